//! The Onboard service over HTTP (Bootstrap once, Finish) and SignCert under the app CA.

mod common;

use std::sync::Arc;

use common::*;
use dstack_kms::Kms;
use dstack_ra_tls::parse_cert;
use dstack_rpc::Client;
use dstack_rpc::kms::{BootstrapRequest, OnboardClient, SignCertRequest};
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpListener;

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn onboard_bootstrap_once_then_finish_then_serve() {
    let (dir, certs) = tempdir();
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let pins = vec![write_pin(dir.path(), "cvm.pem", &app_sim)];
    let kms = Arc::new(Kms::with_tee(config(&certs, pins, true, None), Some(ktee.self_tee.clone())).unwrap());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/prpc", listener.local_addr().unwrap());
    let onboard = {
        let kms = Arc::clone(&kms);
        tokio::spawn(async move { kms.serve_onboard(listener).await })
    };
    let c = OnboardClient::new(Client::new(&url).unwrap());
    let e = c.finish().await.unwrap_err().to_string();
    assert!(e.contains("bootstrap first"), "{e}");
    let info = c.bootstrap(BootstrapRequest { domain: DOMAIN.into() }).await.unwrap();
    assert_eq!(info.k256_pubkey.len(), 33);
    assert!(!info.attestation.is_empty());
    let e = c
        .bootstrap(BootstrapRequest { domain: DOMAIN.into() })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already bootstrapped"), "{e}");
    // Once keys exist, Onboard is refused before it contacts anything.
    let e = c
        .onboard(dstack_rpc::kms::OnboardRequest {
            source_url: "https://127.0.0.1:1".into(),
            domain: DOMAIN.into(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already bootstrapped"), "{e}");
    c.finish().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), onboard)
        .await
        .expect("onboarding server stops after Finish")
        .unwrap()
        .unwrap();

    // The RPC certificate is issued by the root CA for the domain, with usage kms:rpc and an attestation.
    let rpc = parse_cert(&der(&std::fs::read_to_string(certs.join("rpc.crt")).unwrap())).unwrap();
    assert_eq!(rpc.special_usage.as_deref(), Some("kms:rpc"));
    assert!(rpc.quote.is_some());
    assert!(!rpc.self_issued);
    assert_eq!(std::fs::read_to_string(certs.join("rpc-domain")).unwrap(), DOMAIN);

    // The KMS then serves; SignCert issues a certificate for the caller's own app under the app CA.
    let handle = start(&kms).await;
    let leaf_key = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    let spki = leaf_key.verifying_key().to_public_key_der().unwrap();
    let csr = serde_json::json!({
        "confirm": "please sign cert:",
        "pubkey": hex::encode(spki.as_bytes()),
        "config": {"subject": "app.example", "subject_alt_names": ["app.example"], "usage_server_auth": true}
    })
    .to_string();
    let sig: p256::ecdsa::Signature = leaf_key.sign(csr.as_bytes());
    let (cert, key) = client_cert(&app_sim, |_| {});
    let chain = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .sign_cert(SignCertRequest {
            api_version: 1,
            csr: csr.clone().into_bytes(),
            signature: sig.to_der().as_bytes().to_vec(),
            vm_config: String::new(),
        })
        .await
        .unwrap()
        .certificate_chain;
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2], std::fs::read_to_string(certs.join("root-ca.crt")).unwrap());
    let leaf = parse_cert(&der(&chain[0])).unwrap();
    assert_eq!(leaf.app_id.as_deref(), Some(&APP[..]));
    assert_eq!(leaf.special_usage.as_deref(), Some("app:custom"));
    assert_eq!(leaf.spki_der, spki.as_bytes());
    let app_ca = parse_cert(&der(&chain[1])).unwrap();
    assert_eq!(app_ca.special_usage.as_deref(), Some("app:ca"));
    // webpki accepts leaf → app CA → KMS root for the requested name.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&chain[2])).unwrap();
    let v = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    v.verify_server_cert(
        &der(&chain[0]),
        &[der(&chain[1])],
        &ServerName::try_from("app.example").unwrap(),
        &[],
        UnixTime::now(),
    )
    .unwrap();

    // A CSR signed by another key is refused.
    let other: p256::ecdsa::Signature = p256::ecdsa::SigningKey::from_slice(&[8u8; 32])
        .unwrap()
        .sign(csr.as_bytes());
    let (cert, key) = client_cert(&app_sim, |_| {});
    let e = client(&handle, &certs, &ktee.sim, Some((cert, &key)))
        .sign_cert(SignCertRequest {
            api_version: 1,
            csr: csr.into_bytes(),
            signature: other.to_der().as_bytes().to_vec(),
            vm_config: String::new(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not verify"), "{e}");
    handle.shutdown().await.unwrap();
}
