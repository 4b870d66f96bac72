//! The boot sequence (DESIGN.md §3), one function per step, run in order by [`run`]:
//! config intake → strict app-compose → identities → app events → keys → key events → storage-fs → data
//! disk → instance.info → system-ready → env → guest agent → init scripts → containerd/dockerd → the app.
//! Every step reports progress to the host; the first error is reported as `boot.error` and returned
//! (PID 1 then powers off). The backends plug in through [`measure::Measurer`] ([`tee::TeeMeasurer`]),
//! [`keys::KeySource`] ([`kms::KmsKeySource`]) and [`AgentStarter`] (`crate::backends::GuestAgent`).
//! Gateway registration ([`gateway`]) runs after the env step, before the agent and the app.

pub mod config;
pub mod docker;
pub mod env;
pub mod gateway;
pub mod keys;
pub mod kms;
pub mod luks;
pub mod measure;
pub mod notify;
pub mod tee;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dstack_types::shared_files as names;
use dstack_types::{AppIdentity, AppKeys, InstanceInfo, KeyProviderKind, Runner};

use crate::pid1::InitState;
use config::{HostShared, HostSharedSource};
use measure::{Measurer, RuntimeEvent};
use notify::Notifier;

/// Errors of the boot sequence.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("identity: {0}")]
    Identity(#[from] dstack_types::Error),
    #[error(transparent)]
    Measure(#[from] measure::MeasureError),
    #[error("keys: {0}")]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Disk(#[from] luks::LuksError),
    #[error("env: {0}")]
    Env(#[from] env::EnvError),
    #[error("docker: {0}")]
    Docker(#[from] docker::DockerError),
    #[error(transparent)]
    Gateway(#[from] gateway::GatewayError),
    #[error("{what}: {reason}")]
    Step { what: String, reason: String },
}

fn step_err(what: impl Into<String>) -> impl FnOnce(String) -> BootError {
    let what = what.into();
    move |reason| BootError::Step { what, reason }
}

/// Where the app's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDisk {
    /// A block device: LUKS2 + ext4 (or plain ext4 with `dstack.storage_encrypted=0`). Measured `ext4`.
    Device { path: PathBuf, encrypted: bool },
    /// No disk: a RAM-backed tmpfs (ephemeral). Measured `tmpfs`.
    Tmpfs,
    /// An existing directory used as is (development and tests only; not selectable from the kernel
    /// command line). Measured `directory`.
    Directory,
}

impl DataDisk {
    fn fs_name(&self) -> &'static str {
        match self {
            Self::Device { .. } => "ext4",
            Self::Tmpfs => "tmpfs",
            Self::Directory => "directory",
        }
    }
}

/// Inputs of the boot sequence.
#[derive(Debug, Clone)]
pub struct BootEnv {
    /// Root of the system (`/`, or a temporary directory in tests).
    pub root: PathBuf,
    pub host_shared: HostSharedSource,
    pub data: DataDisk,
    /// Host API endpoint override (else sys-config `host_api_url`).
    pub host_api: Option<String>,
    /// Stop after the env step (tests).
    pub start_app: bool,
}

impl BootEnv {
    /// dstack's work dir (`/dstack`).
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("dstack")
    }
    /// The private copy of the host files (`/dstack/.host-shared`).
    pub fn shared_dir(&self) -> PathBuf {
        self.work_dir().join(".host-shared")
    }
    /// `.appkeys.json` (mode 0600): in the work dir, never in the host-shared copy.
    pub fn app_keys_path(&self) -> PathBuf {
        self.work_dir().join(names::APP_KEYS)
    }
    /// The data disk's mount point.
    pub fn data_dir(&self) -> PathBuf {
        self.work_dir().join("persistent")
    }
}

/// The backends the boot uses.
pub struct Deps<'a> {
    pub measurer: &'a dyn Measurer,
    pub kms: Option<&'a dyn keys::KeySource>,
    /// Shutdown hooks and the supervisor (absent in tests that stop before Docker).
    pub state: Option<&'a InitState>,
    /// Starts the guest agent once keys are in place (absent: no agent).
    pub agent: Option<&'a dyn AgentStarter>,
    /// Registers with the gateway and brings up the WireGuard tunnel (absent: never).
    pub gateway: Option<&'a gateway::Gateway>,
}

/// Starts the guest agent (step 10) after keys and env, before the app, so containers find its socket.
pub trait AgentStarter: Send + Sync {
    fn start(&self, env: &BootEnv, report: &BootReport) -> Result<(), String>;
}

/// What the boot established.
#[derive(Debug)]
pub struct BootReport {
    pub identity: AppIdentity,
    pub keys: AppKeys,
    pub shared: HostShared,
}

/// Step 2: copy and parse the host's files.
pub fn intake(env: &BootEnv) -> Result<HostShared, BootError> {
    config::intake(
        &env.host_shared,
        &env.root.join("run/dstack/host-shared-src"),
        &env.shared_dir(),
    )?;
    Ok(HostShared::load(&env.shared_dir())?)
}

/// Step 3: identities. A pinned `app_id` counts only for KMS apps (as in dstack: otherwise the host could
/// pick the measured app id of an app without a KMS binding).
pub fn identity(shared: &HostShared) -> Result<AppIdentity, BootError> {
    let mut info = shared.instance_info.clone();
    if shared.compose.key_provider() != KeyProviderKind::Kms && !info.app_id.is_empty() {
        tracing::warn!("ignoring the host's pinned app_id: only KMS apps may pin one");
        info.app_id.clear();
    }
    Ok(dstack_types::resolve_identity(
        &shared.raw_compose,
        &shared.compose,
        &info,
        dstack_types::random_seed,
    )?)
}

fn measure_all(m: &dyn Measurer, shared: &HostShared, events: &[RuntimeEvent]) -> Result<(), BootError> {
    let v = shared.compose.event_log_version();
    for e in events {
        m.measure(v, e)?;
    }
    Ok(())
}

/// Step 6: the data disk, mounted at [`BootEnv::data_dir`].
pub fn setup_storage(env: &BootEnv, keys: &AppKeys, state: Option<&InitState>) -> Result<(), BootError> {
    let mnt = env.data_dir();
    std::fs::create_dir_all(&mnt).map_err(|e| step_err("data dir")(e.to_string()))?;
    match &env.data {
        DataDisk::Device { path, encrypted: true } => {
            let private = env.root.join("run/dstack/luks");
            luks::setup_data_disk(path, &keys.disk_crypt_key, &private, &mnt)?;
            if let Some(st) = state {
                st.on_close_devices(|| luks::close(luks::DATA_MAPPER_NAME));
            }
        }
        DataDisk::Device { path, encrypted: false } => {
            tracing::warn!(
                "data disk {} is NOT encrypted (dstack.storage_encrypted=0)",
                path.display()
            );
            luks::ensure_ext4(path)?;
            luks::check_and_mount_ext4(path, &mnt)?;
        }
        DataDisk::Tmpfs => {
            tracing::warn!("no data disk configured: app data lives in RAM and is lost at power-off");
            nix::mount::mount(
                Some("tmpfs"),
                &mnt,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("mode=0755"),
            )
            .map_err(|e| step_err("tmpfs data dir")(e.to_string()))?;
        }
        DataDisk::Directory => tracing::warn!("data dir {} used as is (development mode)", mnt.display()),
    }
    Ok(())
}

/// Steps 2–7: everything up to the decrypted env. Reports `boot.error` on failure.
pub fn prepare(env: &BootEnv, deps: &Deps<'_>) -> Result<(BootReport, Box<dyn Notifier>), BootError> {
    let shared = intake(env)?;
    prepare_from(env, deps, shared)
}

/// Steps 3–7 after [`intake`] (PID 1 reads the host's files first: they may name the simulated TEE).
pub fn prepare_from(
    env: &BootEnv,
    deps: &Deps<'_>,
    shared: HostShared,
) -> Result<(BootReport, Box<dyn Notifier>), BootError> {
    let endpoint = env.host_api.clone().or_else(|| shared.sys_config.host_api_url.clone());
    let notifier = notify::for_endpoint(endpoint.as_deref());
    match prepare_inner(env, deps, shared, notifier.as_ref()) {
        Ok(r) => Ok((r, notifier)),
        Err(e) => {
            notifier.notify("boot.error", &e.to_string());
            Err(e)
        }
    }
}

fn prepare_inner(
    env: &BootEnv,
    deps: &Deps<'_>,
    shared: HostShared,
    n: &dyn Notifier,
) -> Result<BootReport, BootError> {
    let identity = identity(&shared)?;
    tracing::info!(
        "app {} ({}), compose hash {}, instance {}",
        shared.compose.name,
        identity.app_id.to_hex(),
        identity.compose_hash.to_hex(),
        hex::encode(identity.instance_id_bytes())
    );
    measure_all(deps.measurer, &shared, &measure::app_events(&identity, &shared.compose))?;

    n.notify("boot.progress", "requesting app keys");
    let (keys, os_image_hash) = keys::provide(
        &shared.compose,
        deps.kms,
        &shared.sys_config.kms_urls,
        &shared.sys_config.vm_config,
    )?;
    keys::verify(&shared.compose, &keys)?;
    measure_all(
        deps.measurer,
        &shared,
        &keys::key_events(&keys, os_image_hash.as_deref())?,
    )?;
    let keys_json =
        zeroize::Zeroizing::new(serde_json::to_vec(&keys).map_err(|e| step_err("app keys")(e.to_string()))?);
    config::write_private(&env.app_keys_path(), &keys_json)
        .map_err(|e| step_err("writing .appkeys.json")(e.to_string()))?;

    let fs = RuntimeEvent::new(measure::names::STORAGE_FS, env.data.fs_name().as_bytes());
    measure_all(deps.measurer, &shared, &[fs])?;
    n.notify("boot.progress", "setting up data disk");
    setup_storage(env, &keys, deps.state)?;

    let info: InstanceInfo = identity.instance_info();
    let info_json = serde_json::to_string(&info).map_err(|e| step_err("instance info")(e.to_string()))?;
    config::write_private(&env.shared_dir().join(names::INSTANCE_INFO), info_json.as_bytes())
        .map_err(|e| step_err("writing .instance_info")(e.to_string()))?;
    n.notify("instance.info", &info_json);
    measure_all(
        deps.measurer,
        &shared,
        &[RuntimeEvent::new(measure::names::SYSTEM_READY, [])],
    )?;
    n.notify("boot.progress", "data disk ready");

    let vars = env::decrypt(
        &shared.encrypted_env,
        &keys.env_crypt_key,
        shared.compose.allowed_envs(),
    )?;
    env::write_files(&env.shared_dir(), &vars)?;
    Ok(BootReport { identity, keys, shared })
}

fn env_pairs(dir: &Path) -> Vec<(String, String)> {
    std::fs::read(dir.join(names::DECRYPTED_ENV_JSON))
        .ok()
        .and_then(|raw| serde_json::from_slice::<std::collections::BTreeMap<String, String>>(&raw).ok())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default()
}

/// Steps 9–10 (gateway registration comes later): init scripts, containerd + dockerd, the app.
pub fn start_app(env: &BootEnv, report: &BootReport, state: &InitState, n: &dyn Notifier) -> Result<(), BootError> {
    let work = env.work_dir();
    let vars = env_pairs(&env.shared_dir());
    let compose = &report.shared.compose;
    for (i, script) in compose.init_scripts().iter().enumerate() {
        n.notify("boot.progress", "init-script");
        let mut cmd = Command::new("bash");
        cmd.args(["-e", "-c", script])
            .current_dir(&work)
            .envs(vars.iter().map(|(k, v)| (k, v)));
        crate::proc::run(&mut cmd, None, Duration::from_secs(3600))
            .map_err(|e| step_err(format!("init script {i}"))(e.to_string()))?;
    }
    if compose.runner == Runner::DockerCompose {
        n.notify("boot.progress", "setting up docker");
        let data_root = env.data_dir().join("docker");
        let cfg = docker::write_daemon_json(
            &env.root,
            &data_root,
            report.shared.sys_config.docker_registry.as_deref(),
        )?;
        let [containerd, dockerd] = docker::services(&env.data_dir(), &cfg);
        state.supervisor.start(containerd);
        docker::wait_ready("containerd", Duration::from_secs(60), || {
            docker::socket_accepts(Path::new(docker::CONTAINERD_SOCK))
        })?;
        state.supervisor.start(dockerd);
        docker::wait_ready("dockerd", Duration::from_secs(120), || {
            docker::docker_ping(Path::new(docker::DOCKER_SOCK))
        })?;
    }
    n.notify("boot.progress", "pre-launch");
    let app = docker::app_command(compose, &work, &vars)?;
    match compose.runner {
        Runner::DockerCompose => {
            crate::proc::run(&mut app.command(), None, Duration::from_secs(3600))
                .map_err(|e| step_err("docker compose up")(e.to_string()))?;
            let stop_dir = work.clone();
            state.on_stop_app(move || {
                let mut c = Command::new("docker");
                c.args(["compose", "-f", "docker-compose.yaml", "stop"])
                    .current_dir(&stop_dir);
                if let Err(e) = crate::proc::run(&mut c, None, Duration::from_secs(60)) {
                    tracing::warn!("docker compose stop: {e}");
                }
            });
        }
        _ => {
            let mut spec = crate::supervisor::ServiceSpec::new("app", &app.program, &[]);
            spec.args = app.args.clone();
            spec.env = app.env.clone();
            spec.cwd = Some(app.cwd.clone());
            state.supervisor.start(spec);
        }
    }
    n.notify("boot.progress", "app started");
    Ok(())
}

/// The whole sequence; on error `boot.error` has been sent.
pub fn run(env: &BootEnv, deps: &Deps<'_>) -> Result<BootReport, BootError> {
    let shared = intake(env)?;
    run_from(env, deps, shared)
}

/// [`run`] after [`intake`].
pub fn run_from(env: &BootEnv, deps: &Deps<'_>, shared: HostShared) -> Result<BootReport, BootError> {
    let (report, notifier) = prepare_from(env, deps, shared)?;
    if let Some(gw) = deps.gateway {
        match gw.setup(env, &report) {
            Ok(Some(reg)) => notifier.notify(
                "boot.progress",
                &format!(
                    "gateway tunnel {} up as {} via {}",
                    reg.interface, reg.client_ip, reg.url
                ),
            ),
            Ok(None) => {}
            Err(e) => {
                let e = BootError::from(e);
                notifier.notify("boot.error", &e.to_string());
                return Err(e);
            }
        }
    }
    if let Some(agent) = deps.agent {
        notifier.notify("boot.progress", "starting guest agent");
        if let Err(e) = agent.start(env, &report).map_err(step_err("guest agent")) {
            notifier.notify("boot.error", &e.to_string());
            return Err(e);
        }
    }
    if env.start_app {
        let state = deps
            .state
            .ok_or_else(|| step_err("start app")("no supervisor".into()))?;
        if let Err(e) = start_app(env, &report, state, notifier.as_ref()) {
            notifier.notify("boot.error", &e.to_string());
            return Err(e);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
