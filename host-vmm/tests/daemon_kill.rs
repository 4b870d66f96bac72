//! Fault injection (issue 13 item 2): `kill -9` of the `dstack-vmm` daemon while a VM runs on the `kvm`
//! backend, then a restart with the same config and run directory. Afterwards the VM is listed once, its
//! process is re-adopted (same PID) — or, when the VM process died while the daemon was down, restarted per
//! its desired state — and there is exactly one VM process for it; the API keeps working (stop, remove).
//!
//! Skipped without /dev/kvm (see `kvm_or_skip`; `DSTACK_REQUIRE_KVM=1` fails instead); needs `mkfs.erofs` on
//! `$PATH` (Debian: erofs-utils). Runs without networking (`passt_path = ""`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Bound on every socket operation and every wait, so a wedged daemon fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const COMPOSE: &str =
    r#"{"manifest_version":2,"name":"k","runner":"docker-compose","docker_compose_file":"services: {}\n"}"#;

/// A spawned daemon, SIGKILLed and reaped on drop.
struct Daemon(Option<Child>);

impl Daemon {
    fn spawn(cfg: &Path, stderr: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dstack-vmm"))
            .arg("--config")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon(Some(child))
    }

    /// `kill -9` and reap.
    fn kill9(mut self) {
        if let Some(mut c) = self.0.take() {
            c.kill().unwrap(); // SIGKILL
            let st = c.wait().unwrap();
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL));
        }
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    fn terminate(mut self) {
        let mut c = self.0.take().unwrap();
        // SAFETY: kill(2) of the daemon this test spawned and has not reaped yet.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "daemon exit: {st}");
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("dstack-vmm did not exit within {IO_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// PIDs of processes whose command line mentions `needle` (the test's temp dir or a VM's work dir).
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty cmdline and are not counted.
        if pid != me && String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// On drop, SIGKILLs every leftover process started under the test's temp dir (VM processes outlive a
/// killed daemon by design).
struct NoLeftovers(String);

impl Drop for NoLeftovers {
    fn drop(&mut self) {
        for pid in pids_mentioning(&self.0) {
            // SAFETY: kill(2) of a process whose command line names this test's private temp dir.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn post(sock: &Path, path: &str, body: &str) -> Option<(u16, serde_json::Value)> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.find("\r\n\r\n").map_or("", |i| &resp[i + 4..]);
    Some((code, serde_json::from_str(body).unwrap_or(serde_json::Value::Null)))
}

fn call(sock: &Path, method: &str, body: &str) -> serde_json::Value {
    let (code, v) = post(sock, &format!("/prpc/{method}?json"), body).unwrap_or_else(|| panic!("{method}: no answer"));
    assert_eq!(code, 200, "{method}: {v}");
    v
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until the (re)started daemon answers `Status` (a stale socket file from the killed one may exist).
fn wait_api(sock: &Path) {
    wait_for("daemon API", || {
        post(sock, "/prpc/Status?json", "{}").is_some_and(|(c, _)| c == 200)
    });
}

fn status_of(sock: &Path, id: &str) -> String {
    let info = call(sock, "GetInfo", &serde_json::json!({ "id": id }).to_string());
    info["info"]["status"].as_str().unwrap_or_default().to_owned()
}

/// The VM process recorded in `vm-state.json` (sidecars first, the VM process last).
fn recorded_vm_pid(workdir: &Path) -> Option<i32> {
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(workdir.join("vm-state.json")).ok()?).ok()?;
    s["processes"].as_array()?.last()?["pid"].as_i64().map(|p| p as i32)
}

/// VM processes (`dstack-vmm-run`) whose command line names `workdir`.
fn vm_processes(workdir: &Path) -> Vec<i32> {
    pids_mentioning(&workdir.display().to_string())
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("dstack-vmm-run"))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn daemon_kill9_restart_readopts_or_restarts_without_duplicates() {
    if kvm_or_skip("daemon_kill9_restart_readopts_or_restarts_without_duplicates").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = NoLeftovers(dir.path().display().to_string());
    halting_image(dir.path(), "forever", b"up\n");
    let sock = dir.path().join("vmm.sock");
    let cfg = dir.path().join("vmm.toml");
    let log = dir.path().join("stderr.log");
    let run: PathBuf = dir.path().join("run");
    std::fs::write(
        &cfg,
        format!(
            "address = \"unix:{}\"\n[image]\npath = \"{}\"\n[cvm]\nbackend = \"kvm\"\nrun_path = \"{}\"\n\
             passt_path = \"\"\nvmm_run_path = \"{}\"\n[cvm.auto_restart]\ninterval = 0.05\n\
             initial_backoff = 0.05\n",
            sock.display(),
            dir.path().join("images").display(),
            run.display(),
            env!("CARGO_BIN_EXE_dstack-vmm-run"),
        ),
    )
    .unwrap();
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();

    let daemon = Daemon::spawn(&cfg, &log);
    wait_api(&sock);
    let req = serde_json::json!({
        "name": "forever", "image": "forever", "compose_file": COMPOSE, "vcpu": 1, "memory": 64, "disk_size": 1,
    });
    let id = call(&sock, "CreateVm", &req.to_string())["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let wd = run.join(&id);
    wait_for("VM running", || status_of(&sock, &id) == "running");
    wait_for("guest output", || {
        std::fs::read_to_string(wd.join("serial.log")).is_ok_and(|s| s.contains("up"))
    });
    let pid1 = recorded_vm_pid(&wd).expect("VM pid recorded");
    assert_eq!(vm_processes(&wd), vec![pid1], "{}", stderr());

    // 1. kill -9 the daemon; the VM process keeps running; a new daemon re-adopts it (same PID, no second one).
    daemon.kill9();
    assert!(alive(pid1), "VM process died with the daemon");
    let daemon = Daemon::spawn(&cfg, &log);
    wait_api(&sock);
    let st = call(&sock, "Status", "{}");
    assert_eq!(st["total"].as_u64(), Some(1), "{st}");
    assert_eq!(st["vms"][0]["id"], id.as_str(), "{st}");
    assert_eq!(status_of(&sock, &id), "running", "{}", stderr());
    // Leave time for a (wrongly) duplicated VM start to show up before counting processes.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm_processes(&wd),
        vec![pid1],
        "not re-adopted exactly once: {}",
        stderr()
    );
    assert_eq!(recorded_vm_pid(&wd), Some(pid1));

    // 2. kill -9 the daemon, then the VM process while no daemon watches: the next daemon restarts the VM
    //    (desired state running) — one new process.
    daemon.kill9();
    // SAFETY: kill(2) of the VM process this test's daemon started (checked alive and ours above).
    unsafe {
        libc::kill(pid1, libc::SIGKILL);
    }
    wait_for("old VM process gone", || !alive(pid1));
    let daemon = Daemon::spawn(&cfg, &log);
    wait_api(&sock);
    wait_for("VM restarted", || {
        recorded_vm_pid(&wd).is_some_and(|p| p != pid1 && alive(p)) && status_of(&sock, &id) == "running"
    });
    let pid2 = recorded_vm_pid(&wd).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm_processes(&wd), vec![pid2], "{}", stderr());
    let st = call(&sock, "Status", "{}");
    assert_eq!(st["total"].as_u64(), Some(1), "{st}");

    // 3. The API works: stop (process gone), remove (listing empty), clean exit.
    call(&sock, "StopVm", &serde_json::json!({ "id": id }).to_string());
    wait_for("VM stopped", || status_of(&sock, &id) == "stopped");
    wait_for("VM process gone", || vm_processes(&wd).is_empty());
    call(&sock, "RemoveVm", &serde_json::json!({ "id": id }).to_string());
    let st = call(&sock, "Status", "{}");
    assert_eq!(st["total"].as_u64(), Some(0), "{st}");
    daemon.terminate();
    assert!(
        pids_mentioning(&dir.path().display().to_string()).is_empty(),
        "leftover processes"
    );
}
