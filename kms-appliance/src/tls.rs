//! The KMS's TLS server configuration (rustls, ring).
//!
//! Server certificate: `rpc.crt` followed by the root CA certificate.
//!
//! Client certificates are optional at the TLS layer (dstack: `[rpc.tls.mutual] mandatory = false`), because
//! `GetMeta`, `GetTempCaCert` and `GetAppEnvEncryptPubKey` are public. A presented certificate is accepted
//! when it chains to the temp CA (how dstack CVMs mint their client certificates) or to the root CA (an RA-TLS
//! app certificate the KMS issued with `SignCert`), or when it is a self-signed certificate carrying a TDX
//! quote; rustls checks the handshake signature, proving possession of the key. Chaining grants nothing by
//! itself: every method that needs an attested caller takes the identity from the certificate's own quote, and
//! refuses a chain the KMS's revocation list covers.
//! The attestation itself (quote, key binding, event-log replay) is verified by the handler of each method
//! that needs an attested caller, with the same [`dstack_ra_tls::AttestationVerifier`], so that a refusal
//! reaches the caller with its reason instead of a bare TLS alert.

use std::sync::Arc;

use dstack_ra_tls::DeferredAttestationClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::KmsError;
use crate::store::KeyMaterial;

fn pem_cert(pem: &str) -> Result<CertificateDer<'static>, KmsError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| KmsError::Tls(format!("certificate PEM: {e}")))
}

/// The rustls server configuration for the KMS RPC.
pub fn server_config(keys: &KeyMaterial) -> Result<Arc<rustls::ServerConfig>, KmsError> {
    let verifier =
        DeferredAttestationClientVerifier::new(vec![keys.tmp_ca.cert_der().clone(), keys.root_ca.cert_der().clone()])
            .map_err(|e| KmsError::Tls(format!("client verifier: {e}")))?;
    let chain = vec![pem_cert(&keys.rpc_cert_pem)?, keys.root_ca.cert_der().clone()];
    let key_der = rcgen::KeyPair::from_pem(&keys.rpc_key_pem)
        .map_err(|e| KmsError::Tls(format!("rpc.key: {e}")))?
        .serialize_der();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| KmsError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}
