//! RA-TLS for the registration RPC: who a registering CVM is, and the TLS server config that lets
//! it present its certificate.
//!
//! Client certificates are optional at the TLS layer (as in the KMS): `Info` is public, and a
//! refused `RegisterCvm` should reach the caller with its reason rather than a bare TLS alert. The
//! verifier below only lets through certificates that are self-issued and carry a TDX quote (or
//! chain to a configured root); rustls checks the handshake signature, proving possession of the
//! key. The quote, key binding and event-log replay are checked by [`RaTlsIdentity`] when a
//! handler asks who is calling.
//!
//! Revocation: given a [`RevocationSet`] ([`RaTlsIdentity::with_revocations`], kept current by
//! [`kms_crl_refresher`] from the KMS's `Revocation.GetCrl`), a caller presenting a certificate chain
//! issued under the KMS root (an app certificate from `SignCert`) is refused when the KMS's list
//! covers it, with the serial in the reason. Self-signed RA-TLS certificates are outside the KMS's
//! list. [`crate::rpc_tls::RpcTls`] wires this from `[core.kms]` (the KMS root as a client root of
//! [`server_config`], the set attached, the refresher spawned).

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dstack_measurements::sim::SimRootPin;
use dstack_ra_tls::{
    AttestationPolicy, AttestationVerifier, CrlRefresher, DeferredAttestationClientVerifier, RevocationSet,
};
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
    revocations: Option<Arc<RevocationSet>>,
}

impl RaTlsIdentity {
    /// Identify callers with `verifier`.
    pub fn new(verifier: Arc<AttestationVerifier>) -> Self {
        Self {
            verifier,
            revocations: None,
        }
    }

    /// Also refuse callers whose certificate chain a KMS revocation list in `set` covers.
    pub fn with_revocations(mut self, set: Arc<RevocationSet>) -> Self {
        self.revocations = Some(set);
        self
    }

    /// The synchronous check behind [`IdentityProvider::identify`].
    pub fn identify_sync(&self, ctx: &CallContext) -> Result<PeerIdentity, IdentityError> {
        // dstack's CVM retries with a quote-carrying certificate on exactly this message.
        let Some(leaf) = ctx.peer_leaf_certificate() else {
            return Err(IdentityError("no attestation provided: no client certificate".into()));
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(set) = &self.revocations {
            let chain = ctx.peer_certificates.iter().flatten().map(|c| c.as_ref());
            set.check_chain(chain, now)
                .map_err(|e| IdentityError(format!("attestation rejected: {e}")))?;
        }
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

/// A refresher keeping the KMS's revocation list (root `kms_root`, DER) in `set`, fetched from
/// `kms_url` (`https://host:port`, `/prpc` appended) every `interval` (bounded by
/// [`dstack_ra_tls::crl`]). The KMS certificate must chain to `kms_root`; the list is verified
/// with it too. `required`: refuse KMS-issued chains until a first list arrived.
pub fn kms_crl_refresher(
    set: Arc<RevocationSet>,
    kms_url: &str,
    kms_root: &[u8],
    required: bool,
    interval: std::time::Duration,
) -> Result<CrlRefresher, AttestError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(kms_root.to_vec()))
        .map_err(|e| AttestError::Config(format!("KMS root CA: {e}")))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| AttestError::Config(format!("KMS root CA: {e}")))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AttestError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let base = kms_url.trim_end_matches('/');
    let url = if base.ends_with("/prpc") {
        base.to_owned()
    } else {
        format!("{base}/prpc")
    };
    let client = dstack_rpc::Client::new(&url)
        .map_err(|e| AttestError::Config(format!("KMS url {url:?}: {e}")))?
        .with_tls(Arc::new(tls))
        .with_timeout(std::time::Duration::from_secs(30));
    let client = Arc::new(dstack_rpc::kms::RevocationClient::new(client));
    let source = move || {
        let client = Arc::clone(&client);
        async move {
            client
                .get_crl()
                .await
                .map(|r| r.crl)
                .map_err(|e| format!("GetCrl: {e}"))
        }
    };
    CrlRefresher::new(set, kms_root, required, source, interval).map_err(|e| AttestError::Config(e.to_string()))
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

/// The rustls server config for the registration RPC. Client chains under `client_roots` (a KMS
/// root) are accepted at the TLS layer besides self-signed RA-TLS certificates.
pub fn server_config(
    id: ServerIdentity,
    client_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, AttestError> {
    server_config_with_resolver(crate::rpc_identity::LiveIdentity::new(id)?, client_roots)
}

/// [`server_config`] with the certificate chosen per handshake by `resolver` (a renewed identity).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    client_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, AttestError> {
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| AttestError::Tls(e.to_string()))?
        .with_client_cert_verifier(
            DeferredAttestationClientVerifier::new(client_roots).map_err(|e| AttestError::Tls(e.to_string()))?,
        )
        .with_cert_resolver(resolver);
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

#[cfg(test)]
mod revocation_tests {
    use dstack_ra_tls::revocation::{CrlContent, RevokedSerial, build_crl};
    use dstack_ra_tls::{CaCert, CertRequest};
    use rcgen::KeyPair;

    use super::*;

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn ctx(chain: Vec<CertificateDer<'static>>) -> CallContext {
        let mut c = CallContext::local();
        c.peer_certificates = Some(chain);
        c
    }

    /// A KMS root, an app CA under it, a list revoking serial 0dead0, and a chain maker (leaf, app CA) by serial.
    fn revoked_fixture() -> (
        CaCert,
        Arc<RevocationSet>,
        impl Fn(&[u8]) -> Vec<CertificateDer<'static>>,
    ) {
        let root = CaCert::self_signed(
            &CertRequest {
                subject: "Dstack KMS CA".into(),
                ca_level: Some(1),
                ..Default::default()
            },
            key(),
        )
        .unwrap();
        let app_ca = CaCert::issued_by(
            &CertRequest {
                subject: "Dstack App CA".into(),
                ca_level: Some(0),
                ..Default::default()
            },
            key(),
            &root,
        )
        .unwrap();
        let leaf_req = CertRequest {
            subject: "dstack-guest-agent".into(),
            usage_client_auth: true,
            usage_server_auth: true,
            alt_names: vec!["gateway-b.example".into()],
            app_id: Some(vec![0x11; 20]),
            ..Default::default()
        };
        let chain = move |serial: &[u8]| {
            let leaf = app_ca.issue_with_serial(&leaf_req, &key(), serial).unwrap();
            vec![leaf.der().clone(), app_ca.cert_der().clone()]
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let crl = build_crl(
            &root,
            &CrlContent {
                crl_number: 1,
                this_update: now - 10,
                next_update: now + 3600,
                serials: vec![RevokedSerial {
                    serial: vec![0x0d, 0xea, 0xd0],
                    revoked_at: now - 10,
                }],
                apps: Vec::new(),
            },
        )
        .unwrap();
        let set = RevocationSet::new();
        set.add_issuer(root.cert_der(), true).unwrap();
        let mut tampered = crl.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(set.update_der(&tampered, now).is_err(), "a tampered list is refused");
        set.update_der(&crl, now).unwrap();
        (root, set, chain)
    }

    #[test]
    fn revoked_kms_issued_client_certificate_is_refused_with_its_serial() {
        let (_root, set, chain) = revoked_fixture();
        let id =
            RaTlsIdentity::new(Arc::new(AttestationVerifier::new(AttestationPolicy::default()))).with_revocations(set);
        // An unlisted serial passes the revocation check and reaches the attestation check (these test
        // certificates carry no quote).
        let e = id
            .identify_sync(&ctx(chain(&[0x0d, 0xea, 0xd1])))
            .map(|_| ())
            .unwrap_err()
            .0;
        assert!(!e.contains("revoked") && e.contains("no quote"), "{e}");
        let e = id
            .identify_sync(&ctx(chain(&[0x0d, 0xea, 0xd0])))
            .map(|_| ())
            .unwrap_err()
            .0;
        assert!(e.contains("revoked") && e.contains("0dead0"), "{e}");
    }

    #[test]
    fn sync_client_refuses_a_peer_gateway_with_a_revoked_chain() {
        use rustls::client::danger::ServerCertVerifier;
        let (root, set, chain) = revoked_fixture();
        let attestation = Arc::new(AttestationVerifier::new(AttestationPolicy::default()));
        let roots = vec![root.cert_der().clone()];
        let peer =
            crate::sync::SameAppServerVerifier::with_revocations(attestation.clone(), roots.clone(), "11", Some(set))
                .unwrap();
        let without = crate::sync::SameAppServerVerifier::new(attestation, roots, "11").unwrap();
        let name = rustls_pki_types::ServerName::try_from("gateway-b.example").unwrap();
        let verify = |v: &crate::sync::SameAppServerVerifier, serial: &[u8]| {
            let c = chain(serial);
            v.verify_server_cert(&c[0], &c[1..], &name, &[], rustls_pki_types::UnixTime::now())
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let e = verify(&peer, &[0x0d, 0xea, 0xd0]);
        assert!(e.contains("revoked") && e.contains("0dead0"), "{e}");
        // Unlisted (or no list): the revocation check passes and attestation refuses these quote-less certificates.
        for e in [
            verify(&peer, &[0x0d, 0xea, 0xd1]),
            verify(&without, &[0x0d, 0xea, 0xd0]),
        ] {
            assert!(!e.contains("revoked") && e.contains("MissingAttestation"), "{e}");
        }
    }
}
