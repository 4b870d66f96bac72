//! The production backends of the boot: the TEE ([`TeeMeasurer`] over `crates/tee`), the KMS client
//! ([`KmsKeySource`]) and the guest agent ([`GuestAgent`]), sharing one tokio runtime owned by [`Backends`].
//!
//! The agent runs **in-process** as a tokio task of PID 1 (not a child process): it needs the app keys, which
//! then never leave PID 1's memory except for `.appkeys.json` (mode 0600). A supervising task restarts the
//! listener task one second after it ends with an error or panics, so an agent crash never takes PID 1 down.
//! Sockets: `/var/run/dstack.sock` (aliases `/run/dstack.sock`, `/var/run/dstack/dstack.sock`) and the legacy
//! `/var/run/tappd.sock`, mode 0777. Compose apps reach them the way dstack documents: a bind mount in the
//! compose file (`volumes: ["/var/run/dstack.sock:/var/run/dstack.sock"]`); the paths are stable across boots.
//!
//! Beside the agent sockets, the host-facing guest API (`GuestApi`: Info, SysInfo, NetworkInfo, ListContainers,
//! Shutdown) is served on vsock port 8000 when the VM has a virtio-vsock device ([`GuestApiSetup`]); the VM
//! manager proxies it. Its `Shutdown` asks PID 1 for the same orderly power-off as the ACPI power button. It is
//! a convenience for the operator: failing to bind it is logged and the boot goes on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_guest_agent::guest_api::{
    GUEST_API_PORT, GuestApiOptions, GuestApiService, ShutdownAction, guest_api_router,
};
use dstack_guest_agent::{Agent, AgentConfig, AgentSockets, CertSigner, LocalCaSigner, link_aliases, serve_agent};
use dstack_ra_tls::{AttestationPolicy, CaCert, CertRequest};
use dstack_tee::Tee;
use dstack_types::KeyProvider;
use tokio::runtime::Runtime;

use crate::boot::kms::{KmsCertSigner, KmsConnector, KmsKeySource};
use crate::boot::tee::TeeMeasurer;
use crate::boot::{AgentStarter, BootEnv, BootReport, Deps, keys};
use crate::pid1::{InitState, PowerAction};

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
                guest_api: Mutex::new(GuestApiSetup::default()),
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
    guest_api: Mutex<GuestApiSetup>,
}

impl GuestAgent {
    /// The running agent (after [`AgentStarter::start`]).
    pub fn agent(&self) -> Option<Arc<Agent>> {
        self.running.lock().ok().and_then(|g| g.clone())
    }

    /// Replaces where (and whether) the guest API is served and what its `Shutdown` does; takes effect at
    /// the next [`AgentStarter::start`]. The default is the CVM's: vsock port 8000, orderly power-off.
    pub fn set_guest_api(&self, setup: GuestApiSetup) {
        if let Ok(mut g) = self.guest_api.lock() {
            *g = setup;
        }
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
        let setup = self.guest_api.lock().map(|g| g.clone()).unwrap_or_default();
        let _ = start_guest_api(&self.rt, &env.root, Arc::clone(&agent), setup);
        if let Ok(mut g) = self.running.lock() {
            *g = Some(agent);
        }
        Ok(())
    }
}

/// Where the guest API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestApiListen {
    /// This vsock port on every local CID, if the VM has a virtio-vsock device (else not served).
    Vsock(u32),
    /// A unix socket, mode 0600 (tests, debugging).
    Unix(PathBuf),
    /// Not served.
    Off,
}

/// The guest API's listener and `Shutdown` action.
#[derive(Clone)]
pub struct GuestApiSetup {
    pub listen: GuestApiListen,
    pub on_shutdown: ShutdownAction,
}

impl std::fmt::Debug for GuestApiSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestApiSetup")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Default for GuestApiSetup {
    /// The CVM's: vsock port 8000; `Shutdown` → PID 1's orderly power-off (apps stopped, disks closed).
    fn default() -> Self {
        Self {
            listen: GuestApiListen::Vsock(GUEST_API_PORT),
            on_shutdown: Arc::new(|| {
                crate::pid1::request_power(PowerAction::PowerOff, "the host asked for a shutdown (guest API)");
            }),
        }
    }
}

/// What [`start_guest_api`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestApiStatus {
    /// Serving; the listener's description.
    Serving(String),
    /// Not served: [`GuestApiListen::Off`], or vsock requested but the VM has no virtio-vsock device.
    NotServed(String),
    /// Binding failed (logged; the boot goes on).
    BindFailed(String),
}

/// virtio device ID of a socket device (virtio spec 1.2, 5.10).
const VIRTIO_ID_VSOCK: u32 = 19;

/// True if sysfs under `root` lists a virtio-vsock device (`/sys/bus/virtio/devices/*/device` = `0x0013`).
pub fn has_vsock_device(root: &Path) -> bool {
    let Ok(dir) = std::fs::read_dir(root.join("sys/bus/virtio/devices")) else {
        return false;
    };
    dir.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("device")).is_ok_and(|id| {
            let id = id.trim();
            u32::from_str_radix(id.strip_prefix("0x").unwrap_or(id), 16) == Ok(VIRTIO_ID_VSOCK)
        })
    })
}

/// Serves the guest API for `agent` on `rt` per `setup` (system files read under `root`). Never fails the
/// boot: a bind error is logged and returned as [`GuestApiStatus::BindFailed`].
pub fn start_guest_api(
    rt: &tokio::runtime::Handle,
    root: &Path,
    agent: Arc<Agent>,
    setup: GuestApiSetup,
) -> GuestApiStatus {
    let opts = GuestApiOptions {
        root: root.to_owned(),
        docker_socket: root.join("var/run/docker.sock"),
        on_shutdown: Some(setup.on_shutdown),
    };
    let router = Arc::new(guest_api_router(GuestApiService::new(agent, opts)));
    // The listeners register with the reactor of the runtime they are created in.
    let _enter = rt.enter();
    let (what, bound) = match &setup.listen {
        GuestApiListen::Off => return GuestApiStatus::NotServed("disabled".into()),
        GuestApiListen::Vsock(port) => {
            if !has_vsock_device(root) {
                tracing::info!("guest API: no virtio-vsock device; not served");
                return GuestApiStatus::NotServed("no virtio-vsock device".into());
            }
            let what = format!("vsock port {port}");
            let bound = dstack_rpc::vsock::VsockListener::bind(dstack_rpc::vsock::VMADDR_CID_ANY, *port)
                .map(|l| rt.spawn(serve_logged(l, router, what.clone())));
            (what, bound)
        }
        GuestApiListen::Unix(path) => {
            let what = format!("unix:{}", path.display());
            let bound = dstack_rpc::bind_unix(path, 0o600).map(|l| rt.spawn(serve_logged(l, router, what.clone())));
            (what, bound)
        }
    };
    match bound {
        Ok(_task) => {
            tracing::info!("guest API serving on {what}");
            GuestApiStatus::Serving(what)
        }
        Err(e) => {
            tracing::warn!("guest API: binding {what}: {e}; the host cannot reach the guest API (boot continues)");
            GuestApiStatus::BindFailed(format!("{what}: {e}"))
        }
    }
}

async fn serve_logged<L: dstack_rpc::Listener>(listener: L, router: Arc<dstack_rpc::RpcRouter>, what: String) {
    if let Err(e) = dstack_rpc::serve(listener, router, std::future::pending()).await {
        tracing::error!("guest API on {what} stopped: {e}");
    }
}

#[cfg(test)]
#[path = "backends_tests.rs"]
mod tests;
