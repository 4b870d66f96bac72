//! `[core.rpc]` + `[core.kms]` put together: the RPC server's identity (PEM files, self-signed, or
//! from the guest agent with renewal), the roots whose client chains are accepted (the KMS root),
//! and the KMS revocation list those chains are checked against (kept current by a refresher).
//! `main.rs` and the tests build the RegisterCvm / GatewaySync endpoint from this one place.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dstack_ra_tls::{AttestationVerifier, CrlRefresher, RevocationSet};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::attest::{AttestError, RaTlsIdentity, ServerIdentity, kms_crl_refresher, server_config_with_resolver};
use crate::config::CoreConfig;
use crate::rpc_identity::{AgentIdentity, IdentitySource, LiveIdentity};
use crate::sync::{SameAppServerVerifier, SyncError, client_tls_with_resolver};

/// How often a failed agent renewal is retried (bounded by the time left).
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// The RPC endpoint's TLS material and its background upkeep.
pub struct RpcTls {
    /// The identity presented as server and as sync client (renewed in place in agent mode).
    pub live: Arc<LiveIdentity>,
    /// Server config for `dstack_rpc::serve_tls`.
    pub server: Arc<rustls::ServerConfig>,
    /// Roots whose chains are accepted from clients and peers (besides self-signed RA-TLS).
    pub roots: Vec<CertificateDer<'static>>,
    /// The KMS revocation list, when `[core.kms] url` is set.
    pub revocations: Option<Arc<RevocationSet>>,
    renewal: Option<(AgentIdentity, u64)>,
    refresher: Option<CrlRefresher>,
}

impl std::fmt::Debug for RpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcTls")
            .field("roots", &self.roots.len())
            .field("agent_renewal", &self.renewal.is_some())
            .field("crl", &self.refresher)
            .finish_non_exhaustive()
    }
}

/// The first certificate of a PEM file.
fn load_root(path: &Path) -> Result<CertificateDer<'static>, AttestError> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| AttestError::Config(format!("core.kms.root_ca {}: {e}", path.display())))?
        .next()
        .ok_or_else(|| AttestError::Config(format!("core.kms.root_ca {}: no certificate", path.display())))?
        .map_err(|e| AttestError::Config(format!("core.kms.root_ca {}: {e}", path.display())))
}

impl RpcTls {
    /// Builds everything from `core` (contacting the guest agent in agent mode). Nothing runs in the
    /// background until [`RpcTls::spawn_background`].
    pub async fn from_config(core: &CoreConfig) -> Result<Self, AttestError> {
        let rpc = &core.rpc;
        let mut agent_root = None;
        let mut renewal = None;
        let identity = match (&rpc.cert_chain, &rpc.cert_key, &rpc.identity) {
            (Some(c), Some(k), _) => ServerIdentity::load(c, k)?,
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(AttestError::Config(
                    "core.rpc: cert_chain and cert_key go together".into(),
                ));
            }
            (None, None, IdentitySource::SelfSigned) => {
                tracing::warn!("core.rpc: no cert_chain/cert_key; using a self-signed certificate");
                ServerIdentity::self_signed(&core.rpc_domain)?
            }
            (None, None, IdentitySource::Agent(socket)) => {
                if core.rpc_domain.is_empty() {
                    return Err(AttestError::Config(
                        "core.rpc.identity = agent:… needs core.rpc_domain (the certificate's name)".into(),
                    ));
                }
                let agent = AgentIdentity::new(socket, &core.rpc_domain, rpc.identity_validity);
                let (id, not_after) = agent.fetch().await?;
                // The chain's last certificate, when self-issued, is the KMS root the agent's keys
                // come from: other CVMs of this KMS present chains to it.
                agent_root = id
                    .chain
                    .last()
                    .filter(|c| dstack_ra_tls::parse_cert(c).is_ok_and(|p| p.self_issued) && id.chain.len() > 1)
                    .cloned();
                tracing::info!(
                    socket = %socket.display(),
                    not_after,
                    chain = id.chain.len(),
                    "core.rpc: certificate from the guest agent"
                );
                renewal = Some((agent, not_after));
                id
            }
        };
        let live = LiveIdentity::new(identity)?;

        let kms = &core.kms;
        let kms_root = match &kms.root_ca {
            Some(path) => Some(load_root(path)?),
            None => agent_root.clone(),
        };
        let mut roots: Vec<CertificateDer<'static>> = kms_root.iter().cloned().collect();
        if let Some(r) = agent_root
            && !roots.contains(&r)
        {
            roots.push(r);
        }
        let (revocations, refresher) = match (kms.url.trim(), &kms_root) {
            ("", Some(_)) => {
                tracing::warn!("core.kms: no url; KMS-issued client chains are accepted without a revocation list");
                (None, None)
            }
            ("", None) => (None, None),
            (_, None) => {
                return Err(AttestError::Config(
                    "core.kms.url needs core.kms.root_ca (or an agent-issued identity) to verify the KMS and its list"
                        .into(),
                ));
            }
            (url, Some(root)) => {
                let set = RevocationSet::new();
                let r = kms_crl_refresher(set.clone(), url, root, kms.crl_required, kms.crl_refresh)?;
                (Some(set), Some(r))
            }
        };
        let server = server_config_with_resolver(live.clone(), roots.clone())?;
        Ok(Self {
            live,
            server,
            roots,
            revocations,
            renewal,
            refresher,
        })
    }

    /// Who a caller is: its RA-TLS certificate, refused when the KMS list covers its chain.
    pub fn identity(&self, verifier: Arc<AttestationVerifier>) -> RaTlsIdentity {
        let id = RaTlsIdentity::new(verifier);
        match &self.revocations {
            Some(set) => id.with_revocations(set.clone()),
            None => id,
        }
    }

    /// The sync client config: our live identity as client certificate, peers verified as the
    /// gateway app (self-signed RA-TLS or chained to [`RpcTls::roots`]) and, with a KMS list, not revoked.
    pub fn sync_client(
        &self,
        verifier: Arc<AttestationVerifier>,
        gateway_app_id: &str,
    ) -> Result<Arc<rustls::ClientConfig>, SyncError> {
        let peer = SameAppServerVerifier::with_revocations(
            verifier,
            self.roots.clone(),
            gateway_app_id,
            self.revocations.clone(),
        )?;
        client_tls_with_resolver(peer, self.live.clone())
    }

    /// Starts the agent renewal and the CRL refresher (each at most once) on the current runtime.
    pub fn spawn_background(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some((agent, not_after)) = self.renewal.take() {
            tasks.push(tokio::spawn(agent.run_renewal(
                self.live.clone(),
                not_after,
                RENEW_RETRY,
            )));
        }
        if let Some(r) = self.refresher.take() {
            tracing::info!(interval = ?r.interval(), "KMS revocation list refresher started");
            tasks.push(r.spawn());
        }
        tasks
    }
}
