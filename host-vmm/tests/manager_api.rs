//! VM manager API tests with a fake backend whose "VM" is a small shell process (`sleep`), so the lifecycle,
//! persistence, re-adoption, auto-restart, host API and dstack `vmm-cli.py` wire format are exercised without
//! a hypervisor. Needs only /bin/sh and sleep.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_host_vmm::manager::{Manager, VmmConfig, router};
use dstack_rpc::host_api::{HostApiClient, Notification};
use dstack_rpc::vmm::{GetInfoResponse, Id, PortMapping, StatusRequest, VmConfiguration, VmInfo, VmmClient};
use dstack_rpc::{Client, LocalTransport, vmm::VmmServer};

#[path = "support/fake.rs"]
mod fake;
use fake::FakeBackend;

const COMPOSE: &str = r#"{"manifest_version":2,"name":"demo","runner":"docker-compose","docker_compose_file":"services: {}\n","kms_enabled":false,"gateway_enabled":false,"local_key_provider_enabled":false,"public_logs":true,"public_sysinfo":true,"allowed_envs":[],"no_instance_id":false,"secure_time":false}"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("images/test-img");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(
            img.join("metadata.json"),
            r#"{"bios":"ovmf.fd","kernel":"bzImage","cmdline":"console=ttyS0","initrd":"initramfs.cpio.gz","rootfs":null,"rootfs_hash":null,"version":"0.1.0","is_dev":true,"build":{}}"#,
        )
        .unwrap();
        Env { dir }
    }

    fn config(&self, extra: &str) -> VmmConfig {
        let text = format!(
            "[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\ncid_start = 1000\ncid_pool_size = 3\n\
             max_allocable_vcpu = 4\nmax_allocable_memory_in_mb = 4096\n{extra}",
            self.dir.path().join("images").display(),
            self.dir.path().join("run").display()
        );
        VmmConfig::parse(&text).unwrap()
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("run").join(id)
    }
}

fn vm_config(name: &str, vcpu: u32, memory: u32) -> VmConfiguration {
    VmConfiguration {
        name: name.into(),
        image: "test-img".into(),
        compose_file: COMPOSE.into(),
        vcpu,
        memory,
        disk_size: 1,
        ..Default::default()
    }
}

fn client(mgr: &Arc<Manager>) -> VmmClient<LocalTransport> {
    VmmClient::new(LocalTransport::new(VmmServer::new(
        dstack_host_vmm::manager::VmmApi::new(mgr.clone()),
    )))
}

async fn info(c: &VmmClient<LocalTransport>, id: &str) -> VmInfo {
    let r: GetInfoResponse = c.get_info(Id { id: id.into() }).await.unwrap();
    assert!(r.found);
    r.info.unwrap()
}

fn pid_of(env: &Env, id: &str) -> u32 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.run_dir(id).join("vm-state.json")).unwrap()).unwrap();
    state["processes"][0]["pid"].as_u64().unwrap() as u32
}

fn cid_of(env: &Env, id: &str) -> u64 {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.run_dir(id).join("vm-manifest.json")).unwrap()).unwrap();
    m["cid"].as_u64().unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_status_and_shared_files() {
    let env = Env::new();
    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let c = client(&mgr);
    let id = c.create_vm(vm_config("app1", 1, 512)).await.unwrap().id;
    let wd = env.run_dir(&id);
    // Host-shared files with dstack's names; app-compose.json verbatim (its sha256 is the compose hash).
    assert_eq!(
        std::fs::read_to_string(wd.join("shared/app-compose.json")).unwrap(),
        COMPOSE
    );
    let sys = dstack_types::SysConfig::from_slice(&std::fs::read(wd.join("shared/.sys-config.json")).unwrap()).unwrap();
    let vmc = sys.vm_config().unwrap();
    assert_eq!((vmc.cpu_count, vmc.memory_size), (1, 512 << 20));
    assert_eq!(sys.host_api_url.as_deref(), Some("vsock://2:10000/api"));
    assert_eq!(std::fs::metadata(wd.join("hda.img")).unwrap().len(), 1 << 30);

    let vm = info(&c, &id).await;
    assert_eq!(vm.status, "running");
    assert_eq!(vm.name, "app1");
    assert_eq!(vm.configuration.as_ref().unwrap().compose_file, COMPOSE);
    // app_id = sha256(compose)[..20]; expected value from Python's hashlib over the same bytes.
    assert_eq!(vm.app_id, "a641a6db0134093eed7fb8e691b2b2d448ed3bbd");
    let pid = pid_of(&env, &id);
    assert!(alive(pid));
    wait_until("VM stdout", Duration::from_secs(5), async || {
        std::fs::read_to_string(wd.join("stdout.log")).is_ok_and(|s| s == "booted cid=1000\n")
    })
    .await;

    let st = c
        .status(StatusRequest {
            brief: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(st.total, 1);
    assert!(st.vms[0].configuration.is_none(), "brief leaves out configurations");

    c.stop_vm(Id { id: id.clone() }).await.unwrap();
    assert_eq!(info(&c, &id).await.status, "stopped");
    assert!(!alive(pid));
    c.start_vm(Id { id: id.clone() }).await.unwrap();
    assert_eq!(info(&c, &id).await.status, "running");
    let pid2 = pid_of(&env, &id);
    assert_ne!(pid, pid2);

    // Updates need the VM stopped.
    let upd = dstack_rpc::vmm::UpdateVmRequest {
        id: id.clone(),
        vcpu: Some(2),
        ..Default::default()
    };
    let e = c.update_vm(upd.clone()).await.unwrap_err().to_string();
    assert!(e.contains("needs it stopped"), "{e}");
    c.stop_vm(Id { id: id.clone() }).await.unwrap();
    c.upgrade_app(upd).await.unwrap();
    assert_eq!(info(&c, &id).await.configuration.unwrap().vcpu, 2);

    c.remove_vm(Id { id: id.clone() }).await.unwrap();
    assert!(!wd.exists());
    assert!(!c.get_info(Id { id }).await.unwrap().found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_allocation_bad_config_and_cid_reuse() {
    let env = Env::new();
    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let c = client(&mgr);
    let a = c.create_vm(vm_config("a", 3, 1024)).await.unwrap().id;
    let e = c.create_vm(vm_config("b", 2, 1024)).await.unwrap_err().to_string();
    assert!(
        e.contains("not enough resources") && e.contains("max_allocable_vcpu"),
        "{e}"
    );
    let e = c.create_vm(vm_config("b", 1, 4000)).await.unwrap_err().to_string();
    assert!(e.contains("memory") && e.contains("max_allocable_memory_in_mb"), "{e}");
    // Created stopped, it does not count; starting it is refused.
    let mut stopped = vm_config("b", 2, 1024);
    stopped.stopped = true;
    let b = c.create_vm(stopped).await.unwrap().id;
    let e = c.start_vm(Id { id: b.clone() }).await.unwrap_err().to_string();
    assert!(e.contains("not enough resources"), "{e}");

    let bad = |f: fn(&mut VmConfiguration)| {
        let mut v = vm_config("x", 1, 256);
        f(&mut v);
        v
    };
    for (req, needle) in [
        (
            bad(|v| v.compose_file = "{\"manifest_version\":2}".into()),
            "compose_file",
        ),
        (bad(|v| v.compose_file = "not json".into()), "compose_file"),
        (bad(|v| v.name = "../evil".into()), "name"),
        (bad(|v| v.vcpu = 0), "vcpu"),
        (bad(|v| v.image = "missing".into()), "image"),
        (bad(|v| v.image = "../images/test-img".into()), "image"),
        (bad(|v| v.app_id = Some("xyz".into())), "app_id"),
        (
            bad(|v| {
                v.ports = vec![PortMapping {
                    protocol: "tcp".into(),
                    host_port: 40000,
                    vm_port: 80,
                    host_address: String::new(),
                }]
            }),
            "outside the allowed ranges",
        ),
    ] {
        let e = c.create_vm(req).await.unwrap_err().to_string();
        assert!(e.contains(needle), "expected {needle:?} in {e}");
    }

    // CIDs: lowest free, reused after removal, and the pool (size 3) is a hard limit.
    assert_eq!((cid_of(&env, &a), cid_of(&env, &b)), (1000, 1001));
    let mut third = vm_config("c", 1, 256);
    third.stopped = true;
    let c3 = c.create_vm(third.clone()).await.unwrap().id;
    assert_eq!(cid_of(&env, &c3), 1002);
    let e = c.create_vm(third.clone()).await.unwrap_err().to_string();
    assert!(e.contains("no free guest CID"), "{e}");
    c.remove_vm(Id { id: a }).await.unwrap();
    let d = c.create_vm(third).await.unwrap().id;
    assert_eq!(cid_of(&env, &d), 1000);
    for id in [b, c3, d] {
        c.remove_vm(Id { id }).await.unwrap();
    }
}

/// The simulated TDX module of VM `id` (it answers beside the VM on `<uds>_10001`).
fn sim_of(env: &Env, id: &str) -> dstack_rpc::sim_tdx::SimTdxClient<Client> {
    dstack_rpc::sim_tdx::SimTdxClient::new(Client::unix(env.run_dir(id).join("vsock.sock_10001"), ""))
}

/// Extends RTMR3 of VM `id` with runtime event `name` (empty payload), as its guest-init would; returns the
/// registers after it.
async fn extend_rtmr3(env: &Env, id: &str, name: &str) -> dstack_rpc::sim_tdx::Measurements {
    let ev = dstack_measurements::eventlog::RuntimeEvent::new(name, Vec::new());
    let sim = sim_of(env, id);
    sim.extend_rtmr(dstack_rpc::sim_tdx::ExtendRtmrRequest {
        index: 3,
        digest: ev.digest().to_vec(),
        event: Some(name.into()),
        payload: Some(Vec::new()),
    })
    .await
    .unwrap();
    sim.get_rtmrs().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restart_keeps_state_and_readopts() {
    let env = Env::new();
    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let c = client(&mgr);
    let running = c.create_vm(vm_config("keep", 1, 256)).await.unwrap().id;
    let mut s = vm_config("off", 1, 256);
    s.stopped = true;
    let off = c.create_vm(s).await.unwrap().id;
    let pid = pid_of(&env, &running);
    // The guest measures something into RTMR3 through its simulated TDX module.
    let initial = sim_of(&env, &running).get_rtmrs().await.unwrap();
    let measured = extend_rtmr3(&env, &running, "compose-hash").await;
    assert_ne!(measured.rtmr3, initial.rtmr3);
    mgr.detach();
    drop(c);
    drop(mgr);
    assert!(alive(pid), "VM processes outlive the daemon");

    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let c = client(&mgr);
    let vm = info(&c, &running).await;
    assert_eq!(vm.status, "running");
    assert_eq!(pid_of(&env, &running), pid, "re-adopted, not restarted");
    // Its module kept what the running boot measured (a fresh one would make every later quote disagree with
    // the guest's event log), and goes on from there.
    let sim = sim_of(&env, &running);
    assert_eq!(
        sim.get_rtmrs().await.unwrap(),
        measured,
        "RTMRs lost across the daemon restart"
    );
    assert_eq!(
        sim.get_runtime_event_log()
            .await
            .unwrap()
            .event_log
            .matches("compose-hash")
            .count(),
        1
    );
    extend_rtmr3(&env, &running, "after-readopt").await;
    assert_eq!(info(&c, &off).await.status, "stopped");
    assert_eq!(cid_of(&env, &running), 1000);
    // The CID stays reserved across the restart.
    let mut n = vm_config("new", 1, 256);
    n.stopped = true;
    let new = c.create_vm(n).await.unwrap().id;
    assert_eq!(cid_of(&env, &new), 1002);
    // Stopping the adopted VM kills the process we did not spawn.
    c.stop_vm(Id { id: running.clone() }).await.unwrap();
    wait_until("adopted process gone", Duration::from_secs(5), async || !alive(pid)).await;

    // A VM whose process died while the daemon was down is restarted on load.
    c.start_vm(Id { id: running.clone() }).await.unwrap();
    let pid = pid_of(&env, &running);
    mgr.detach();
    drop(c);
    drop(mgr);
    // SAFETY: plain kill(2) of the test's own child.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    wait_until("killed", Duration::from_secs(5), async || !alive(pid)).await;
    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let c = client(&mgr);
    assert_eq!(info(&c, &running).await.status, "running");
    assert_ne!(pid_of(&env, &running), pid);
    // A new boot: the module starts again from the initial registers.
    assert_eq!(sim_of(&env, &running).get_rtmrs().await.unwrap(), initial);
    for id in [running, off, new] {
        c.remove_vm(Id { id }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vm_is_restarted_with_backoff_then_given_up() {
    let env = Env::new();
    let cfg = env.config(
        "[cvm.auto_restart]\ninterval = 0.02\ninitial_backoff = 0.3\nmax_backoff = 10\nmax_retries = 2\nreset_window = 60\n",
    );
    let mgr = Manager::open(cfg, Box::new(FakeBackend)).unwrap();
    let _monitor = mgr.spawn_monitor();
    let c = client(&mgr);
    let id = c.create_vm(vm_config("crashy", 1, 256)).await.unwrap().id;
    let mut delays = Vec::new();
    let initial = sim_of(&env, &id).get_rtmrs().await.unwrap();
    for round in 1..=2u32 {
        let pid = pid_of(&env, &id);
        extend_rtmr3(&env, &id, "boot-measured").await;
        let killed = Instant::now();
        // SAFETY: plain kill(2) of the VM process this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        wait_until("restarting", Duration::from_secs(5), async || {
            info(&c, &id).await.status == "restarting"
        })
        .await;
        wait_until("restarted", Duration::from_secs(10), async || {
            info(&c, &id).await.status == "running" && pid_of(&env, &id) != pid
        })
        .await;
        delays.push(killed.elapsed());
        // A restart is a new boot: its simulated TDX module starts from the initial registers again.
        let fresh = async || sim_of(&env, &id).get_rtmrs().await.ok() == Some(initial.clone());
        wait_until("a fresh simulated TDX module", Duration::from_secs(5), fresh).await;
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(env.run_dir(&id).join("vm-state.json")).unwrap()).unwrap();
        assert_eq!(state["restarts"], round);
        assert!(state["last_exit"].as_str().unwrap().contains("signal 9"), "{state}");
    }
    // Backoff 0.3 s then 0.6 s.
    assert!(delays[0] >= Duration::from_millis(300), "{delays:?}");
    assert!(delays[1] >= Duration::from_millis(600), "{delays:?}");
    // The third crash exceeds max_retries = 2.
    let pid = pid_of(&env, &id);
    // SAFETY: as above.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    wait_until("exited", Duration::from_secs(5), async || {
        info(&c, &id).await.status == "exited"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let vm = info(&c, &id).await;
    assert_eq!(vm.status, "exited");
    assert!(vm.exited_at.is_some());
    c.remove_vm(Id { id }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_api_notify_updates_vm_info() {
    let env = Env::new();
    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let c = client(&mgr);
    let id = c.create_vm(vm_config("notify", 1, 256)).await.unwrap().id;
    // The guest reaches host port 10000 through the VMM's vsock: `<uds>_10000` on the host.
    let sock = env.run_dir(&id).join("vsock.sock_10000");
    let host = HostApiClient::new(Client::unix(&sock, "/api"));
    let hi = host.info().await.unwrap();
    assert!(!hi.version.is_empty());
    host.notify(Notification {
        event: "boot.progress".into(),
        payload: "mounting rootfs".into(),
    })
    .await
    .unwrap();
    host.notify(Notification {
        event: "boot.error".into(),
        payload: "disk full".into(),
    })
    .await
    .unwrap();
    let seed = "11".repeat(20);
    let iid = "22".repeat(20);
    host.notify(Notification {
        event: "instance.info".into(),
        payload: format!(
            r#"{{"instance_id_seed":"{seed}","instance_id":"{iid}","app_id":"{}"}}"#,
            "33".repeat(20)
        ),
    })
    .await
    .unwrap();
    let bad = host
        .notify(Notification {
            event: "instance.info".into(),
            payload: r#"{"instance_id":"abcd"}"#.into(),
        })
        .await;
    assert!(bad.is_err(), "a 2-byte instance id is refused");

    let vm = info(&c, &id).await;
    assert_eq!(vm.boot_progress, "mounting rootfs");
    assert_eq!(vm.boot_error, "disk full");
    assert_eq!(vm.instance_id.as_deref(), Some(iid.as_str()));
    assert_eq!(vm.app_id, "33".repeat(20));
    let events: Vec<&str> = vm.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["boot.progress", "boot.error", "instance.info"]);
    let saved = std::fs::read(env.run_dir(&id).join("shared/.instance_info")).unwrap();
    assert_eq!(
        dstack_types::InstanceInfo::from_slice(&saved).unwrap().instance_id,
        vec![0x22; 20]
    );

    // The simulated TDX module answers beside it on `<uds>_10001`.
    let sim = dstack_rpc::sim_tdx::SimTdxClient::new(Client::unix(env.run_dir(&id).join("vsock.sock_10001"), ""));
    let m = sim.get_rtmrs().await.unwrap();
    assert_eq!(
        m.mrtd,
        vec![0u8; 48],
        "no predicted measurements in the test image: zeros"
    );
    c.remove_vm(Id { id }).await.unwrap();
}

/// Raw HTTP/1.1 over the daemon's unix socket, exactly as dstack's `vmm-cli.py` sends it
/// (`POST /prpc/<Method>?json` with a JSON body).
fn raw_post(sock: &Path, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp[9..12].parse().unwrap();
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_cli_json_over_unix_socket() {
    let env = Env::new();
    let mgr = Manager::open(env.config(""), Box::new(FakeBackend)).unwrap();
    let sock = env.dir.path().join("vmm.sock");
    let listener = dstack_rpc::bind_unix(&sock, 0o600).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dstack_rpc::serve_unix(listener, router(mgr.clone()), async {
        let _ = stopped.await;
    }));

    // `vmm-cli.py deploy` (no env, one port, app_id None → null).
    let body = serde_json::json!({
        "name": "cli-app", "image": "test-img", "compose_file": COMPOSE, "vcpu": 1, "memory": 256,
        "disk_size": 1, "app_id": null,
        "ports": [{"protocol": "tcp", "host_port": 18080, "vm_port": 80, "host_address": "127.0.0.1"}],
        "hugepages": false, "pin_numa": false
    })
    .to_string();
    let sock2 = sock.clone();
    let (code, created) = tokio::task::spawn_blocking(move || raw_post(&sock2, "/prpc/CreateVm?json", &body))
        .await
        .unwrap();
    assert_eq!(code, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    // `vmm-cli.py lsvm`: Status with an empty body; the CLI reads these fields.
    let sock2 = sock.clone();
    let (code, st) = tokio::task::spawn_blocking(move || raw_post(&sock2, "/prpc/Status?json", "{}"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let vm = &st["vms"][0];
    assert_eq!(vm["id"], id.as_str());
    assert_eq!(vm["name"], "cli-app");
    assert_eq!(vm["status"], "running");
    assert_eq!(vm["configuration"]["vcpu"], 1);
    assert_eq!(vm["configuration"]["ports"][0]["host_port"], 18080);
    assert!(vm["app_id"].as_str().unwrap().len() == 40);
    assert_eq!(st["port_mapping_enabled"], true);

    // Legacy service prefix and an error in dstack's `{"error": …}` shape.
    let sock2 = sock.clone();
    let (code, err) = tokio::task::spawn_blocking(move || {
        raw_post(
            &sock2,
            "/prpc/Teepod.CreateVm?json",
            r#"{"name":"x","image":"test-img","vcpu":0}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 400);
    assert!(err["error"].as_str().unwrap().contains("compose_file"), "{err}");

    let sock2 = sock.clone();
    let id2 = id.clone();
    let (code, _) =
        tokio::task::spawn_blocking(move || raw_post(&sock2, "/prpc/RemoveVm?json", &format!(r#"{{"id":"{id2}"}}"#)))
            .await
            .unwrap();
    assert_eq!(code, 200);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_requires_bearer_token() {
    let env = Env::new();
    let cfg = env.config("");
    let mut cfg = cfg;
    cfg.auth.enabled = true;
    cfg.auth.tokens = vec!["s3cret".into()];
    let mgr = Manager::open(cfg, Box::new(FakeBackend)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(dstack_rpc::serve_tcp(listener, router(mgr), async {
        let _ = stopped.await;
    }));
    let url = format!("http://{addr}/prpc");
    let anon = VmmClient::new(Client::new(&url).unwrap());
    let e = anon.version().await.unwrap_err().to_string();
    assert!(e.contains("unauthorized"), "{e}");
    let wrong = VmmClient::new(Client::new(&url).unwrap().with_bearer_token("s3cres").unwrap());
    assert!(wrong.version().await.is_err());
    let ok = VmmClient::new(Client::new(&url).unwrap().with_bearer_token("s3cret").unwrap());
    assert!(!ok.version().await.unwrap().version.is_empty());
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
