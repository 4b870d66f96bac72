//! The `dstack-vmm` binary end to end, and a real kernel under the `tcg` backend.
//!
//! `tcg_backend_boots_a_kernel` needs external inputs and is skipped (with the reason printed) without them:
//! - `DSTACK_TEST_KERNEL`: a Linux bzImage (e.g. Debian's `vmlinuz`),
//! - `VHOST_DEVICE_VSOCK`: the `vhost-device-vsock` 0.3.0 binary (`cargo install vhost-device-vsock --version 0.3.0`),
//! - `qemu-system-x86_64` and `mkfs.erofs` on `$PATH` (Debian: qemu-system-x86, erofs-utils).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dstack_host_vmm::manager::backend::TcgBackend;
use dstack_host_vmm::manager::{Manager, VmmApi, VmmConfig};
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, VmConfiguration, VmmClient, VmmServer};

/// Every socket read/write and every wait in this file is bounded by this, so a wedged daemon fails the test
/// instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A spawned `dstack-vmm` that is SIGKILLed and reaped if the test ends (or panics) before stopping it.
struct Daemon(Option<Child>);

impl Daemon {
    fn spawn(cfg: &Path, stderr: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_dstack-vmm"))
            .arg("--config")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap();
        Daemon(Some(child))
    }

    fn pid(&self) -> i32 {
        self.0.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// SIGTERM, then the exit status within [`IO_TIMEOUT`] (the guard kills it if that runs out).
    fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill(2) of the daemon this test spawned and has not reaped yet.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
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

fn post(sock: &Path, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.find("\r\n\r\n").map_or("", |i| &resp[i + 4..]);
    (code, body.to_owned())
}

fn post_json(sock: &Path, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (code, body) = post(sock, path, body);
    (code, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn daemon_serves_prpc_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vmm.sock");
    let cfg = dir.path().join("vmm.toml");
    let log = dir.path().join("stderr.log");
    std::fs::write(
        &cfg,
        format!(
            "address = \"unix:{}\"\n[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\nmax_allocable_vcpu = 3\n",
            sock.display(),
            dir.path().join("images").display(),
            dir.path().join("run").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::spawn(&cfg, &log);
    wait_for("daemon socket", IO_TIMEOUT, || sock.exists());
    let (code, v) = post_json(&sock, "/prpc/Version?json", "");
    assert_eq!(code, 200);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let (code, meta) = post_json(&sock, "/prpc/GetMeta?json", "{}");
    assert_eq!(code, 200);
    assert_eq!(meta["resources"]["max_allocable_vcpu"], 3);
    assert_eq!(meta["networking"]["default_mode"], "user");
    let (code, st) = post_json(&sock, "/prpc/Status?json", "{}");
    assert_eq!((code, st["total"].as_u64()), (200, Some(0)));
    let status = daemon.terminate();
    assert!(status.success(), "{status}: {}", stderr_of(&log));
}

/// True if this host's kvm_intel module has TDX switched on (then the refusal below cannot be observed).
fn host_has_tdx() -> bool {
    std::fs::read_to_string("/sys/module/kvm_intel/parameters/tdx").is_ok_and(|v| v.trim() == "Y")
}

/// `backend = "tdx"` on a host without TDX: the daemon starts and serves the API (so existing VMs can be
/// listed and removed), logs why TDs cannot run, and refuses every CreateVm with the capability error.
#[test]
fn daemon_with_tdx_backend_refuses_create_vm_on_hosts_without_tdx() {
    if host_has_tdx() {
        eprintln!("skipped: this host has TDX enabled; the refusal path cannot be observed here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vmm.sock");
    let cfg = dir.path().join("vmm.toml");
    let log = dir.path().join("stderr.log");
    let img = dir.path().join("images/td-img");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(
        img.join("metadata.json"),
        r#"{"bios":"ovmf.fd","kernel":"bzImage","cmdline":"console=ttyS0","initrd":"","version":"0.1.0"}"#,
    )
    .unwrap();
    std::fs::write(img.join("bzImage"), b"not started").unwrap();
    std::fs::write(img.join("ovmf.fd"), b"not started").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "address = \"unix:{}\"\n[image]\npath = \"{}\"\n[cvm]\nbackend = \"tdx\"\nrun_path = \"{}\"\n\
             passt_path = \"\"\nvmm_run_path = \"/nonexistent/dstack-vmm-run\"\n",
            sock.display(),
            dir.path().join("images").display(),
            dir.path().join("run").display()
        ),
    )
    .unwrap();
    let daemon = Daemon::spawn(&cfg, &log);
    wait_for("daemon socket", IO_TIMEOUT, || sock.exists());
    let (code, meta) = post_json(&sock, "/prpc/GetMeta?json", "{}");
    assert_eq!(code, 200, "{}", stderr_of(&log));
    assert!(meta.is_object(), "{meta}");

    let req = serde_json::json!({
        "name": "td1",
        "image": "td-img",
        "compose_file": r#"{"manifest_version":2,"name":"td","runner":"docker-compose","docker_compose_file":"services: {}\n"}"#,
        "vcpu": 1,
        "memory": 256,
        "disk_size": 1,
    });
    let (code, body) = post(&sock, "/prpc/CreateVm?json", &req.to_string());
    assert_ne!(code, 200, "CreateVm on a host without TDX succeeded: {body}");
    assert!(body.contains("cannot run TDX guests"), "{body}");
    // The reason is named: either KVM's VM-type capability lacks TDX, or /dev/kvm itself is unusable.
    assert!(body.contains("KVM_X86_TDX_VM") || body.contains("/dev/kvm"), "{body}");
    // The daemon said so at start-up too.
    assert!(
        stderr_of(&log).contains("cannot start on this host"),
        "{}",
        stderr_of(&log)
    );
    // The VM record stays (stopped) so the operator can inspect and remove it; nothing runs.
    let (code, st) = post_json(&sock, "/prpc/Status?json", "{}");
    assert_eq!((code, st["total"].as_u64()), (200, Some(1)), "{st}");
    assert_ne!(st["vms"][0]["status"], "running", "{st}");

    let status = daemon.terminate();
    assert!(status.success(), "{status}: {}", stderr_of(&log));
}

fn external(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(PathBuf::from).filter(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcg_backend_boots_a_kernel() {
    let (Some(kernel), Some(vhost)) = (external("DSTACK_TEST_KERNEL"), external("VHOST_DEVICE_VSOCK")) else {
        let why = "set DSTACK_TEST_KERNEL (bzImage) and VHOST_DEVICE_VSOCK (vhost-device-vsock binary)";
        assert_ne!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
            Ok("1"),
            "tcg_backend_boots_a_kernel: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("images/k");
    std::fs::create_dir_all(&img).unwrap();
    std::os::unix::fs::symlink(&kernel, img.join("bzImage")).unwrap();
    // No initrd: the kernel boots, prints its banner, and panics for lack of a root fs; enough to prove the
    // QEMU command line, the memfd memory backend and the vhost-user vsock hand-shake.
    std::fs::write(
        img.join("metadata.json"),
        r#"{"kernel":"bzImage","initrd":"","cmdline":"console=ttyS0 panic=-1","version":"t","is_dev":true}"#,
    )
    .unwrap();
    let cfg = VmmConfig::parse(&format!(
        "[image]\npath = \"{}\"\n[cvm]\nbackend = \"tcg\"\nrun_path = \"{}\"\n",
        dir.path().join("images").display(),
        dir.path().join("run").display()
    ))
    .unwrap();
    let backend = TcgBackend {
        qemu: "qemu-system-x86_64".into(),
        vhost_vsock: vhost,
        mkfs_erofs: "mkfs.erofs".into(),
        net: cfg.cvm.networking.net.clone(),
        dhcp_start: cfg.cvm.networking.dhcp_start.clone(),
    };
    let mgr = Manager::open(cfg, Box::new(backend)).unwrap();
    let c = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(mgr.clone()))));
    let req = VmConfiguration {
        name: "tcg".into(),
        image: "k".into(),
        compose_file:
            r#"{"manifest_version":2,"name":"t","runner":"docker-compose","docker_compose_file":"services: {}\n"}"#
                .into(),
        vcpu: 1,
        memory: 256,
        disk_size: 1,
        ..Default::default()
    };
    let id = c.create_vm(req).await.unwrap().id;
    let wd = dir.path().join("run").join(&id);
    let serial = wd.join("serial.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if text.contains("Linux version") {
            break;
        }
        let stderr = std::fs::read_to_string(wd.join("stderr.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "no kernel banner in serial.log; QEMU stderr: {stderr}"
        );
        let info = c.get_info(Id { id: id.clone() }).await.unwrap().info.unwrap();
        assert_eq!(info.status, "running", "QEMU stopped early: {stderr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wd.join("vsock.sock").exists(), "vhost-device-vsock host socket");
    assert!(wd.join("shared.img").exists(), "erofs host-shared image");
    c.remove_vm(Id { id }).await.unwrap();
}
