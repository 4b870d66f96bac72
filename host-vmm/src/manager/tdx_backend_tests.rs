//! `tdx` backend tests. The manager-level test runs the real manager (create → start through the pRPC API)
//! with a `dstack-vmm-run` stand-in that records its argument list, then feeds that exact list to the
//! `--tdx` parser and launch code (`tdx::cli`) against the recording fake TDX host. Needs `mkfs.erofs`
//! (Debian `erofs-utils`), /bin/sh and sleep.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, VmConfiguration, VmmClient, VmmServer};

use super::*;
use crate::hypervisor::fake::{Call, FakeHypervisor, ScriptedExit, TdxCall};
use crate::hypervisor::{CpuIdEntry, SystemEventKind};
use crate::manager::backend::{Image, ImageMetadata};
use crate::manager::state::Workdir;
use crate::manager::{Manager, VmmApi, VmmConfig};
use crate::tdx::cli::{TdRunArgs, run};
use crate::tdx::tests::{fake_tdx_host, synthetic_tdvf};
use crate::vcpu::VmExit;

const COMPOSE: &str = r#"{"manifest_version":2,"name":"td","runner":"docker-compose","docker_compose_file":"services: {}\n","kms_enabled":false,"gateway_enabled":false,"local_key_provider_enabled":false,"public_logs":true,"public_sysinfo":true,"allowed_envs":[],"no_instance_id":false,"secure_time":false}"#;

fn kvm(vmm_run: &Path) -> KvmBackend {
    KvmBackend {
        vmm_run: vmm_run.to_owned(),
        mkfs_erofs: "mkfs.erofs".into(),
        passt: None,
    }
}

fn no_tdx_host() -> FakeHypervisor {
    FakeHypervisor::new(vec![CpuIdEntry::default()])
}

fn image(dir: &Path, cmdline: &str) -> Image {
    Image {
        name: "td-img".into(),
        dir: dir.join("td-img"),
        metadata: ImageMetadata {
            bios: "ovmf.fd".into(),
            kernel: "bzImage".into(),
            initrd: "initramfs.cpio.gz".into(),
            cmdline: cmdline.into(),
            ..Default::default()
        },
    }
}

fn input<'a>(wd: &'a Workdir, img: &'a Image) -> LaunchInput<'a> {
    LaunchInput {
        workdir: wd,
        image: img,
        vcpu: 1,
        memory_mb: 256,
        disk_size_gb: 1,
        cid: 1000,
        ports: &[],
        default_host_address: "127.0.0.1",
        tap: None,
    }
}

#[test]
fn plan_is_the_kvm_command_line_with_the_td_flags() {
    let b = TdxBackend::probe(
        &fake_tdx_host(),
        kvm(Path::new("/bin/dstack-vmm-run")),
        Some("/q.sock".into()),
    );
    b.available().unwrap();
    assert_eq!(b.name(), "tdx");
    assert!(!b.is_emulation());
    let dir = tempfile::tempdir().unwrap();
    let wd = Workdir::new(dir.path(), "v");
    wd.create().unwrap();
    let compose =
        br#"{"manifest_version":2,"name":"demo","runner":"docker-compose","docker_compose_file":"services: {}"}"#;
    wd.write_shared(dstack_types::shared_files::APP_COMPOSE, compose)
        .unwrap();
    let img = image(Path::new("/i"), "console=ttyS0");
    let plan = b.plan(&input(&wd, &img)).unwrap();
    let kvm_plan = b.kvm.plan(&input(&wd, &img)).unwrap();
    assert_eq!(plan.len(), 1);
    // MRCONFIGID V1 of this compose: (b'\x01' + sha256(compose) + bytes(15)).hex() in Python.
    let v1 = "012fbaf054f4559b7e5851871a79f3d7d7abfa3a9e51c429823f36d12bce2f079d000000000000000000000000000000";
    assert_eq!(
        plan[0].args[..7],
        [
            "--tdx",
            "--firmware",
            "/i/td-img/ovmf.fd",
            "--qgs-socket",
            "/q.sock",
            "--mrconfigid",
            v1
        ]
    );
    assert_eq!(plan[0].args[7..], kvm_plan[0].args[..]);
    // The planned line parses with the VMM's own --tdx parser.
    let args =
        TdRunArgs::try_parse_from(std::iter::once("dstack-vmm-run".to_owned()).chain(plan[0].args.clone())).unwrap();
    assert_eq!(args.firmware, PathBuf::from("/i/td-img/ovmf.fd"));
    assert_eq!((args.vcpus, args.memory_mib), (1, 256));
    assert_eq!(args.mrconfigid.as_deref(), Some(v1));

    // Opting out drops the flag; without a compose to bind, the start fails naming MRCONFIGID.
    let mut off = b.clone();
    off.use_mrconfigid = false;
    let plan = off.plan(&input(&wd, &img)).unwrap();
    assert!(!plan[0].args.iter().any(|a| a == "--mrconfigid"));
    let empty = Workdir::new(dir.path(), "w");
    let e = b.plan(&input(&empty, &img)).unwrap_err().to_string();
    assert!(e.contains("MRCONFIGID"), "{e}");
}

#[test]
fn simulated_tee_images_and_bad_firmware_names_are_refused() {
    let b = TdxBackend::probe(&fake_tdx_host(), kvm(Path::new("/x")), None);
    let wd = Workdir::new(Path::new("/r"), "v");
    let img = image(Path::new("/i"), "console=ttyS0 dstack.tee=simulated:vsock:2:10001");
    let e = b.plan(&input(&wd, &img)).unwrap_err().to_string();
    assert!(e.contains("simulated TEE"), "{e}");
    let mut img = image(Path::new("/i"), "console=ttyS0");
    img.metadata.bios = "../../etc/passwd".into();
    let e = b.plan(&input(&wd, &img)).unwrap_err().to_string();
    assert!(e.contains("bios"), "{e}");
    // A missing firmware file is caught before any disk is made.
    let dir = tempfile::tempdir().unwrap();
    let wd = Workdir::new(dir.path(), "v");
    let img = image(dir.path(), "console=ttyS0");
    let e = b.prepare(&input(&wd, &img)).unwrap_err().to_string();
    assert!(e.contains("TDVF firmware") && e.contains("missing"), "{e}");
}

#[test]
fn hosts_without_tdx_refuse_every_start_with_the_capability_error() {
    let b = TdxBackend::probe(&no_tdx_host(), kvm(Path::new("/x")), None);
    let wd = Workdir::new(Path::new("/r"), "v");
    let img = image(Path::new("/i"), "console=ttyS0");
    for e in [
        b.available().unwrap_err(),
        b.prepare(&input(&wd, &img)).unwrap_err(),
        b.plan(&input(&wd, &img)).unwrap_err(),
    ] {
        let e = e.to_string();
        assert!(e.contains("backend tdx") && e.contains("cannot run TDX guests"), "{e}");
    }
    // This machine's own /dev/kvm (no TDX) gives the same answer.
    match crate::hypervisor::kvm::KvmHypervisor::new() {
        Ok(hv) => {
            let e = TdxBackend::probe(&hv, kvm(Path::new("/x")), None)
                .available()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("KVM_CAP_VM_TYPES") && e.contains("lacks KVM_X86_TDX_VM"),
                "{e}"
            );
        }
        Err(e) => eprintln!("SKIP real /dev/kvm part: {e}"),
    }
}

/// An image directory with the synthetic TDVF, a minimal bzImage header and an initrd; a VMM stand-in that
/// records its arguments (one per line) into `<workdir>/vmm-args` and then sleeps.
fn manager_env(dir: &Path) -> (VmmConfig, PathBuf) {
    let img = dir.join("images/td-img");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(
        img.join("metadata.json"),
        r#"{"bios":"ovmf.fd","kernel":"bzImage","cmdline":"console=ttyS0","initrd":"initramfs.cpio.gz","version":"0.1.0"}"#,
    )
    .unwrap();
    std::fs::write(img.join("ovmf.fd"), synthetic_tdvf()).unwrap();
    let mut kernel = vec![0u8; 0x3000];
    kernel[0x1f1] = 3;
    kernel[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    kernel[0x211] = 0x01;
    std::fs::write(img.join("bzImage"), kernel).unwrap();
    std::fs::write(img.join("initramfs.cpio.gz"), b"initrd").unwrap();
    let vmm = dir.join("vmm-run-recorder");
    std::fs::write(
        &vmm,
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > vmm-args.tmp && mv vmm-args.tmp vmm-args\nexec sleep 600\n",
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = format!(
        "[image]\npath = \"{}\"\n[cvm]\nbackend = \"tdx\"\nrun_path = \"{}\"\ncid_start = 1000\ncid_pool_size = 2\n\
         max_allocable_vcpu = 4\nmax_allocable_memory_in_mb = 4096\npasst_path = \"\"\n",
        dir.join("images").display(),
        dir.join("run").display()
    );
    (VmmConfig::parse(&text).unwrap(), vmm)
}

fn vm_config() -> VmConfiguration {
    VmConfiguration {
        name: "td1".into(),
        image: "td-img".into(),
        compose_file: COMPOSE.into(),
        vcpu: 1,
        memory: 256,
        disk_size: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_create_start_drives_the_td_launch_on_a_tdx_host() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, vmm) = manager_env(dir.path());
    let host = fake_tdx_host();
    let backend = TdxBackend::probe(&host, kvm(&vmm), None);
    let mgr: Arc<Manager> = Manager::open(cfg.clone(), Box::new(backend)).unwrap();
    let c = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(mgr.clone()))));
    let id = c.create_vm(vm_config()).await.unwrap().id;
    let wd = Workdir::new(&cfg.cvm.run_path, &id);

    // The guest is told to use real TDX, and no simulated module listens beside it.
    let sys = dstack_types::SysConfig::from_slice(&std::fs::read(wd.path().join("shared/.sys-config.json")).unwrap())
        .unwrap();
    assert_eq!(sys.tee.as_deref(), Some("tdx"));
    assert!(wd.vsock_port_path(cfg.host_api.port).exists());
    assert!(!wd.vsock_port_path(cfg.sim_tdx.port).exists());

    // What the manager started, parsed by the VMM's --tdx parser.
    let recorded = wd.path().join("vmm-args");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !recorded.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let argv: Vec<String> = std::fs::read_to_string(&recorded)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let args = TdRunArgs::try_parse_from(std::iter::once("dstack-vmm-run".to_owned()).chain(argv)).unwrap();
    assert!(args.tdx);
    assert_eq!(args.firmware, cfg.image.path.join("td-img/ovmf.fd"));
    assert_eq!((args.vcpus, args.memory_mib), (1, 256));
    assert_eq!(args.serial_log, Some(wd.serial_log()));
    // The kvm backend's devices are attached to the TD too (the vsock with the VM's CID).
    assert_eq!(args.device_config().unwrap().vsock.map(|v| v.cid), Some(1000));
    // MRCONFIGID binds the compose the VM was created with.
    let compose = wd.read_shared(dstack_types::shared_files::APP_COMPOSE).unwrap();
    let info = wd.read_shared(dstack_types::shared_files::INSTANCE_INFO).ok();
    let want = crate::tdx::mr_config::for_app(&compose, info.as_deref()).unwrap();
    assert_eq!(args.mrconfigid.as_deref(), Some(hex::encode(want).as_str()));

    // That command line on a TDX host: the launch sequence up to FINALIZE, then the firmware's first I/O.
    host.script(
        0,
        [
            ScriptedExit::IoOut {
                port: 0x3f8,
                data: b"T".to_vec(),
            },
            ScriptedExit::IoOut {
                port: 0x3f8,
                data: b"D".to_vec(),
            },
            ScriptedExit::SystemEvent(SystemEventKind::Shutdown),
        ],
    );
    let exit = tokio::task::spawn_blocking({
        let host = host.clone();
        move || run(&host, &args, None)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(matches!(exit, VmExit::PowerOff), "{exit:?}");
    let tdx: Vec<TdxCall> = host
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Tdx(t) => Some(t),
            _ => None,
        })
        .collect();
    assert!(tdx.contains(&TdxCall::CreateTdxVm));
    assert!(tdx.contains(&TdxCall::EnableSplitIrqchip { ioapic_pins: 24 }));
    assert!(tdx.contains(&TdxCall::InitVcpu {
        vcpu: 0,
        rcx: 0x80_9000
    }));
    // The synthetic TDVF's four non-PAGE_AUG sections, then FINALIZE.
    let adds = tdx
        .iter()
        .filter(|c| matches!(c, TdxCall::InitMemRegion { .. }))
        .count();
    assert_eq!(adds, 4);
    assert_eq!(tdx.last(), Some(&TdxCall::Finalize));
    // …and reached KVM_TDX_INIT_VM.
    assert!(
        tdx.iter()
            .any(|c| matches!(c, TdxCall::InitVm(p) if p.mrconfigid == want && want[0] != 0))
    );
    assert!(std::fs::read_to_string(wd.serial_log()).unwrap().contains("TD"));

    c.remove_vm(Id { id }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_on_a_host_without_tdx_answers_with_the_capability_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, vmm) = manager_env(dir.path());
    let backend = TdxBackend::probe(&no_tdx_host(), kvm(&vmm), None);
    let mgr: Arc<Manager> = Manager::open(cfg, Box::new(backend)).unwrap();
    let c = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(mgr.clone()))));
    let e = c.create_vm(vm_config()).await.unwrap_err().to_string();
    assert!(e.contains("cannot run TDX guests") && e.contains("tdx-host.md"), "{e}");
    // Nothing was started.
    assert!(
        !dir.path()
            .join("run")
            .read_dir()
            .unwrap()
            .flatten()
            .any(|d| d.path().join("vmm-args").exists())
    );
}
