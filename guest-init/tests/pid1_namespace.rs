//! Runs `guest-init init` as PID 1 of a new PID + mount namespace (`unshare --pid --fork --mount
//! --propagation private`, util-linux) over a fake root, and checks: API filesystems mounted under the
//! fake root, orphans reaped (no zombies), a crashing service restarted without harming PID 1, and an
//! orderly shutdown on SIGTERM ending in reboot(2), which in a child PID namespace ends the namespace's
//! init (the kernel reports it as killed by SIGINT for POWER_OFF).
//!
//! Needs root and util-linux `unshare`; skips with the reason otherwise, fails instead when
//! `DSTACK_REQUIRE_FIXTURES=1`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn skip(reason: &str) {
    if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("PID 1 namespace fixture unavailable: {reason}");
    }
    eprintln!("SKIP: PID 1 namespace test: {reason}");
}

fn wait_for(log: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids whose parent is `ppid`, with their state letter (from /proc/<pid>/stat).
fn children_of(ppid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state, ppid, …
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim().to_owned()) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push((pid, state));
        }
    }
    out
}

#[test]
fn pid1_reaps_supervises_and_shuts_down_in_order() {
    if !nix::unistd::geteuid().is_root() {
        return skip("not running as root");
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        return skip("unshare (util-linux) is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let log = dir.path().join("init.log");
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_guest-init"))
        .arg("init")
        .arg("--root")
        .arg(&root)
        .args(["--no-switch-root", "--no-boot", "--log-file"])
        .arg(&log)
        // Double fork: the inner sleep is orphaned to PID 1 and must be reaped by it.
        .args(["--service", "orphaner=sh,-c,(sleep 0.2 &); exec sleep 600"])
        .args(["--service", "crasher=sh,-c,exit 3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child.id()));
    let text = wait_for(&log, "reaped orphan pid", Duration::from_secs(15));
    if !text.contains("guest-init") {
        drop(guard);
        let _ = child.wait();
        return skip(&format!(
            "unshare did not start guest-init (no PID namespaces here?): {text}"
        ));
    }
    assert!(text.contains("reaped orphan pid"), "{text}");
    let text = wait_for(&log, "restarting in", Duration::from_secs(10));
    assert!(text.contains("service crasher: exited unexpectedly"), "{text}");

    // The namespace's init is unshare's only child; no zombie may hang under it.
    let init = children_of(child.id()).first().map(|c| c.0).expect("namespace init");
    guard.0 = Some(init);
    let mountinfo = std::fs::read_to_string(format!("/proc/{init}/mountinfo")).unwrap();
    for m in [
        "proc",
        "sys",
        "dev",
        "run",
        "dev/pts",
        "dev/shm",
        "tmp",
        "sys/fs/cgroup",
    ] {
        let want = format!(" {}/{m} ", root.display());
        assert!(
            mountinfo.contains(&want),
            "{m} not mounted in the namespace:\n{mountinfo}"
        );
    }
    assert!(text.contains("early mounts:"), "{text}");
    let zombies: Vec<_> = children_of(init).into_iter().filter(|c| c.1 == 'Z').collect();
    assert!(zombies.is_empty(), "zombies under PID 1: {zombies:?}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), nix::sys::signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "PID 1 did not shut down");
        std::thread::sleep(Duration::from_millis(50));
    };
    guard.0 = None;
    let text = std::fs::read_to_string(&log).unwrap();
    let pos = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing in:\n{text}"))
    };
    assert!(pos("shutdown (PowerOff): received SIGTERM") < pos("service orphaner: sending SIGTERM"));
    assert!(!text.contains("sending SIGKILL"), "services stop on SIGTERM:\n{text}");
    assert!(pos("service orphaner: sending SIGTERM") < pos(&format!("unmounted {}/tmp", root.display())));
    assert!(pos(&format!("unmounted {}/sys/fs/cgroup", root.display())) < pos("powering off"));
    // Late mounts are unmounted in reverse order.
    assert!(
        pos(&format!("unmounted {}/sys/fs/cgroup", root.display()))
            < pos(&format!("unmounted {}/dev/shm", root.display()))
    );
    // reboot(POWER_OFF) in a child PID namespace ends its init as "killed by SIGINT"; util-linux unshare
    // re-raises that signal on itself.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(nix::libc::SIGINT), "unshare status {status:?}");
}

/// Kills the namespace (its init, or unshare before the init is known) if the test fails midway.
struct Guard(Option<u32>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
    }
}
