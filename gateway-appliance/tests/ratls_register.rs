//! `RegisterCvm` over real mTLS with RA-TLS client certificates whose quotes come from the in-process
//! simulated TDX module (`dstack-sim-tdx`), verified against its pinned root.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::sim::{APP_ID, DOMAIN, INSTANCE_ID, booted_sim, client_cert};
use dstack_gateway::attest::{RaTlsIdentity, build_verifier, rpc_router, server_config};
use dstack_gateway::config::{AttestationConfig, GatewayConfig};
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgBackend, WgError, WgPeer};
use dstack_gateway::routing::RoutingTable;
use dstack_measurements::sim::SimRootPin;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier};
use dstack_rpc::gateway::{GatewayClient, InfoResponse, RegisterCvmRequest};
use dstack_rpc::{Client, Empty};
use dstack_sim_tdx::SimTdx;
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

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

struct Gateway {
    port: u16,
    ca: CertificateDer<'static>,
    wg: Arc<RecordingWg>,
    table: RoutingTable,
}

/// Server certificate issued by a test CA, written to PEM files and loaded like the binary does.
async fn start_gateway(verifier: Arc<AttestationVerifier>) -> Gateway {
    let (id, ca) = common::sim::server_identity();
    let tls = server_config(id, Vec::new()).unwrap();

    let cfg = Arc::new(
        GatewayConfig::from_toml(
            "[core]\nrpc_domain = \"gateway.test\"\n[core.wg]\nendpoint = \"192.0.2.1:51820\"\npublic_key = \"c2VydmVyLXB1YmxpYy1rZXktcGxhY2Vob2xkZXIhISE=\"\n[core.proxy]\nbase_domain = \"app.test\"\n",
        )
        .unwrap(),
    );
    let wg = Arc::new(RecordingWg::default());
    let table = RoutingTable::new();
    let registrar = Arc::new(Registrar::new(
        cfg,
        table.clone(),
        Box::new(RaTlsIdentity::new(verifier)),
        wg.clone(),
        AdmissionPolicy::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Arc::new(rpc_router(registrar));
    tokio::spawn(dstack_rpc::serve_tls(listener, tls, router, std::future::pending()));
    Gateway { port, ca, wg, table }
}

fn client(gw: &Gateway, cert: Option<(CertificateDer<'static>, &KeyPair)>) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(gw.ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                vec![c],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Client::new(&format!("https://127.0.0.1:{}/prpc", gw.port))
        .unwrap()
        .with_tls(Arc::new(cfg))
        .with_server_name(DOMAIN)
        .unwrap()
}

fn verifier(sim: &SimTdx, allow_simulated: bool) -> Arc<AttestationVerifier> {
    Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated,
        simulated_roots: vec![sim.root_pin()],
        ..Default::default()
    }))
}

fn wg_key(n: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn req(n: u8) -> RegisterCvmRequest {
    RegisterCvmRequest {
        client_public_key: wg_key(n),
        port_policy: None,
    }
}

#[tokio::test]
async fn attested_cvm_registers_and_gets_tunnel_config() {
    let sim = booted_sim();
    let gw = start_gateway(verifier(&sim, true)).await;
    let (cert, key) = client_cert(&sim, |_| {});
    let c = GatewayClient::new(client(&gw, Some((cert, &key))));
    let resp = c.register_cvm(req(7)).await.unwrap();
    let wg = resp.wg.unwrap();
    // 10.0.0.0/25 default range; .0 is the network address, .1 the gateway.
    assert_eq!(wg.client_ip, "10.0.0.2");
    assert_eq!(wg.servers[0].endpoint, "192.0.2.1:51820");
    assert_eq!(resp.agent.unwrap().domain, "app.test");
    let inst = gw.table.get(&hex::encode(INSTANCE_ID)).expect("instance recorded");
    assert_eq!(inst.app_id, hex::encode(APP_ID));
    assert_eq!(
        gw.wg.0.lock().unwrap().as_slice(),
        [WgPeer {
            public_key: wg_key(7),
            ip: "10.0.0.2".parse().unwrap(),
        }]
    );
    // Same instance again (new key): same address, peer replaced.
    let again = c.register_cvm(req(8)).await.unwrap();
    assert_eq!(again.wg.unwrap().client_ip, "10.0.0.2");
    assert_eq!(gw.wg.0.lock().unwrap().len(), 1);
    // dstack's legacy service name reaches the same service.
    let info: InfoResponse = client(&gw, None).call("Tproxy.Info", &Empty {}).await.unwrap();
    assert_eq!(info.base_domain, "app.test");
}

async fn refusal(gw: &Gateway, cert: Option<(CertificateDer<'static>, &KeyPair)>) -> String {
    let err = GatewayClient::new(client(gw, cert))
        .register_cvm(req(9))
        .await
        .unwrap_err();
    assert!(gw.table.instances().is_empty(), "nothing registered on refusal");
    assert!(gw.wg.0.lock().unwrap().is_empty(), "no peer added on refusal");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    msg
}

#[tokio::test]
async fn missing_certificate_is_refused_with_dstack_retry_message() {
    let sim = booted_sim();
    let gw = start_gateway(verifier(&sim, true)).await;
    let msg = refusal(&gw, None).await;
    assert!(msg.contains("no attestation provided"), "{msg}");
}

#[tokio::test]
async fn tampered_event_log_is_refused() {
    let sim = booted_sim();
    let gw = start_gateway(verifier(&sim, true)).await;
    // Claim another app id: the payload no longer matches the digest the quote's RTMR3 replays.
    let (cert, key) = client_cert(&sim, |log| {
        let ev = log.iter_mut().find(|e| e.event == "app-id").expect("app-id event");
        ev.event_payload = vec![0xbb; 20];
    });
    let msg = refusal(&gw, Some((cert, &key))).await;
    assert!(msg.contains("attestation rejected"), "{msg}");
    // Consistent forgery (digest recomputed for the new payload): RTMR3 no longer replays.
    let (cert, key) = client_cert(&sim, |log| {
        let ev = log.iter_mut().find(|e| e.event == "app-id").expect("app-id event");
        ev.event_payload = vec![0xbb; 20];
        ev.digest = dstack_measurements::eventlog::RuntimeEvent::new("app-id", [0xbb; 20])
            .digest()
            .to_vec();
    });
    let msg = refusal(&gw, Some((cert, &key))).await;
    assert!(
        msg.contains("attestation rejected") && msg.contains("rtmr3 replays"),
        "{msg}"
    );
}

#[tokio::test]
async fn simulated_quote_refused_unless_allowed() {
    let sim = booted_sim();
    let gw = start_gateway(verifier(&sim, false)).await;
    let (cert, key) = client_cert(&sim, |_| {});
    let msg = refusal(&gw, Some((cert, &key))).await;
    assert!(
        msg.contains("attestation rejected") && msg.to_lowercase().contains("simulat"),
        "{msg}"
    );
}

#[tokio::test]
async fn quote_from_an_unpinned_simulator_is_refused() {
    let trusted = booted_sim();
    let rogue = booted_sim(); // fresh signing root, not pinned
    let gw = start_gateway(verifier(&trusted, true)).await;
    let (cert, key) = client_cert(&rogue, |_| {});
    let msg = refusal(&gw, Some((cert, &key))).await;
    assert!(msg.contains("attestation rejected"), "{msg}");
}

#[test]
fn config_builds_verifier_from_pinned_root_file() {
    let sim = booted_sim();
    let SimRootPin::SpkiSha256(pin) = sim.root_pin() else {
        panic!("simulator pins are SPKI hashes");
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim-root.pin");
    std::fs::write(&path, format!("{}\n", hex::encode(pin))).unwrap();
    // One pin inline, the same pin from a file.
    let cfg = AttestationConfig {
        allow_simulated: true,
        simulated_roots: vec![hex::encode(pin), path.display().to_string()],
        ..Default::default()
    };
    let v = build_verifier(&cfg).unwrap();
    assert_eq!(v.policy().simulated_roots, vec![sim.root_pin(), sim.root_pin()]);
    let (cert, _) = client_cert(&sim, |_| {});
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let id = v.verify_cert(&cert, now).unwrap().unwrap();
    assert_eq!(id.app_id, APP_ID);
    // allow_simulated without a pin is a configuration error, not "accept any simulator".
    let bad = AttestationConfig {
        allow_simulated: true,
        ..Default::default()
    };
    assert!(build_verifier(&bad).is_err());
}
