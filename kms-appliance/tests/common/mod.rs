//! Test fixtures: a KMS on loopback whose own TEE is a simulated TDX module reached over a unix socket, CVMs
//! (simulated modules with dstack runtime events) with RA-TLS client certificates, an mTLS pRPC client and a
//! tiny webhook server.
#![allow(dead_code)]

pub mod anvil;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_kms::bootstrap::SelfTee;
use dstack_kms::config::{AuthApiKind, KmsConfig};
use dstack_kms::{Kms, KmsHandle};
use dstack_measurements::eventlog::TdxEvent;
use dstack_ra_tls::tls::RaTlsVerifierConfig;
use dstack_ra_tls::{
    AttestationPolicy, AttestationVerifier, CertAttestation, CertRequest, RaTlsServerVerifier, ra_tls_report_data,
};
use dstack_rpc::Client;
use dstack_rpc::kms::KmsClient;
use dstack_sim_tdx::{SimTdx, fixture};
use dstack_tee::{SimEndpoint, SimulatedTee};
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const DOMAIN: &str = "kms.test";
pub const GATEWAY_APP_ID: &str = "0123456789abcdef0123456789abcdef01234567";

/// A simulated TDX module that "booted" (three boot events, MRTD `mrtd_byte`).
pub fn booted(mrtd_byte: u8) -> SimTdx {
    fixture::booted(mrtd_byte, mrtd_byte).unwrap()
}

/// A CVM: a module with dstack's boot-time runtime events for `app_id` / `instance_id`.
pub fn cvm(app_id: [u8; 20], instance_id: [u8; 20]) -> SimTdx {
    let sim = booted(0x21);
    fixture::measure_dstack_boot(&sim, &app_id, &[0xc0; 32], &instance_id).unwrap();
    sim
}

pub fn full_log(sim: &SimTdx) -> Vec<TdxEvent> {
    sim.full_event_log()
}

/// A self-signed RA-TLS client certificate for `sim` (event log passed through `tamper`).
pub fn client_cert(sim: &SimTdx, tamper: impl FnOnce(&mut Vec<TdxEvent>)) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut event_log = full_log(sim);
    tamper(&mut event_log);
    let att = CertAttestation {
        quote: sim.quote(&ra_tls_report_data(&key.subject_public_key_info())).unwrap(),
        event_log,
    };
    let cert = CertRequest {
        subject: "cvm".into(),
        usage_client_auth: true,
        attestation: Some(att),
        ..Default::default()
    }
    .self_signed(&key)
    .unwrap();
    (cert.der().clone(), key)
}

/// The KMS's own TEE: a simulated module served over a unix socket in `dir`.
pub struct KmsTee {
    pub sim: Arc<SimTdx>,
    pub self_tee: SelfTee,
    _server: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn kms_tee(dir: &Path) -> KmsTee {
    let sim = Arc::new(booted(0x41));
    let sock = dir.join("kms-sim.sock");
    let server = tokio::spawn(dstack_sim_tdx::serve_unix(
        Arc::clone(&sim),
        sock.clone(),
        std::future::pending(),
    ));
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tee = Arc::new(SimulatedTee::new(&SimEndpoint::Unix(sock)));
    KmsTee {
        sim,
        self_tee: SelfTee {
            tee,
            runtime_log: dir.join("no-runtime-events.log"),
        },
        _server: server,
    }
}

/// A KMS's own TEE that booted as a dstack app (`app_id`, compose hash `[0xc5; 32]`, instance `[0x1e; 20]`):
/// a simulated module (MRTD `mrtd_byte`) over a unix socket in `dir`, with its runtime events measured through
/// the TEE into `dir/<name>-runtime.log`, so its RA-TLS certificates carry a replayable app identity.
pub async fn kms_tee_app(dir: &Path, name: &str, mrtd_byte: u8, app_id: [u8; 20]) -> KmsTee {
    let sim = Arc::new(booted(mrtd_byte));
    let sock = dir.join(format!("{name}-sim.sock"));
    let server = tokio::spawn(dstack_sim_tdx::serve_unix(
        Arc::clone(&sim),
        sock.clone(),
        std::future::pending(),
    ));
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tee: Arc<dyn dstack_tee::Tee> = Arc::new(SimulatedTee::new(&SimEndpoint::Unix(sock)));
    let runtime_log = dir.join(format!("{name}-runtime.log"));
    let log = dstack_tee::RuntimeEventLog::new(
        Arc::clone(&tee),
        &runtime_log,
        dstack_measurements::eventlog::EventLogVersion::V1,
    );
    for (event, payload) in [
        ("system-preparing", &b""[..]),
        ("app-id", &app_id[..]),
        ("compose-hash", &[0xc5; 32][..]),
        ("instance-id", &[0x1e; 20][..]),
        ("boot-mr-done", &b""[..]),
        ("system-ready", &b""[..]),
    ] {
        log.measure(event, payload).await.unwrap();
    }
    KmsTee {
        sim,
        self_tee: SelfTee { tee, runtime_log },
        _server: server,
    }
}

pub fn write_pin(dir: &Path, name: &str, sim: &SimTdx) -> String {
    let p = dir.join(name);
    std::fs::write(&p, sim.root_cert_pem()).unwrap();
    p.display().to_string()
}

pub fn config(cert_dir: &Path, pins: Vec<String>, allow_simulated: bool, webhook: Option<&str>) -> KmsConfig {
    let mut c = KmsConfig::default();
    c.core.cert_dir = cert_dir.to_path_buf();
    c.core.attestation.allow_simulated = allow_simulated;
    c.core.attestation.simulated_roots = pins;
    c.core.auth_api.dev.gateway_app_id = GATEWAY_APP_ID.into();
    if let Some(url) = webhook {
        c.core.auth_api.kind = AuthApiKind::Webhook;
        c.core.auth_api.webhook.url = url.into();
        c.core.auth_api.webhook.timeout_ms = 2000;
    }
    c
}

pub async fn start(kms: &Kms) -> KmsHandle {
    kms.start(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .await
        .unwrap()
}

/// Verifies the KMS RPC certificate: chains to the root CA in `cert_dir`, usage `kms:rpc`, attestation signed
/// by `kms_sim`.
pub fn server_verifier(cert_dir: &Path, kms_sim: &SimTdx) -> Arc<RaTlsServerVerifier> {
    let root_pem = std::fs::read_to_string(cert_dir.join("root-ca.crt")).unwrap();
    let root = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap()
    };
    let att = Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![kms_sim.root_pin()],
        required_usage: Some("kms:rpc".into()),
        ..Default::default()
    }));
    RaTlsServerVerifier::new(
        RaTlsVerifierConfig {
            roots: vec![root],
            accept_self_signed: false,
            require_attestation: true,
        },
        att,
    )
    .unwrap()
}

/// An mTLS client for `handle` (see [`server_verifier`]) presenting `client` if given.
pub fn client(
    handle: &KmsHandle,
    cert_dir: &Path,
    kms_sim: &SimTdx,
    client: Option<(CertificateDer<'static>, &KeyPair)>,
) -> KmsClient<Client> {
    client_with(handle, server_verifier(cert_dir, kms_sim), client)
}

/// Like [`client`] with a given (shared, caching) server verifier.
pub fn client_with(
    handle: &KmsHandle,
    verifier: Arc<RaTlsServerVerifier>,
    client: Option<(CertificateDer<'static>, &KeyPair)>,
) -> KmsClient<Client> {
    client_named(handle, verifier, client, DOMAIN)
}

/// Like [`client_with`] for a KMS whose RPC certificate is for `server_name`.
pub fn client_named(
    handle: &KmsHandle,
    verifier: Arc<RaTlsServerVerifier>,
    client: Option<(CertificateDer<'static>, &KeyPair)>,
    server_name: &str,
) -> KmsClient<Client> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let url = format!("https://127.0.0.1:{}/prpc", handle.addr.port());
    KmsClient::new(
        Client::new(&url)
            .unwrap()
            .with_tls(Arc::new(cfg))
            .with_server_name(server_name)
            .unwrap(),
    )
}

/// A minimal HTTP/1.1 webhook: records `(path, body)` and allows exactly the app ids in `allowed`. While `hold`
/// is set, `/bootAuth/kms` requests are recorded and then left unanswered (up to 20 s): the asking KMS is stuck
/// mid-decision.
pub struct Webhook {
    pub url: String,
    pub requests: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    pub hold: Arc<std::sync::atomic::AtomicBool>,
}

impl Webhook {
    /// How many requests for `path` arrived so far.
    pub fn count(&self, path: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|(p, _)| p == path).count()
    }
}

pub async fn webhook(allowed: Vec<[u8; 20]>) -> Webhook {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&requests);
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = Arc::clone(&hold);
    let allowed: Vec<String> = allowed.iter().map(hex::encode).collect();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            let held = Arc::clone(&held);
            let allowed = allowed.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "webhook client closed early");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                let body: serde_json::Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
                let app = body["appId"].as_str().unwrap_or_default().to_owned();
                let kms_check = path == "/bootAuth/kms";
                log.lock().unwrap().push((path, body));
                let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while kms_check && held.load(std::sync::atomic::Ordering::SeqCst) && std::time::Instant::now() < until {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                let answer = if allowed.contains(&app) {
                    serde_json::json!({"isAllowed": true, "reason": "", "gatewayAppId": GATEWAY_APP_ID})
                } else {
                    serde_json::json!({"isAllowed": false, "reason": format!("App not registered: {app}"), "gatewayAppId": ""})
                }
                .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Webhook { url, requests, hold }
}

pub fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    (dir, certs)
}
