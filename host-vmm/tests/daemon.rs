//! The `dstack-vmm` binary end to end, and a real kernel under the `tcg` backend.
//!
//! `tcg_backend_boots_a_kernel` needs external inputs and is skipped (with the reason printed) without them:
//! - `DSTACK_TEST_KERNEL`: a Linux bzImage (e.g. Debian's `vmlinuz`),
//! - `VHOST_DEVICE_VSOCK`: the `vhost-device-vsock` 0.3.0 binary (`cargo install vhost-device-vsock --version 0.3.0`),
//! - `qemu-system-x86_64` and `mkfs.erofs` on `$PATH` (Debian: qemu-system-x86, erofs-utils).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dstack_host_vmm::manager::backend::TcgBackend;
use dstack_host_vmm::manager::{Manager, VmmApi, VmmConfig};
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, VmConfiguration, VmmClient, VmmServer};

fn post(sock: &Path, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp[9..12].parse().unwrap();
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    (code, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn daemon_serves_prpc_and_exits_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vmm.sock");
    let cfg = dir.path().join("vmm.toml");
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_dstack-vmm"))
        .arg("--config")
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("daemon socket", Duration::from_secs(10), || sock.exists());
    let (code, v) = post(&sock, "/prpc/Version?json", "");
    assert_eq!(code, 200);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let (code, meta) = post(&sock, "/prpc/GetMeta?json", "{}");
    assert_eq!(code, 200);
    assert_eq!(meta["resources"]["max_allocable_vcpu"], 3);
    assert_eq!(meta["networking"]["default_mode"], "user");
    let (code, st) = post(&sock, "/prpc/Status?json", "{}");
    assert_eq!((code, st["total"].as_u64()), (200, Some(0)));
    // SAFETY: kill(2) of the daemon this test spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn daemon_refuses_tdx_backend() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vmm.toml");
    std::fs::write(&cfg, "[cvm]\nbackend = \"tdx\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dstack-vmm"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not available on this host"), "{err}");
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
