//! The manager's `kvm` backend end to end: the daemon-side command line drives the real `dstack-vmm-run`
//! (with the data disk, erofs host-shared disk, vsock and rng it always attaches) on /dev/kvm, booting a small
//! payload that prints over serial and exits with a chosen status. Skipped without /dev/kvm (see
//! `kvm_or_skip`); needs `mkfs.erofs` on `$PATH` (Debian: erofs-utils). When passt (Debian `passt`; path from
//! `DSTACK_PASST`, default `passt` on `$PATH`) runs here, the VMs also get user networking with a port mapping:
//! passt is started beside the VMM and the VMM connects its virtio-net device to it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dstack_host_vmm::manager::backend::{KvmBackend, PasstNet};
use dstack_host_vmm::manager::{Manager, VmmApi, VmmConfig, shutdown};
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, PortMapping, VmConfiguration, VmInfo, VmmClient, VmmServer};

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
    let passt = std::env::var("DSTACK_PASST").unwrap_or_else(|_| "passt".into());
    let have_passt = std::process::Command::new(&passt)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !have_passt {
        eprintln!("note: passt not found; VMs run without networking in this test");
    }
    let backend = KvmBackend {
        vmm_run: env!("CARGO_BIN_EXE_dstack-vmm-run").into(),
        mkfs_erofs: "mkfs.erofs".into(),
        passt: have_passt.then(|| PasstNet {
            program: passt.into(),
            net: "10.0.2.0/24".into(),
            dhcp_start: "10.0.2.10".into(),
        }),
    };
    // Inside the default allowed range (1–20000); varied by PID so parallel runs rarely collide.
    let host_port = 15000 + std::process::id() % 5000;
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
    let mut ok_req = req("ok");
    if have_passt {
        ok_req.ports.push(PortMapping {
            protocol: "tcp".into(),
            host_port,
            vm_port: 80,
            host_address: String::new(),
        });
    }
    let ok = c.create_vm(ok_req).await.unwrap().id;
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
    if have_passt {
        // passt was started (its output file exists) and the VMM's virtio-net device connected to its
        // socket: the VM would not have booted otherwise (dstack-vmm-run fails setup on a refused connect).
        assert!(run.join("passt.out").exists(), "passt was not started");
    }

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

/// A payload that enables PWRBTN_EN, waits (polling PM1_STS) for the power button, clears the status by
/// writing 1 and checks it reads back clear, then enters S5 through PM1_CNT.
fn button_image(dir: &Path) {
    let img = dir.join("images").join("button");
    std::fs::create_dir_all(&img).unwrap();
    let mut a = asm();
    a.mov(edx, 0x602).unwrap(); // PM1_EN
    a.mov(eax, 0x100).unwrap();
    a.out(dx, ax).unwrap();
    emit_print(&mut a, b"waiting\n");
    a.nop().unwrap(); // the print ends in a label; one label per instruction
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.pause().unwrap();
    a.mov(edx, 0x600).unwrap(); // PM1_STS
    a.in_(ax, dx).unwrap();
    a.test(eax, 0x100).unwrap();
    a.jz(poll).unwrap();
    a.mov(eax, 0x100).unwrap();
    a.out(dx, ax).unwrap(); // write 1 to clear
    a.in_(ax, dx).unwrap();
    let mut stuck = a.create_label();
    a.test(eax, 0x100).unwrap();
    a.jnz(stuck).unwrap();
    emit_print(&mut a, b"cleared\n");
    a.mov(edx, 0x604).unwrap(); // PM1_CNT: SLP_TYP = 5 (S5) | SLP_EN
    a.mov(eax, (5 << 10) | (1 << 13)).unwrap();
    a.out(dx, ax).unwrap();
    a.set_label(&mut stuck).unwrap();
    emit_print(&mut a, b"still running\n");
    emit_exit(&mut a, 7);
    write_elf(&img, &assemble(a));
    std::fs::write(
        img.join("metadata.json"),
        r#"{"kernel":"payload.elf","initrd":"","cmdline":"console=ttyS0","version":"p","is_dev":true}"#,
    )
    .unwrap();
}

async fn wait_serial(dir: &Path, id: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let path = dir.join("run").join(id).join("serial.log");
    while !std::fs::read_to_string(&path).unwrap_or_default().contains(text) {
        assert!(Instant::now() < deadline, "serial never showed {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `ShutdownVm` on `kvm`: the manager presses the ACPI power button through the VMM's control socket; a
/// guest that honours it powers off by itself (S5 through PM1_CNT), one that ignores it is hard-stopped after
/// the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_shutdown_presses_the_acpi_power_button() {
    if kvm_or_skip("kvm_shutdown_presses_the_acpi_power_button").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    button_image(dir.path());
    halting_image(dir.path(), "deaf", b"deaf\n");
    let cfg = VmmConfig::parse(&format!(
        "[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\npasst_path = \"\"\n[cvm.auto_restart]\ninterval = 0.02\n",
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
    let req = |image: &str| VmConfiguration {
        name: image.into(),
        image: image.into(),
        compose_file: COMPOSE.into(),
        vcpu: 1,
        memory: 64,
        disk_size: 1,
        ..Default::default()
    };

    let id = c.create_vm(req("button")).await.unwrap().id;
    wait_serial(dir.path(), &id, "waiting\n").await;
    let t = Instant::now();
    shutdown::graceful(&mgr, &id, Duration::from_secs(20)).await.unwrap();
    let took = t.elapsed();
    let run = dir.path().join("run").join(&id);
    let serial = std::fs::read_to_string(run.join("serial.log")).unwrap();
    let stderr = std::fs::read_to_string(run.join("stderr.log")).unwrap();
    assert_eq!(serial, "waiting\ncleared\n", "{stderr}");
    assert!(stderr.contains("vm: guest powered off"), "{stderr}");
    assert!(
        took < Duration::from_secs(10),
        "the guest's own power-off took {took:?}"
    );
    assert_eq!(
        c.get_info(Id { id: id.clone() }).await.unwrap().info.unwrap().status,
        "stopped"
    );

    let deaf = c.create_vm(req("deaf")).await.unwrap().id;
    wait_serial(dir.path(), &deaf, "deaf\n").await;
    let t = Instant::now();
    shutdown::graceful(&mgr, &deaf, Duration::from_secs(1)).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "grace then hard stop took {took:?}"
    );
    assert_eq!(
        c.get_info(Id { id: deaf.clone() }).await.unwrap().info.unwrap().status,
        "stopped"
    );
    for id in [id, deaf] {
        c.remove_vm(Id { id }).await.unwrap();
    }
}
