//! The production backends of the boot: the TEE ([`TeeMeasurer`] over `crates/tee`), the KMS client
//! ([`KmsKeySource`]) and the guest agent ([`GuestAgent`]), sharing one tokio runtime owned by [`Backends`].
//!
//! The agent runs **in-process** as a tokio task of PID 1 (not a child process): it needs the app keys, which
//! then never leave PID 1's memory except for `.appkeys.json` (mode 0600). A supervising task restarts the
//! listener task one second after it ends with an error or panics, so an agent crash never takes PID 1 down.
//! Sockets: `/var/run/dstack.sock` (aliases `/run/dstack.sock`, `/var/run/dstack/dstack.sock`) and the legacy
//! `/var/run/tappd.sock`, mode 0777. Compose apps reach them the way dstack documents: a bind mount in the
//! compose file (`volumes: ["/var/run/dstack.sock:/var/run/dstack.sock"]`); the paths are stable across boots.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_guest_agent::{Agent, AgentConfig, AgentSockets, CertSigner, LocalCaSigner, link_aliases, serve_agent};
use dstack_ra_tls::{AttestationPolicy, CaCert, CertRequest};
use dstack_tee::Tee;
use dstack_types::KeyProvider;
use tokio::runtime::Runtime;

use crate::boot::kms::{KmsCertSigner, KmsConnector, KmsKeySource};
use crate::boot::tee::TeeMeasurer;
use crate::boot::{AgentStarter, BootEnv, BootReport, Deps, keys};
use crate::pid1::InitState;

/// Agent socket paths under a root (`/` in a CVM).
pub fn agent_sockets(root: &Path) -> (AgentSockets, Vec<PathBuf>) {
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let sockets = AgentSockets {
        dstack: under("/var/run/dstack.sock"),
        tappd: Some(under("/var/run/tappd.sock")),
    };
    let aliases = dstack_guest_agent::ALIAS_SOCKETS.iter().map(|a| under(a)).collect();
    (sockets, aliases)
}

/// The TEE, KMS and agent backends and their runtime.
pub struct Backends {
    pub rt: Runtime,
    pub measurer: Arc<TeeMeasurer>,
    pub kms: KmsKeySource,
    pub agent: GuestAgent,
    pub gateway: crate::boot::gateway::Gateway,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("measurer", &self.measurer)
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// `event_log`: where runtime events are persisted; `kms_attestation`: also verify the KMS certificate's
    /// attestation with this policy (needs collateral or a simulator pin; `None` in a CVM, as dstack).
    pub fn new(
        tee: Arc<dyn Tee>,
        event_log: impl Into<PathBuf>,
        kms_attestation: Option<AttestationPolicy>,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("guest-init-rt")
            .enable_all()
            .build()?;
        let measurer = Arc::new(TeeMeasurer::new(tee, event_log, rt.handle().clone()));
        let connector = KmsConnector::new(Arc::clone(&measurer), kms_attestation);
        Ok(Self {
            kms: KmsKeySource {
                connector: connector.clone(),
                rt: rt.handle().clone(),
            },
            agent: GuestAgent {
                measurer: Arc::clone(&measurer),
                connector,
                rt: rt.handle().clone(),
                running: Mutex::new(None),
            },
            gateway: crate::boot::gateway::Gateway::new(Arc::clone(&measurer), rt.handle().clone()),
            measurer,
            rt,
        })
    }

    /// The boot's dependencies.
    pub fn deps<'a>(&'a self, state: Option<&'a InitState>) -> Deps<'a> {
        Deps {
            measurer: self.measurer.as_ref(),
            kms: Some(&self.kms),
            state,
            agent: Some(&self.agent),
            gateway: Some(&self.gateway),
        }
    }
}

/// Starts and supervises the in-process guest agent.
pub struct GuestAgent {
    measurer: Arc<TeeMeasurer>,
    connector: KmsConnector,
    rt: tokio::runtime::Handle,
    running: Mutex<Option<Arc<Agent>>>,
}

impl GuestAgent {
    /// The running agent (after [`AgentStarter::start`]).
    pub fn agent(&self) -> Option<Arc<Agent>> {
        self.running.lock().ok().and_then(|g| g.clone())
    }

    fn build(&self, report: &BootReport) -> Result<Agent, String> {
        let event_log = self
            .measurer
            .event_log()
            .ok_or("no runtime event log (nothing was measured)")?;
        let sys = &report.shared.sys_config;
        let keys = &report.keys;
        let signer: Arc<dyn CertSigner> = match &keys.key_provider {
            KeyProvider::Kms { .. } => Arc::new(KmsCertSigner::new(self.connector.clone(), keys, &sys.vm_config)?),
            KeyProvider::None { key } if keys.ca_cert.is_empty() => {
                // Provider `none` keys carry the app CA key but no certificate: self-sign one (as dstack's
                // gen_app_keys_from_seed).
                let kp = rcgen::KeyPair::from_pem(key).map_err(|e| format!("app CA key: {e}"))?;
                let req = CertRequest {
                    subject: "Dstack App CA".into(),
                    org_name: Some("Dstack".into()),
                    ca_level: Some(0),
                    app_id: Some(report.identity.app_id.0.to_vec()),
                    special_usage: Some("app:ca".into()),
                    ..Default::default()
                };
                let ca = CaCert::self_signed(&req, kp).map_err(|e| format!("app CA: {e}"))?;
                Arc::new(LocalCaSigner::new(ca, Vec::new()))
            }
            _ => Arc::new(LocalCaSigner::from_app_keys(keys).map_err(|e| e.to_string())?),
        };
        let key_provider_info = keys::key_events(keys, None)
            .map_err(|e| e.to_string())?
            .pop()
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .unwrap_or_default();
        let os_image_hash = serde_json::from_str::<serde_json::Value>(&sys.vm_config)
            .ok()
            .and_then(|v| v.get("os_image_hash").and_then(|h| h.as_str()).map(str::to_owned))
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_default();
        // Info's device_id is sha256(PPID) from this TD's own quote (dstack reports it the same way).
        let device_id = match self.rt.block_on(self.measurer.tee().quote([0; 64])) {
            Ok(q) => dstack_guest_agent::self_reported_device_id(&q),
            Err(e) => {
                tracing::warn!("no quote for the device id: {e}");
                Vec::new()
            }
        };
        Agent::new(AgentConfig {
            app_keys: keys.clone(),
            cert_signer: signer,
            event_log,
            app_compose: String::from_utf8_lossy(&report.shared.raw_compose).into_owned(),
            app_name: report.shared.compose.name.clone(),
            app_id: report.identity.app_id.0.to_vec(),
            instance_id: report.identity.instance_id_bytes().to_vec(),
            compose_hash: report.identity.compose_hash.0.to_vec(),
            device_id,
            vm_config: sys.vm_config.clone(),
            os_image_hash,
            key_provider_info,
            gpu_attestation: String::new(),
            cloud_vendor: String::new(),
            cloud_product: String::new(),
        })
        .map_err(|e| e.to_string())
    }
}

impl AgentStarter for GuestAgent {
    fn start(&self, env: &BootEnv, report: &BootReport) -> Result<(), String> {
        let agent = Arc::new(self.build(report)?);
        let (sockets, aliases) = agent_sockets(&env.root);
        for p in std::iter::once(&sockets.dstack).chain(sockets.tappd.iter()) {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
        }
        let a = Arc::clone(&agent);
        let s = sockets.clone();
        self.rt.spawn(async move {
            loop {
                let (a2, s2) = (Arc::clone(&a), s.clone());
                let task = tokio::spawn(async move { serve_agent(a2, &s2, std::future::pending()).await });
                match task.await {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => tracing::error!("guest agent stopped: {e}; restarting"),
                    Err(e) => tracing::error!("guest agent crashed: {e}; restarting"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        // Report a socket that never appears as a boot error (a wrong path, a read-only /run).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sockets.dstack.exists() {
            if std::time::Instant::now() > deadline {
                return Err(format!("agent socket {} did not appear", sockets.dstack.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let alias_refs: Vec<&Path> = aliases.iter().map(PathBuf::as_path).collect();
        link_aliases(&sockets.dstack, &alias_refs).map_err(|e| format!("agent socket aliases: {e}"))?;
        tracing::info!("guest agent serving on {}", sockets.dstack.display());
        if let Ok(mut g) = self.running.lock() {
            *g = Some(agent);
        }
        Ok(())
    }
}
