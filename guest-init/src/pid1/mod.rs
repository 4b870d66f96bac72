//! PID 1: API filesystems, console logging, kernel modules, the switch to the verified rootfs, the signal
//! loop (reaping, shutdown requests) and the orderly shutdown. The boot sequence ([`crate::boot`]) runs in
//! its own thread; when it fails, it reports and asks the loop to power off — PID 1 never exits on its
//! own, never drops to a shell and never continues a half-set-up system.
//!
//! Signals (all blocked in every thread and read from a signalfd by the main loop; `std::process`
//! resets the mask for children):
//! - `SIGCHLD`: nothing here; a reaper thread ([`crate::proc::start_reaper_thread`]) reaps so that the
//!   shutdown sequence, which waits for children, never waits on itself.
//! - `SIGTERM`, `SIGUSR2`, `SIGPWR`: orderly power-off (busybox uses SIGUSR2 for poweroff; SIGPWR is
//!   what the kernel/ACPI-less hosts send on power failure).
//! - `SIGINT`: orderly reboot (ctrl-alt-del is routed here with `reboot(CAD_OFF)`, as init does).
//! - `SIGUSR1`: internal wake-up for a request made with [`request_power`] (e.g. a fatal boot error).
//! - `SIGHUP`: ignored (logged).
//!
//! The ACPI power button (an input device) is watched by [`power_button`]: a press is an orderly power-off.

pub mod modules;
pub mod mounts;
pub mod power_button;
pub mod shutdown;
pub mod switch_root;
pub mod verity;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::cmdline::Cmdline;
use crate::supervisor::{ServiceSpec, Supervisor};
pub use shutdown::PowerAction;

type Hook = Box<dyn FnMut() + Send>;

/// State shared by the boot thread and the signal loop.
#[derive(Default)]
pub struct InitState {
    pub supervisor: Supervisor,
    stop_app: Mutex<Vec<Hook>>,
    close_devices: Mutex<Vec<Hook>>,
}

impl std::fmt::Debug for InitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitState")
            .field("supervisor", &self.supervisor)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl InitState {
    /// Runs at shutdown before services are stopped (e.g. `docker compose stop`).
    pub fn on_stop_app(&self, f: impl FnMut() + Send + 'static) {
        lock(&self.stop_app).push(Box::new(f));
    }
    /// Runs at shutdown after filesystems are unmounted (e.g. `cryptsetup close`).
    pub fn on_close_devices(&self, f: impl FnMut() + Send + 'static) {
        lock(&self.close_devices).push(Box::new(f));
    }
}

static REQUEST: Mutex<Option<(PowerAction, String)>> = Mutex::new(None);

/// Asks PID 1 to shut down (from any thread).
pub fn request_power(action: PowerAction, reason: impl Into<String>) {
    lock(&REQUEST).get_or_insert((action, reason.into()));
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGUSR1);
}

/// Options of `guest-init init` (defaults = the real CVM).
#[derive(Debug, Clone)]
pub struct Pid1Options {
    /// Prefix for every mount (a fake root in tests).
    pub root: PathBuf,
    pub switch_root: bool,
    pub run_boot: bool,
    /// Extra supervised services (tests and debugging).
    pub services: Vec<ServiceSpec>,
    /// Log here instead of the console.
    pub log_file: Option<PathBuf>,
}

impl Default for Pid1Options {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            switch_root: true,
            run_boot: true,
            services: Vec::new(),
            log_file: None,
        }
    }
}

struct RealSystem<'a> {
    state: &'a InitState,
    root: PathBuf,
    is_pid1: bool,
}

impl shutdown::System for RealSystem<'_> {
    fn stop_app(&mut self) {
        for h in lock(&self.state.stop_app).iter_mut() {
            h();
        }
    }
    fn stop_services(&mut self) {
        self.state.supervisor.stop_all();
    }
    fn signal_all(&mut self, sig: Signal) {
        // kill(-1) outside PID 1 would hit every process of the user: only PID 1 may do this.
        if self.is_pid1 {
            let _ = nix::sys::signal::kill(Pid::from_raw(-1), sig);
        }
    }
    fn wait_all_gone(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let (orphans, left) = crate::proc::reap_and_check();
            for (pid, st) in orphans {
                tracing::info!("reaped pid {pid} ({st})");
            }
            if !left {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn mounts(&mut self) -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        mounts::mount_points(&info, &self.root)
            .into_iter()
            .filter(|m| !mounts::is_essential(m, &self.root))
            .collect()
    }
    fn unmount(&mut self, path: &Path) -> Result<(), String> {
        mounts::unmount(path).map_err(|e| e.to_string())
    }
    fn close_devices(&mut self) {
        for h in lock(&self.state.close_devices).iter_mut() {
            h();
        }
    }
    fn sync(&mut self) {
        nix::unistd::sync();
    }
    fn power(&mut self, action: PowerAction) {
        if !self.is_pid1 {
            std::process::exit(0);
        }
        let mode = match action {
            PowerAction::PowerOff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
            PowerAction::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        };
        let err = nix::sys::reboot::reboot(mode);
        tracing::error!("reboot(2) failed: {err:?}; halting here");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Logs a fatal error and powers off (or exits when not PID 1). Never returns.
pub fn fatal(state: &InitState, root: &Path, msg: &str) -> ! {
    tracing::error!("FATAL: {msg}");
    tracing::error!("FATAL: the CVM cannot continue safely and will power off");
    let mut sys = RealSystem {
        state,
        root: root.to_owned(),
        is_pid1: nix::unistd::getpid().as_raw() == 1,
    };
    shutdown::shutdown(&mut sys, PowerAction::PowerOff, msg);
    std::process::exit(1)
}

fn signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPWR,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

/// `PATH` for PID 1 and everything it starts (Debian's default for root).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs PID 1 until shutdown. Never returns.
pub fn run(opts: Pid1Options, boot: impl FnOnce(Arc<InitState>, Cmdline) + Send + 'static) -> ! {
    let is_pid1 = nix::unistd::getpid().as_raw() == 1;
    if is_pid1 && std::env::var_os("PATH").is_none() {
        // The kernel starts init without PATH; the tools the boot runs (blkid, cryptsetup, mkfs.ext4,
        // dockerd) live in the sbin directories, which a default exec search would miss.
        // SAFETY: no other thread exists yet (this is the first thing PID 1 does), so nothing can read the
        // environment concurrently.
        unsafe { std::env::set_var("PATH", DEFAULT_PATH) };
    }
    // Before any thread exists, so every thread inherits the mask.
    let set = signal_set();
    let _ = set.thread_block();
    let reaper = if is_pid1 {
        crate::proc::start_reaper_thread()
    } else {
        Ok(())
    };
    let state = Arc::new(InitState::default());
    let early = mounts::mount_all(&opts.root, mounts::EARLY);
    // With a log file (tests) the console is left alone: it is the host's console then.
    let sink = match &opts.log_file {
        Some(f) => {
            let s = crate::log::ConsoleSink::default();
            let _ = s.add_file(f);
            s
        }
        None => crate::log::ConsoleSink::open(&opts.root),
    };
    crate::log::init(sink);
    tracing::info!(
        "guest-init {} starting (pid {})",
        env!("CARGO_PKG_VERSION"),
        nix::unistd::getpid()
    );
    if let Err(e) = reaper {
        fatal(&state, &opts.root, &format!("starting the reaper thread: {e}"));
    }
    match early {
        Ok(done) => tracing::info!(
            "early mounts: {}",
            done.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => fatal(&state, &opts.root, &format!("early mounts: {e}")),
    }
    let cmdline_text = std::fs::read_to_string(opts.root.join("proc/cmdline")).unwrap_or_default();
    let cmdline = match Cmdline::parse(&cmdline_text) {
        Ok(c) => c,
        Err(e) => fatal(&state, &opts.root, &e.to_string()),
    };
    if let Err(e) = modules::load_all(&opts.root) {
        fatal(&state, &opts.root, &e.to_string());
    }
    let mut root = opts.root.clone();
    if opts.switch_root {
        match &cmdline.rootfs {
            Some(r) => {
                let step = verity::open_verity(&root, "dstack-rootfs", &r.device, r.data_size, &r.root_hash)
                    .map_err(|e| e.to_string())
                    .and_then(|dev| switch_root::mount_new_root(&root, &dev).map_err(|e| e.to_string()))
                    .and_then(|new| switch_root::switch_root(&new).map_err(|e| e.to_string()));
                if let Err(e) = step {
                    fatal(&state, &root, &format!("switching to the verified rootfs: {e}"));
                }
                root = PathBuf::from("/");
            }
            None => tracing::warn!("no dstack.rootfs_hash on the command line: staying in the initramfs root"),
        }
    }
    if let Err(e) = mounts::mount_all(&root, mounts::LATE) {
        fatal(&state, &root, &format!("mounts: {e}"));
    }
    if is_pid1 {
        // Route ctrl-alt-del to SIGINT instead of an immediate reboot (EINVAL in a PID namespace).
        let _ = nix::sys::reboot::set_cad_enabled(false);
        power_button::start(&root);
    }
    for spec in opts.services.clone() {
        state.supervisor.start(spec);
    }
    if opts.run_boot {
        let st = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("boot".into())
            .spawn(move || boot(st, cmdline));
        if let Err(e) = spawned {
            fatal(&state, &root, &format!("starting the boot thread: {e}"));
        }
    }
    signal_loop(&state, &root, set, is_pid1)
}

fn signal_loop(state: &InitState, root: &Path, set: SigSet, is_pid1: bool) -> ! {
    let sfd = match SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(e) => fatal(state, root, &format!("signalfd: {e}")),
    };
    loop {
        let sig = match sfd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::error!("reading signalfd: {e}");
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        };
        let action = match sig {
            // The reaper thread does the reaping; SIGCHLD stays blocked only so it is never lost.
            Some(Signal::SIGCHLD) => None,
            Some(Signal::SIGTERM | Signal::SIGUSR2 | Signal::SIGPWR) => Some((
                PowerAction::PowerOff,
                format!("received {}", sig.map_or("?", |s| s.as_str())),
            )),
            Some(Signal::SIGINT) => Some((PowerAction::Reboot, "received SIGINT (ctrl-alt-del)".to_owned())),
            Some(Signal::SIGUSR1) => lock(&REQUEST).take(),
            Some(other) => {
                tracing::info!("ignoring {other}");
                None
            }
            None => None,
        };
        if let Some((action, reason)) = action {
            let mut sys = RealSystem {
                state,
                root: root.to_owned(),
                is_pid1,
            };
            shutdown::shutdown(&mut sys, action, &reason);
            std::process::exit(0);
        }
    }
}
