//! RA-TLS for the registration RPC: who a registering CVM is, and the TLS server config that lets
//! it present its certificate.
//!
//! Client certificates are optional at the TLS layer (as in the KMS): `Info` is public, and a
//! refused `RegisterCvm` should reach the caller with its reason rather than a bare TLS alert. The
//! verifier below only lets through certificates that are self-issued and carry a TDX quote (or
//! chain to a configured root); rustls checks the handshake signature, proving possession of the
//! key. The quote, key binding and event-log replay are checked by [`RaTlsIdentity`] when a
//! handler asks who is calling.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dstack_measurements::sim::SimRootPin;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, DeferredAttestationClientVerifier};
use dstack_rpc::{BoxFuture, CallContext};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::config::AttestationConfig;
use crate::registration::{IdentityError, IdentityProvider, PeerIdentity};

/// Setting up attestation or the RPC TLS endpoint failed.
#[derive(Debug, Error)]
pub enum AttestError {
    /// `[core.attestation]` is inconsistent or a pin file is unreadable.
    #[error("attestation config: {0}")]
    Config(String),
    /// Certificates or keys could not be loaded.
    #[error("rpc tls: {0}")]
    Tls(String),
}

/// The verifier `[core.attestation]` describes.
pub fn build_verifier(cfg: &AttestationConfig) -> Result<Arc<AttestationVerifier>, AttestError> {
    let mut pins = Vec::new();
    for entry in &cfg.simulated_roots {
        let data = if entry.len() == 64 && entry.bytes().all(|b| b.is_ascii_hexdigit()) {
            entry.as_bytes().to_vec()
        } else {
            std::fs::read(Path::new(entry))
                .map_err(|e| AttestError::Config(format!("simulated_roots: reading {entry}: {e}")))?
        };
        pins.push(SimRootPin::parse(&data).map_err(|e| AttestError::Config(format!("simulated_roots {entry}: {e}")))?);
    }
    if cfg.allow_simulated {
        tracing::warn!("attestation: SIMULATED quotes are accepted (development only)");
        if pins.is_empty() {
            return Err(AttestError::Config(
                "allow_simulated needs at least one pinned simulator root in simulated_roots".into(),
            ));
        }
    }
    Ok(Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: cfg.allow_simulated,
        simulated_roots: pins,
        allow_debug: cfg.allow_debug,
        ..Default::default()
    })))
}

/// [`IdentityProvider`] over the caller's RA-TLS client certificate.
#[derive(Debug, Clone)]
pub struct RaTlsIdentity {
    verifier: Arc<AttestationVerifier>,
}

impl RaTlsIdentity {
    /// Identify callers with `verifier`.
    pub fn new(verifier: Arc<AttestationVerifier>) -> Self {
        Self { verifier }
    }

    /// The synchronous check behind [`IdentityProvider::identify`].
    pub fn identify_sync(&self, ctx: &CallContext) -> Result<PeerIdentity, IdentityError> {
        // dstack's CVM retries with a quote-carrying certificate on exactly this message.
        let Some(leaf) = ctx.peer_leaf_certificate() else {
            return Err(IdentityError("no attestation provided: no client certificate".into()));
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let id = self
            .verifier
            .verify_cert(leaf, now)
            .map_err(|e| IdentityError(format!("attestation rejected: {e}")))?
            .ok_or_else(|| IdentityError("no attestation provided: client certificate has no quote".into()))?;
        if id.app_id.is_empty() || id.instance_id.is_empty() {
            return Err(IdentityError(
                "attestation rejected: event log has no app-id/instance-id".into(),
            ));
        }
        Ok(PeerIdentity {
            app_id: hex::encode(&id.app_id),
            instance_id: hex::encode(&id.instance_id),
            compose_hash: Some(hex::encode(&id.compose_hash)),
        })
    }
}

impl IdentityProvider for RaTlsIdentity {
    fn identify<'a>(&'a self, ctx: &'a CallContext) -> BoxFuture<'a, Result<PeerIdentity, IdentityError>> {
        // Verification is CPU-bound and cached per certificate; cheap enough inline.
        Box::pin(async move { self.identify_sync(ctx) })
    }
}

/// The RPC server's certificate chain and key.
#[derive(Debug)]
pub struct ServerIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 key.
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// Load PEM files.
    pub fn load(chain: &Path, key: &Path) -> Result<Self, AttestError> {
        use rustls_pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(chain)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| AttestError::Tls(format!("{}: {e}", chain.display())))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| AttestError::Tls(format!("{}: {e}", key.display())))?;
        Ok(Self { chain, key })
    }

    /// A fresh self-signed certificate for `domain` (no attestation; clients must pin it).
    pub fn self_signed(domain: &str) -> Result<Self, AttestError> {
        let name = if domain.is_empty() { "localhost" } else { domain };
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AttestError::Tls(e.to_string()))?;
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .and_then(|p| p.self_signed(&key))
            .map_err(|e| AttestError::Tls(e.to_string()))?;
        Ok(Self {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }
}

/// The rustls server config for the registration RPC.
pub fn server_config(
    id: ServerIdentity,
    client_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, AttestError> {
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| AttestError::Tls(e.to_string()))?
        .with_client_cert_verifier(
            DeferredAttestationClientVerifier::new(client_roots).map_err(|e| AttestError::Tls(e.to_string()))?,
        )
        .with_single_cert(id.chain, id.key)
        .map_err(|e| AttestError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// The registration RPC router: `Gateway` at `/prpc`, also reachable as dstack's legacy `Tproxy.`.
pub fn rpc_router(registrar: Arc<crate::registration::Registrar>) -> dstack_rpc::RpcRouter {
    dstack_rpc::RpcRouter::new("/prpc")
        .service(dstack_rpc::gateway::GatewayServer::from_arc(registrar))
        .alias("Tproxy", "Gateway")
}

/// [`rpc_router`] plus `GatewaySync` for peer nodes.
pub fn rpc_router_with_sync(
    registrar: Arc<crate::registration::Registrar>,
    sync: crate::sync::SyncService,
) -> dstack_rpc::RpcRouter {
    rpc_router(registrar).service(dstack_rpc::gateway::GatewaySyncServer::new(sync))
}
