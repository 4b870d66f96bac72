//! Revocation through the on-chain policy, end to end over RA-TLS: an app, one instance, a compose hash and an
//! OS image that were allowed are revoked on chain, and the KMS then refuses `GetAppKey` with the contract's
//! reason; restoring allows again. KMS authorization for replication (`isKmsAllowed`) goes through the same
//! registry on both sides of an onboarding.
//!
//! Environment: `DSTACK_TEST_ANVIL` (see `tests/common/anvil.rs`; unset → loud SKIP).

mod common;

use std::sync::Arc;

use alloy_primitives::B256;
use common::anvil::{DEV_KEY_0, admin, anvil};
use common::*;
use dstack_kms::Kms;
use dstack_kms::config::{AuthApiKind, KmsConfig};
use dstack_kms::onchain::{Change, NewApp};
use dstack_rpc::kms::{AppKeyResponse, GetAppKeyRequest, OnboardClient, OnboardRequest};
use dstack_rpc::{Client, RpcError};

const OS_IMAGE: B256 = B256::repeat_byte(0x05);
const COMPOSE: B256 = B256::repeat_byte(0xc0); // what common::cvm measures as compose-hash
const INSTANCE: [u8; 20] = [0x1d; 20];
const OTHER_INSTANCE: [u8; 20] = [0x2e; 20];

fn onchain(mut c: KmsConfig, rpc_url: &str, registry: &str) -> KmsConfig {
    c.core.auth_api.kind = AuthApiKind::Onchain;
    c.core.auth_api.onchain.rpc_url = rpc_url.into();
    c.core.auth_api.onchain.kms_contract = registry.into();
    c
}

#[tokio::test]
async fn revoked_app_instance_compose_hash_and_os_image_are_refused() {
    let Some(anvil) = anvil().await else { return };
    let owner = admin(&anvil, DEV_KEY_0);
    let registry = owner.deploy_registry(None).await.unwrap();
    owner.apply(registry, &Change::AddOsImage(OS_IMAGE)).await.unwrap();
    let app = owner
        .register_new_app(
            registry,
            &NewApp {
                allow_any_device: true,
                compose_hash: COMPOSE,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let app_id: [u8; 20] = app.into_array();

    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let sim = cvm(app_id, INSTANCE);
    let sibling = cvm(app_id, OTHER_INSTANCE);
    let pins = vec![
        write_pin(dir.path(), "cvm1.pem", &sim),
        write_pin(dir.path(), "cvm2.pem", &sibling),
    ];
    let cfg = onchain(config(&certs, pins, true, None), &anvil.url, &registry.to_string());
    let kms = Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let get = |s: &dstack_sim_tdx::SimTdx| {
        let (cert, key) = client_cert(s, |_| {});
        let c = client(&handle, &certs, &ktee.sim, Some((cert, &key)));
        async move {
            c.get_app_key(GetAppKeyRequest {
                api_version: 1,
                vm_config: format!(r#"{{"os_image_hash":"{}"}}"#, hex::encode(OS_IMAGE)),
            })
            .await
        }
    };
    let refused = |r: Result<AppKeyResponse, RpcError>, reason: &str| {
        let e = r.unwrap_err().to_string();
        eprintln!("refused: {e}");
        assert!(
            e.contains("GetAppKey denied by policy") && e.contains(reason),
            "expected {reason:?} in {e}"
        );
    };
    let apply = |c: Change| {
        let owner = &owner;
        async move { owner.apply(registry, &c).await.unwrap() }
    };

    let before = get(&sim).await.unwrap();
    get(&sibling).await.unwrap();

    // One instance revoked: that instance is refused, its sibling is not; restoring gives the same keys back.
    let instance = alloy_primitives::Address::from(INSTANCE);
    apply(Change::RevokeInstance { app, instance }).await;
    refused(get(&sim).await, "Instance revoked");
    get(&sibling).await.unwrap();
    apply(Change::RestoreInstance { app, instance }).await;
    assert_eq!(get(&sim).await.unwrap().disk_crypt_key, before.disk_crypt_key);

    // Compose hash revoked.
    apply(Change::RemoveComposeHash { app, hash: COMPOSE }).await;
    refused(get(&sim).await, "Compose hash not allowed");
    refused(get(&sibling).await, "Compose hash not allowed");
    apply(Change::AddComposeHash { app, hash: COMPOSE }).await;
    get(&sim).await.unwrap();

    // OS image revoked.
    apply(Change::RemoveOsImage(OS_IMAGE)).await;
    refused(get(&sim).await, "OS image is not allowed");
    apply(Change::AddOsImage(OS_IMAGE)).await;
    get(&sim).await.unwrap();

    // App deregistered.
    apply(Change::DeregisterApp(app)).await;
    refused(get(&sim).await, "App not registered");
    refused(get(&sibling).await, "App not registered");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn kms_replication_is_decided_by_the_registry() {
    let Some(anvil) = anvil().await else { return };
    let owner = admin(&anvil, DEV_KEY_0);
    let registry = owner.deploy_registry(None).await.unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kms_app = [0x4b; 20];
    let a_tee = kms_tee_app(d, "a", 0x41, kms_app).await;
    let b_tee = kms_tee_app(d, "b", 0x42, kms_app).await;
    let certs_a = d.join("certs-a");
    let a = Kms::with_tee(
        onchain(
            config(&certs_a, vec![write_pin(d, "b.pem", &b_tee.sim)], true, None),
            &anvil.url,
            &registry,
        ),
        Some(a_tee.self_tee.clone()),
    )
    .unwrap();
    a.bootstrap("localhost").await.unwrap();
    let handle_a = start(&a).await;

    let onboard = |policy_onchain: bool, name: &'static str| {
        let mut cfg = config(&d.join(name), vec![write_pin(d, "a.pem", &a_tee.sim)], true, None);
        if policy_onchain {
            cfg = onchain(cfg, &anvil.url, &registry);
        }
        let node = Arc::new(Kms::with_tee(cfg, Some(b_tee.self_tee.clone())).unwrap());
        let url = format!("https://localhost:{}", handle_a.addr.port());
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let onboard_url = format!("http://{}/prpc", listener.local_addr().unwrap());
            let n = Arc::clone(&node);
            let _task = tokio::spawn(async move { n.serve_onboard(listener).await });
            let c = OnboardClient::new(Client::new(&onboard_url).unwrap());
            let r = c
                .onboard(OnboardRequest {
                    source_url: url,
                    domain: "localhost".into(),
                })
                .await;
            (r.map(|_| ()), node.store.is_initialized())
        }
    };
    // isKmsAllowed requires TcbStatus UpToDate, which a simulated quote never has: the source (A, on-chain)
    // refuses B even though B's own policy is dev...
    let (r, stored) = onboard(false, "certs-b1").await;
    let e = r.unwrap_err().to_string();
    eprintln!("source refused: {e}");
    assert!(
        e.contains("refused to release") && e.contains("TCB status is not up to date"),
        "{e}"
    );
    assert!(!stored);
    // ...and a new node with the on-chain policy refuses A as a source for the same reason.
    let (r, stored) = onboard(true, "certs-b2").await;
    let e = r.unwrap_err().to_string();
    eprintln!("new node refused the source: {e}");
    assert!(
        e.contains("source KMS is not allowed") && e.contains("TCB status is not up to date"),
        "{e}"
    );
    assert!(!stored);
    handle_a.shutdown().await.unwrap();
}
