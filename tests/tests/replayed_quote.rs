//! Tamper matrix, replayed quote: a genuine quote taken from a running CVM, presented by someone else.
//!
//! The attacker (this test, on the host) asks the running CVM's demo app for a quote (`/quote/<nonce>`: a real
//! quote of the genuine CVM with its full event log, report data = SHA-512("dstack-demo-quote:" ‖ the attacker's
//! nonce) — the attacker asks for the binding its own key needs, and must not get it), puts quote and
//! event log into a fresh RA-TLS client certificate for a key of its own (our ra-tls certificate builder, under
//! the KMS's temporary client CA exactly as a CVM does), and calls `GetAppKey` over mutual TLS. The KMS must
//! refuse because the quote's report data is not `sha512("ratls-cert:" ‖ SPKI)` of the presented key, say so,
//! and return no key. Positive control: the same KMS released the keys to the genuine CVM (its app answers
//! with the env it decrypted).
//!
//! The KMS is the strict one of the tamper matrix (simulated quotes accepted under the pinned root, OS image
//! verification on), so the refusal comes from the key binding, not from the image or the quote's signature.
//!
//! Inputs: as `full_stack.rs` (the `dstack_e2e` crate docs). One CVM boot under TCG; about 2 minutes here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_e2e::gateway::KMS_DOMAIN;
use dstack_e2e::stack::{AppSpec, free_port, http_get};
use dstack_e2e::verify::demo_quote_report_data;
use dstack_e2e::{Inputs, KmsOptions, Stack};
use dstack_measurements::eventlog::parse_json_log;
use dstack_ra_tls::{CaCert, CertAttestation, CertRequest, ra_tls_report_data};
use dstack_rpc::Client;
use dstack_rpc::kms::{GetAppKeyRequest, KmsClient};
use rcgen::PublicKeyData;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quote of the running CVM over `report_data`, with its event log and vm_config, via the demo app.
fn cvm_quote(port: u16, report_data: &[u8]) -> (Vec<u8>, String, String) {
    let (status, body) = http_get(port, &format!("/quote/{}", hex::encode(report_data))).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
    (
        hex::decode(field("quote")).unwrap(),
        field("event_log"),
        field("vm_config"),
    )
}

/// `GetAppKey` over mutual TLS with an RA-TLS client certificate for `key` carrying `quote` and `event_log`
/// (JSON lines as the agent returns them), issued under the KMS's temporary client CA.
async fn get_app_key_with(
    stack: &Stack,
    key: &rcgen::KeyPair,
    quote: Vec<u8>,
    event_log: &str,
    vm_config: &str,
) -> Result<dstack_rpc::kms::AppKeyResponse, String> {
    // Unauthenticated first call, as a CVM: the temporary client CA.
    let tmp = dstack_host_vmm::cli::kms::kms_client(&stack.kms_url())
        .map_err(|e| e.to_string())?
        .get_temp_ca_cert()
        .await
        .map_err(|e| format!("GetTempCaCert: {e}"))?;
    let req = CertRequest {
        subject: "dstack-guest".into(),
        usage_client_auth: true,
        attestation: Some(CertAttestation {
            quote,
            event_log: parse_json_log(event_log.as_bytes()).map_err(|e| format!("event log: {e}"))?,
        }),
        ..Default::default()
    };
    let ca = CaCert::from_pem(&tmp.temp_ca_cert, &tmp.temp_ca_key).map_err(|e| format!("temp CA: {e}"))?;
    let leaf = ca.issue(&req, key).map_err(|e| format!("client certificate: {e}"))?;
    let chain = vec![leaf.der().clone(), ca.cert_der().clone()];

    let root_pem = std::fs::read(stack.dir.join("kms-certs/root-ca.crt")).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&root_pem).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let tls = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| e.to_string())?;
    let client = Client::new(&format!("https://127.0.0.1:{}/prpc", stack.kms_port))
        .map_err(|e| e.to_string())?
        .with_tls(Arc::new(tls))
        .with_server_name(KMS_DOMAIN)
        .map_err(|e| e.to_string())?;
    KmsClient::new(client)
        .get_app_key(GetAppKeyRequest {
            api_version: 1,
            vm_config: vm_config.to_owned(),
        })
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_replayed_under_another_key_gets_no_key() {
    let Some(inputs) = Inputs::for_test("replayed_quote") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start(dir.path(), inputs, KmsOptions::default()).await.unwrap();
    let port = free_port().unwrap();
    let greeting = "only for the genuine CVM";
    let mut app = AppSpec::demo(&stack.app_image, greeting, port);
    app.vcpus = 1;
    app.memory_mb = 2048;
    let id = stack.deploy(&app).await.unwrap();
    let t = Instant::now();
    let page = stack
        .wait_app(&id, port, BOOT_TIMEOUT, |p| {
            eprintln!("[{:>6.1}s] boot: {p}", t.elapsed().as_secs_f64())
        })
        .await
        .unwrap();
    // Positive control: this KMS released the keys to the genuine CVM (the env decrypted inside it).
    assert!(page.contains(greeting), "{page}");

    let attacker = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // The attacker asks for exactly the report data its own key needs. The app must not quote it as is
    // (that would hand out a valid RA-TLS binding for the attacker's key, and with it the app's keys): it
    // quotes SHA-512("dstack-demo-quote:" || nonce) instead.
    let expected = ra_tls_report_data(&attacker.subject_public_key_info());
    let nonce = expected;
    let (quote, event_log, vm_config) = cvm_quote(port, &nonce);
    assert!(quote.len() > 632, "a whole quote ({} bytes)", quote.len());
    // The quote is genuine and fresh: it carries the hashed nonce (TD report body at 48, report data at +520).
    let quoted = demo_quote_report_data(&nonce);
    assert_eq!(quote.get(568..632), Some(&quoted[..]), "report data of the quote");
    assert_ne!(&expected[..], &quoted[..]);

    let t = Instant::now();
    let refused = get_app_key_with(&stack, &attacker, quote, &event_log, &vm_config).await;
    let took = t.elapsed();
    let err = match refused {
        Ok(keys) => panic!(
            "the KMS released keys for a replayed quote (disk key {} bytes, env key {} bytes)",
            keys.disk_crypt_key.len(),
            keys.env_crypt_key.len()
        ),
        Err(e) => e,
    };
    eprintln!("replayed quote: refused after {took:?}: {err}");
    assert!(
        err.contains("does not bind this certificate's key") && err.contains(&hex::encode(&quoted[..16])),
        "the refusal must name the report-data / key binding (found: the hashed nonce, expected: sha512 of the SPKI): {err}"
    );
    assert!(
        err.contains(&hex::encode(&expected[..16])),
        "the refusal must show the binding the presented key needed: {err}"
    );
    // The genuine CVM is unaffected.
    assert_eq!(http_get(port, "/").map(|r| r.0), Ok(200));
}
