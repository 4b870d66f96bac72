//! Replication: KMS B onboards from KMS A over mutually attested RA-TLS (`Onboard.Onboard` → `GetKmsKey`), then
//! both release identical app keys; onboarding is refused when either side's policy does not allow the other,
//! and when the source does not accept simulated quotes.
//!
//! Every KMS runs on loopback with its own simulated TDX module (a distinct signing root), booted as the dstack
//! app `KMS_APP`; the webhook policy allows app ids, for both `bootAuth/app` and `bootAuth/kms`.

mod common;

use std::sync::Arc;

use common::*;
use dstack_kms::config::KmsConfig;
use dstack_kms::{Kms, KmsHandle};
use dstack_rpc::Client;
use dstack_rpc::kms::{GetAppKeyRequest, OnboardClient, OnboardRequest};
use tokio::net::TcpListener;

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];
const KMS_APP: [u8; 20] = [0x4b; 20];
const ROGUE_APP: [u8; 20] = [0x66; 20];
/// The RPC domain of every KMS here: the onboarding client checks the source's certificate against the URL's
/// host, and `localhost` resolves without DNS.
const HOST: &str = "localhost";
const VM_CONFIG: &str = r#"{"os_image_hash":"5eed00000000000000000000000000000000000000000000000000000000beef"}"#;

/// A not-yet-bootstrapped KMS serving `Onboard` on loopback; returns its Onboard client and the server task.
async fn onboarding_node(
    kms: Arc<Kms>,
) -> (
    OnboardClient<Client>,
    tokio::task::JoinHandle<Result<(), dstack_kms::KmsError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/prpc", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { kms.serve_onboard(listener).await });
    (OnboardClient::new(Client::new(&url).unwrap()), task)
}

fn onboard_req(source: &KmsHandle) -> OnboardRequest {
    OnboardRequest {
        source_url: format!("https://{HOST}:{}", source.addr.port()),
        domain: HOST.into(),
    }
}

async fn app_key(
    handle: &KmsHandle,
    certs: &std::path::Path,
    kms: &KmsTee,
    app: &dstack_sim_tdx::SimTdx,
) -> dstack_rpc::kms::AppKeyResponse {
    let (cert, key) = client_cert(app, |_| {});
    client_named(handle, server_verifier(certs, &kms.sim), Some((cert, &key)), HOST)
        .get_app_key(GetAppKeyRequest {
            api_version: 1,
            vm_config: VM_CONFIG.into(),
        })
        .await
        .unwrap()
}

fn node_config(certs: &std::path::Path, pins: Vec<String>, allow_simulated: bool, hook: &str) -> KmsConfig {
    let mut c = config(certs, pins, allow_simulated, Some(hook));
    let vm = certs.with_extension("vm_config.json");
    std::fs::write(&vm, VM_CONFIG).unwrap();
    c.core.onboard.vm_config_file = Some(vm);
    c
}

#[tokio::test]
async fn onboarded_node_serves_identical_keys_and_unauthorized_nodes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a_tee = kms_tee_app(d, "a", 0x41, KMS_APP).await;
    let b_tee = kms_tee_app(d, "b", 0x42, KMS_APP).await;
    let rogue_tee = kms_tee_app(d, "rogue", 0x43, ROGUE_APP).await;
    let app_sim = cvm(APP, INSTANCE);
    let hook = webhook(vec![KMS_APP, APP]).await;
    let pin = |name: &str, t: &KmsTee| write_pin(d, name, &t.sim);
    let cvm_pin = write_pin(d, "cvm.pem", &app_sim);

    // Node A: bootstrapped, serving.
    let certs_a = d.join("certs-a");
    let a = Kms::with_tee(
        node_config(
            &certs_a,
            vec![cvm_pin.clone(), pin("b.pem", &b_tee), pin("rogue.pem", &rogue_tee)],
            true,
            &hook.url,
        ),
        Some(a_tee.self_tee.clone()),
    )
    .unwrap();
    let a_info = a.bootstrap(HOST).await.unwrap();
    let handle_a = start(&a).await;

    // Node B onboards from A.
    let certs_b = d.join("certs-b");
    let b = Arc::new(
        Kms::with_tee(
            node_config(&certs_b, vec![cvm_pin.clone(), pin("a.pem", &a_tee)], true, &hook.url),
            Some(b_tee.self_tee.clone()),
        )
        .unwrap(),
    );
    let (onboard_b, task_b) = onboarding_node(Arc::clone(&b)).await;
    hook.requests.lock().unwrap().clear();
    let resp = onboard_b.onboard(onboard_req(&handle_a)).await.unwrap();
    assert_eq!(resp.k256_pubkey, a_info.k256_pubkey);
    {
        // Both sides asked their policy about the other KMS (bootAuth/kms), with distinct measurements.
        let seen = hook.requests.lock().unwrap();
        let kms_checks: Vec<_> = seen.iter().filter(|(p, _)| p == "/bootAuth/kms").collect();
        assert_eq!(kms_checks.len(), 2, "{seen:?}");
        for (_, body) in &kms_checks {
            assert_eq!(body["appId"], hex::encode(KMS_APP));
            assert_eq!(body["teeVariant"], "dstack-simulated-tdx");
        }
        assert_ne!(kms_checks[0].1["mrAggregated"], kms_checks[1].1["mrAggregated"]);
        // B sent its vm_config: A saw B's os_image_hash from it.
        assert!(
            kms_checks
                .iter()
                .any(|(_, b)| VM_CONFIG.contains(b["osImageHash"].as_str().unwrap()))
        );
    }
    onboard_b.finish().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), task_b)
        .await
        .expect("onboarding server stops after Finish")
        .unwrap()
        .unwrap();

    // B holds A's root CA and keys, but its own RPC key and certificate, attested by B's TEE.
    let read = |dir: &std::path::Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    for f in [
        "root-ca.crt",
        "root-ca.key",
        "root-k256.key",
        "tmp-ca.crt",
        "tmp-ca.key",
    ] {
        assert_eq!(read(&certs_a, f), read(&certs_b, f), "{f}");
    }
    assert_ne!(read(&certs_a, "rpc.key"), read(&certs_b, "rpc.key"));
    let handle_b = start(&b).await;
    let meta_b = client_named(&handle_b, server_verifier(&certs_b, &b_tee.sim), None, HOST)
        .get_meta()
        .await
        .unwrap();
    assert_eq!(meta_b.bootstrap_info.as_ref(), Some(&a_info));
    // B's RPC certificate does not verify as A's TEE (it carries B's quote).
    let e = client_named(&handle_b, server_verifier(&certs_b, &a_tee.sim), None, HOST)
        .get_meta()
        .await
        .unwrap_err()
        .to_string();
    assert!(!e.is_empty());

    // The same CVM gets identical keys from both nodes.
    let from_a = app_key(&handle_a, &certs_a, &a_tee, &app_sim).await;
    let from_b = app_key(&handle_b, &certs_b, &b_tee, &app_sim).await;
    assert_eq!(from_a.disk_crypt_key, from_b.disk_crypt_key);
    assert_eq!(from_a.env_crypt_key, from_b.env_crypt_key);
    assert_eq!(from_a.k256_key, from_b.k256_key);
    assert_eq!(from_a.k256_signature, from_b.k256_signature);
    assert_eq!(from_a.ca_cert, from_b.ca_cert);
    assert_eq!(from_a.disk_crypt_key.len(), 32);

    // A KMS booted as another app: A's policy refuses it as a KMS, nothing is stored.
    let certs_r = d.join("certs-rogue");
    let rogue = Arc::new(
        Kms::with_tee(
            node_config(&certs_r, vec![pin("a2.pem", &a_tee)], true, &hook.url),
            Some(rogue_tee.self_tee.clone()),
        )
        .unwrap(),
    );
    let (onboard_r, _task_r) = onboarding_node(Arc::clone(&rogue)).await;
    let e = onboard_r.onboard(onboard_req(&handle_a)).await.unwrap_err().to_string();
    eprintln!("rogue KMS refused with: {e}");
    assert!(
        e.contains("refused to release") && e.contains("denied by policy") && e.contains("App not registered"),
        "{e}"
    );
    assert!(!rogue.store.is_initialized());

    // The other direction: a new node whose own policy does not allow A's KMS app does not ask for keys.
    let strict_hook = webhook(vec![APP]).await;
    let certs_s = d.join("certs-strict");
    let strict = Arc::new(
        Kms::with_tee(
            node_config(&certs_s, vec![pin("a3.pem", &a_tee)], true, &strict_hook.url),
            Some(b_tee.self_tee.clone()),
        )
        .unwrap(),
    );
    let (onboard_s, _task_s) = onboarding_node(Arc::clone(&strict)).await;
    let e = onboard_s.onboard(onboard_req(&handle_a)).await.unwrap_err().to_string();
    eprintln!("disallowed source refused with: {e}");
    assert!(
        e.contains("source KMS is not allowed") && e.contains("App not registered"),
        "{e}"
    );
    assert!(!strict.store.is_initialized());

    // A node that cannot verify A's quote (A's simulator root not pinned) refuses A as a source.
    let certs_u = d.join("certs-unpinned");
    let unpinned = Arc::new(
        Kms::with_tee(
            node_config(&certs_u, vec![cvm_pin.clone()], true, &hook.url),
            Some(b_tee.self_tee.clone()),
        )
        .unwrap(),
    );
    let (onboard_u, _task_u) = onboarding_node(Arc::clone(&unpinned)).await;
    let e = onboard_u.onboard(onboard_req(&handle_a)).await.unwrap_err().to_string();
    eprintln!("unverifiable source refused with: {e}");
    assert!(e.contains("not trustworthy"), "{e}");
    assert!(!unpinned.store.is_initialized());

    handle_a.shutdown().await.unwrap();
    handle_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn simulated_kms_refused_when_source_disallows_simulated_quotes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a_tee = kms_tee_app(d, "a", 0x41, KMS_APP).await;
    let b_tee = kms_tee_app(d, "b", 0x42, KMS_APP).await;
    let hook = webhook(vec![KMS_APP]).await;
    // A pins B's simulator root but does not allow simulated quotes.
    let certs_a = d.join("certs-a");
    let a = Kms::with_tee(
        node_config(&certs_a, vec![write_pin(d, "b.pem", &b_tee.sim)], false, &hook.url),
        Some(a_tee.self_tee.clone()),
    )
    .unwrap();
    a.bootstrap(HOST).await.unwrap();
    let handle_a = start(&a).await;
    let certs_b = d.join("certs-b");
    let b = Arc::new(
        Kms::with_tee(
            node_config(&certs_b, vec![write_pin(d, "a.pem", &a_tee.sim)], true, &hook.url),
            Some(b_tee.self_tee.clone()),
        )
        .unwrap(),
    );
    let (onboard_b, _task) = onboarding_node(Arc::clone(&b)).await;
    let e = onboard_b.onboard(onboard_req(&handle_a)).await.unwrap_err().to_string();
    assert!(
        e.contains("refused to release") && e.contains("simulated") && e.contains("not allowed"),
        "{e}"
    );
    assert!(!b.store.is_initialized());
    // Only B asked its policy (about A); A refused at attestation, before asking its policy about B.
    let kms_checks = hook
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == "/bootAuth/kms")
        .count();
    assert_eq!(kms_checks, 1);
    handle_a.shutdown().await.unwrap();
}

#[tokio::test]
async fn onboarding_without_own_tee_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a_tee = kms_tee_app(d, "a", 0x41, KMS_APP).await;
    let hook = webhook(vec![KMS_APP]).await;
    let certs_a = d.join("certs-a");
    let a = Kms::with_tee(
        node_config(&certs_a, vec![], false, &hook.url),
        Some(a_tee.self_tee.clone()),
    )
    .unwrap();
    a.bootstrap(HOST).await.unwrap();
    let handle_a = start(&a).await;
    let certs_b = d.join("certs-b");
    let b = Arc::new(
        Kms::with_tee(
            node_config(&certs_b, vec![write_pin(d, "a.pem", &a_tee.sim)], true, &hook.url),
            None,
        )
        .unwrap(),
    );
    let (onboard_b, _task) = onboarding_node(Arc::clone(&b)).await;
    let e = onboard_b.onboard(onboard_req(&handle_a)).await.unwrap_err().to_string();
    assert!(e.contains("own TEE"), "{e}");
    assert!(!b.store.is_initialized());
    handle_a.shutdown().await.unwrap();
}
