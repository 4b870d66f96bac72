//! A KMS inside a CVM (`tee = "agent:<socket>"`): its own vm_config — sent to the source KMS when onboarding —
//! comes from the guest agent when `[core.onboard] vm_config_file` is not set. The agent is a real
//! `dstack-guest-agent` in host simulation mode (an in-process simulated TDX module, never TDX) serving its
//! unix socket from its own thread and runtime.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dstack_guest_agent::simulate::{BackgroundSimulator, SimulateOptions};
use dstack_kms::Kms;
use dstack_kms::server::own_vm_config;
use dstack_rpc::Client;
use dstack_rpc::agent::{DstackGuestClient, RawQuoteArgs};
use dstack_rpc::kms::{OnboardClient, OnboardRequest};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// A simulated guest agent on its own thread, in a temporary directory (the agent stops before the directory
/// goes).
struct RunningAgent {
    socket: PathBuf,
    ready: serde_json::Value,
    _sim: BackgroundSimulator,
    dir: tempfile::TempDir,
}

fn start_agent() -> RunningAgent {
    let dir = tempfile::tempdir().unwrap();
    let opts = SimulateOptions {
        socket: dir.path().join("dstack.sock"),
        tappd_socket: None,
        state_dir: Some(dir.path().join("state")),
        app_compose: None,
    };
    let sim = BackgroundSimulator::start(opts, Duration::from_secs(60)).expect("the simulated agent did not come up");
    assert_eq!(sim.ready()["simulated"], true);
    RunningAgent {
        socket: sim.socket().to_owned(),
        ready: sim.ready().clone(),
        _sim: sim,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_config_comes_from_the_agent_unless_a_file_is_configured() {
    let agent = start_agent();
    let mut cfg = dstack_kms::config::KmsConfig::default();
    cfg.core.tee = format!("agent:{}", agent.socket.display());

    let from_agent = own_vm_config(&cfg).await.unwrap();
    // What the agent itself answers to any app.
    let direct = DstackGuestClient::new(Client::unix(&agent.socket, ""))
        .get_quote(RawQuoteArgs {
            report_data: vec![7; 64],
        })
        .await
        .unwrap()
        .vm_config;
    assert_eq!(from_agent, direct);
    // The simulated agent's VmConfig: its os_image_hash is sha256 of its label (computed here with sha2).
    let v: serde_json::Value = serde_json::from_str(&from_agent).unwrap();
    assert_eq!(
        v["os_image_hash"].as_str().unwrap(),
        hex::encode(Sha256::digest(b"dstack-rs simulated OS image"))
    );
    assert_eq!(v["cpu_count"], 1);

    // An explicit file wins; an empty path means "not set".
    let file = agent.dir.path().join("vm_config.json");
    std::fs::write(&file, r#"{"os_image_hash":"ab"}"#).unwrap();
    cfg.core.onboard.vm_config_file = Some(file);
    assert_eq!(own_vm_config(&cfg).await.unwrap(), r#"{"os_image_hash":"ab"}"#);
    cfg.core.onboard.vm_config_file = Some(PathBuf::new());
    assert_eq!(own_vm_config(&cfg).await.unwrap(), from_agent);

    // Other TEEs have no agent to ask: no vm_config.
    cfg.core.tee = "none".into();
    assert_eq!(own_vm_config(&cfg).await.unwrap(), "");
    // An agent that is not there is an error naming its socket.
    cfg.core.tee = "agent:/nonexistent/dstack.sock".into();
    let e = own_vm_config(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("/nonexistent/dstack.sock"), "{e}");
}

/// The KMS in the agent's "CVM" onboards from a source KMS: quoted through the agent, its vm_config from the
/// agent, allowed by the source's webhook as the agent's app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_in_an_agent_cvm_onboards_from_a_peer() {
    let agent = start_agent();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent_app: [u8; 20] = hex::decode(agent.ready["app_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let source_tee = kms_tee_app(d, "src", 0x41, [0x4b; 20]).await;
    let hook = webhook(vec![agent_app, [0x4b; 20]]).await;

    // Source: pins the agent's simulator, bootstrapped for "localhost".
    let agent_pin = agent.ready["root_cert"].as_str().unwrap().to_owned();
    let certs_a = d.join("certs-a");
    let a = Kms::with_tee(
        config(&certs_a, vec![agent_pin], true, Some(&hook.url)),
        Some(source_tee.self_tee.clone()),
    )
    .unwrap();
    let a_info = a.bootstrap("localhost").await.unwrap();
    let handle_a = start(&a).await;

    // The new KMS: tee = agent:…, no vm_config_file.
    let certs_b = d.join("certs-b");
    let mut b_cfg = config(
        &certs_b,
        vec![write_pin(d, "src.pem", &source_tee.sim)],
        true,
        Some(&hook.url),
    );
    b_cfg.core.tee = format!("agent:{}", agent.socket.display());
    let b = Arc::new(Kms::new(b_cfg).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/prpc", listener.local_addr().unwrap());
    let task = tokio::spawn({
        let b = Arc::clone(&b);
        async move { b.serve_onboard(listener).await }
    });
    let onboard = OnboardClient::new(Client::new(&url).unwrap());
    hook.requests.lock().unwrap().clear();
    let resp = onboard
        .onboard(OnboardRequest {
            source_url: format!("https://localhost:{}", handle_a.addr.port()),
            domain: "localhost".into(),
        })
        .await
        .unwrap();
    assert_eq!(resp.k256_pubkey, a_info.k256_pubkey);
    {
        // The source asked its policy about the new KMS as the agent's app, with the agent's OS image.
        let seen = hook.requests.lock().unwrap();
        let asked = seen
            .iter()
            .find(|(p, b)| p == "/bootAuth/kms" && b["appId"] == agent.ready["app_id"])
            .unwrap_or_else(|| panic!("no bootAuth/kms for the agent's app: {seen:?}"));
        assert_eq!(
            asked.1["osImageHash"].as_str().unwrap(),
            hex::encode(Sha256::digest(b"dstack-rs simulated OS image"))
        );
        assert_eq!(asked.1["teeVariant"], "dstack-simulated-tdx");
    }
    onboard.finish().await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("onboarding server stops after Finish")
        .unwrap()
        .unwrap();
    assert_eq!(
        std::fs::read(certs_a.join("root-ca.key")).unwrap(),
        std::fs::read(certs_b.join("root-ca.key")).unwrap()
    );
}
