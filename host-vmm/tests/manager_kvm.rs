//! The manager's `kvm` backend end to end: the daemon-side command line drives the real `dstack-vmm-run`
//! (with the data disk, erofs host-shared disk, vsock and rng it always attaches) on /dev/kvm, booting a small
//! payload that prints over serial and exits with a chosen status. Skipped without /dev/kvm (see
//! `kvm_or_skip`); needs `mkfs.erofs` on `$PATH` (Debian: erofs-utils).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dstack_host_vmm::manager::backend::KvmBackend;
use dstack_host_vmm::manager::{Manager, VmmApi, VmmConfig};
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, VmConfiguration, VmInfo, VmmClient, VmmServer};

const COMPOSE: &str =
    r#"{"manifest_version":2,"name":"k","runner":"docker-compose","docker_compose_file":"services: {}\n"}"#;

fn image(dir: &Path, name: &str, text: &[u8], status: u8) {
    let img = dir.join("images").join(name);
    std::fs::create_dir_all(&img).unwrap();
    let mut a = asm();
    emit_print(&mut a, text);
    emit_exit(&mut a, status);
    let elf = write_elf(&img, &assemble(a));
    assert_eq!(elf.file_name().unwrap(), "payload.elf");
    std::fs::write(
        img.join("metadata.json"),
        r#"{"kernel":"payload.elf","initrd":"","cmdline":"console=ttyS0","version":"p","is_dev":true}"#,
    )
    .unwrap();
}

async fn wait_status(c: &VmmClient<LocalTransport>, id: &str, want: &str) -> VmInfo {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.get_info(Id { id: id.into() }).await.unwrap().info.unwrap();
        if info.status == want {
            return info;
        }
        assert!(Instant::now() < deadline, "VM {id} never became {want}: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_backend_runs_our_vmm() {
    if kvm_or_skip("kvm_backend_runs_our_vmm").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    image(dir.path(), "ok", b"payload up\n", 0);
    image(dir.path(), "crash", b"crashing\n", 3);
    let cfg = VmmConfig::parse(&format!(
        "[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\n[cvm.auto_restart]\ninterval = 0.02\n\
         initial_backoff = 0.05\nmax_retries = 1\n",
        dir.path().join("images").display(),
        dir.path().join("run").display()
    ))
    .unwrap();
    let backend = KvmBackend {
        vmm_run: env!("CARGO_BIN_EXE_dstack-vmm-run").into(),
        mkfs_erofs: "mkfs.erofs".into(),
    };
    let mgr = Manager::open(cfg, Box::new(backend)).unwrap();
    let _monitor = mgr.spawn_monitor();
    let c = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(mgr.clone()))));
    let req = |image: &str| VmConfiguration {
        name: image.into(),
        image: image.into(),
        compose_file: COMPOSE.into(),
        vcpu: 1,
        memory: 64,
        disk_size: 1,
        ..Default::default()
    };

    // A guest that powers off (status 0) is not restarted.
    let ok = c.create_vm(req("ok")).await.unwrap().id;
    let info = wait_status(&c, &ok, "exited").await;
    let run = dir.path().join("run").join(&ok);
    let stderr = std::fs::read_to_string(run.join("stderr.log")).unwrap();
    assert_eq!(
        std::fs::read_to_string(run.join("serial.log")).unwrap(),
        "payload up\n",
        "{stderr}"
    );
    assert!(stderr.contains("debug exit with status 0x0"), "{stderr}");
    assert!(info.exited_at.is_some());

    // A crashing guest (status 3) is restarted once (max_retries = 1), then left exited.
    let crash = c.create_vm(req("crash")).await.unwrap().id;
    let run = dir.path().join("run").join(&crash);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("vm-state.json")).unwrap()).unwrap();
        if state["last_exit"]
            .as_str()
            .is_some_and(|s| s.contains("gave up after 1 restarts"))
        {
            assert!(state["last_exit"].as_str().unwrap().contains("exit code 3"), "{state}");
            break;
        }
        assert!(Instant::now() < deadline, "no give-up: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        std::fs::read_to_string(run.join("serial.log")).unwrap(),
        "crashing\ncrashing\n"
    );
    wait_status(&c, &crash, "exited").await;
    for id in [ok, crash] {
        c.remove_vm(Id { id }).await.unwrap();
    }
}
