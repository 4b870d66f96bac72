//! The VM registry: one owner of all VM state (a mutex around the map), persisted to each VM's work
//! directory after every change. Lifecycle, resource accounting, the monitor tick (exit detection, log
//! rotation, auto-restart with exponential backoff) and re-adoption after a daemon restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dstack_rpc::vmm::{GuestEvent, VmConfiguration};
use tracing::{info, warn};

use super::backend::{Backend, Image, LaunchInput};
use super::bridge::{BridgeError, BridgeNet, TapPort, tap_name};
use super::config::VmmConfig;
use super::services::{self, VmServices};
use super::state::{CidPool, Desired, Manifest, ProcRecord, VmState, Workdir, is_valid_id, new_uuid, now_ms};
use super::supervisor::{Limits, Process, rotate_log};
use super::validate::{self, ValidationError};

/// Errors of manager operations (shown to API clients).
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("VM {0} not found")]
    NotFound(String),
    #[error("VM {id} is {status}; {action} needs it stopped")]
    NotStopped {
        id: String,
        status: String,
        action: &'static str,
    },
    #[error(
        "not enough resources: {what} requested {requested}, {available} of {limit} available \
         (vmm.toml [cvm] {field})"
    )]
    OverAllocation {
        what: &'static str,
        requested: u64,
        available: u64,
        limit: u64,
        field: &'static str,
    },
    #[error("no free guest CID: all {0} CIDs of the pool are in use ([cvm] cid_pool_size)")]
    CidExhausted(u32),
    #[error(transparent)]
    Backend(#[from] super::backend::BackendError),
    #[error(transparent)]
    Supervisor(#[from] super::supervisor::SupervisorError),
    #[error(transparent)]
    State(#[from] super::state::StateError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("{0}")]
    Other(String),
}

/// One VM in memory.
struct Vm {
    wd: Workdir,
    manifest: Manifest,
    state: VmState,
    procs: Vec<Process>,
    services: Option<VmServices>,
    started: Option<Instant>,
    next_restart: Option<Instant>,
    /// The VM's tap on the managed bridge while it runs (bridge networking).
    tap: Option<TapPort>,
}

impl Vm {
    fn running(&mut self) -> bool {
        match self.procs.last_mut() {
            Some(p) => p.poll_exit().is_none(),
            None => false,
        }
    }

    fn status(&mut self) -> &'static str {
        if self.running() {
            "running"
        } else if self.state.desired == Desired::Running && self.next_restart.is_some() {
            "restarting"
        } else if self.state.exited_at_ms.is_some() {
            "exited"
        } else {
            "stopped"
        }
    }

    fn save(&self) -> Result<(), ManagerError> {
        Ok(self.wd.save_state(&self.state)?)
    }
}

/// A snapshot of one VM for the API layer.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    pub manifest: Manifest,
    pub state: VmState,
    pub status: &'static str,
    pub uptime: Option<Duration>,
    pub workdir: PathBuf,
}

struct Registry {
    vms: BTreeMap<String, Vm>,
    cids: CidPool,
}

/// The manager shared by the API handlers and the monitor task.
pub struct Manager {
    pub config: VmmConfig,
    backend: Box<dyn Backend>,
    /// The managed bridge (`[cvm.networking.bridge]`).
    bridge: Option<BridgeNet>,
    registry: Mutex<Registry>,
    runtime: tokio::runtime::Handle,
    /// Set for the re-adoption hand-over in tests and on daemon exit: leave VM processes running.
    detach: std::sync::atomic::AtomicBool,
}

impl Manager {
    /// Loads every persisted VM from `run_path`, re-adopting live processes and restarting VMs that should
    /// run but whose processes are gone. Must be called inside a Tokio runtime.
    pub fn open(config: VmmConfig, backend: Box<dyn Backend>) -> Result<Arc<Self>, ManagerError> {
        config.validate().map_err(|e| ManagerError::Other(e.to_string()))?;
        let run_path = config.cvm.run_path.clone();
        std::fs::create_dir_all(&run_path).map_err(|e| ManagerError::Other(format!("{}: {e}", run_path.display())))?;
        // The simulated TDX module's root exists before any VM starts, so a KMS can pin it up front.
        let sim_dir = config.sim_tdx_state_dir();
        dstack_sim_tdx::ensure_signer(&sim_dir)
            .map_err(|e| ManagerError::Other(format!("simulated TDX module key in {}: {e}", sim_dir.display())))?;
        info!(
            "simulated TDX module root certificate (pin it in verifiers that allow simulation): {}",
            dstack_sim_tdx::root_cert_path(&sim_dir).display()
        );
        let bridge = match &config.cvm.networking.bridge {
            Some(b) => Some(BridgeNet::setup(b, &run_path.join(".bridge"))?),
            None => None,
        };
        let mut cids = CidPool::new(config.cvm.cid_start, config.cvm.cid_pool_size);
        let mut vms = BTreeMap::new();
        let entries =
            std::fs::read_dir(&run_path).map_err(|e| ManagerError::Other(format!("{}: {e}", run_path.display())))?;
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !is_valid_id(&id) {
                continue;
            }
            let wd = Workdir::new(&run_path, &id);
            if wd.removing_marker().exists() {
                let _ = std::fs::remove_dir_all(wd.path());
                continue;
            }
            let (manifest, state) = match (wd.load_manifest(), wd.load_state()) {
                (Ok(m), Ok(s)) => (m, s),
                (Err(e), _) | (_, Err(e)) => {
                    warn!("skipping VM directory {}: {e}", wd.path().display());
                    continue;
                }
            };
            if !cids.reserve(manifest.cid) {
                warn!("VM {id}: CID {} is outside the pool or taken; skipping", manifest.cid);
                continue;
            }
            vms.insert(
                id,
                Vm {
                    wd,
                    manifest,
                    state,
                    procs: Vec::new(),
                    services: None,
                    started: None,
                    next_restart: None,
                    tap: None,
                },
            );
        }
        let mgr = Arc::new(Manager {
            config,
            backend,
            bridge,
            registry: Mutex::new(Registry { vms, cids }),
            runtime: tokio::runtime::Handle::current(),
            detach: std::sync::atomic::AtomicBool::new(false),
        });
        mgr.readopt();
        Ok(mgr)
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The managed bridge, if configured.
    pub fn bridge(&self) -> Option<&BridgeNet> {
        self.bridge.as_ref()
    }

    /// Whether `vm` uses bridge networking.
    fn uses_bridge(&self, vm: &Vm) -> bool {
        validate::network_mode(&self.config, &vm.manifest.config) == "bridge"
    }

    /// Deletes the VM's tap (after its processes ended).
    fn release_tap(&self, vm: &mut Vm) {
        if let (Some(tap), Some(b)) = (vm.tap.take(), &self.bridge) {
            b.remove_port(&tap.ifname);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves consistent-enough state (every change is persisted).
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn readopt(self: &Arc<Self>) {
        let mut reg = self.lock();
        let ids: Vec<String> = reg.vms.keys().cloned().collect();
        for id in ids {
            let Some(vm) = reg.vms.get_mut(&id) else { continue };
            if vm.state.desired != Desired::Running {
                continue;
            }
            let adopted: Vec<Process> = vm
                .state
                .processes
                .iter()
                .filter_map(|r| Process::adopt(&r.name, r.pid, r.start_time))
                .collect();
            if adopted.len() == vm.state.processes.len() && !adopted.is_empty() {
                info!(
                    "VM {id}: re-adopted {} process(es), VM pid {}",
                    adopted.len(),
                    adopted.last().map_or(0, Process::pid)
                );
                vm.procs = adopted;
                vm.started = Some(Instant::now());
                if let Some(b) = self.bridge.as_ref().filter(|_| self.uses_bridge(vm)) {
                    vm.tap = Some(TapPort {
                        ifname: tap_name(vm.manifest.cid),
                        bridge: b.plan().name.clone(),
                    });
                }
                match services::start(self, vm_ctx(vm, true)) {
                    Ok(s) => vm.services = Some(s),
                    Err(e) => warn!("VM {id}: host services: {e}"),
                }
                continue;
            }
            // Partially alive: stop the leftovers, then restart per the auto-restart policy.
            for mut p in adopted {
                p.kill_and_wait(Duration::from_secs(2));
            }
            if self.config.cvm.auto_restart.enabled {
                info!("VM {id}: processes gone after daemon restart; restarting");
                if let Err(e) = self.launch(vm) {
                    warn!("VM {id}: restart failed: {e}");
                    vm.state.last_exit = Some(format!("restart after daemon restart failed: {e}"));
                    vm.state.exited_at_ms = Some(now_ms());
                }
            } else {
                vm.state.desired = Desired::Stopped;
                vm.state.processes.clear();
                vm.state.exited_at_ms = Some(now_ms());
                vm.state.last_exit = Some("process gone after daemon restart".into());
            }
            if let Err(e) = vm.save() {
                warn!("VM {id}: {e}");
            }
        }
    }

    /// Creates a VM (and starts it unless `stopped`). Returns its id.
    pub fn create(self: &Arc<Self>, req: VmConfiguration) -> Result<String, ManagerError> {
        let image = validate::vm_configuration(&self.config, &req)?;
        let id = new_uuid().map_err(|e| ManagerError::Other(format!("random id: {e}")))?;
        let mut reg = self.lock();
        if !req.stopped {
            self.check_resources(&mut reg, &id, req.vcpu, req.memory)?;
        }
        validate::port_conflicts(
            &id,
            &req.ports,
            reg.vms.values().map(|v| (&v.manifest.id, &v.manifest.config.ports)),
        )?;
        let cid = reg
            .cids
            .allocate()
            .ok_or(ManagerError::CidExhausted(self.config.cvm.cid_pool_size))?;
        let wd = Workdir::new(&self.config.cvm.run_path, &id);
        let result = (|| -> Result<Vm, ManagerError> {
            wd.create()?;
            services::write_shared_files(&self.config, &wd, &req, &image)?;
            let mut config = req.clone();
            config.compose_file.clear();
            config.encrypted_env.clear();
            config.user_config.clear();
            let manifest = Manifest {
                id: id.clone(),
                cid,
                created_at_ms: now_ms(),
                config,
            };
            wd.save_manifest(&manifest)?;
            let vm = Vm {
                wd: wd.clone(),
                manifest,
                state: VmState::default(),
                procs: Vec::new(),
                services: None,
                started: None,
                next_restart: None,
                tap: None,
            };
            vm.save()?;
            Ok(vm)
        })();
        let vm = match result {
            Ok(vm) => vm,
            Err(e) => {
                reg.cids.release(cid);
                let _ = std::fs::remove_dir_all(wd.path());
                return Err(e);
            }
        };
        info!("VM {id} created (name {:?}, cid {cid})", req.name);
        reg.vms.insert(id.clone(), vm);
        drop(reg);
        if !req.stopped {
            self.start(&id)?;
        }
        Ok(id)
    }

    /// Starts a stopped VM after checking the resource limits.
    pub fn start(self: &Arc<Self>, id: &str) -> Result<(), ManagerError> {
        let mut reg = self.lock();
        let (vcpu, mem) = {
            let vm = reg
                .vms
                .get_mut(id)
                .ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
            if vm.running() {
                return Ok(());
            }
            (vm.manifest.config.vcpu, vm.manifest.config.memory)
        };
        self.check_resources(&mut reg, id, vcpu, mem)?;
        let Some(vm) = reg.vms.get_mut(id) else {
            return Err(ManagerError::NotFound(id.to_owned()));
        };
        vm.state.restarts = 0;
        self.launch(vm)?;
        vm.save()
    }

    /// Refuses a start that would exceed `max_allocable_vcpu` / `max_allocable_memory_in_mb`.
    fn check_resources(&self, reg: &mut Registry, exclude: &str, vcpu: u32, mem: u32) -> Result<(), ManagerError> {
        let mut used = (0u64, 0u64);
        for (other, vm) in reg.vms.iter_mut() {
            if other != exclude && (vm.state.desired == Desired::Running || vm.running()) {
                used.0 += u64::from(vm.manifest.config.vcpu);
                used.1 += u64::from(vm.manifest.config.memory);
            }
        }
        let cvm = &self.config.cvm;
        check_limit(
            "vcpu",
            u64::from(vcpu),
            used.0,
            cvm.max_allocable_vcpu,
            "max_allocable_vcpu",
        )?;
        check_limit(
            "memory (MB)",
            u64::from(mem),
            used.1,
            cvm.max_allocable_memory_in_mb,
            "max_allocable_memory_in_mb",
        )
    }

    /// Starts processes and host services for `vm` and marks it running.
    fn launch(self: &Arc<Self>, vm: &mut Vm) -> Result<(), ManagerError> {
        let image = Image::load(&self.config.image.path, &vm.manifest.config.image)?;
        // The image may have been rebuilt under the same name since the last start: vm_config's
        // os_image_hash must name what boots now (the KMS checks it against the measurements).
        services::write_sys_config(&self.config, &vm.wd, &vm.manifest.config, &image)?;
        self.prepare_tap(vm)?;
        let planned = (|| {
            let c = &vm.manifest.config;
            let input = LaunchInput {
                workdir: &vm.wd,
                image: &image,
                vcpu: c.vcpu,
                memory_mb: c.memory,
                disk_size_gb: c.disk_size,
                cid: vm.manifest.cid,
                ports: &c.ports,
                default_host_address: &self.config.cvm.port_mapping.address,
                tap: vm.tap.as_ref(),
            };
            self.backend.prepare(&input)?;
            Ok::<_, ManagerError>(self.backend.plan(&input)?)
        })();
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                self.release_tap(vm);
                return Err(e);
            }
        };
        if vm.services.is_none() {
            match services::start(self, vm_ctx(vm, false)) {
                Ok(s) => vm.services = Some(s),
                Err(e) => {
                    self.release_tap(vm);
                    return Err(ManagerError::Other(e));
                }
            }
        }
        if let Err(e) = self.spawn_plan(vm, &plan) {
            self.release_tap(vm);
            // The VM will not run: its host services go too.
            if let Some(s) = vm.services.take() {
                s.shutdown();
            }
            return Err(e);
        }
        Ok(())
    }

    /// The tap a bridge-mode VM's start needs (created here; deleted when the VM's processes end).
    fn prepare_tap(&self, vm: &mut Vm) -> Result<(), ManagerError> {
        if !self.uses_bridge(vm) {
            return Ok(());
        }
        let bridge = self.bridge.as_ref().ok_or_else(|| {
            ManagerError::Other(format!(
                "VM {} uses bridge networking, which is not configured (vmm.toml [cvm.networking.bridge])",
                vm.manifest.id
            ))
        })?;
        if vm.tap.is_none() {
            vm.tap = Some(bridge.add_port(vm.manifest.cid)?);
        }
        Ok(())
    }

    fn spawn_plan(&self, vm: &mut Vm, plan: &[super::supervisor::ProcSpec]) -> Result<(), ManagerError> {
        let limits = Limits {
            nofile: self.config.cvm.rlimit_nofile,
        };
        let mut procs: Vec<Process> = Vec::new();
        for spec in plan {
            match Process::spawn(spec, limits) {
                Ok(p) => procs.push(p),
                Err(e) => {
                    for mut p in procs {
                        p.kill_and_wait(Duration::from_secs(2));
                    }
                    return Err(e.into());
                }
            }
        }
        info!(
            "VM {} started on {}{}: {}",
            vm.manifest.id,
            self.backend.name(),
            if self.backend.is_emulation() {
                " (software emulation)"
            } else {
                ""
            },
            plan.last().map(|s| s.command_line()).unwrap_or_default()
        );
        vm.state.processes = procs
            .iter()
            .map(|p| ProcRecord {
                name: p.name.clone(),
                pid: p.pid(),
                start_time: p.start_time(),
            })
            .collect();
        vm.procs = procs;
        vm.state.desired = Desired::Running;
        vm.state.started_at_ms = Some(now_ms());
        vm.state.exited_at_ms = None;
        vm.state.boot_progress.clear();
        vm.state.boot_error.clear();
        vm.state.shutdown_progress.clear();
        vm.started = Some(Instant::now());
        vm.next_restart = None;
        Ok(())
    }

    /// Stops a VM: SIGTERM with `grace`, then SIGKILL. Host services stop too.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<(), ManagerError> {
        let mut reg = self.lock();
        let vm = reg
            .vms
            .get_mut(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
        vm.state.desired = Desired::Stopped;
        vm.next_restart = None;
        for mut p in std::mem::take(&mut vm.procs).into_iter().rev() {
            let exit = p.stop(grace);
            info!("VM {id}: {} stopped ({exit})", p.name);
        }
        vm.state.processes.clear();
        vm.state.exited_at_ms = None;
        vm.state.last_exit = None;
        if let Some(s) = vm.services.take() {
            s.shutdown();
        }
        vm.started = None;
        if let (Some(tap), Some(b)) = (vm.tap.take(), &self.bridge) {
            b.remove_port(&tap.ifname);
        }
        vm.save()
    }

    /// Stops and deletes a VM, freeing its CID.
    pub fn remove(&self, id: &str) -> Result<(), ManagerError> {
        self.stop(id, Duration::from_secs(2))?;
        let mut reg = self.lock();
        let vm = reg
            .vms
            .remove(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
        let _ = std::fs::write(vm.wd.removing_marker(), b"");
        std::fs::remove_dir_all(vm.wd.path())
            .map_err(|e| ManagerError::Other(format!("{}: {e}", vm.wd.path().display())))?;
        reg.cids.release(vm.manifest.cid);
        info!("VM {id} removed");
        Ok(())
    }

    /// Applies `f` to a stopped VM's manifest and persists it (UpgradeApp / ResizeVm).
    pub fn update_stopped(
        &self,
        id: &str,
        action: &'static str,
        f: impl FnOnce(&Workdir, &mut VmConfiguration) -> Result<(), ManagerError>,
    ) -> Result<(), ManagerError> {
        let mut reg = self.lock();
        let vm = reg
            .vms
            .get_mut(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
        let status = vm.status();
        if status == "running" || status == "restarting" {
            return Err(ManagerError::NotStopped {
                id: id.to_owned(),
                status: status.to_owned(),
                action,
            });
        }
        let mut config = vm.manifest.config.clone();
        f(&vm.wd, &mut config)?;
        vm.manifest.config = config;
        Ok(vm.wd.save_manifest(&vm.manifest)?)
    }

    /// Snapshots of all VMs (sorted by id).
    pub fn snapshots(&self) -> Vec<VmSnapshot> {
        let mut reg = self.lock();
        reg.vms.values_mut().map(snapshot).collect()
    }

    pub fn snapshot(&self, id: &str) -> Option<VmSnapshot> {
        let mut reg = self.lock();
        reg.vms.get_mut(id).map(snapshot)
    }

    /// Sum of vCPUs and MB of VMs that run or should run.
    pub fn allocated(&self) -> (u64, u64) {
        let mut reg = self.lock();
        reg.vms
            .values_mut()
            .filter_map(|vm| {
                (vm.state.desired == Desired::Running || vm.running())
                    .then(|| (u64::from(vm.manifest.config.vcpu), u64::from(vm.manifest.config.memory)))
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Records a guest notification (host API).
    pub fn guest_event(&self, id: &str, event: &str, body: &str) -> Result<(), ManagerError> {
        let mut reg = self.lock();
        let vm = reg
            .vms
            .get_mut(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
        match event {
            "boot.progress" | "boot_progress" => vm.state.boot_progress = body.to_owned(),
            "boot.error" | "boot_error" => vm.state.boot_error = body.to_owned(),
            "shutdown.progress" | "shutdown_progress" => vm.state.shutdown_progress = body.to_owned(),
            "instance.info" | "instance_info" => {
                let info = dstack_types::InstanceInfo::from_slice(body.as_bytes())
                    .map_err(|e| ManagerError::Other(e.to_string()))?;
                let json = serde_json::to_vec(&info).map_err(|e| ManagerError::Other(e.to_string()))?;
                vm.wd.write_shared(dstack_types::shared_files::INSTANCE_INFO, &json)?;
            }
            _ => {}
        }
        vm.state.events.push(GuestEvent {
            event: event.to_owned(),
            body: body.to_owned(),
            timestamp: now_ms(),
        });
        let keep = self.config.event_buffer_size;
        let len = vm.state.events.len();
        if len > keep {
            vm.state.events.drain(..len - keep);
        }
        vm.save()
    }

    /// One monitor pass: rotate logs, detect exits, schedule and run auto-restarts.
    pub fn tick(self: &Arc<Self>) {
        if let Some(b) = &self.bridge {
            b.check();
        }
        let mut reg = self.lock();
        let ar = &self.config.cvm.auto_restart;
        let log = &self.config.cvm.log;
        for (id, vm) in reg.vms.iter_mut() {
            for path in [vm.wd.stdout_log(), vm.wd.stderr_log(), vm.wd.serial_log()] {
                if let Err(e) = rotate_log(&path, log.max_bytes, log.max_backups) {
                    warn!("VM {id}: rotating {}: {e}", path.display());
                }
            }
            let exit = vm.procs.last_mut().and_then(Process::poll_exit);
            if let Some(exit) = exit {
                for mut p in std::mem::take(&mut vm.procs) {
                    p.kill_and_wait(Duration::from_secs(2));
                }
                if let (Some(tap), Some(b)) = (vm.tap.take(), &self.bridge) {
                    b.remove_port(&tap.ifname);
                }
                vm.state.processes.clear();
                vm.state.exited_at_ms = Some(now_ms());
                vm.state.last_exit = Some(exit.to_string());
                let uptime = vm.started.take().map(|s| s.elapsed()).unwrap_or_default();
                if uptime >= ar.reset_window() {
                    vm.state.restarts = 0;
                }
                if exit.is_clean() || vm.state.desired != Desired::Running {
                    info!("VM {id}: exited ({exit})");
                    vm.state.desired = Desired::Stopped;
                } else if !ar.enabled || vm.state.restarts >= ar.max_retries {
                    warn!(
                        "VM {id}: {exit}; not restarting (restarts so far: {})",
                        vm.state.restarts
                    );
                    vm.state.desired = Desired::Stopped;
                    if ar.enabled {
                        vm.state.last_exit = Some(format!("{exit}; gave up after {} restarts", vm.state.restarts));
                    }
                } else {
                    vm.state.restarts += 1;
                    let delay = ar.backoff(vm.state.restarts);
                    warn!("VM {id}: {exit}; restart {} in {delay:?}", vm.state.restarts);
                    vm.next_restart = Some(Instant::now() + delay);
                }
                // The guest is gone, and with it what its simulated TDX module measured (RTMRs, event log): a
                // restart is a new boot and gets fresh host services, never the crashed run's registers.
                if let Some(s) = vm.services.take() {
                    s.shutdown();
                }
                if let Err(e) = vm.save() {
                    warn!("VM {id}: {e}");
                }
            }
            if vm.state.desired == Desired::Running && vm.next_restart.is_some_and(|t| t <= Instant::now()) {
                vm.next_restart = None;
                if let Err(e) = self.launch(vm) {
                    warn!("VM {id}: auto-restart failed: {e}");
                    vm.state.desired = Desired::Stopped;
                    if let Some(s) = vm.services.take() {
                        s.shutdown();
                    }
                    vm.state.last_exit = Some(format!("auto-restart failed: {e}"));
                }
                if let Err(e) = vm.save() {
                    warn!("VM {id}: {e}");
                }
            }
        }
    }

    /// Runs [`Self::tick`] every `[cvm.auto_restart] interval` until the manager is dropped.
    pub fn spawn_monitor(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let interval = self.config.cvm.auto_restart.interval();
        self.runtime.spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(mgr) = weak.upgrade() else { return };
                if mgr.detach.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let _ = tokio::task::spawn_blocking(move || mgr.tick()).await;
            }
        })
    }

    /// Leaves VM processes running (for a daemon exit): host services stop, state stays on disk, and the
    /// next daemon re-adopts the processes.
    pub fn detach(&self) {
        self.detach.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut reg = self.lock();
        for vm in reg.vms.values_mut() {
            if let Some(s) = vm.services.take() {
                s.shutdown();
            }
            vm.procs.clear();
        }
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }
}

fn vm_ctx(vm: &Vm, resume: bool) -> services::VmCtx {
    services::VmCtx {
        resume,
        id: vm.manifest.id.clone(),
        wd: vm.wd.clone(),
        image: vm.manifest.config.image.clone(),
        vcpu: vm.manifest.config.vcpu,
        memory_mb: vm.manifest.config.memory,
    }
}

fn snapshot(vm: &mut Vm) -> VmSnapshot {
    let status = vm.status();
    VmSnapshot {
        manifest: vm.manifest.clone(),
        state: vm.state.clone(),
        status,
        uptime: if status == "running" {
            vm.started.map(|s| s.elapsed())
        } else {
            None
        },
        workdir: vm.wd.path().to_owned(),
    }
}

fn check_limit(
    what: &'static str,
    requested: u64,
    used: u64,
    limit: u32,
    field: &'static str,
) -> Result<(), ManagerError> {
    let limit = u64::from(limit);
    let available = limit.saturating_sub(used);
    if requested > available {
        return Err(ManagerError::OverAllocation {
            what,
            requested,
            available,
            limit,
            field,
        });
    }
    Ok(())
}
