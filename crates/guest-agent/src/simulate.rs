//! Host mode (`--simulate`): the agent with an in-process simulated TDX module and a generated app identity,
//! like dstack's simulator, so SDK users can develop without a CVM. Quotes come from `dstack-sim-tdx` and
//! verify only against its root (printed as a pin); nothing here claims TDX.
//!
//! The generated identity mimics a KMS deployment: a random KMS root CA (P-256, "Dstack KMS CA") and root
//! k256 key; the app's keys are derived from them with dstack's KDF (`crates/keys`), the app CA is the
//! KMS-derived `app-ca` key issued by the root, and the RTMR3 events of a dstack boot are measured.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dstack_keys::sig::{compressed, k256_signing_key};
use dstack_measurements::eventlog::{EV_EVENT_TAG, TdxEvent};
use dstack_ra_tls::{CaCert, CertRequest};
use dstack_sim_tdx::{InitialState, SimTdx, root_cert_path};
use dstack_tee::{
    EventLogVersion, QUOTE_REPORT_DATA_LEN, RTMR_LEN, Rtmrs, RuntimeEvent, RuntimeEventLog, Tee, TeeError, TeeFuture,
    TeeKind,
};
use dstack_types::{AppKeys, KeyProvider};
use rcgen::PublicKeyData as _;
use sha2::{Digest, Sha256, Sha384};
use zeroize::Zeroizing;

use crate::cert::{LocalCaSigner, p256_key_pair};
use crate::serve::{AgentSockets, BoundAgent};
use crate::{Agent, AgentConfig, AgentError};

/// [`Tee`] over an in-process [`SimTdx`] (reports [`TeeKind::Simulated`]).
#[derive(Debug, Clone)]
pub struct InProcessSimTee(pub Arc<SimTdx>);

fn sim_err(e: dstack_sim_tdx::SimTdxError) -> TeeError {
    TeeError::Simulator {
        endpoint: "in-process".into(),
        message: e.to_string(),
    }
}

impl Tee for InProcessSimTee {
    fn kind(&self) -> TeeKind {
        TeeKind::Simulated
    }

    fn quote(&self, report_data: [u8; QUOTE_REPORT_DATA_LEN]) -> TeeFuture<'_, Vec<u8>> {
        let sim = Arc::clone(&self.0);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || sim.quote(&report_data))
                .await
                .map_err(|e| TeeError::Task(e.to_string()))?
                .map_err(sim_err)
        })
    }

    fn extend_rtmr(&self, index: u32, digest: [u8; RTMR_LEN]) -> TeeFuture<'_, ()> {
        Box::pin(async move { self.0.extend_rtmr(index, &digest, None).map_err(sim_err) })
    }

    fn extend_runtime_event(&self, event: RuntimeEvent) -> TeeFuture<'_, ()> {
        Box::pin(async move {
            self.0
                .extend_rtmr(3, &event.digest(), Some((&event.name, &event.payload)))
                .map_err(sim_err)
        })
    }

    fn rtmrs(&self) -> TeeFuture<'_, Rtmrs> {
        Box::pin(async move { Ok(self.0.registers().rtmr) })
    }

    fn boot_event_log(&self) -> TeeFuture<'_, Vec<TdxEvent>> {
        Box::pin(async move { Ok(self.0.boot_event_log()) })
    }
}

/// The app-compose used when none is given (keys sorted, compact, as the SDKs' `get_compose_hash` writes it).
pub const DEFAULT_APP_COMPOSE: &str = r#"{"docker_compose_file":"services: {}\n","gateway_enabled":false,"kms_enabled":true,"manifest_version":2,"name":"dstack-rs-simulated-app","public_logs":false,"public_sysinfo":false,"public_tcbinfo":true,"runner":"docker-compose"}"#;

/// What a simulated agent publishes for verifiers and tests (printed as one JSON line by the binary).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimulationInfo {
    /// Always true: this is not a TDX guest.
    pub simulated: bool,
    /// The simulator root certificate to pin (PEM file).
    pub root_cert: PathBuf,
    /// SHA-256 of the simulator root's SubjectPublicKeyInfo.
    pub root_spki_sha256: String,
    /// The simulated KMS root CA certificate (PEM file): `GetTlsKey` chains end here.
    pub kms_root_ca: PathBuf,
    /// The simulated KMS root k256 public key (compressed, hex): `GetKey` chains recover to it.
    pub kms_k256_pubkey: String,
    /// The app's root k256 public key (compressed, hex).
    pub app_k256_pubkey: String,
    pub app_id: String,
    pub instance_id: String,
    pub compose_hash: String,
}

/// Boot events (RTMR0-2) of the simulated TD: one labelled event per register (no image is booted).
fn simulated_boot_log() -> Vec<TdxEvent> {
    (0..3)
        .map(|imr| {
            let label = format!("dstack-rs simulated boot RTMR{imr}");
            TdxEvent {
                imr,
                event_type: EV_EVENT_TAG,
                digest: Sha384::digest(label.as_bytes()).to_vec(),
                event: label,
                event_payload: Vec::new(),
                version: None,
            }
        })
        .collect()
}

fn random32() -> Result<Zeroizing<[u8; 32]>, AgentError> {
    let mut b = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut b[..]).map_err(|e| AgentError::Internal(format!("OS random number generator: {e}")))?;
    Ok(b)
}

fn ca_request(subject: &str, app_id: Option<&[u8]>, usage: Option<&str>) -> CertRequest {
    CertRequest {
        subject: subject.into(),
        org_name: Some("Dstack".into()),
        app_id: app_id.map(<[u8]>::to_vec),
        special_usage: usage.map(str::to_owned),
        ..Default::default()
    }
}

/// Builds a simulated agent: starts the in-process module (signer kept in `state_dir`), generates root keys
/// and the app identity from `app_compose` (raw JSON), measures dstack's boot events into RTMR3.
pub async fn simulated_agent(state_dir: &Path, app_compose: &str) -> Result<(Agent, SimulationInfo), AgentError> {
    let init = InitialState {
        mrtd: Sha384::digest(b"dstack-rs simulated MRTD").to_vec(),
        boot_event_log: simulated_boot_log(),
        ..Default::default()
    };
    let sim = Arc::new(SimTdx::open(&init, state_dir).map_err(|e| AgentError::Config(e.to_string()))?);
    let tee: Arc<dyn Tee> = Arc::new(InProcessSimTee(Arc::clone(&sim)));
    // The module restarts with fresh registers: start a fresh runtime log too.
    let log_path = state_dir.join("runtime_events.log");
    match std::fs::remove_file(&log_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(AgentError::Config(format!("removing {}: {e}", log_path.display())));
        }
        _ => {}
    }
    let event_log = Arc::new(RuntimeEventLog::new(tee, &log_path, EventLogVersion::V1));

    // Simulated KMS roots.
    let root_ca_key = dstack_keys::kdf::derive_p256_from_bytes(&random32()?[..], &[b"sim-kms-root-ca"])?;
    let root_k256 = k256_signing_key(&random32()?[..])?;
    let (root_kp, _) = p256_key_pair(&root_ca_key)?;
    let root_ca = CaCert::self_signed(&ca_request("Dstack KMS CA", None, None), root_kp)
        .map_err(|e| AgentError::Cert(e.to_string()))?;

    // Identity (compose hash, app id, instance id) as a dstack guest computes it.
    let compose_hash = dstack_types::compose_hash(app_compose.as_bytes());
    let app_id = dstack_types::app_id(None, &compose_hash);
    let seed = dstack_types::random_seed().map_err(|e| AgentError::Internal(e.to_string()))?;
    let instance_id = dstack_types::instance_id(&seed, &app_id);
    let keys = dstack_keys::derive_app_keys(&root_ca_key, &root_k256, &app_id.0, &instance_id.0)?;
    let app_ca_key = dstack_keys::app_keys::app_ca_key(&root_ca_key, &app_id.0)?;
    let (app_ca_kp, _) = p256_key_pair(&app_ca_key)?;
    let app_ca = CaCert::issued_by(
        &ca_request("Dstack App CA", Some(&app_id.0), Some("app:ca")),
        app_ca_kp,
        &root_ca,
    )
    .map_err(|e| AgentError::Cert(e.to_string()))?;
    let root_spki = root_ca.key().subject_public_key_info();
    let key_provider_info = serde_json::json!({"name": "kms", "id": hex::encode(&root_spki)}).to_string();
    let os_image_hash = Sha256::digest(b"dstack-rs simulated OS image").to_vec();
    let vm_config = serde_json::json!({
        "os_image_hash": hex::encode(&os_image_hash),
        "cpu_count": 1,
        "memory_size": 2_147_483_648u64,
    })
    .to_string();

    // RTMR3 events in dstack's boot order (no data disk in simulation, so no storage-fs).
    for (name, payload) in [
        ("system-preparing", Vec::new()),
        ("app-id", app_id.0.to_vec()),
        ("compose-hash", compose_hash.0.to_vec()),
        ("instance-id", instance_id.0.to_vec()),
        ("boot-mr-done", Vec::new()),
        ("os-image-hash", os_image_hash.clone()),
        ("key-provider", key_provider_info.as_bytes().to_vec()),
        ("system-ready", Vec::new()),
    ] {
        event_log.measure(name, &payload).await?;
    }

    let kms_root_ca = state_dir.join("kms-root-ca.pem");
    std::fs::write(&kms_root_ca, root_ca.cert_pem())
        .map_err(|e| AgentError::Config(format!("writing {}: {e}", kms_root_ca.display())))?;
    let app_k256_pubkey = compressed(k256_signing_key(&keys.k256_key[..])?.verifying_key());
    let app_keys = AppKeys {
        disk_crypt_key: keys.disk_crypt_key.to_vec(),
        env_crypt_key: keys.env_crypt_key.to_vec(),
        k256_key: keys.k256_key.to_vec(),
        k256_signature: keys.k256_signature.to_vec(),
        gateway_app_id: String::new(),
        ca_cert: root_ca.cert_pem().to_owned(),
        key_provider: KeyProvider::Kms {
            url: "simulated:".into(),
            pubkey: root_spki.clone(),
            tmp_ca_key: String::new(),
            tmp_ca_cert: String::new(),
        },
    };
    // The simulated PCK leaf carries the signer's per-host PPID: report sha256(PPID) like a real TD does.
    let own_quote = tokio::task::spawn_blocking({
        let sim = Arc::clone(&sim);
        move || sim.quote(&[0; 64])
    })
    .await
    .map_err(|e| AgentError::Internal(e.to_string()))?
    .map_err(|e| AgentError::Config(e.to_string()))?;
    let device_id = dstack_measurements::verify::self_reported_device_id(&own_quote);
    let app_name = serde_json::from_str::<serde_json::Value>(app_compose)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let info = SimulationInfo {
        simulated: true,
        root_cert: root_cert_path(state_dir),
        root_spki_sha256: hex::encode(sim.root_spki_sha256()),
        kms_root_ca,
        kms_k256_pubkey: hex::encode(compressed(root_k256.verifying_key())),
        app_k256_pubkey: hex::encode(app_k256_pubkey),
        app_id: app_id.to_hex(),
        instance_id: instance_id.to_hex(),
        compose_hash: compose_hash.to_hex(),
    };
    // The simulated KMS signs with the app CA (what KMS SignCert does); chains end at the KMS root.
    let signer = LocalCaSigner::new(app_ca, vec![root_ca.cert_pem().to_owned()]);
    let agent = Agent::new(AgentConfig {
        app_keys,
        cert_signer: Arc::new(signer),
        event_log,
        app_compose: app_compose.to_owned(),
        app_name,
        app_id: app_id.0.to_vec(),
        instance_id: instance_id.0.to_vec(),
        compose_hash: compose_hash.0.to_vec(),
        device_id,
        vm_config,
        os_image_hash,
        key_provider_info,
        gpu_attestation: String::new(),
        cloud_vendor: String::new(),
        cloud_product: String::new(),
    })?;
    Ok((agent, info))
}

/// Options of the host mode, shared by `dstack-guest-agent --simulate` and `guest-init agent --simulate`.
#[derive(Debug, Clone, Default)]
pub struct SimulateOptions {
    /// The dstack API socket (`DstackGuest` at `/`).
    pub socket: PathBuf,
    /// The legacy tappd socket (`Tappd` at `/prpc`).
    pub tappd_socket: Option<PathBuf>,
    /// Where the simulated module keeps its signing key (reused across runs, so verifiers can keep the pin);
    /// `None`: a fresh signer in a temporary directory removed on exit.
    pub state_dir: Option<PathBuf>,
    /// app-compose.json to use instead of [`DEFAULT_APP_COMPOSE`].
    pub app_compose: Option<PathBuf>,
}

impl SimulateOptions {
    /// The option grammar of [`SimulateOptions::from_args`].
    pub const USAGE: &str = "--simulate --socket PATH [--tappd-socket PATH] [--state-dir DIR] [--compose FILE]";

    /// Parses `--simulate --socket PATH [--tappd-socket PATH] [--state-dir DIR] [--compose FILE]`
    /// (`--app-compose` is accepted for `--compose`). `--simulate` is required: nothing else runs outside a CVM.
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        let mut o = Self::default();
        let mut simulate = false;
        let mut socket = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--simulate" => simulate = true,
                "--socket" => socket = Some(value("--socket")?),
                "--tappd-socket" => o.tappd_socket = Some(value("--tappd-socket")?),
                "--state-dir" => o.state_dir = Some(value("--state-dir")?),
                "--compose" | "--app-compose" => o.app_compose = Some(value("--compose")?),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if !simulate {
            return Err("only --simulate is available outside a CVM (in a CVM the agent runs inside PID 1)".into());
        }
        o.socket = socket.ok_or("--socket PATH is required")?;
        Ok(o)
    }
}

/// [`run_simulator`] on its own thread and runtime, for callers that are not async or must not share their
/// runtime with the agent (tools, tests). Stopped and joined on drop.
pub struct BackgroundSimulator {
    socket: PathBuf,
    ready: serde_json::Value,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
}

impl BackgroundSimulator {
    /// Starts the agent and waits (at most `timeout`) until it serves.
    pub fn start(opts: SimulateOptions, timeout: std::time::Duration) -> Result<Self, AgentError> {
        let socket = opts.socket.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| AgentError::Internal(format!("agent runtime: {e}")))?;
            rt.block_on(run_simulator(
                &opts,
                async move {
                    let _ = stopped.await;
                },
                move |line| {
                    let _ = ready_tx.send(line);
                },
            ))
        });
        match ready_rx.recv_timeout(timeout) {
            Ok(ready) => Ok(Self {
                socket,
                ready,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(thread
                .join()
                .map_err(|_| AgentError::Internal("the simulated agent thread panicked".into()))
                .and_then(|r| r)
                .err()
                .unwrap_or_else(|| AgentError::Internal("the simulated agent stopped before serving".into()))),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                drop(stop);
                Err(AgentError::Internal(format!(
                    "the simulated agent did not serve within {timeout:?}"
                )))
            }
        }
    }

    /// The dstack API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The ready line: [`SimulationInfo`] plus `socket`, `tappd_socket`, `state_dir`.
    pub fn ready(&self) -> &serde_json::Value {
        &self.ready
    }
}

impl Drop for BackgroundSimulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A state directory removed on drop (the fresh-signer case).
struct TempState(PathBuf);

impl TempState {
    fn create() -> Result<Self, AgentError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut tag = [0u8; 8];
        getrandom::fill(&mut tag).map_err(|e| AgentError::Internal(format!("OS random number generator: {e}")))?;
        let dir = std::env::temp_dir().join(format!("dstack-sim-{}", hex::encode(tag)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| AgentError::Config(format!("creating {}: {e}", dir.display())))?;
        Ok(Self(dir))
    }
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the simulated agent until `shutdown`: builds the identity, binds the sockets, calls `on_ready` with
/// the [`SimulationInfo`] JSON (plus `socket`, `tappd_socket`, `state_dir`) once connections are accepted,
/// then serves.
pub async fn run_simulator(
    opts: &SimulateOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(serde_json::Value),
) -> Result<(), AgentError> {
    let compose = match &opts.app_compose {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| AgentError::Config(format!("reading {}: {e}", p.display())))?
        }
        None => DEFAULT_APP_COMPOSE.to_owned(),
    };
    let temp = match &opts.state_dir {
        Some(_) => None,
        None => Some(TempState::create()?),
    };
    let state_dir = match (&opts.state_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.0.clone(),
        (None, None) => return Err(AgentError::Internal("no state directory".into())),
    };
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| AgentError::Config(format!("creating {}: {e}", state_dir.display())))?;
    let (agent, info) = simulated_agent(&state_dir, &compose).await?;
    let sockets = AgentSockets {
        dstack: opts.socket.clone(),
        tappd: opts.tappd_socket.clone(),
    };
    let bound =
        BoundAgent::bind(&sockets).map_err(|e| AgentError::Config(format!("binding the agent sockets: {e}")))?;
    let mut line = serde_json::to_value(&info).map_err(|e| AgentError::Internal(e.to_string()))?;
    line["socket"] = serde_json::json!(opts.socket);
    line["tappd_socket"] = serde_json::json!(opts.tappd_socket);
    line["state_dir"] = serde_json::json!(state_dir);
    on_ready(line);
    let served = bound.serve(Arc::new(agent), shutdown).await;
    drop(temp);
    served.map_err(|e| AgentError::Internal(format!("serving: {e}")))
}

/// [`run_simulator`] on its own Tokio runtime until SIGINT or SIGTERM, printing the ready line (one JSON object)
/// on stdout. The entry point of both host-mode commands.
pub fn run_simulator_blocking(opts: &SimulateOptions) -> Result<(), AgentError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AgentError::Internal(format!("Tokio runtime: {e}")))?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| AgentError::Internal(format!("SIGTERM: {e}")))?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        run_simulator(opts, shutdown, |line| {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        })
        .await
    })
}

#[cfg(test)]
mod options_tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_and_requires_simulate_and_socket() {
        let o = SimulateOptions::from_args(&args(&[
            "--simulate",
            "--socket",
            "/tmp/d.sock",
            "--tappd-socket",
            "/tmp/t.sock",
            "--compose",
            "c.json",
        ]))
        .unwrap();
        assert_eq!(o.socket, PathBuf::from("/tmp/d.sock"));
        assert_eq!(o.tappd_socket, Some(PathBuf::from("/tmp/t.sock")));
        assert_eq!(o.app_compose, Some(PathBuf::from("c.json")));
        assert_eq!(o.state_dir, None);
        assert!(SimulateOptions::from_args(&args(&["--socket", "x"])).is_err());
        assert!(SimulateOptions::from_args(&args(&["--simulate"])).is_err());
        assert!(SimulateOptions::from_args(&args(&["--simulate", "--socket"])).is_err());
        assert!(SimulateOptions::from_args(&args(&["--simulate", "--socket", "x", "--bogus"])).is_err());
    }

    #[tokio::test]
    async fn fresh_state_is_removed_on_exit() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SimulateOptions {
            socket: dir.path().join("d.sock"),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut state = None;
        let run = run_simulator(
            &opts,
            async move {
                let _ = rx.await;
            },
            |line| {
                state = line["state_dir"].as_str().map(PathBuf::from);
                let _ = tx.send(());
            },
        );
        run.await.unwrap();
        let state = state.expect("ready line names the state dir");
        assert!(!state.exists(), "{} left behind", state.display());
    }
}
