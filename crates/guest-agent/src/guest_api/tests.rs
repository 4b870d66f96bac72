use std::sync::atomic::{AtomicU32, Ordering};

use dstack_rpc::Client;
use dstack_rpc::guest_api::GuestApiClient;

use super::*;
use crate::simulate::{DEFAULT_APP_COMPOSE, simulated_agent};

/// Serves the guest API on a unix socket (standing in for vsock) and returns a client for it.
async fn served(compose: &str, opts: GuestApiOptions) -> (GuestApiClient<Client>, Arc<Agent>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = simulated_agent(&dir.path().join("sim"), compose).await.unwrap();
    let agent = Arc::new(agent);
    let sock = dir.path().join("guest-api.sock");
    let listener = dstack_rpc::bind_unix(&sock, 0o600).unwrap();
    let router = Arc::new(guest_api_router(GuestApiService::new(agent.clone(), opts)));
    tokio::spawn(dstack_rpc::serve_unix(listener, router, std::future::pending()));
    (GuestApiClient::new(Client::unix(&sock, "/api")), agent, dir)
}

#[tokio::test]
async fn info_matches_the_agent_and_respects_public_tcbinfo() {
    let (c, agent, _d) = served(DEFAULT_APP_COMPOSE, GuestApiOptions::default()).await;
    let info = c.info().await.unwrap();
    let app = agent.info().await.unwrap();
    assert_eq!(info.app_id, agent.config().app_id);
    assert_eq!(info.instance_id, agent.config().instance_id);
    assert_eq!(info.device_id, agent.config().device_id);
    assert_eq!(info.app_cert, app.app_cert);
    assert!(info.app_cert.contains("BEGIN CERTIFICATE"));
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let tcb: serde_json::Value = serde_json::from_str(&info.tcb_info).unwrap();
    assert_eq!(tcb["compose_hash"], hex::encode(&agent.config().compose_hash));
    // The default compose keeps SysInfo private.
    let e = c.sys_info().await.unwrap_err().to_string();
    assert!(e.contains("public_sysinfo"), "{e}");

    let private = DEFAULT_APP_COMPOSE
        .replace("\"public_tcbinfo\":true", "\"public_tcbinfo\":false")
        .replace("\"public_sysinfo\":false", "\"public_sysinfo\":true");
    let (c, _agent, _d) = served(&private, GuestApiOptions::default()).await;
    assert_eq!(c.info().await.unwrap().tcb_info, "");
    let s = c.sys_info().await.unwrap();
    assert!(
        s.num_cpus >= 1 && s.total_memory > 0 && !s.kernel_version.is_empty(),
        "{s:?}"
    );
}

#[tokio::test]
async fn network_containers_and_shutdown() {
    let count = Arc::new(AtomicU32::new(0));
    let seen = count.clone();
    let dir = tempfile::tempdir().unwrap();
    let opts = GuestApiOptions {
        docker_socket: dir.path().join("no-docker.sock"),
        on_shutdown: Some(Arc::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        })),
        ..Default::default()
    };
    let (c, _agent, _d) = served(DEFAULT_APP_COMPOSE, opts).await;
    let n = c.network_info().await.unwrap();
    assert!(n.interfaces.iter().any(|i| i.name == "lo"), "{n:?}");
    assert!(c.list_containers().await.unwrap().containers.is_empty());
    c.shutdown().await.unwrap();
    // The action runs after the answer.
    for _ in 0..50 {
        if count.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count.load(Ordering::SeqCst), 1);

    let (c, _agent, _d) = served(DEFAULT_APP_COMPOSE, GuestApiOptions::default()).await;
    let e = c.shutdown().await.unwrap_err().to_string();
    assert!(e.contains("not available"), "{e}");
}
