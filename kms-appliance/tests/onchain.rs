//! The on-chain policy on a real local chain: Foundry's anvil (npm `@foundry-rs/anvil-linux-amd64`).
//!
//! Environment: `DSTACK_TEST_ANVIL` = path of the anvil binary (e.g.
//! `/var/cache/dstack-rs/npm-anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil`). Unset: the tests
//! print a loud SKIP and pass, unless `DSTACK_REQUIRE_FIXTURES=1`, where they fail.
//!
//! Each test starts its own anvil on 127.0.0.1 (free port), deploys the committed contracts with the admin code
//! (anvil's first dev key), and kills anvil when done.

mod common;

use std::process::Command;
use std::time::Duration;

use alloy_primitives::{Address, B256};
use common::anvil::{DEV_KEY_0, DEV_KEY_1, admin, anvil};
use common::*;
use dstack_kms::Kms;
use dstack_kms::config::AuthApiKind;
use dstack_kms::onchain::{Admin, Change, NewApp, OnchainPolicy};
use dstack_kms::policy::BootInfo;
use dstack_rpc::kms::GetAppKeyRequest;

const GATEWAY: &str = "4444444444444444444444444444444444444444";
const OS_IMAGE: B256 = B256::repeat_byte(0x05);
const COMPOSE: B256 = B256::repeat_byte(0xc0); // what common::cvm measures as compose-hash
const DEVICE: B256 = B256::repeat_byte(0xde);
const KMS_MR: B256 = B256::repeat_byte(0x33);

/// A registry with the gateway id and `OS_IMAGE` set, and one app allowing `COMPOSE` on `DEVICE`.
async fn deploy(admin: &Admin, app: NewApp) -> (Address, Address) {
    let registry = admin.deploy_registry(None).await.unwrap();
    admin
        .apply(registry, &Change::SetGatewayAppId(GATEWAY.into()))
        .await
        .unwrap();
    admin.apply(registry, &Change::AddOsImage(OS_IMAGE)).await.unwrap();
    let app_id = admin.register_new_app(registry, &app).await.unwrap();
    (registry, app_id)
}

fn boot_info(app: Address) -> BootInfo {
    BootInfo {
        tee_variant: "dstack-tdx".into(),
        mr_aggregated: KMS_MR.to_vec(),
        os_image_hash: OS_IMAGE.to_vec(),
        mr_system: vec![0x77; 32],
        app_id: app.to_vec(),
        compose_hash: COMPOSE.to_vec(),
        instance_id: vec![0x1d; 20],
        device_id: DEVICE.to_vec(),
        key_provider_info: b"{}".to_vec(),
        tcb_status: "UpToDate".into(),
        advisory_ids: vec![],
    }
}

/// Asserts a refusal with exactly the contract's reason.
async fn refused(policy: &OnchainPolicy, info: &BootInfo, is_kms: bool, reason: &str) {
    let r = policy.is_allowed(info, is_kms).await.unwrap();
    assert!(!r.is_allowed, "expected refusal {reason:?}, got {r:?}");
    assert_eq!(r.reason, reason);
    assert_eq!(r.gateway_app_id, "");
}

#[tokio::test]
async fn contracts_decide_app_and_kms_boots() {
    let Some(anvil) = anvil().await else { return };
    let owner = admin(&anvil, DEV_KEY_0);
    let new_app = NewApp {
        require_tcb_up_to_date: true,
        device_id: DEVICE,
        compose_hash: COMPOSE,
        ..Default::default()
    };
    let (registry, app) = deploy(&owner, new_app).await;
    let policy = OnchainPolicy::new(&anvil.url, &registry.to_string(), Duration::from_secs(5)).unwrap();
    assert_eq!(policy.gateway_app_id().await.unwrap(), GATEWAY);

    // A registry address without code answers nothing: an error (the KMS denies), never an allow.
    let no_code = OnchainPolicy::new(
        &anvil.url,
        &Address::repeat_byte(0x42).to_string(),
        Duration::from_secs(5),
    )
    .unwrap();
    let err = no_code.is_allowed(&boot_info(app), false).await.unwrap_err();
    assert!(err.to_string().contains("returned nothing"), "{err}");

    // Allowed app.
    let good = boot_info(app);
    let r = policy.is_allowed(&good, false).await.unwrap();
    assert!(r.is_allowed, "{r:?}");
    assert_eq!((r.reason.as_str(), r.gateway_app_id.as_str()), ("", GATEWAY));

    // Refusals, each with the contract's reason string.
    let mut info = boot_info(Address::repeat_byte(0x99));
    refused(&policy, &info, false, "App not registered").await;
    info = good.clone();
    info.compose_hash = vec![0xc1; 32];
    refused(&policy, &info, false, "Compose hash not allowed").await;
    info = good.clone();
    info.os_image_hash = vec![0x06; 32];
    refused(&policy, &info, false, "OS image is not allowed").await;
    info = good.clone();
    info.device_id = vec![0xdf; 32];
    refused(&policy, &info, false, "Device not allowed").await;
    info = good.clone();
    info.tcb_status = "OutOfDate".into();
    refused(&policy, &info, false, "TCB status is not up to date").await;

    // A registered address without code.
    let eoa = Address::repeat_byte(0xee);
    owner.apply(registry, &Change::RegisterApp(eoa)).await.unwrap();
    refused(&policy, &boot_info(eoa), false, "App not deployed or invalid address").await;

    // The app's owner edits its allow-lists; the registry owner deregisters.
    owner
        .apply(registry, &Change::SetAllowAnyDevice { app, allow: true })
        .await
        .unwrap();
    info = good.clone();
    info.device_id = vec![0xdf; 32];
    assert!(policy.is_allowed(&info, false).await.unwrap().is_allowed);
    owner
        .apply(registry, &Change::RemoveComposeHash { app, hash: COMPOSE })
        .await
        .unwrap();
    refused(&policy, &good, false, "Compose hash not allowed").await;
    owner
        .apply(registry, &Change::AddComposeHash { app, hash: COMPOSE })
        .await
        .unwrap();
    assert!(policy.is_allowed(&good, false).await.unwrap().is_allowed);
    owner.apply(registry, &Change::DeregisterApp(app)).await.unwrap();
    refused(&policy, &good, false, "App not registered").await;

    // Only the owner may change anything (the transaction is refused before it is sent).
    let stranger = admin(&anvil, DEV_KEY_1);
    let err = stranger.apply(registry, &Change::RegisterApp(app)).await.unwrap_err();
    assert!(err.to_string().contains("revert"), "{err}");
    refused(&policy, &good, false, "App not registered").await;

    // KMS replication decisions.
    refused(&policy, &good, true, "Aggregated MR not allowed").await;
    owner.apply(registry, &Change::AddKmsMr(KMS_MR)).await.unwrap();
    refused(&policy, &good, true, "KMS is not allowed to boot on this device").await;
    owner.apply(registry, &Change::AddKmsDevice(DEVICE)).await.unwrap();
    let r = policy.is_allowed(&good, true).await.unwrap();
    assert!(r.is_allowed && r.gateway_app_id == GATEWAY, "{r:?}");
    info = good.clone();
    info.tcb_status = "SWHardeningNeeded".into();
    refused(&policy, &info, true, "TCB status is not up to date").await;
    owner.apply(registry, &Change::RemoveOsImage(OS_IMAGE)).await.unwrap();
    refused(&policy, &good, true, "OS image is not allowed").await;
}

const INSTANCE: [u8; 20] = [0x1d; 20];

#[tokio::test]
async fn get_app_key_with_onchain_policy() {
    let Some(anvil) = anvil().await else { return };
    let owner = admin(&anvil, DEV_KEY_0);
    // Simulated CVMs report tcbStatus "Simulated" and no device, so this app accepts any device and TCB.
    let new_app = NewApp {
        allow_any_device: true,
        compose_hash: COMPOSE,
        ..Default::default()
    };
    let (registry, app) = deploy(&owner, new_app).await;
    let app_id: [u8; 20] = app.into_array();
    let stranger_id = [0x99; 20];

    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(app_id, INSTANCE);
    let stranger_sim = cvm(stranger_id, INSTANCE);
    let pins = vec![
        write_pin(dir.path(), "cvm1.pem", &app_sim),
        write_pin(dir.path(), "cvm2.pem", &stranger_sim),
    ];
    let mut cfg = config(&certs, pins, true, None);
    cfg.core.auth_api.kind = AuthApiKind::Onchain;
    cfg.core.auth_api.onchain.rpc_url = anvil.url.clone();
    cfg.core.auth_api.onchain.kms_contract = registry.to_string();
    let kms = Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let vm_config = |os: B256| GetAppKeyRequest {
        api_version: 1,
        vm_config: format!(r#"{{"os_image_hash":"{}"}}"#, hex::encode(os)),
    };
    let get = |sim: &dstack_sim_tdx::SimTdx, os: B256| {
        let (cert, key) = client_cert(sim, |_| {});
        let c = client(&handle, &certs, &ktee.sim, Some((cert, &key)));
        async move { c.get_app_key(vm_config(os)).await }
    };

    let meta = client(&handle, &certs, &ktee.sim, None).get_meta().await.unwrap();
    assert_eq!(meta.kms_contract_address, Some(registry.to_string()));
    assert_eq!(meta.chain_id, Some(31337));
    assert!(!meta.is_dev);

    let stored = dstack_kms::store::KeyStore::new(&certs).load().unwrap();
    let expected =
        dstack_keys::app_keys::derive_app_keys(&stored.root_ca_secret, &stored.root_k256, &app_id, &INSTANCE).unwrap();
    let resp = get(&app_sim, OS_IMAGE).await.unwrap();
    assert_eq!(resp.disk_crypt_key, expected.disk_crypt_key.to_vec());
    assert_eq!(resp.k256_key, expected.k256_key.to_vec());
    assert_eq!(resp.gateway_app_id, GATEWAY);

    let denied = |r: Result<_, dstack_rpc::RpcError>, reason: &str| {
        let e = r.map(|_: dstack_rpc::kms::AppKeyResponse| ()).unwrap_err().to_string();
        assert!(e.contains(reason), "expected {reason:?} in {e}");
    };
    denied(get(&stranger_sim, OS_IMAGE).await, "App not registered");
    denied(get(&app_sim, B256::repeat_byte(0x06)).await, "OS image is not allowed");
    owner
        .apply(registry, &Change::RemoveComposeHash { app, hash: COMPOSE })
        .await
        .unwrap();
    denied(get(&app_sim, OS_IMAGE).await, "Compose hash not allowed");
    owner
        .apply(registry, &Change::AddComposeHash { app, hash: COMPOSE })
        .await
        .unwrap();
    owner
        .apply(registry, &Change::SetRequireTcbUpToDate { app, require: true })
        .await
        .unwrap();
    denied(get(&app_sim, OS_IMAGE).await, "TCB status is not up to date");

    // The chain going away is a denial, not an allow.
    drop(anvil);
    denied(get(&app_sim, OS_IMAGE).await, "policy unavailable");
    handle.shutdown().await.unwrap();
}

/// The `dstack-kms admin` CLI: key from a file or the environment, prints addresses / transaction hashes.
#[tokio::test]
async fn admin_cli_deploys_and_edits() {
    let Some(anvil) = anvil().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, format!("0x{DEV_KEY_0}\n")).unwrap();
    let run = |args: &[&str], key_in_env: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dstack-kms"));
        cmd.args(["admin", "--rpc-url", &anvil.url])
            .env_remove("DSTACK_KMS_ADMIN_KEY");
        if key_in_env {
            cmd.env("DSTACK_KMS_ADMIN_KEY", DEV_KEY_0);
        } else {
            cmd.arg("--private-key-file").arg(&key_file);
        }
        let out = cmd.args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (
            out.status.success(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, registry, err) = run(&["deploy"], false);
    assert!(ok, "{err}");
    let registry_addr: Address = registry.parse().unwrap();
    let compose = COMPOSE.to_string();
    let (ok, app, err) = run(
        &[
            "--kms-contract",
            &registry,
            "register-app",
            "--allow-any-device",
            "--compose-hash",
            &compose,
        ],
        true,
    );
    assert!(ok, "{err}");
    let app: Address = app.parse().unwrap();
    let (ok, tx, err) = run(
        &["--kms-contract", &registry, "add-os-image", &OS_IMAGE.to_string()],
        false,
    );
    assert!(ok && tx.parse::<B256>().is_ok(), "{tx} {err}");

    let policy = OnchainPolicy::new(&anvil.url, &registry, Duration::from_secs(5)).unwrap();
    assert!(policy.is_allowed(&boot_info(app), false).await.unwrap().is_allowed);
    let other = B256::repeat_byte(0xc1).to_string();
    let app_s = app.to_string();
    let (ok, _, err) = run(
        &["--kms-contract", &registry, "add-compose-hash", "--app", &app_s, &other],
        true,
    );
    assert!(ok, "{err}");
    let mut info = boot_info(app);
    info.compose_hash = vec![0xc1; 32];
    assert!(policy.is_allowed(&info, false).await.unwrap().is_allowed);
    let (ok, _, err) = run(
        &[
            "--kms-contract",
            &registry,
            "remove-compose-hash",
            "--app",
            &app_s,
            &other,
        ],
        true,
    );
    assert!(ok, "{err}");
    refused(&policy, &info, false, "Compose hash not allowed").await;

    // Missing key and missing --kms-contract are clear errors.
    let out = Command::new(env!("CARGO_BIN_EXE_dstack-kms"))
        .args(["admin", "--rpc-url", &anvil.url, "deploy"])
        .env_remove("DSTACK_KMS_ADMIN_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DSTACK_KMS_ADMIN_KEY"));
    let (ok, _, err) = run(&["add-os-image", &OS_IMAGE.to_string()], true);
    assert!(!ok && err.contains("--kms-contract"), "{err}");
    assert_ne!(registry_addr, Address::ZERO);
}
