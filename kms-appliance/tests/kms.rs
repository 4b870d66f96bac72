//! End to end: a real KMS on loopback (its own TEE simulated over a unix socket), CVM clients with RA-TLS
//! certificates over mTLS, dev and webhook policies.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use dstack_keys::app_keys::{derive_app_keys, env_crypt_key, x25519_public};
use dstack_keys::sig::{KMS_ISSUED_PREFIX, compressed, k256_signing_key, message_digest, recover};
use dstack_kms::Kms;
use dstack_kms::bootstrap::generated_keys_report_data;
use dstack_kms::store::KeyStore;
use dstack_measurements::verify::{TcbStatus, VerifyOptions, verify_quote};
use dstack_rpc::RpcError;
use dstack_rpc::kms::{AppId, GetAppKeyRequest, GetKmsKeyRequest};

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];
const OTHER_APP: [u8; 20] = [0xb2; 20];
const OS_HASH: &str = "5eed00000000000000000000000000000000000000000000000000000000beef";
const VM_CONFIG: &str =
    r#"{"os_image_hash":"5eed00000000000000000000000000000000000000000000000000000000beef","cpu_count":1}"#;

fn err_text(e: RpcError) -> String {
    e.to_string()
}

fn req() -> GetAppKeyRequest {
    assert!(VM_CONFIG.contains(OS_HASH));
    GetAppKeyRequest {
        api_version: 1,
        vm_config: VM_CONFIG.into(),
    }
}

#[tokio::test]
async fn webhook_policy_key_release_end_to_end() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let other_sim = cvm(OTHER_APP, INSTANCE);
    let pins = vec![
        write_pin(dir.path(), "cvm1.pem", &app_sim),
        write_pin(dir.path(), "cvm2.pem", &other_sim),
    ];
    let hook = webhook(vec![APP]).await;
    let kms = Kms::with_tee(config(&certs, pins, true, Some(&hook.url)), Some(ktee.self_tee.clone())).unwrap();
    let info = kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;

    // Expected keys, computed with crates/keys from the key files (independently of the server's cache).
    let stored = KeyStore::new(&certs).load().unwrap();
    let expected = derive_app_keys(&stored.root_ca_secret, &stored.root_k256, &APP, &INSTANCE).unwrap();

    // Allowed CVM.
    let (cert, key) = client_cert(&app_sim, |_| {});
    let resp = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req())
        .await
        .unwrap();
    assert_eq!(resp.disk_crypt_key, expected.disk_crypt_key.to_vec());
    assert_eq!(resp.env_crypt_key, expected.env_crypt_key.to_vec());
    assert_eq!(resp.k256_key, expected.k256_key.to_vec());
    assert_eq!(resp.k256_signature, expected.k256_signature.to_vec());
    assert_eq!(resp.gateway_app_id, GATEWAY_APP_ID);
    assert_eq!(resp.tproxy_app_id, GATEWAY_APP_ID);
    assert_eq!(hex::encode(&resp.os_image_hash), OS_HASH);
    assert_eq!(
        resp.ca_cert,
        std::fs::read_to_string(certs.join("root-ca.crt")).unwrap()
    );
    // The k256 signature chain: the KMS root key signed the app's compressed public key.
    let app_pub = compressed(k256_signing_key(&resp.k256_key).unwrap().verifying_key());
    let signer = recover(&message_digest(KMS_ISSUED_PREFIX, &APP, &app_pub), &resp.k256_signature).unwrap();
    assert_eq!(compressed(&signer), info.k256_pubkey);

    // What the webhook saw: dstack's BootInfo for this CVM.
    {
        let seen = hook.requests.lock().unwrap();
        let (path, body) = seen.last().unwrap();
        assert_eq!(path, "/bootAuth/app");
        assert_eq!(body["appId"], hex::encode(APP));
        assert_eq!(body["instanceId"], hex::encode(INSTANCE));
        assert_eq!(body["composeHash"], hex::encode([0xc0; 32]));
        assert_eq!(body["tcbStatus"], "Simulated");
        assert_eq!(body["teeVariant"], "dstack-simulated-tdx");
        assert_eq!(body["osImageHash"], OS_HASH);
        assert_eq!(body["keyProviderInfo"], hex::encode(br#"{"name":"kms","id":"00"}"#));
        assert_eq!(body["mrAggregated"].as_str().unwrap().len(), 64);
        assert_eq!(body["mrSystem"].as_str().unwrap().len(), 64);
    }

    // The webhook denies another app: the reason reaches the caller.
    let (cert, key) = client_cert(&other_sim, |_| {});
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req())
        .await
        .unwrap_err();
    let e = err_text(e);
    assert!(
        e.contains("denied by policy") && e.contains("App not registered"),
        "{e}"
    );

    // GetKmsKey goes to bootAuth/kms and is denied for an app the webhook does not know.
    let (cert, key) = client_cert(&other_sim, |_| {});
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_kms_key(GetKmsKeyRequest::default())
        .await
        .unwrap_err();
    assert!(err_text(e).contains("denied by policy"));
    assert_eq!(hook.requests.lock().unwrap().last().unwrap().0, "/bootAuth/kms");

    // No client certificate.
    let e = client(&handle, &certs, &ktee.sim, None)
        .get_app_key(req())
        .await
        .unwrap_err();
    assert!(err_text(e).contains("none was presented"));

    // Tampered event log: a runtime event claims another app id (digest no longer matches the quote).
    let (cert, key) = client_cert(&app_sim, |log| {
        let ev = log.iter_mut().find(|e| e.event == "app-id").unwrap();
        ev.event_payload = OTHER_APP.to_vec();
    });
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req())
        .await
        .unwrap_err();
    let e = err_text(e);
    eprintln!("tampered app-id refused with: {e}");
    assert!(e.contains("attestation verification failed"), "{e}");

    // Tampered boot event digest.
    let (cert, key) = client_cert(&app_sim, |log| log[0].digest[0] ^= 1);
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req())
        .await
        .unwrap_err();
    assert!(err_text(e).contains("event log does not match"), "tampered boot log");

    handle.shutdown().await.unwrap();

    // Restart on the same cert_dir: the same keys come back.
    let kms = Kms::with_tee(
        config(
            &certs,
            vec![write_pin(dir.path(), "cvm1.pem", &app_sim)],
            true,
            Some(&hook.url),
        ),
        Some(ktee.self_tee.clone()),
    )
    .unwrap();
    let handle = start(&kms).await;
    let (cert, key) = client_cert(&app_sim, |_| {});
    let again = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req())
        .await
        .unwrap();
    assert_eq!(again.disk_crypt_key, resp.disk_crypt_key);
    assert_eq!(again.env_crypt_key, resp.env_crypt_key);
    assert_eq!(again.k256_key, resp.k256_key);
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn simulated_quotes_refused_without_allow_simulated() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let pins = vec![write_pin(dir.path(), "cvm.pem", &app_sim)];
    let kms = Kms::with_tee(config(&certs, pins, false, None), Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let (cert, key) = client_cert(&app_sim, |_| {});
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(req())
        .await
        .unwrap_err();
    let e = err_text(e);
    assert!(e.contains("simulated") && e.contains("not allowed"), "{e}");
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn dev_policy_public_methods_and_bootstrap_evidence() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let pins = vec![write_pin(dir.path(), "cvm.pem", &app_sim)];
    let kms = Kms::with_tee(config(&certs, pins, true, None), Some(ktee.self_tee.clone())).unwrap();
    let info = kms.bootstrap(DOMAIN).await.unwrap();

    // Bootstrap twice is refused and leaves the keys alone.
    let before = std::fs::read(certs.join("root-k256.key")).unwrap();
    let e = kms.bootstrap(DOMAIN).await.unwrap_err().to_string();
    assert!(e.contains("already bootstrapped"), "{e}");
    assert_eq!(std::fs::read(certs.join("root-k256.key")).unwrap(), before);

    // Key files are private.
    for name in ["root-ca.key", "root-k256.key", "tmp-ca.key", "rpc.key"] {
        let mode = std::fs::metadata(certs.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }

    // The bootstrap attestation is a simulated quote over the dstack report data of the generated keys.
    let att: serde_json::Value = serde_json::from_slice(&info.attestation).unwrap();
    assert_eq!(att["tee"], "simulated");
    let quote = hex::decode(att["quote"].as_str().unwrap()).unwrap();
    let opts = VerifyOptions {
        now: 1_800_000_000,
        allow_simulated: true,
        simulated_roots: vec![ktee.sim.root_pin()],
        allow_debug: false,
    };
    let verified = verify_quote(&quote, None, &opts).unwrap();
    assert_eq!(verified.status, TcbStatus::Simulated);
    assert_eq!(
        verified.quote.report.report_data,
        generated_keys_report_data(&info.ca_pubkey, &info.k256_pubkey)
    );
    let stored = KeyStore::new(&certs).load().unwrap();
    assert_eq!(info.k256_pubkey, stored.k256_pubkey());

    let handle = start(&kms).await;
    let public = client(&handle, &certs, &ktee.sim, None);

    let meta = public.get_meta().await.unwrap();
    assert!(meta.is_dev);
    assert_eq!(meta.k256_pubkey, info.k256_pubkey);
    assert_eq!(meta.bootstrap_info.as_ref(), Some(&info));
    assert_eq!(meta.gateway_app_id.as_deref(), Some(GATEWAY_APP_ID));

    let tmp = public.get_temp_ca_cert().await.unwrap();
    assert_eq!(
        tmp.temp_ca_cert,
        std::fs::read_to_string(certs.join("tmp-ca.crt")).unwrap()
    );
    assert_eq!(tmp.ca_cert, meta.ca_cert);

    // Env encryption key: the public half of the env key GetAppKey releases, signed by the KMS k256 key.
    let pk = public
        .get_app_env_encrypt_pub_key(AppId { app_id: APP.to_vec() })
        .await
        .unwrap();
    let secret = env_crypt_key(&stored.root_ca_secret, &APP).unwrap();
    assert_eq!(pk.public_key, x25519_public(&secret).to_vec());
    let pub32: [u8; 32] = pk.public_key.clone().try_into().unwrap();
    let signer =
        dstack_keys::app_keys::recover_env_pubkey_signer(&APP, &pub32, pk.timestamp, &pk.signature_v1).unwrap();
    assert_eq!(compressed(&signer), info.k256_pubkey);
    let e = public
        .get_app_env_encrypt_pub_key(AppId { app_id: vec![1; 19] })
        .await
        .unwrap_err();
    assert!(err_text(e).contains("20 bytes"));

    // Dev policy: an attested KMS caller gets the root keys (isKmsAllowed is "allow all" in dev).
    let (cert, key) = client_cert(&app_sim, |_| {});
    let kk = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_kms_key(GetKmsKeyRequest::default())
        .await
        .unwrap();
    assert_eq!(kk.keys.len(), 1);
    assert_eq!(kk.keys[0].k256_key, std::fs::read(certs.join("root-k256.key")).unwrap());
    let root_from_rpc = dstack_keys::kdf::p256_from_pkcs8_pem(&kk.keys[0].ca_key).unwrap();
    assert_eq!(root_from_rpc.to_bytes(), stored.root_ca_secret.to_bytes());

    // An unsupported api_version.
    let (cert, key) = client_cert(&app_sim, |_| {});
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .get_app_key(GetAppKeyRequest {
            api_version: 2,
            vm_config: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err_text(e).contains("api_version"));
    handle.shutdown().await.unwrap();
}
