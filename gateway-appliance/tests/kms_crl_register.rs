//! `[core.kms]` wiring: RegisterCvm over real mTLS from CVMs presenting KMS-issued RA-TLS chains
//! (`[leaf, app CA]` under a KMS root, the leaf quoted by the in-process simulated TDX module), with the
//! KMS's revocation list fetched by the gateway's refresher from a `Revocation.GetCrl` endpoint over TLS.
//!
//! The KMS here is a stand-in serving the real pRPC method with a list built and signed by
//! `dstack_ra_tls::revocation::build_crl` (what the KMS appliance publishes) under a test root; the
//! gateway side (config → root as client root → refresher → set → refusal) is the code `main.rs` runs.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::sim::{APP_ID, DOMAIN, booted_sim, server_identity};
use dstack_gateway::attest::rpc_router;
use dstack_gateway::config::GatewayConfig;
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgBackend, WgError, WgPeer};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::rpc_tls::RpcTls;
use dstack_ra_tls::revocation::{CrlContent, RevokedSerial, build_crl};
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, CaCert, CertAttestation, CertRequest, RevocationSet};
use dstack_rpc::gateway::{GatewayClient, RegisterCvmRequest};
use dstack_rpc::kms::{GetCrlResponse, RevocationRpc, RevocationServer};
use dstack_rpc::{CallContext, Client, Empty, RpcError, RpcRouter};
use dstack_sim_tdx::SimTdx;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn ca(subject: &str, level: u8) -> CertRequest {
    CertRequest {
        subject: subject.into(),
        ca_level: Some(level),
        ..Default::default()
    }
}

/// The stand-in KMS: its root, app CA, and the revoked serials it publishes (none served while `down`).
struct FakeKms {
    root: Arc<CaCert>,
    revoked: Mutex<(u64, Vec<Vec<u8>>)>,
    down: AtomicBool,
}

impl RevocationRpc for FakeKms {
    async fn get_crl(&self, _: &CallContext, _: Empty) -> Result<GetCrlResponse, RpcError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RpcError::Internal("KMS not ready".into()));
        }
        let (number, serials) = self.revoked.lock().unwrap().clone();
        let t = now();
        let crl = build_crl(
            &self.root,
            &CrlContent {
                crl_number: number,
                this_update: t - 10,
                next_update: t + 7 * 86400,
                serials: serials
                    .into_iter()
                    .map(|serial| RevokedSerial {
                        serial,
                        revoked_at: t - 10,
                    })
                    .collect(),
                apps: Vec::new(),
            },
        )
        .map_err(|e| RpcError::Internal(e.to_string()))?;
        Ok(GetCrlResponse {
            crl_pem: String::new(),
            crl,
            crl_number: number,
        })
    }
}

#[derive(Default)]
struct RecordingWg(Mutex<Vec<WgPeer>>);
impl WgBackend for RecordingWg {
    fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError> {
        *self.0.lock().unwrap() = peers.to_vec();
        Ok(())
    }
    fn latest_handshakes(&self) -> HashMap<String, SystemTime> {
        HashMap::new()
    }
}

/// `[leaf, app CA]` for a fresh key with `serial`, the leaf an RA-TLS client certificate quoted by `sim`.
fn kms_issued_chain(sim: &SimTdx, app_ca: &CaCert, serial: &[u8]) -> (Vec<CertificateDer<'static>>, KeyPair) {
    let key = p256();
    let rd = dstack_ra_tls::ra_tls_report_data(&key.subject_public_key_info());
    let req = CertRequest {
        subject: "dstack-guest-agent".into(),
        usage_client_auth: true,
        app_id: Some(APP_ID.to_vec()),
        attestation: Some(CertAttestation {
            quote: sim.quote(&rd).unwrap(),
            event_log: sim.full_event_log(),
        }),
        ..Default::default()
    };
    let leaf = app_ca.issue_with_serial(&req, &key, serial).unwrap();
    (vec![leaf.der().clone(), app_ca.cert_der().clone()], key)
}

async fn register(
    port: u16,
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: &KeyPair,
    n: u8,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let client = Client::new(&format!("https://127.0.0.1:{port}/prpc"))
        .unwrap()
        .with_tls(Arc::new(tls))
        .with_server_name(DOMAIN)
        .unwrap();
    use base64::Engine;
    GatewayClient::new(client)
        .register_cvm(RegisterCvmRequest {
            client_public_key: base64::engine::general_purpose::STANDARD.encode([n; 32]),
            port_policy: None,
        })
        .await
        .map(|r| r.wg.unwrap().client_ip)
        .map_err(|e| e.to_string())
}

/// Waits until the set holds list number `n` (the refresher runs every 5 s at the fastest).
async fn wait_for_list(set: &RevocationSet, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while set.status().first().and_then(|s| s.crl_number) != Some(n) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "list {n} never arrived: {:?}",
            set.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_issued_client_chains_are_checked_against_the_kms_revocation_list() {
    // The KMS: root, app CA, an RPC certificate for 127.0.0.1 under the root.
    let root = Arc::new(CaCert::self_signed(&ca("Dstack KMS CA", 1), p256()).unwrap());
    let app_ca = CaCert::issued_by(&ca("Dstack App CA", 0), p256(), &root).unwrap();
    let kms_key = p256();
    let kms_cert = root
        .issue(
            &CertRequest {
                subject: "kms.test".into(),
                alt_names: vec!["127.0.0.1".into()],
                usage_server_auth: true,
                ..Default::default()
            },
            &kms_key,
        )
        .unwrap();
    let kms = Arc::new(FakeKms {
        root: root.clone(),
        revoked: Mutex::new((1, vec![vec![0x0d, 0xea, 0xd0]])),
        down: AtomicBool::new(true),
    });
    let kms_tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![kms_cert.der().clone(), root.cert_der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kms_key.serialize_der())),
        )
        .unwrap();
    let kms_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let kms_port = kms_listener.local_addr().unwrap().port();
    tokio::spawn(dstack_rpc::serve_tls(
        kms_listener,
        Arc::new(kms_tls),
        Arc::new(RpcRouter::new("/prpc").service(RevocationServer::from_arc(kms.clone()))),
        std::future::pending(),
    ));

    // The gateway: PEM identity, [core.kms] pointing at the KMS, the root as a PEM file.
    let dir = tempfile::tempdir().unwrap();
    let root_pem = dir.path().join("kms-root-ca.pem");
    std::fs::write(&root_pem, root.cert_pem()).unwrap();
    let (id, server_ca) = server_identity();
    let chain_pem = dir.path().join("rpc.crt");
    let key_pem = dir.path().join("rpc.key");
    let mut chain_text = String::new();
    for c in &id.chain {
        chain_text.push_str(&pem_cert(c));
    }
    std::fs::write(&chain_pem, chain_text).unwrap();
    std::fs::write(&key_pem, pem_key(&id.key)).unwrap();
    let cfg = GatewayConfig::from_toml(&format!(
        "[core]\nrpc_domain = \"{DOMAIN}\"\n[core.rpc]\ncert_chain = \"{}\"\ncert_key = \"{}\"\n\
         [core.kms]\nurl = \"https://127.0.0.1:{kms_port}\"\nroot_ca = \"{}\"\ncrl_required = true\ncrl_refresh = \"5s\"\n\
         [core.wg]\nendpoint = \"192.0.2.1:51820\"\npublic_key = \"c2VydmVyLXB1YmxpYy1rZXktcGxhY2Vob2xkZXIhISE=\"\n",
        chain_pem.display(),
        key_pem.display(),
        root_pem.display()
    ))
    .unwrap();
    let mut rpc = RpcTls::from_config(&cfg.core).await.unwrap();
    assert_eq!(rpc.roots, vec![root.cert_der().clone()]);
    let set = rpc.revocations.clone().expect("[core.kms] url set: a revocation set");

    let sim = booted_sim();
    let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![sim.root_pin()],
        ..Default::default()
    }));
    let table = RoutingTable::new();
    let registrar = Arc::new(Registrar::new(
        Arc::new(cfg.clone()),
        table.clone(),
        Box::new(rpc.identity(verifier)),
        Arc::new(RecordingWg::default()),
        AdmissionPolicy::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(dstack_rpc::serve_tls(
        listener,
        rpc.server.clone(),
        Arc::new(rpc_router(registrar)),
        std::future::pending(),
    ));
    assert_eq!(rpc.spawn_background().len(), 1, "the CRL refresher runs");

    // crl_required: while the KMS cannot publish, KMS-issued chains are refused (fail closed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while set.status().first().and_then(|s| s.last_error.clone()).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fetch attempted: {:?}",
            set.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (chain, key) = kms_issued_chain(&sim, &app_ca, &[0x0d, 0xea, 0xd1]);
    let e = register(port, &server_ca, chain.clone(), &key, 1).await.unwrap_err();
    assert!(e.contains("revocation status unknown"), "{e}");
    assert!(table.instances().is_empty());

    // The KMS publishes list 1 (0dead0 revoked): an unrevoked chain registers, the revoked one is refused
    // with its serial.
    kms.down.store(false, Ordering::SeqCst);
    wait_for_list(&set, 1).await;
    assert_eq!(register(port, &server_ca, chain, &key, 1).await.unwrap(), "10.0.0.2");
    let (revoked, rkey) = kms_issued_chain(&sim, &app_ca, &[0x0d, 0xea, 0xd0]);
    let e = register(port, &server_ca, revoked, &rkey, 2).await.unwrap_err();
    assert!(e.contains("revoked") && e.contains("0dead0"), "{e}");

    // A revocation published later reaches the gateway through the refresher.
    *kms.revoked.lock().unwrap() = (2, vec![vec![0x0d, 0xea, 0xd0], vec![0x0d, 0xea, 0xd2]]);
    let (later, lkey) = kms_issued_chain(&sim, &app_ca, &[0x0d, 0xea, 0xd2]);
    assert_eq!(
        register(port, &server_ca, later.clone(), &lkey, 3).await.unwrap(),
        "10.0.0.2"
    );
    wait_for_list(&set, 2).await;
    let e = register(port, &server_ca, later, &lkey, 3).await.unwrap_err();
    assert!(e.contains("revoked") && e.contains("0dead2"), "{e}");

    // A chain under another root is not accepted at all (not a KMS-issued chain, not self-signed).
    let rogue_root = CaCert::self_signed(&ca("Dstack KMS CA", 1), p256()).unwrap();
    let rogue_app = CaCert::issued_by(&ca("Dstack App CA", 0), p256(), &rogue_root).unwrap();
    let (rogue, rgkey) = kms_issued_chain(&sim, &rogue_app, &[0x01]);
    let e = register(port, &server_ca, rogue, &rgkey, 4).await.unwrap_err();
    eprintln!("foreign root refused: {e}");
    assert_eq!(table.instances().len(), 1, "only the one instance registered above");
}

fn pem_cert(der: &CertificateDer<'_>) -> String {
    pem_block("CERTIFICATE", der)
}

fn pem_key(key: &PrivateKeyDer<'_>) -> String {
    pem_block("PRIVATE KEY", key.secret_der())
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s + &format!("-----END {label}-----\n")
}
