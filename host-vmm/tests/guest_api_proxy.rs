//! The manager's guest API proxy (`/guest`, `ProxiedGuestApi`) against the real guest agent's `GuestApi`
//! (crates/guest-agent `guest_api`, with a simulated TEE): the agent is served behind a stand-in for the VM's
//! hybrid-vsock unix socket (`<workdir>/vsock.sock`, `CONNECT 8000\n` → `OK …\n`, which is what our VMM and
//! vhost-device-vsock expose on the host), so the round trip is manager HTTP front → hybrid vsock → agent.
//! `ShutdownVm` reaches the agent's `Shutdown`, whose action here ends the fake VM process.

#[path = "support/fake.rs"]
mod fake;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dstack_guest_agent::guest_api::{GuestApiOptions, GuestApiService, guest_api_router};
use dstack_guest_agent::simulate::{DEFAULT_APP_COMPOSE, simulated_agent};
use dstack_rpc::guest_api::{Id as GuestId, ProxiedGuestApiClient};
use dstack_rpc::vmm::{Id, VmConfiguration, VmmClient};
use dstack_rpc::{Client, ConnInfo, RemoteAddr, RpcRouter};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Accepts hybrid-vsock connections on `<workdir>/vsock.sock`: port 8000 goes to `router`, others are refused.
fn spawn_hybrid_guest(workdir: &Path, router: Arc<RpcRouter>) {
    let listener = tokio::net::UnixListener::bind(workdir.join("vsock.sock")).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let router = router.clone();
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut line = String::new();
                if s.read_line(&mut line).await.is_err() {
                    return;
                }
                if line != "CONNECT 8000\n" {
                    let _ = s.get_mut().write_all(b"ERR connection refused\n").await;
                    return;
                }
                if s.get_mut().write_all(b"OK 1073741830\n").await.is_err() {
                    return;
                }
                let conn = ConnInfo::plain(RemoteAddr::Unix { path: None, peer: None });
                dstack_rpc::serve_connection(s.into_inner(), conn, router).await;
            });
        }
    });
}

/// The fake VM's pid from the manager's persisted state.
fn vm_pid(workdir: &Path) -> i32 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(workdir.join("vm-state.json")).unwrap()).unwrap();
    state["processes"][0]["pid"].as_i64().unwrap() as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reaches_the_agents_guest_api() {
    let s = fake::Served::start().await;
    let vmm = VmmClient::new(Client::unix(&s.sock, "/prpc"));
    let id = vmm
        .create_vm(VmConfiguration {
            name: "agent-vm".into(),
            image: "test-img".into(),
            compose_file: DEFAULT_APP_COMPOSE.into(),
            vcpu: 1,
            memory: 256,
            disk_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let workdir = s.run_dir(&id);

    let agent_dir = tempfile::tempdir().unwrap();
    let (agent, _) = simulated_agent(agent_dir.path(), DEFAULT_APP_COMPOSE).await.unwrap();
    let agent = Arc::new(agent);
    let pid = vm_pid(&workdir);
    let shutdowns = Arc::new(AtomicU32::new(0));
    let seen = shutdowns.clone();
    let opts = GuestApiOptions {
        docker_socket: agent_dir.path().join("docker.sock"),
        // The guest powering off ends the VM process.
        on_shutdown: Some(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            // SAFETY: kill(2) of the fake VM process this test's manager started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })),
        ..Default::default()
    };
    spawn_hybrid_guest(
        &workdir,
        Arc::new(guest_api_router(GuestApiService::new(agent.clone(), opts))),
    );

    let guest = ProxiedGuestApiClient::new(Client::unix(&s.sock, "/guest"));
    let info = guest.info(GuestId { id: id.clone() }).await.unwrap();
    assert_eq!(info.app_id, agent.config().app_id);
    assert_eq!(info.instance_id, agent.config().instance_id);
    assert!(info.app_cert.contains("BEGIN CERTIFICATE"));
    let tcb: serde_json::Value = serde_json::from_str(&info.tcb_info).unwrap();
    assert_eq!(tcb["compose_hash"], hex::encode(&agent.config().compose_hash));
    let net = guest.network_info(GuestId { id: id.clone() }).await.unwrap();
    assert!(net.interfaces.iter().any(|i| i.name == "lo"));
    assert!(
        guest
            .list_containers(GuestId { id: id.clone() })
            .await
            .unwrap()
            .containers
            .is_empty()
    );
    // The agent's refusal travels back through the proxy.
    let e = guest
        .sys_info(GuestId { id: id.clone() })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("public_sysinfo"), "{e}");
    let e = guest
        .info(GuestId {
            id: "no-such-vm".into(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");

    // ShutdownVm asks the agent (GuestApi.Shutdown); its action ends the VM, well inside the grace period.
    let t = std::time::Instant::now();
    vmm.shutdown_vm(Id { id: id.clone() }).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(shutdowns.load(Ordering::SeqCst), 1, "the agent's Shutdown ran");
    let status = vmm.get_info(Id { id: id.clone() }).await.unwrap().info.unwrap().status;
    assert_eq!(status, "stopped");
}
