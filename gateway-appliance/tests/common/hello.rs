//! Real ClientHellos, produced by rustls (an independent TLS stack) rather than hand-built bytes.
use std::sync::Arc;

use rustls::pki_types::ServerName;

/// The first flight rustls sends for `sni` (a DNS name) with `alpn`, as raw TLS records. No server is
/// involved, so an empty root store is fine: verification would only happen after the hello.
pub fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}
