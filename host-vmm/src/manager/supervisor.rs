//! Per-VM process supervision: spawning with rlimits in a process group of its own (so VM processes outlive a
//! daemon restart and can be re-adopted), PID + start-time tracking (a recycled PID is not mistaken for the
//! VM), exit detection, TERM-then-KILL stop, and size-based log rotation.
//!
//! Logs: the child writes straight to `stdout.log`/`stderr.log` opened with `O_APPEND`, so nothing in the
//! daemon sits in the data path and a restarted daemon keeps rotating the logs of adopted processes.
//! Rotation copies the file to `.1` (shifting `.1`→`.2`, …) and truncates it; `O_APPEND` writers then
//! continue at the new end.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting or controlling a process.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("opening log {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
    #[error("starting {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("process {name} exited right after start ({exit})")]
    EarlyExit { name: String, exit: String },
    #[error("{name}: {path} did not appear within {secs} s")]
    WaitPath { name: String, path: PathBuf, secs: u64 },
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSpec {
    /// Short role name (`vm`, `vhost-vsock`), used in messages.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// A path the process creates when ready (e.g. a vhost-user socket); the start waits for it.
    pub ready_path: Option<PathBuf>,
}

impl ProcSpec {
    /// The command line as one shell-like string (for `SvList` and logs).
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Resource limits applied in the child before exec.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub nofile: u64,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// An adopted process (not our child) disappeared; its status is not observable.
    Gone,
}

impl ExitInfo {
    /// A guest power-off makes the VM process exit 0; everything else counts as a crash.
    pub fn is_clean(self) -> bool {
        self == ExitInfo::Code(0)
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit code {c}"),
            ExitInfo::Signal(s) => write!(f, "killed by signal {s}"),
            ExitInfo::Gone => write!(f, "exited (status unknown: adopted process)"),
        }
    }
}

/// A running (or just-exited) process.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pid: u32,
    start_time: u64,
    /// `Some` when we spawned it (exit status observable), `None` when adopted after a daemon restart.
    child: Option<Child>,
    exited: Option<ExitInfo>,
}

fn open_log(path: &Path) -> Result<File, SupervisorError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| SupervisorError::Log {
            path: path.to_owned(),
            source,
        })
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot) and the state letter.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // rest starts at field 3 (state), so field 22 is index 19.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The start time of a live process (for PID-reuse checks).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// Runs in the forked child before exec.
fn apply_limits(nofile: u64) -> io::Result<()> {
    let nofile = libc::rlimit {
        rlim_cur: nofile,
        rlim_max: nofile,
    };
    // No core dumps: a VM process's memory is the guest's RAM.
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an initialized rlimit on this stack.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Process {
    /// Starts `spec` in its own process group with `limits`; waits for `ready_path` if set.
    pub fn spawn(spec: &ProcSpec, limits: Limits) -> Result<Self, SupervisorError> {
        let stdout = open_log(&spec.stdout)?;
        let stderr = open_log(&spec.stderr)?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let nofile = limits.nofile;
        // SAFETY: the closure runs between fork and exec and only calls setrlimit (async-signal-safe, no
        // allocation, no locks).
        unsafe {
            cmd.pre_exec(move || apply_limits(nofile));
        }
        let child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        let pid = child.id();
        let mut proc = Process {
            name: spec.name.clone(),
            pid,
            start_time: proc_start_time(pid).unwrap_or(0),
            child: Some(child),
            exited: None,
        };
        if let Some(path) = &spec.ready_path {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !path.exists() {
                if let Some(exit) = proc.poll_exit() {
                    return Err(SupervisorError::EarlyExit {
                        name: spec.name.clone(),
                        exit: exit.to_string(),
                    });
                }
                if Instant::now() > deadline {
                    proc.kill_and_wait(Duration::from_secs(1));
                    return Err(SupervisorError::WaitPath {
                        name: spec.name.clone(),
                        path: path.clone(),
                        secs: 10,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(proc)
    }

    /// Re-attaches to a process started by an earlier daemon, if it still runs with the same start time.
    pub fn adopt(name: &str, pid: u32, start_time: u64) -> Option<Self> {
        match proc_stat(pid) {
            Some((state, t)) if t == start_time && state != 'Z' && state != 'X' => Some(Process {
                name: name.to_owned(),
                pid,
                start_time,
                child: None,
                exited: None,
            }),
            _ => None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Non-blocking exit check; returns the exit once it happened (and keeps returning it).
    pub fn poll_exit(&mut self) -> Option<ExitInfo> {
        if self.exited.is_some() {
            return self.exited;
        }
        self.exited = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(match (status.code(), status.signal()) {
                    (Some(c), _) => ExitInfo::Code(c),
                    (None, Some(s)) => ExitInfo::Signal(s),
                    (None, None) => ExitInfo::Gone,
                }),
                Ok(None) => None,
                Err(_) => Some(ExitInfo::Gone),
            },
            None => match proc_stat(self.pid) {
                Some((state, t)) if t == self.start_time && state != 'Z' && state != 'X' => None,
                _ => Some(ExitInfo::Gone),
            },
        };
        self.exited
    }

    fn signal(&mut self, sig: i32) {
        if self.poll_exit().is_some() {
            return;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions; the PID was checked alive (same start time)
        // just above, so the signal goes to the process we started.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
    pub fn stop(&mut self, grace: Duration) -> ExitInfo {
        self.signal(libc::SIGTERM);
        if let Some(e) = self.wait_for(grace) {
            return e;
        }
        self.kill_and_wait(Duration::from_secs(5))
    }

    /// SIGKILL and wait up to `timeout`.
    pub fn kill_and_wait(&mut self, timeout: Duration) -> ExitInfo {
        self.signal(libc::SIGKILL);
        self.wait_for(timeout).unwrap_or(ExitInfo::Gone)
    }

    fn wait_for(&mut self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.poll_exit() {
                return Some(e);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Rotates `path` when it exceeds `max_bytes`: `path.N-1`→`path.N`, …, copy → `path.1`, truncate `path`.
/// Returns whether it rotated.
pub fn rotate_log(path: &Path, max_bytes: u64, max_backups: u32) -> io::Result<bool> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    let backup = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if max_backups > 0 {
        for n in (1..max_backups).rev() {
            if backup(n).exists() {
                std::fs::rename(backup(n), backup(n + 1))?;
            }
        }
        std::fs::copy(path, backup(1))?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, script: &str) -> ProcSpec {
        ProcSpec {
            name: "t".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            cwd: dir.to_owned(),
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
            ready_path: None,
        }
    }

    const LIMITS: Limits = Limits { nofile: 256 };

    #[test]
    fn spawn_logs_exit_code_and_rlimit() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Process::spawn(&spec(dir.path(), "ulimit -n; ulimit -c; echo err >&2; exit 7"), LIMITS).unwrap();
        assert_eq!(p.wait_for(Duration::from_secs(5)), Some(ExitInfo::Code(7)));
        let out = std::fs::read_to_string(dir.path().join("stdout.log")).unwrap();
        assert_eq!(out, "256\n0\n");
        assert_eq!(std::fs::read_to_string(dir.path().join("stderr.log")).unwrap(), "err\n");
    }

    #[test]
    fn stop_terminates_and_adopt_checks_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Process::spawn(&spec(dir.path(), "exec sleep 100"), LIMITS).unwrap();
        let adopted = Process::adopt("t", p.pid(), p.start_time());
        assert!(adopted.is_some());
        assert!(
            Process::adopt("t", p.pid(), p.start_time() + 1).is_none(),
            "start time mismatch must not adopt"
        );
        assert_eq!(p.stop(Duration::from_secs(5)), ExitInfo::Signal(libc::SIGTERM));
        let mut adopted = adopted.unwrap();
        assert_eq!(adopted.poll_exit(), Some(ExitInfo::Gone));
    }

    #[test]
    fn ready_path_early_exit_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), "exit 3");
        s.ready_path = Some(dir.path().join("never"));
        let e = Process::spawn(&s, LIMITS).unwrap_err().to_string();
        assert!(e.contains("exit code 3"), "{e}");
    }

    #[test]
    fn rotation_keeps_backups() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        for round in 0..4u8 {
            std::fs::write(&log, vec![b'a' + round; 20]).unwrap();
            assert!(rotate_log(&log, 10, 2).unwrap());
        }
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(std::fs::read(dir.path().join("stdout.log.1")).unwrap(), vec![b'd'; 20]);
        assert_eq!(std::fs::read(dir.path().join("stdout.log.2")).unwrap(), vec![b'c'; 20]);
        assert!(!dir.path().join("stdout.log.3").exists());
        std::fs::write(&log, b"small").unwrap();
        assert!(!rotate_log(&log, 10, 2).unwrap());
    }
}
