//! Wiring: configuration → TEE, verifier, policy, key store → the onboarding server (until keys exist) → the
//! KMS RPC over HTTPS (`/prpc`, `KMS.` prefix accepted).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dstack_measurements::sim::SimRootPin;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, StaticCollateral};
use dstack_rpc::RpcRouter;
use dstack_rpc::kms::{AdminServer, KmsServer, OnboardServer, RevocationServer};
use dstack_tee::{RUNTIME_EVENT_LOG_FILE, TeeConfig, TeeError, TeeRequest, detect, tdx::TdxPaths};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::KmsError;
use crate::admin_service::AdminService;
use crate::bootstrap::{OnboardService, SelfTee, bootstrap};
use crate::config::{AttestationConfig, KmsConfig};
use crate::image::ImageVerifier;
use crate::onboard::OnboardContext;
use crate::policy::AuthApi;
use crate::replication::{SyncTask, load_source, spawn_sync};
use crate::revocation::{CrlService, RevocationStore};
use crate::service::KmsService;
use crate::store::KeyStore;

/// Resolves `[core] tee`: `none` → no TEE; `auto` → TDX or the simulated module named on the kernel command
/// line, else no TEE (with a warning); anything else → that TEE or an error.
pub fn resolve_tee(selector: &str) -> Result<Option<SelfTee>, KmsError> {
    let wrap = |tee| {
        Some(SelfTee {
            tee,
            runtime_log: RUNTIME_EVENT_LOG_FILE.into(),
        })
    };
    match selector {
        "none" => Ok(None),
        "auto" | "" => match TeeConfig::system().and_then(|c| detect(&c)) {
            Ok(tee) => Ok(wrap(tee)),
            Err(e @ (TeeError::NoTee(_) | TeeError::Io { .. })) => {
                tracing::warn!("no TEE for the KMS itself ({e}); keys will not be attested");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        },
        other => {
            let cfg = TeeConfig {
                tdx_paths: TdxPaths::system(),
                request: TeeRequest::parse(other)?,
            };
            Ok(wrap(detect(&cfg)?))
        }
    }
}

/// This KMS's own vm_config, sent to the source KMS when onboarding: `[core.onboard] vm_config_file` when set;
/// otherwise, inside a CVM (`tee = "agent:<socket>"`), what the guest agent reports (`GetQuote.vm_config`, the
/// VmConfig of the CVM's sys-config); otherwise none.
pub async fn own_vm_config(config: &KmsConfig) -> Result<String, KmsError> {
    let onboard = &config.core.onboard;
    if onboard
        .vm_config_file
        .as_ref()
        .is_some_and(|p| !p.as_os_str().is_empty())
    {
        return onboard.load_vm_config();
    }
    // Only the agent selector names an agent; the others ("none", "auto", …) have no vm_config to offer.
    if !config.core.tee.starts_with("agent:") {
        return Ok(String::new());
    }
    let TeeRequest::Agent(socket) = TeeRequest::parse(&config.core.tee)? else {
        return Ok(String::new());
    };
    let agent = dstack_rpc::agent::DstackGuestClient::new(dstack_rpc::Client::unix(&socket, ""));
    let resp = agent
        .get_quote(dstack_rpc::agent::RawQuoteArgs {
            report_data: vec![0; 64],
        })
        .await
        .map_err(|e| KmsError::Config(format!("vm_config from the guest agent {}: {e}", socket.display())))?;
    if resp.vm_config.trim().is_empty() {
        tracing::warn!(socket = %socket.display(), "the guest agent reports no vm_config; onboarding sends none");
    }
    Ok(resp.vm_config)
}

/// Builds the client-attestation verifier from `[core.attestation]`.
pub fn build_verifier(cfg: &AttestationConfig) -> Result<Arc<AttestationVerifier>, KmsError> {
    let mut pins = Vec::new();
    for entry in &cfg.simulated_roots {
        let data = if entry.len() == 64 && entry.bytes().all(|b| b.is_ascii_hexdigit()) {
            entry.as_bytes().to_vec()
        } else {
            std::fs::read(Path::new(entry))
                .map_err(|e| KmsError::Config(format!("simulated_roots: reading {entry}: {e}")))?
        };
        pins.push(SimRootPin::parse(&data).map_err(|e| KmsError::Config(format!("simulated_roots {entry}: {e}")))?);
    }
    if cfg.allow_simulated {
        tracing::warn!("attestation: SIMULATED quotes are accepted (development only)");
        if pins.is_empty() {
            return Err(KmsError::Config(
                "allow_simulated needs at least one pinned simulator root in simulated_roots".into(),
            ));
        }
    }
    let collateral = match &cfg.collateral_file {
        Some(path) => {
            let data = std::fs::read(path)
                .map_err(|e| KmsError::Config(format!("collateral_file {}: {e}", path.display())))?;
            let c: dcap_qvl::QuoteCollateralV3 = serde_json::from_slice(&data)
                .map_err(|e| KmsError::Config(format!("collateral_file {}: {e}", path.display())))?;
            Some(Arc::new(StaticCollateral(c)) as Arc<dyn dstack_ra_tls::CollateralProvider>)
        }
        None => None,
    };
    Ok(Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: cfg.allow_simulated,
        simulated_roots: pins,
        allow_debug: cfg.allow_debug,
        collateral,
        required_usage: None,
        cache_ttl: None,
    })))
}

/// A configured KMS (not yet serving).
#[derive(Debug)]
pub struct Kms {
    pub config: KmsConfig,
    pub store: KeyStore,
    pub tee: Option<SelfTee>,
    verifier: Arc<AttestationVerifier>,
    auth: AuthApi,
    image: Arc<ImageVerifier>,
    revocations: Arc<RevocationStore>,
}

/// A running plain-HTTP server (the `Admin` service).
#[derive(Debug)]
pub struct AdminHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminHandle {
    pub async fn shutdown(mut self) -> Result<(), KmsError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| KmsError::Io(std::io::Error::other(e.to_string())))??;
        Ok(())
    }
}

/// A running KMS RPC server.
#[derive(Debug)]
pub struct KmsHandle {
    pub addr: SocketAddr,
    pub service: KmsService,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    /// The replica's revocation pull (stops with the handle).
    _sync: Option<SyncTask>,
}

impl KmsHandle {
    /// Stops accepting, drains connections and waits for the server to end.
    pub async fn shutdown(mut self) -> Result<(), KmsError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| KmsError::Io(std::io::Error::other(e.to_string())))??;
        Ok(())
    }

    /// Waits until the server ends (it ends only on shutdown or a fatal error).
    pub async fn wait(self) -> Result<(), KmsError> {
        let _keep_running = self.stop;
        self.task
            .await
            .map_err(|e| KmsError::Io(std::io::Error::other(e.to_string())))??;
        Ok(())
    }
}

impl Kms {
    /// A KMS whose own TEE comes from `[core] tee`.
    pub fn new(config: KmsConfig) -> Result<Self, KmsError> {
        let tee = resolve_tee(&config.core.tee)?;
        Self::with_tee(config, tee)
    }

    /// A KMS with an explicit own TEE (tests pass the simulated module here).
    pub fn with_tee(config: KmsConfig, tee: Option<SelfTee>) -> Result<Self, KmsError> {
        let verifier = build_verifier(&config.core.attestation)?;
        let auth = AuthApi::from_config(&config.core.auth_api).map_err(|e| KmsError::Config(e.to_string()))?;
        if auth.is_dev() {
            tracing::warn!(
                "!!! auth_api type = \"dev\": EVERY attested CVM receives its keys and any KMS the root keys. \
                 Never use this in production !!!"
            );
        }
        let image = Arc::new(ImageVerifier::new(&config.core.image.cache_dir));
        if config.core.image.verify {
            tracing::info!(cache_dir = %config.core.image.cache_dir.display(), "OS image verification is on");
        }
        let revocations = Arc::new(RevocationStore::open(&config.core.cert_dir)?);
        Ok(Self {
            store: KeyStore::new(&config.core.cert_dir),
            config,
            tee,
            verifier,
            auth,
            image,
            revocations,
        })
    }

    /// What the admin revoked (also used by `Admin.RevokeCerts` and `Revocation.GetCrl`).
    pub fn revocations(&self) -> &Arc<RevocationStore> {
        &self.revocations
    }

    /// The image cache (also used by `Admin.ClearImageCache`).
    pub fn image_verifier(&self) -> &Arc<ImageVerifier> {
        &self.image
    }

    /// Bootstraps the key store for `domain` (refuses when keys exist).
    pub async fn bootstrap(&self, domain: &str) -> Result<dstack_rpc::kms::BootstrapResponse, KmsError> {
        let keys = bootstrap(&self.store, domain, self.tee.as_ref(), self.config.core.attest_rpc_cert).await?;
        Ok(keys.bootstrap_info)
    }

    /// Serves the `Onboard` service over plain HTTP on `listener` until a bootstrap or onboarding is followed by
    /// `Finish`.
    pub async fn serve_onboard(&self, listener: TcpListener) -> Result<(), KmsError> {
        let auth = &self.config.core.auth_api;
        let onchain = (auth.kind == crate::config::AuthApiKind::Onchain).then_some(&auth.onchain);
        let ctx = OnboardContext {
            tee: self.tee.clone(),
            verifier: Arc::clone(&self.verifier),
            auth: self.auth.clone(),
            vm_config: own_vm_config(&self.config).await?,
            attest_rpc_cert: self.config.core.attest_rpc_cert,
            revocations: Arc::clone(&self.revocations),
            site_name: self.config.core.site_name.clone(),
            eth_rpc_url: onchain.map(|c| c.rpc_url.clone()).unwrap_or_default(),
            kms_contract_address: onchain.map(|c| c.kms_contract.clone()).unwrap_or_default(),
        };
        let (svc, mut finished) = OnboardService::new(self.store.clone(), ctx);
        let router = Arc::new(RpcRouter::new("/prpc").service(OnboardServer::new(svc)));
        tracing::info!(addr = %listener.local_addr()?, "no keys yet: serving Onboard (Bootstrap, Onboard, Finish)");
        dstack_rpc::serve_tcp(listener, router, async move {
            let _ = finished.wait_for(|f| *f).await;
        })
        .await?;
        Ok(())
    }

    /// Loads the keys and serves the KMS RPC over RA-TLS on `listener`.
    pub async fn start(&self, listener: TcpListener) -> Result<KmsHandle, KmsError> {
        let store = self.store.clone();
        let keys = tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| KmsError::Storage(format!("loader task failed: {e}")))??;
        let tls = crate::tls::server_config(&keys)?;
        let keys_root = keys.root_ca.cert_der().to_vec();
        let image = self.config.core.image.verify.then(|| Arc::clone(&self.image));
        let service = KmsService::new(
            keys,
            Arc::clone(&self.verifier),
            self.auth.clone(),
            image,
            Some(Arc::clone(&self.revocations)),
        );
        let sync = self.start_revocation_sync(&keys_root)?;
        let crl = CrlService {
            kms: service.clone(),
            store: Arc::clone(&self.revocations),
        };
        let router = Arc::new(
            RpcRouter::new("/prpc")
                .service(KmsServer::new(service.clone()))
                .service(RevocationServer::new(crl)),
        );
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(dstack_rpc::serve_tls(listener, tls, router, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, policy = %self.auth.describe(), "KMS RPC listening (HTTPS, RA-TLS client auth)");
        Ok(KmsHandle {
            addr,
            service,
            stop: Some(stop),
            task,
            _sync: sync,
        })
    }

    /// A replica (onboarded from a source, `replication-source.json`) follows the source's revocations.
    fn start_revocation_sync(&self, root: &[u8]) -> Result<Option<SyncTask>, KmsError> {
        let every = self.config.core.onboard.revocation_sync_secs;
        let Some(source) = load_source(&self.config.core.cert_dir)? else {
            return Ok(None);
        };
        self.revocations.follow(&source.source_url);
        if every == 0 {
            tracing::warn!(source = %source.source_url, "revocation_sync_secs = 0: not following the source");
            return Ok(None);
        }
        spawn_sync(
            source.source_url,
            root.to_vec(),
            Arc::clone(&self.revocations),
            Duration::from_secs(every),
        )
        .map(Some)
    }

    /// Serves the `Admin` service (bearer token `[core.admin] auth_token`) over plain HTTP on `listener`.
    pub fn start_admin(&self, listener: TcpListener) -> Result<AdminHandle, KmsError> {
        let admin = &self.config.core.admin;
        if admin.auth_token.is_empty() {
            tracing::warn!("[core.admin] auth_token is empty: every Admin call will be refused");
        }
        let svc = AdminService::new(
            &admin.auth_token,
            Arc::clone(&self.image),
            Arc::clone(&self.revocations),
        );
        let router = Arc::new(RpcRouter::new("/prpc").service(AdminServer::new(svc)));
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(dstack_rpc::serve_tcp(listener, router, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "KMS Admin listening (HTTP, bearer token)");
        Ok(AdminHandle {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// The binary's path: auto-bootstrap or onboarding when needed, then the KMS RPC until it ends.
    pub async fn run(self) -> Result<(), KmsError> {
        if !self.store.is_initialized() {
            let domain = self.config.core.onboard.auto_bootstrap_domain.trim().to_owned();
            if !domain.is_empty() {
                self.bootstrap(&domain).await?;
            } else if self.config.core.onboard.enabled {
                let o = &self.config.core.onboard;
                let listener = TcpListener::bind((o.address, o.port)).await?;
                self.serve_onboard(listener).await?;
            } else {
                return Err(KmsError::NotBootstrapped(format!(
                    "{} holds no keys, onboarding is disabled and no auto_bootstrap_domain is set",
                    self.store.dir().display()
                )));
            }
        }
        let _admin = if self.config.core.admin.enabled {
            let a = &self.config.core.admin;
            Some(self.start_admin(TcpListener::bind((a.address, a.port)).await?)?)
        } else {
            None
        };
        let listener = TcpListener::bind(self.config.rpc.socket_addr()).await?;
        self.start(listener).await?.wait().await
    }
}
