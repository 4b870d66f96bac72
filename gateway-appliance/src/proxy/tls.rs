//! TLS termination with the wildcard certificate (rustls + ring), reloadable at run time.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Certificate loading errors.
#[derive(Debug, Error)]
pub enum TlsError {
    /// PEM could not be read.
    #[error("reading {what} from {path}: {msg}")]
    Pem {
        /// "certificate chain" or "private key".
        what: &'static str,
        /// File.
        path: String,
        /// Cause.
        msg: String,
    },
    /// rustls refused the configuration.
    #[error("tls config: {0}")]
    Rustls(#[from] rustls::Error),
    /// An unknown entry in `tls_versions`.
    #[error("unknown TLS version {0:?} (use \"1.2\" or \"1.3\")")]
    Version(String),
    /// No certificate loaded yet.
    #[error("no certificate loaded for TLS termination")]
    NoCertificate,
}

/// Server configs for the two terminating modes.
#[derive(Debug)]
struct Configs {
    plain: Arc<ServerConfig>,
    h2: Arc<ServerConfig>,
}

/// Holds the current certificate; swapped atomically on renewal.
#[derive(Debug)]
pub struct TlsTerminator {
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
    current: RwLock<Option<Configs>>,
}

/// Parse `tls_versions` entries.
pub fn protocol_versions(names: &[String]) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
    let mut out = Vec::new();
    for n in names {
        out.push(match n.trim() {
            "1.2" => &rustls::version::TLS12,
            "1.3" => &rustls::version::TLS13,
            other => return Err(TlsError::Version(other.to_owned())),
        });
    }
    if out.is_empty() {
        out.push(&rustls::version::TLS13);
    }
    Ok(out)
}

/// Read a PEM chain and key.
pub fn load_pem(chain: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let err = |what, path: &Path, msg: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        msg,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
        .map_err(|e| err("certificate chain", chain, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("certificate chain", chain, e.to_string()))?;
    if certs.is_empty() {
        return Err(err("certificate chain", chain, "no CERTIFICATE blocks".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err("private key", key, e.to_string()))?;
    Ok((certs, key))
}

impl TlsTerminator {
    /// Without a certificate; terminating connections fail until [`Self::set_certificate`].
    pub fn new(versions: Vec<&'static rustls::SupportedProtocolVersion>) -> Self {
        Self {
            versions,
            current: RwLock::new(None),
        }
    }

    fn build(
        &self,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&self.versions)?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// Install a certificate chain and key.
    pub fn set_certificate(
        &self,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let plain = self.build(certs.clone(), key.clone_key(), &[b"http/1.1"])?;
        let h2 = self.build(certs, key, &[b"h2"])?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Configs { plain, h2 });
        Ok(())
    }

    /// Load (or reload) from PEM files.
    pub fn load_files(&self, chain: &Path, key: &Path) -> Result<(), TlsError> {
        let (certs, key) = load_pem(chain, key)?;
        self.set_certificate(certs, key)
    }

    /// Whether a certificate is installed.
    pub fn has_certificate(&self) -> bool {
        self.current.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The config for a mode (`h2` = advertise only ALPN h2).
    pub fn config(&self, h2: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        let c = guard.as_ref().ok_or(TlsError::NoCertificate)?;
        Ok(if h2 { c.h2.clone() } else { c.plain.clone() })
    }
}
