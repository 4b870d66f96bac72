//! Certificate revocation end to end: `SignCert` issues app certificates, `Admin.RevokeCerts` (bearer token)
//! revokes one by serial and later every certificate of the app issued before a time, `Revocation.GetCrl`
//! publishes the CRL signed by the KMS root, and an RA-TLS verifier loaded with it refuses exactly the revoked
//! certificates. The revocations survive a restart.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use der::Decode;
use dstack_kms::Kms;
use dstack_ra_tls::tls::RaTlsVerifierConfig;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, RaTlsServerVerifier, RevocationList};
use dstack_rpc::Client;
use dstack_rpc::kms::{AdminClient, KmsClient, RevocationClient, RevokeCertsRequest, SignCertRequest};
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpListener;

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];
const TOKEN: &str = "revocation-admin-token";

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `[leaf, app CA]` for a fresh key, valid from `not_before`.
async fn sign(kms: &KmsClient<Client>, key_byte: u8, not_before: u64) -> Vec<CertificateDer<'static>> {
    let key = p256::ecdsa::SigningKey::from_slice(&[key_byte; 32]).unwrap();
    let spki = key.verifying_key().to_public_key_der().unwrap();
    let csr = serde_json::json!({
        "confirm": "please sign cert:",
        "pubkey": hex::encode(spki.as_bytes()),
        "config": {"subject": "app.example", "subject_alt_names": ["app.example"], "usage_server_auth": true,
                   "not_before": not_before}
    })
    .to_string();
    let sig: p256::ecdsa::Signature = key.sign(csr.as_bytes());
    let chain = kms
        .sign_cert(SignCertRequest {
            api_version: 1,
            csr: csr.into_bytes(),
            signature: sig.to_der().as_bytes().to_vec(),
            vm_config: String::new(),
        })
        .await
        .unwrap()
        .certificate_chain;
    chain[..2].iter().map(|p| der(p)).collect()
}

fn serial_hex(cert: &CertificateDer<'_>) -> String {
    let c = x509_cert::Certificate::from_der(cert).unwrap();
    hex::encode(c.tbs_certificate().serial_number().as_bytes())
}

#[tokio::test]
async fn revoke_publish_and_refuse() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let mut cfg = config(&certs, vec![write_pin(dir.path(), "cvm.pem", &app_sim)], true, None);
    cfg.core.admin.auth_token = TOKEN.into();
    let kms = Kms::with_tee(cfg.clone(), Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let admin = kms
        .start_admin(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let admin_url = format!("http://{}/prpc", admin.addr);
    let root = der(&std::fs::read_to_string(certs.join("root-ca.crt")).unwrap());

    let attested = || {
        let (cert, key) = client_cert(&app_sim, |_| {});
        client(&handle, &certs, &ktee.sim, Some((cert, &key)))
    };
    let t0 = now();
    let a = sign(&attested(), 1, t0 - 100).await;
    let b = sign(&attested(), 2, t0 - 100).await;
    assert_ne!(serial_hex(&a[0]), serial_hex(&b[0]));

    // The CRL is public: no client certificate needed; GET works too.
    let anon = client(&handle, &certs, &ktee.sim, None);
    let crl_client = RevocationClient::new(anon.transport().clone());
    let fetch = || async {
        let r = crl_client.get_crl().await.unwrap();
        let list = RevocationList::from_der(&r.crl, &root, now()).unwrap();
        let from_pem = RevocationList::from_pem(&r.crl_pem, &root, now()).unwrap();
        assert_eq!(list.content(), from_pem.content());
        assert_eq!(list.content().crl_number, r.crl_number);
        (r.crl, list)
    };
    let (_, empty) = fetch().await;
    assert_eq!(empty.content().crl_number, 0);
    empty.check(&a[0]).unwrap();
    let raw = anon
        .transport()
        .send(http::Method::GET, "/prpc/GetCrl", None, bytes::Bytes::new())
        .await
        .unwrap();
    assert!(raw.status.is_success(), "{:?}", raw.body);
    let json: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    assert!(
        json["crl_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN X509 CRL-----")
    );

    // Admin auth is required.
    let revoke_a = RevokeCertsRequest {
        serial_numbers: vec![serial_hex(&a[0]).to_uppercase()],
        reason: "key compromise".into(),
        ..Default::default()
    };
    let no_token = AdminClient::new(Client::new(&admin_url).unwrap());
    let wrong = AdminClient::new(Client::new(&admin_url).unwrap().with_bearer_token("nope").unwrap());
    for c in [&no_token, &wrong] {
        let e = c.revoke_certs(revoke_a.clone()).await.unwrap_err().to_string();
        assert!(e.contains("bearer token"), "{e}");
    }
    assert_eq!(
        fetch().await.1.content().crl_number,
        0,
        "a refused call changes nothing"
    );
    let right = AdminClient::new(Client::new(&admin_url).unwrap().with_bearer_token(TOKEN).unwrap());
    let e = right
        .revoke_certs(RevokeCertsRequest::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing to revoke"), "{e}");
    let r = right.revoke_certs(revoke_a).await.unwrap();
    assert_eq!((r.crl_number, r.revoked_serials, r.revoked_apps), (1, 1, 0));

    // The CRL lists A; a verifier loaded with it refuses A's chain and accepts B's.
    let (crl_der, list) = fetch().await;
    assert_eq!(list.content().crl_number, 1);
    assert_eq!(hex::encode(&list.content().serials[0].serial), serial_hex(&a[0]));
    let verifier = RaTlsServerVerifier::new(
        RaTlsVerifierConfig {
            roots: vec![root.clone()],
            accept_self_signed: false,
            require_attestation: false,
        },
        Arc::new(AttestationVerifier::new(AttestationPolicy::default())),
    )
    .unwrap();
    let name = ServerName::try_from("app.example").unwrap();
    let verify = |chain: &[CertificateDer<'static>]| {
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    verify(&a).unwrap();
    verifier.set_revocation_list(Some(Arc::new(list)));
    let e = verify(&a).unwrap_err();
    assert!(e.contains("Revoked") && e.contains(&serial_hex(&a[0])), "{e}");
    verify(&b).unwrap();

    // A tampered CRL (one bit of the signature) is refused.
    let mut bad = crl_der.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = RevocationList::from_der(&bad, &root, now()).unwrap_err().to_string();
    assert!(e.contains("does not verify"), "{e}");

    // App-wide: everything of APP issued before t0 - 50 is revoked; a certificate issued after it is not.
    let r = right
        .revoke_certs(RevokeCertsRequest {
            app_id: APP.to_vec(),
            issued_before: t0 - 50,
            reason: "app retired its keys".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((r.crl_number, r.revoked_serials, r.revoked_apps), (2, 1, 1));
    let c = sign(&attested(), 3, t0 - 10).await;
    let (_, list) = fetch().await;
    verifier.set_revocation_list(Some(Arc::new(list)));
    let e = verify(&b).unwrap_err();
    assert!(e.contains("Revoked") && e.contains(&hex::encode(APP)), "{e}");
    verify(&c).unwrap();

    admin.shutdown().await.unwrap();
    handle.shutdown().await.unwrap();

    // The revocations are in cert_dir and survive a restart.
    let again = Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap();
    let state = again.revocations().snapshot();
    assert_eq!(state.crl_number, 2);
    assert_eq!(state.serials.len(), 1);
    assert_eq!(state.apps.len(), 1);
}

/// An RA-TLS app certificate the KMS issued (`SignCert` with the CSR key's attestation), for `sim`'s app.
async fn ra_tls_app_cert(
    kms: &KmsClient<Client>,
    sim: &dstack_sim_tdx::SimTdx,
) -> (Vec<CertificateDer<'static>>, rcgen::KeyPair) {
    use rcgen::{PublicKeyData, SigningKey};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = key.subject_public_key_info();
    let quote = sim.quote(&dstack_ra_tls::ra_tls_report_data(&spki)).unwrap();
    let csr = serde_json::json!({
        "confirm": "please sign cert:",
        "pubkey": hex::encode(&spki),
        "config": {"subject": "app.example", "subject_alt_names": [], "usage_client_auth": true,
                   "ext_quote": true},
        "attestation": {"quote": hex::encode(quote), "event_log": full_log(sim)},
    })
    .to_string();
    let signature = key.sign(csr.as_bytes()).unwrap();
    let chain = kms
        .sign_cert(SignCertRequest {
            api_version: 1,
            csr: csr.into_bytes(),
            signature,
            vm_config: String::new(),
        })
        .await
        .unwrap()
        .certificate_chain;
    (chain[..2].iter().map(|p| der(p)).collect(), key)
}

/// A KMS client presenting `chain` (leaf, app CA) with `key`.
fn chain_client(
    handle: &dstack_kms::KmsHandle,
    certs: &std::path::Path,
    ktee: &KmsTee,
    chain: Vec<CertificateDer<'static>>,
    key: &rcgen::KeyPair,
) -> KmsClient<Client> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(server_verifier(certs, &ktee.sim))
        .with_client_auth_cert(
            chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let url = format!("https://127.0.0.1:{}/prpc", handle.addr.port());
    KmsClient::new(
        Client::new(&url)
            .unwrap()
            .with_tls(Arc::new(cfg))
            .with_server_name(DOMAIN)
            .unwrap(),
    )
}

/// The KMS honours its own list: a CVM calling with a revoked RA-TLS app certificate the KMS issued is refused
/// with the serial named; an unrevoked one still gets its keys.
#[tokio::test]
async fn kms_refuses_callers_presenting_a_revoked_app_certificate() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let cfg = config(&certs, vec![write_pin(dir.path(), "cvm.pem", &app_sim)], true, None);
    let kms = Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let (cert, key) = client_cert(&app_sim, |_| {});
    let self_signed = client(&handle, &certs, &ktee.sim, Some((cert, &key)));
    let (revoked, revoked_key) = ra_tls_app_cert(&self_signed, &app_sim).await;
    let (kept, kept_key) = ra_tls_app_cert(&self_signed, &app_sim).await;
    let get = |c: KmsClient<Client>| async move {
        c.get_app_key(dstack_rpc::kms::GetAppKeyRequest {
            api_version: 1,
            vm_config: String::new(),
        })
        .await
        .map_err(|e| e.to_string())
    };
    let before = get(chain_client(&handle, &certs, &ktee, revoked.clone(), &revoked_key))
        .await
        .unwrap();
    assert_eq!(before.disk_crypt_key.len(), 32);

    kms.revocations()
        .revoke(
            &dstack_kms::revocation::RevokeRequest {
                serials: vec![serial_hex(&revoked[0])],
                reason: "leaked".into(),
                ..Default::default()
            },
            now(),
        )
        .unwrap();
    let e = get(chain_client(&handle, &certs, &ktee, revoked.clone(), &revoked_key))
        .await
        .unwrap_err();
    assert!(
        e.contains("revoked") && e.contains(serial_hex(&revoked[0]).trim_start_matches("00")),
        "{e}"
    );
    let after = get(chain_client(&handle, &certs, &ktee, kept, &kept_key))
        .await
        .unwrap();
    assert_eq!(after.disk_crypt_key, before.disk_crypt_key);
    handle.shutdown().await.unwrap();
}
