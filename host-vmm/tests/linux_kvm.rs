//! A real Linux boot under our VMM: the guest image's own kernel, initrd and rootfs (the image CVMs run)
//! booted by the manager's `kvm` backend, up to guest-init running as PID 1 and measuring the app.
//!
//! Runs where the host has hardware virtualization (`vmx` or `svm` in /proc/cpuinfo). Elsewhere it is
//! skipped with the reason: on our CI machines `/dev/kvm` is PVM, where a stock kernel needs minutes and
//! hits instruction-emulation failures (DESIGN.md §10); the same image is booted there under the `tcg`
//! backend by the end-to-end tests (crate `dstack-e2e`). `DSTACK_FORCE_LINUX_KVM=1` runs it anyway (with
//! long timeouts); `DSTACK_REQUIRE_HW_VIRT=1` (for hardware-KVM CI hosts) turns the skip into a failure.
//!
//! Inputs: `DSTACK_E2E_IMAGE` (an image directory from `dstack-image-build build`, as for the end-to-end
//! tests; `cargo xtask test` sets it) and `mkfs.erofs` on `$PATH` (Debian: erofs-utils).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dstack_host_vmm::manager::backend::KvmBackend;
use dstack_host_vmm::manager::{Manager, VmmApi, VmmConfig};
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, VmConfiguration, VmmClient, VmmServer};

/// A no-KMS app (local key provider off, key provider none): guest-init runs without any service beside it.
const APP_COMPOSE: &str = r#"{"manifest_version":2,"name":"linux-kvm","runner":"docker-compose","docker_compose_file":"services: {}\n","kms_enabled":false,"gateway_enabled":false,"local_key_provider_enabled":false,"key_provider":"none","public_logs":true,"public_sysinfo":true,"allowed_envs":[],"no_instance_id":false,"secure_time":false}"#;

/// Why this host cannot boot a stock kernel on /dev/kvm at usable speed, if it cannot.
fn no_hardware_virtualization() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
    if flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        return None;
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    Some(format!(
        "no vmx/svm in /proc/cpuinfo{}: a stock Linux kernel does not boot at usable speed on this /dev/kvm \
         (DESIGN.md §10; the tcg end-to-end tests boot the same image)",
        if pvm { " and /dev/kvm is PVM (kvm_pvm)" } else { "" }
    ))
}

fn serial_has(path: &Path, text: &str) -> bool {
    std::fs::read_to_string(path).unwrap_or_default().contains(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_image_kernel_boots_to_guest_init_under_our_vmm() {
    const TEST: &str = "guest_image_kernel_boots_to_guest_init_under_our_vmm";
    let forced = std::env::var("DSTACK_FORCE_LINUX_KVM").is_ok_and(|v| v == "1");
    let required = std::env::var("DSTACK_REQUIRE_HW_VIRT").is_ok_and(|v| v == "1");
    if let Some(reason) = no_hardware_virtualization().filter(|_| !forced) {
        assert!(!required, "{TEST}: DSTACK_REQUIRE_HW_VIRT=1 but {reason}");
        eprintln!("SKIPPED {TEST}: {reason} (DSTACK_FORCE_LINUX_KVM=1 runs it anyway)");
        return;
    }
    if kvm_or_skip(TEST).is_none() {
        return;
    }
    let Some(image) = std::env::var_os("DSTACK_E2E_IMAGE") else {
        assert!(!required, "{TEST}: DSTACK_E2E_IMAGE is not set");
        eprintln!("SKIPPED {TEST}: DSTACK_E2E_IMAGE (a guest image directory) is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::os::unix::fs::symlink(&image, dir.path().join("images/dstack-dev")).unwrap();
    let cfg = VmmConfig::parse(&format!(
        "[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\npasst_path = \"\"\n[cvm.auto_restart]\nmax_retries = 0\n",
        dir.path().join("images").display(),
        dir.path().join("run").display()
    ))
    .unwrap();
    let backend = KvmBackend {
        vmm_run: env!("CARGO_BIN_EXE_dstack-vmm-run").into(),
        mkfs_erofs: "mkfs.erofs".into(),
        passt: None,
    };
    let mgr = Manager::open(cfg, Box::new(backend)).unwrap();
    let _monitor = mgr.spawn_monitor();
    let c = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(mgr.clone()))));
    let started = Instant::now();
    let id = c
        .create_vm(VmConfiguration {
            name: "linux-kvm".into(),
            image: "dstack-dev".into(),
            compose_file: APP_COMPOSE.into(),
            vcpu: 2,
            memory: 2048,
            disk_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let run = dir.path().join("run").join(&id);
    let serial = run.join("serial.log");
    let scale = if forced { 20 } else { 1 };
    // Each milestone with its deadline: the kernel's own banner, guest-init as PID 1, the app measured.
    for (what, text, secs) in [
        ("kernel banner", "Linux version", 10),
        ("guest-init as PID 1", "starting (pid 1)", 30),
        ("compose hash measured", "compose hash", 90),
    ] {
        let deadline = started + Duration::from_secs(secs * scale);
        while !serial_has(&serial, text) {
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            let stderr = std::fs::read_to_string(run.join("stderr.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "{what}: {text:?} not on serial after {secs}×{scale} s\nserial tail:\n{}\nVMM stderr tail:\n{}",
                tail(&log, 30),
                tail(&stderr, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("{TEST}: {what} after {:.2} s", started.elapsed().as_secs_f64());
    }
    c.remove_vm(Id { id }).await.unwrap();
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
