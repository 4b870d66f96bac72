//! Multi-gateway state sync (ours; dstack 0.6 uses WaveKV, ≤ 0.5 a `Gateway.UpdateState` push).
//!
//! Every node keeps the whole cluster state ([`store::Store`]: nodes, instances, certificates) and
//! runs push-pull anti-entropy: each round it sends its state to every known peer with
//! `GatewaySync.UpdateState` and merges the state the peer answers with. Rounds run every
//! `sync.interval` and right after a local change (registration, recycling, key rotation, a new
//! certificate), so a registration reaches the other nodes within one round trip.
//!
//! * **Membership**: the peers are `sync.bootnodes` plus every node record learned. A node that
//!   joins late only needs one reachable bootnode: the first exchange gives it the whole state,
//!   node records included, and the others learn of it from its own record.
//! * **Failure**: peers are called concurrently, each under `sync.timeout`, so a dead node delays
//!   nothing. Its record stops being refreshed; after `sync.node_timeout` it is left out of the
//!   WireGuard servers handed to CVMs. Every node carries every instance as a WireGuard peer and
//!   every CVM has every live node as a server, so traffic reaches a CVM through any survivor.
//! * **Authentication**: both directions are RA-TLS. The caller presents its RA-TLS client
//!   certificate and the callee ([`SyncService`]) requires its attested app id to be
//!   `sync.gateway_app_id`; the caller verifies the callee's certificate the same way
//!   ([`SameAppServerVerifier`]) before sending anything (the state holds certificate keys).

pub mod persist;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use dstack_ra_tls::tls::RaTlsVerifierConfig;
use dstack_ra_tls::{AttestationVerifier, RaTlsServerVerifier, RevocationSet};
use dstack_rpc::gateway::{GatewayState, GatewaySyncClient, GatewaySyncRpc};
use dstack_rpc::{CallContext, Client, RpcError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;
use tracing::{debug, warn};

use crate::registration::{IdentityProvider, Registrar};

/// Sync setup errors.
#[derive(Debug, Error)]
pub enum SyncError {
    /// Bad configuration.
    #[error("sync config: {0}")]
    Config(String),
    /// TLS setup.
    #[error("sync tls: {0}")]
    Tls(String),
}

/// Serves `GatewaySync.UpdateState` to attested peers.
pub struct SyncService {
    registrar: Arc<Registrar>,
    identity: Box<dyn IdentityProvider>,
    gateway_app_id: String,
}

impl std::fmt::Debug for SyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncService")
            .field("gateway_app_id", &self.gateway_app_id)
            .finish_non_exhaustive()
    }
}

impl SyncService {
    /// Peers must prove (through `identity`) the app id `gateway_app_id` (hex).
    pub fn new(
        registrar: Arc<Registrar>,
        identity: Box<dyn IdentityProvider>,
        gateway_app_id: &str,
    ) -> Result<Self, SyncError> {
        let id = gateway_app_id.trim().to_ascii_lowercase();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SyncError::Config(format!(
                "gateway_app_id {gateway_app_id:?} must be a hex app id"
            )));
        }
        Ok(Self {
            registrar,
            identity,
            gateway_app_id: id,
        })
    }
}

impl GatewaySyncRpc for SyncService {
    async fn update_state(&self, ctx: &CallContext, req: GatewayState) -> Result<GatewayState, RpcError> {
        let peer = self
            .identity
            .identify(ctx)
            .await
            .map_err(|e| RpcError::handler(format!("sync refused: {e}")))?;
        if !peer.app_id.eq_ignore_ascii_case(&self.gateway_app_id) {
            warn!(app_id = %peer.app_id, "sync refused: not a gateway of this cluster");
            return Err(RpcError::handler(format!(
                "sync refused: app {} is not the gateway app",
                peer.app_id
            )));
        }
        self.registrar
            .merge_remote(&req)
            .map_err(|e| RpcError::handler(format!("applying state: {e}")))?;
        Ok(self.registrar.snapshot())
    }
}

/// Verifies a peer gateway's server certificate: RA-TLS (self-signed with a quote, or chained to
/// `roots`), attestation verified, attested app id equal to the cluster's gateway app id.
/// With a KMS revocation list ([`SameAppServerVerifier::with_revocations`]), a peer whose chain it covers is
/// refused too (the same check `RegisterCvm` and the sync server apply to their callers).
#[derive(Debug)]
pub struct SameAppServerVerifier {
    inner: Arc<RaTlsServerVerifier>,
    attestation: Arc<AttestationVerifier>,
    app_id: Vec<u8>,
    revocations: Option<Arc<RevocationSet>>,
}

impl SameAppServerVerifier {
    /// A verifier accepting only attested servers of app `app_id_hex`.
    pub fn new(
        attestation: Arc<AttestationVerifier>,
        roots: Vec<CertificateDer<'static>>,
        app_id_hex: &str,
    ) -> Result<Arc<Self>, SyncError> {
        Self::with_revocations(attestation, roots, app_id_hex, None)
    }

    /// [`SameAppServerVerifier::new`] that also refuses peers whose chain the KMS list in `set` covers.
    pub fn with_revocations(
        attestation: Arc<AttestationVerifier>,
        roots: Vec<CertificateDer<'static>>,
        app_id_hex: &str,
        revocations: Option<Arc<RevocationSet>>,
    ) -> Result<Arc<Self>, SyncError> {
        let app_id = hex::decode(app_id_hex.trim()).map_err(|e| SyncError::Config(format!("gateway_app_id: {e}")))?;
        let inner = RaTlsServerVerifier::new(
            RaTlsVerifierConfig {
                roots,
                accept_self_signed: true,
                require_attestation: true,
            },
            attestation.clone(),
        )
        .map_err(|e| SyncError::Tls(e.to_string()))?;
        Ok(Arc::new(Self {
            inner,
            attestation,
            app_id,
            revocations,
        }))
    }
}

impl ServerCertVerifier for SameAppServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(set) = &self.revocations {
            let chain = std::iter::once(end_entity).chain(intermediates).map(|c| c.as_ref());
            set.check_chain(chain, now.as_secs())
                .map_err(|e| rustls::Error::General(format!("peer gateway: {e}")))?;
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        // Just verified, so normally cached; verify again otherwise.
        let id = match self.attestation.cached(end_entity) {
            Some(id) => Some(id),
            None => self
                .attestation
                .verify_cert(end_entity, now.as_secs())
                .map_err(|e| rustls::Error::General(e.to_string()))?,
        };
        match id {
            Some(id) if id.app_id == self.app_id => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "peer gateway attests app {}, expected {}",
                hex::encode(&id.app_id),
                hex::encode(&self.app_id)
            ))),
            None => Err(rustls::Error::General(
                "peer gateway certificate has no attestation".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS client config for talking to peers: our RA-TLS certificate as client certificate, the
/// peer checked by [`SameAppServerVerifier`].
pub fn client_tls(
    verifier: Arc<SameAppServerVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, SyncError> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| SyncError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| SyncError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// [`client_tls`] with the client certificate chosen per handshake by `resolver` (a renewed
/// identity, e.g. [`crate::rpc_identity::LiveIdentity`]).
pub fn client_tls_with_resolver(
    verifier: Arc<SameAppServerVerifier>,
    resolver: Arc<dyn rustls::client::ResolvesClientCert>,
) -> Result<Arc<rustls::ClientConfig>, SyncError> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| SyncError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    Ok(Arc::new(cfg))
}

/// Drives the anti-entropy rounds of one node.
#[derive(Clone)]
pub struct Syncer {
    registrar: Arc<Registrar>,
    tls: Arc<rustls::ClientConfig>,
    bootnodes: Vec<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("bootnodes", &self.bootnodes)
            .finish_non_exhaustive()
    }
}

/// What one round achieved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// Peers that answered.
    pub reached: Vec<String>,
    /// Peers that did not, with the error.
    pub failed: Vec<(String, String)>,
}

fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_owned()
}

impl Syncer {
    /// A syncer for `registrar` using `tls` (see [`client_tls`]).
    pub fn new(registrar: Arc<Registrar>, tls: Arc<rustls::ClientConfig>) -> Self {
        let cfg = &registrar.config.core.sync;
        let bootnodes = cfg.bootnodes.iter().map(|u| normalize(u)).collect();
        let timeout = cfg.timeout;
        Self {
            registrar,
            tls,
            bootnodes,
            timeout,
        }
    }

    /// Everyone to talk to: bootnodes and known nodes, except ourselves.
    pub fn targets(&self) -> Vec<String> {
        let me = self.registrar.node_id();
        let my_url = normalize(&self.registrar.my_url());
        let mut urls: Vec<String> = self.bootnodes.clone();
        let store = self.registrar.store.lock().unwrap_or_else(|e| e.into_inner());
        urls.extend(
            store
                .nodes
                .values()
                .filter(|n| n.id != me && !n.url.is_empty())
                .map(|n| normalize(&n.url)),
        );
        drop(store);
        urls.retain(|u| *u != my_url);
        urls.sort();
        urls.dedup();
        urls
    }

    async fn exchange(&self, url: &str, state: &GatewayState) -> Result<GatewayState, String> {
        let client = Client::new(&format!("{url}/prpc"))
            .map_err(|e| e.to_string())?
            .with_tls(self.tls.clone())
            .with_connect_timeout(self.timeout)
            .with_timeout(self.timeout);
        GatewaySyncClient::new(client)
            .update_state(state.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// One round with every target, concurrently.
    pub async fn round(&self) -> RoundReport {
        let state = self.registrar.snapshot();
        let targets = self.targets();
        let calls = targets.iter().map(|url| {
            let state = &state;
            async move { (url.clone(), self.exchange(url, state).await) }
        });
        let mut report = RoundReport::default();
        for (url, res) in join_all(calls).await {
            match res {
                Ok(theirs) => {
                    if let Err(e) = self.registrar.merge_remote(&theirs) {
                        warn!("sync: applying state from {url}: {e}");
                    }
                    report.reached.push(url);
                }
                Err(e) => {
                    debug!("sync: {url}: {e}");
                    report.failed.push((url, e));
                }
            }
        }
        report
    }

    /// Run rounds forever: every `interval`, and soon after a local change.
    pub async fn run(self, interval: Duration) {
        let mut failing = std::collections::HashSet::new();
        loop {
            let report = self.round().await;
            for (url, e) in &report.failed {
                if failing.insert(url.clone()) {
                    warn!("sync: peer {url} unreachable: {e}");
                }
            }
            for url in &report.reached {
                if failing.remove(url) {
                    tracing::info!("sync: peer {url} reachable again");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.registrar.changed.notified() => {
                    // Coalesce a burst of registrations into one round.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Await futures concurrently on the current task (no extra dependency for a handful of peers).
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in pending.iter_mut().enumerate() {
            if out.get(i).is_some_and(Option::is_none) {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        if let Some(slot) = out.get_mut(i) {
                            *slot = Some(v);
                        }
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
