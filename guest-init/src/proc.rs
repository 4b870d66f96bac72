//! Child processes under a PID 1 that reaps everything.
//!
//! PID 1 must `waitpid(-1)` to reap orphans, which would steal the exit status of any child that someone
//! else waits for with `Child::wait`. So every child guest-init starts goes through [`spawn`]: in
//! [`WaitMode::Reaper`] (PID 1) the pid is registered in a table *while holding the table lock across
//! `fork`*, and [`reap`] (run by the signal loop on SIGCHLD) takes the same lock before reaping, so a
//! child can never be reaped before its waiter is registered. Statuses of unregistered pids are orphans:
//! logged and dropped. Outside PID 1 ([`WaitMode::Direct`], tests) children are waited for directly.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How children are waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// `Child::wait` (not PID 1).
    Direct,
    /// The central reaper delivers statuses (PID 1).
    Reaper,
}

static REAPER: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<i32, SyncSender<ExitStatus>>>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<HashMap<i32, SyncSender<ExitStatus>>>> {
    match TABLE.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Switches to [`WaitMode::Reaper`]; call once, before any child is spawned, in PID 1.
pub fn enable_reaper() {
    table().get_or_insert_with(HashMap::new);
    REAPER.store(true, Ordering::SeqCst);
}

/// The current mode.
pub fn mode() -> WaitMode {
    if REAPER.load(Ordering::SeqCst) {
        WaitMode::Reaper
    } else {
        WaitMode::Direct
    }
}

fn raw_status(ws: WaitStatus) -> Option<(i32, ExitStatus)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus::from_raw((code & 0xff) << 8))),
        WaitStatus::Signaled(pid, sig, core) => Some((
            pid.as_raw(),
            ExitStatus::from_raw(sig as i32 | if core { 0x80 } else { 0 }),
        )),
        _ => None,
    }
}

/// Reaps every exited child. Registered children get their status; the pids of orphans are returned.
pub fn reap() -> Vec<(i32, ExitStatus)> {
    let mut guard = table();
    let mut orphans = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(ws) => {
                let Some((pid, status)) = raw_status(ws) else { continue };
                match guard.as_mut().and_then(|t| t.remove(&pid)) {
                    Some(tx) => {
                        let _ = tx.try_send(status);
                    }
                    None => orphans.push((pid, status)),
                }
            }
        }
    }
    orphans
}

/// Starts the reaper thread of PID 1: it blocks in `waitid(WNOWAIT)` until some child has exited (without
/// reaping it, so no lock is held while blocked), then reaps under the table lock. Orphans are logged.
pub fn start_reaper_thread() -> io::Result<()> {
    enable_reaper();
    std::thread::Builder::new().name("reaper".into()).spawn(|| {
        loop {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            match nix::sys::wait::waitid(nix::sys::wait::Id::All, flags) {
                Err(nix::errno::Errno::ECHILD) => std::thread::sleep(Duration::from_millis(200)),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("waitid: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(_) => {
                    for (pid, st) in reap() {
                        tracing::info!("reaped orphan pid {pid} ({st})");
                    }
                }
            }
        }
    })?;
    Ok(())
}

/// Reaps what has exited and tells whether any child is left (`ECHILD` = none).
pub fn reap_and_check() -> (Vec<(i32, ExitStatus)>, bool) {
    let orphans = reap();
    // WNOWAIT leaves a just-exited child for the next reap; only "no children at all" counts as empty.
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let left = !matches!(
        nix::sys::wait::waitid(nix::sys::wait::Id::All, flags),
        Err(nix::errno::Errno::ECHILD)
    );
    (orphans, left)
}

/// A started child.
pub struct Spawned {
    pid: i32,
    child: Child,
    rx: Option<Receiver<ExitStatus>>,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spawned(pid {})", self.pid)
    }
}

/// Starts `cmd` so that its exit status reaches this handle in either mode. The child starts with an
/// empty signal mask (PID 1 blocks its signals; `std` does not reset the mask for children).
pub fn spawn(cmd: &mut Command) -> io::Result<Spawned> {
    // SAFETY: the closure runs between fork and exec and only calls sigprocmask, which is
    // async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            )
            .map_err(io::Error::from)
        });
    }
    if mode() == WaitMode::Reaper {
        let mut guard = table();
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = sync_channel(1);
        guard.get_or_insert_with(HashMap::new).insert(pid, tx);
        drop(guard);
        Ok(Spawned {
            pid,
            child,
            rx: Some(rx),
            status: None,
        })
    } else {
        let child = cmd.spawn()?;
        Ok(Spawned {
            pid: child.id() as i32,
            child,
            rx: None,
            status: None,
        })
    }
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The child's pipes (stdin/stdout/stderr as configured).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits at most `timeout` (forever with `None`); `Ok(None)` on timeout.
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let status = match &self.rx {
            Some(rx) => match timeout {
                None => rx.recv().ok(),
                Some(t) => match rx.recv_timeout(t) {
                    Ok(s) => Some(s),
                    Err(RecvTimeoutError::Timeout) => return Ok(None),
                    Err(RecvTimeoutError::Disconnected) => None,
                },
            },
            None => {
                let deadline = timeout.map(|t| Instant::now() + t);
                loop {
                    if let Some(s) = self.child.try_wait()? {
                        break Some(s);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let status = status.ok_or_else(|| io::Error::other(format!("lost the exit status of pid {}", self.pid)))?;
        self.status = Some(status);
        Ok(Some(status))
    }

    /// Waits for exit.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.wait_timeout(None)?
            .ok_or_else(|| io::Error::other("wait without timeout returned nothing"))
    }

    /// Sends `sig` unless the child is already known to have exited.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.status.is_none() {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), sig);
        }
    }
}

/// Errors from running a tool.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("starting {program}: {source} (is it installed?)")]
    Start {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program}: {source}")]
    Io {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} timed out after {secs} s")]
    Timeout { program: String, secs: u64 },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl CmdError {
    /// The exit code of a failed run.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Self::Failed { status, .. } => status.code(),
            _ => None,
        }
    }
}

/// Output of a finished tool.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = s.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Runs `cmd` with `stdin` (secrets go here, never into argv), capturing stdout and stderr; kills it
/// after `timeout`. Returns the output whatever the exit status.
pub fn run_unchecked(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, CmdError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(cmd).map_err(|source| CmdError::Start {
        program: program.clone(),
        source,
    })?;
    let io_err = |source| CmdError::Io {
        program: program.clone(),
        source,
    };
    let input = child.child_mut().stdin.take();
    let mut out = child.child_mut().stdout.take();
    let mut err = child.child_mut().stderr.take();
    let (stdout, stderr, status) = std::thread::scope(|s| {
        if let (Some(mut pipe), Some(data)) = (input, stdin) {
            s.spawn(move || {
                // A tool that exits early closes the pipe; its status tells what happened.
                let _ = pipe.write_all(data);
            });
        }
        let out_t = s.spawn(move || {
            let mut v = Vec::new();
            if let Some(p) = out.as_mut() {
                let _ = p.read_to_end(&mut v);
            }
            v
        });
        let err_t = s.spawn(move || {
            let mut v = Vec::new();
            if let Some(p) = err.as_mut() {
                let _ = p.read_to_end(&mut v);
            }
            v
        });
        let status = child.wait_timeout(Some(timeout));
        if matches!(status, Ok(None)) {
            child.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
        (
            out_t.join().unwrap_or_default(),
            err_t.join().unwrap_or_default(),
            status,
        )
    });
    let status = status.map_err(io_err)?.ok_or(CmdError::Timeout {
        program: program.clone(),
        secs: timeout.as_secs(),
    })?;
    Ok(Output { status, stdout, stderr })
}

/// [`run_unchecked`], failing on a non-zero exit with the tail of stderr in the error.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, CmdError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = run_unchecked(cmd, stdin, timeout)?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            program,
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_stdin_and_reports_failure() {
        let out = run(
            Command::new("sh").args(["-c", "cat; echo err >&2"]),
            Some(b"secret"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"secret");
        assert_eq!(out.stderr, b"err\n");
        let err = run(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            None,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), Some(3));
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn times_out_and_kills() {
        let start = Instant::now();
        let err = run(Command::new("sleep").arg("30"), None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, CmdError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_is_a_start_error() {
        let err = run(&mut Command::new("/nonexistent/tool"), None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CmdError::Start { .. }));
    }

    #[test]
    fn children_start_with_an_empty_signal_mask() {
        let out = std::thread::spawn(|| {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(nix::sys::signal::Signal::SIGTERM);
            set.thread_block().unwrap();
            run(
                Command::new("grep").args(["SigBlk", "/proc/self/status"]),
                None,
                Duration::from_secs(10),
            )
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SigBlk:\t0000000000000000");
    }

    #[test]
    fn raw_status_encoding_matches_std() {
        let (_, s) = raw_status(WaitStatus::Exited(Pid::from_raw(5), 7)).unwrap();
        assert_eq!(s.code(), Some(7));
        let (_, s) = raw_status(WaitStatus::Signaled(Pid::from_raw(5), nix::sys::signal::SIGKILL, false)).unwrap();
        assert_eq!(s.signal(), Some(9));
    }
}
