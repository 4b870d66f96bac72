//! Replication of the revocation state and `Onboard.GetAttestationInfo`.
//!
//! KMS A is bootstrapped and revokes a serial; KMS B reports its attestation info (checked against its own
//! quote, recomputed here with sha2), onboards from A and publishes a CRL (signed by the shared root) that lists
//! A's revocation; a later revocation on A reaches B's CRL through B's periodic pull, and survives B's restart.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dstack_kms::Kms;
use dstack_kms::config::KmsConfig;
use dstack_measurements::quote::Quote;
use dstack_ra_tls::RevocationList;
use dstack_rpc::Client;
use dstack_rpc::kms::{AdminClient, OnboardClient, OnboardRequest, RevocationClient, RevokeCertsRequest};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

const KMS_APP: [u8; 20] = [0x4b; 20];
const HOST: &str = "localhost";
const TOKEN: &str = "replication-admin-token";
const OS_IMAGE: &str = "5eed00000000000000000000000000000000000000000000000000000000beef";

fn node_config(certs: &std::path::Path, pins: Vec<String>, hook: &str) -> KmsConfig {
    let mut c = config(certs, pins, true, Some(hook));
    let vm = certs.with_extension("vm_config.json");
    std::fs::write(&vm, format!(r#"{{"os_image_hash":"{OS_IMAGE}"}}"#)).unwrap();
    c.core.onboard.vm_config_file = Some(vm);
    c.core.onboard.revocation_sync_secs = 1;
    c.core.admin.auth_token = TOKEN.into();
    c.core.site_name = "site-b".into();
    c
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The CRL a KMS publishes, verified with `root`.
async fn crl_of(handle: &dstack_kms::KmsHandle, certs: &std::path::Path, tee: &KmsTee, root: &[u8]) -> RevocationList {
    let anon = client_named(handle, server_verifier(certs, &tee.sim), None, HOST);
    let r = RevocationClient::new(anon.transport().clone()).get_crl().await.unwrap();
    RevocationList::from_der(&r.crl, root, now()).unwrap()
}

fn serials(list: &RevocationList) -> Vec<String> {
    // DER integers are positive: a serial with its top bit set carries a leading zero byte.
    let strip = |s: &[u8]| hex::encode(&s[s.iter().position(|&b| b != 0).unwrap_or(s.len())..]);
    list.content().serials.iter().map(|s| strip(&s.serial)).collect()
}

#[tokio::test]
async fn replica_copies_and_follows_the_source_revocations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a_tee = kms_tee_app(d, "a", 0x41, KMS_APP).await;
    let b_tee = kms_tee_app(d, "b", 0x42, KMS_APP).await;
    let hook = webhook(vec![KMS_APP]).await;

    let certs_a = d.join("certs-a");
    let a = Kms::with_tee(
        node_config(&certs_a, vec![write_pin(d, "b.pem", &b_tee.sim)], &hook.url),
        Some(a_tee.self_tee.clone()),
    )
    .unwrap();
    a.bootstrap(HOST).await.unwrap();
    let handle_a = start(&a).await;
    let admin_a = a.start_admin(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
    let admin = AdminClient::new(
        Client::new(&format!("http://{}/prpc", admin_a.addr))
            .unwrap()
            .with_bearer_token(TOKEN)
            .unwrap(),
    );
    let revoke = |serial: &str| RevokeCertsRequest {
        serial_numbers: vec![serial.into()],
        reason: "test".into(),
        ..Default::default()
    };
    admin.revoke_certs(revoke("0a11ce")).await.unwrap();
    admin
        .revoke_certs(RevokeCertsRequest {
            app_id: vec![0xa1; 20],
            issued_before: 1_700_000_000,
            ..Default::default()
        })
        .await
        .unwrap();

    // B, not yet onboarded, reports who it is.
    let certs_b = d.join("certs-b");
    let b = Arc::new(
        Kms::with_tee(
            node_config(&certs_b, vec![write_pin(d, "a.pem", &a_tee.sim)], &hook.url),
            Some(b_tee.self_tee.clone()),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let onboard_url = format!("http://{}/prpc", listener.local_addr().unwrap());
    let task_b = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.serve_onboard(listener).await })
    };
    let onboard_b = OnboardClient::new(Client::new(&onboard_url).unwrap());
    let info = onboard_b.get_attestation_info().await.unwrap();
    let quote = Quote::parse(&b_tee.sim.quote(&[0u8; 64]).unwrap()).unwrap();
    let r = &quote.report;
    let mut h = Sha256::new();
    for part in [&r.mr_td[..], &r.rtmr[0], &r.rtmr[1], &r.rtmr[2], &r.rtmr[3]] {
        h.update(part);
    }
    assert_eq!(info.mr_aggregated, h.finalize().to_vec(), "sha256(mrtd ‖ rtmr0..3)");
    assert!(!info.ppid.is_empty(), "the simulated PCK certificate carries a PPID");
    assert_eq!(info.device_id, Sha256::digest(&info.ppid).to_vec());
    assert_eq!(hex::encode(&info.os_image_hash), OS_IMAGE);
    assert_eq!(info.tee_variant, "dstack-simulated-tdx");
    assert_eq!(info.site_name, "site-b");
    assert_eq!(
        (info.eth_rpc_url.as_str(), info.kms_contract_address.as_str()),
        ("", "")
    );
    // The same info over pRPC JSON uses dstack's field names.
    let raw = Client::new(&onboard_url)
        .unwrap()
        .send(http::Method::GET, "/prpc/GetAttestationInfo", None, bytes::Bytes::new())
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    for field in [
        "device_id",
        "mr_aggregated",
        "os_image_hash",
        "tee_variant",
        "site_name",
        "eth_rpc_url",
        "kms_contract_address",
        "ppid",
    ] {
        assert!(json.get(field).is_some(), "{field} missing in {json}");
    }

    // B onboards: it copies A's revocations.
    onboard_b
        .onboard(OnboardRequest {
            source_url: format!("https://{HOST}:{}", handle_a.addr.port()),
            domain: HOST.into(),
        })
        .await
        .unwrap();
    onboard_b.finish().await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), task_b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let state = b.revocations().snapshot();
    assert_eq!(state.serials.len(), 1);
    assert_eq!(state.serials[0].serial, "0a11ce");
    assert!(state.serials[0].reason.contains("copied from"), "{state:?}");
    assert_eq!(state.apps.len(), 1);
    assert_eq!(state.apps[0].issued_before, 1_700_000_000);
    assert_eq!(state.crl_number, 2, "{state:?}");

    let root = CertificateDer::from_pem_slice(&std::fs::read(certs_b.join("root-ca.crt")).unwrap()).unwrap();
    let handle_b = start(&b).await;
    let crl_b = crl_of(&handle_b, &certs_b, &b_tee, &root).await;
    assert_eq!(serials(&crl_b), ["0a11ce"]);
    assert_eq!(crl_b.content().apps.len(), 1);

    // A later revocation on A reaches B's CRL through the periodic pull (every second here).
    let r = admin.revoke_certs(revoke("b0b0")).await.unwrap();
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = serials(&crl_of(&handle_b, &certs_b, &b_tee, &root).await);
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed, ["0a11ce", "b0b0"]);
    let crl_b = crl_of(&handle_b, &certs_b, &b_tee, &root).await;
    // One number, one list: B publishes A's list under A's number.
    assert_eq!(crl_b.content().crl_number, r.crl_number);
    let crl_a = crl_of(&handle_a, &certs_a, &a_tee, &root).await;
    assert_eq!(crl_b.content().serials, crl_a.content().serials);
    assert_eq!(crl_b.content().apps, crl_a.content().apps);
    handle_b.shutdown().await.unwrap();
    handle_a.shutdown().await.unwrap();
    admin_a.shutdown().await.unwrap();

    // B's copy is its own: it survives a restart without A.
    let again = Kms::with_tee(
        node_config(&certs_b, vec![write_pin(d, "a.pem", &a_tee.sim)], &hook.url),
        Some(b_tee.self_tee.clone()),
    )
    .unwrap();
    assert_eq!(again.revocations().snapshot().serials.len(), 2);
}

#[tokio::test]
async fn attestation_info_needs_a_tee() {
    let dir = tempfile::tempdir().unwrap();
    let hook = webhook(vec![KMS_APP]).await;
    let pin = write_pin(dir.path(), "cvm.pem", &cvm([1; 20], [2; 20]));
    let b = Arc::new(Kms::with_tee(node_config(&dir.path().join("certs"), vec![pin], &hook.url), None).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/prpc", listener.local_addr().unwrap());
    let _task = tokio::spawn(async move { b.serve_onboard(listener).await });
    let e = OnboardClient::new(Client::new(&url).unwrap())
        .get_attestation_info()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("without a TEE"), "{e}");
}
