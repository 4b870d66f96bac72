//! The gateway inside a CVM: `[core.rpc] identity = "agent:<socket>"` gets the RPC certificate from a real
//! guest agent (`dstack-guest-agent`'s host simulation mode: an in-process simulated TDX module, never TDX,
//! serving its unix socket from its own thread and runtime as from another process). A client pinned to the
//! agent's KMS root accepts the served chain; the leaf's quote verifies against the simulator's pin and names
//! the agent's app; the certificate is renewed before notAfter; a CVM presenting an agent-issued client chain
//! (under the same KMS root) registers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dstack_gateway::attest::rpc_router;
use dstack_gateway::config::GatewayConfig;
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgBackend, WgError, WgPeer};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::rpc_tls::RpcTls;
use dstack_gateway::sync::SameAppServerVerifier;
use dstack_guest_agent::simulate::{BackgroundSimulator, SimulateOptions};
use dstack_measurements::sim::SimRootPin;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, parse_cert};
use dstack_rpc::agent::{DstackGuestClient, GetTlsKeyArgs};
use dstack_rpc::gateway::{GatewayClient, RegisterCvmRequest};
use dstack_rpc::{Client, Empty};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

const DOMAIN: &str = "gateway.test";

/// A simulated guest agent on its own thread, in a temporary directory (the agent stops before the directory
/// goes).
struct RunningAgent {
    socket: PathBuf,
    ready: serde_json::Value,
    _sim: BackgroundSimulator,
    _dir: tempfile::TempDir,
}

fn start_agent() -> RunningAgent {
    let dir = tempfile::tempdir().unwrap();
    let opts = SimulateOptions {
        socket: dir.path().join("dstack.sock"),
        tappd_socket: None,
        state_dir: Some(dir.path().join("state")),
        app_compose: None,
    };
    let sim = BackgroundSimulator::start(opts, Duration::from_secs(60)).expect("the simulated agent did not come up");
    assert_eq!(sim.ready()["simulated"], true);
    RunningAgent {
        socket: sim.socket().to_owned(),
        ready: sim.ready().clone(),
        _sim: sim,
        _dir: dir,
    }
}

impl RunningAgent {
    fn kms_root(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.ready["kms_root_ca"].as_str().unwrap()).unwrap()
    }

    fn verifier(&self) -> Arc<AttestationVerifier> {
        let pin = SimRootPin::parse(&std::fs::read(self.ready["root_cert"].as_str().unwrap()).unwrap()).unwrap();
        Arc::new(AttestationVerifier::new(AttestationPolicy {
            allow_simulated: true,
            simulated_roots: vec![pin],
            ..Default::default()
        }))
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

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn tls_client(
    root: CertificateDer<'static>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// The chain the server presents to a client pinned to `root` (or the handshake error).
async fn served_chain(port: u16, root: CertificateDer<'static>) -> Result<Vec<CertificateDer<'static>>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(tls_client(root, None))
        .connect(ServerName::try_from(DOMAIN).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn.get_ref().1.peer_certificates().unwrap().to_vec())
}

fn serial(cert: &CertificateDer<'_>) -> Vec<u8> {
    use der::Decode;
    x509_cert::Certificate::from_der(cert)
        .unwrap()
        .tbs_certificate()
        .serial_number()
        .as_bytes()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_identity_from_the_guest_agent_is_served_verified_and_renewed() {
    let agent = start_agent();
    let cfg = GatewayConfig::from_toml(&format!(
        "[core]\nrpc_domain = \"{DOMAIN}\"\n[core.rpc]\nidentity = \"agent:{}\"\nidentity_validity = \"6s\"\n\
         [core.wg]\nendpoint = \"192.0.2.1:51820\"\npublic_key = \"c2VydmVyLXB1YmxpYy1rZXktcGxhY2Vob2xkZXIhISE=\"\n\
         [core.proxy]\nbase_domain = \"app.test\"\n",
        agent.socket.display()
    ))
    .unwrap();
    let mut rpc = RpcTls::from_config(&cfg.core).await.unwrap();
    // In agent mode the agent chain's root (the KMS root) is trusted for client chains.
    assert_eq!(rpc.roots, vec![agent.kms_root()]);
    assert!(rpc.revocations.is_none(), "no [core.kms] url: no revocation list");

    let verifier = agent.verifier();
    let wg = Arc::new(RecordingWg::default());
    let table = RoutingTable::new();
    let registrar = Arc::new(Registrar::new(
        Arc::new(cfg.clone()),
        table.clone(),
        Box::new(rpc.identity(verifier.clone())),
        wg.clone(),
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
    assert_eq!(rpc.spawn_background().len(), 1, "only the renewal runs");

    // A client pinned to the KMS root accepts the served chain: [leaf, app CA, KMS root].
    let chain = served_chain(port, agent.kms_root()).await.unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2], agent.kms_root());
    let leaf = parse_cert(&chain[0]).unwrap();
    assert!(
        leaf.quote.is_some(),
        "usage_ra_tls: the leaf carries the gateway's quote"
    );
    let t = now();
    assert!(
        leaf.not_after <= t + 7 && leaf.not_after + 60 > t,
        "asked lifetime: {}",
        leaf.not_after - t
    );
    let id = verifier.verify_cert(&chain[0], t).unwrap().unwrap();
    assert_eq!(hex::encode(&id.app_id), agent.ready["app_id"].as_str().unwrap());
    assert_eq!(
        hex::encode(&id.instance_id),
        agent.ready["instance_id"].as_str().unwrap()
    );

    // A peer gateway of the same app accepts it as a sync server; one expecting another app refuses it.
    let name = ServerName::try_from(DOMAIN).unwrap();
    let app = agent.ready["app_id"].as_str().unwrap();
    let same = SameAppServerVerifier::new(verifier.clone(), rpc.roots.clone(), app).unwrap();
    same.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .unwrap();
    let other = SameAppServerVerifier::new(verifier.clone(), rpc.roots.clone(), &"ab".repeat(20)).unwrap();
    let e = other
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .unwrap_err();
    assert!(e.to_string().contains("expected abab"), "{e}");

    // A client pinned to an unrelated root refuses the server.
    let stranger = dstack_gateway::attest::ServerIdentity::self_signed(DOMAIN).unwrap();
    let e = served_chain(port, stranger.chain[0].clone()).await.unwrap_err();
    assert!(e.to_lowercase().contains("unknown") || e.contains("issuer"), "{e}");

    // RPC works over it: Info, and RegisterCvm from a CVM presenting an agent-issued chain (KMS-issued,
    // RA-TLS leaf) rather than a self-signed certificate.
    let guest = DstackGuestClient::new(Client::unix(&agent.socket, ""));
    let issued = guest
        .get_tls_key(GetTlsKeyArgs {
            subject: "cvm".into(),
            usage_ra_tls: true,
            usage_client_auth: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let client_chain: Vec<CertificateDer<'static>> = issued
        .certificate_chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect();
    let client_key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
    let rpc_client = Client::new(&format!("https://127.0.0.1:{port}/prpc"))
        .unwrap()
        .with_tls(tls_client(agent.kms_root(), Some((client_chain, client_key))))
        .with_server_name(DOMAIN)
        .unwrap();
    let info: dstack_rpc::gateway::InfoResponse = rpc_client.call("Gateway.Info", &Empty {}).await.unwrap();
    assert_eq!(info.base_domain, "app.test");
    let resp = GatewayClient::new(rpc_client)
        .register_cvm(RegisterCvmRequest {
            client_public_key: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
            port_policy: None,
        })
        .await
        .unwrap();
    assert_eq!(resp.wg.unwrap().client_ip, "10.0.0.2");
    assert_eq!(
        table.get(agent.ready["instance_id"].as_str().unwrap()).unwrap().app_id,
        app
    );

    // Renewal at two thirds of the 6 s lifetime: a new leaf (new serial, new key) is served, still valid.
    let first = serial(&chain[0]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        let c = served_chain(port, agent.kms_root()).await.unwrap();
        if serial(&c[0]) != first {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the certificate was not renewed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let leaf2 = parse_cert(&renewed[0]).unwrap();
    assert_ne!(leaf2.spki_der, leaf.spki_der, "a fresh key");
    assert!(leaf2.not_after > leaf.not_after);
    assert!(now() < leaf.not_after + 1, "renewed before the first one expired");
    assert_eq!(rpc.live.chain()[0], renewed[0]);
}

#[tokio::test]
async fn agent_identity_needs_rpc_domain_and_a_reachable_agent() {
    let cfg = GatewayConfig::from_toml("[core.rpc]\nidentity = \"agent:/nonexistent/dstack.sock\"").unwrap();
    let e = RpcTls::from_config(&cfg.core).await.unwrap_err().to_string();
    assert!(e.contains("rpc_domain"), "{e}");
    let cfg = GatewayConfig::from_toml(
        "[core]\nrpc_domain = \"gw\"\n[core.rpc]\nidentity = \"agent:/nonexistent/dstack.sock\"",
    )
    .unwrap();
    let e = RpcTls::from_config(&cfg.core).await.unwrap_err().to_string();
    assert!(e.contains("/nonexistent/dstack.sock") && e.contains("GetTlsKey"), "{e}");
    // cert_chain wins over identity; a lone cert_chain is an error.
    let cfg = GatewayConfig::from_toml("[core.rpc]\ncert_chain = \"/x.pem\"").unwrap();
    let e = RpcTls::from_config(&cfg.core).await.unwrap_err().to_string();
    assert!(e.contains("go together"), "{e}");
}

/// `image-build/appliances/gateway/gateway.toml` with its `vars.env` defaults (and `overrides`) filled in.
fn gateway_template(overrides: &[(&str, &str)]) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-build/appliances/gateway");
    let mut text = std::fs::read_to_string(dir.join("gateway.toml")).unwrap();
    for (k, v) in overrides {
        text = text.replace(&format!("@{k}@"), v);
    }
    for line in std::fs::read_to_string(dir.join("vars.env")).unwrap().lines() {
        if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            text = text.replace(&format!("@{k}@"), v);
        }
    }
    assert!(!text.contains("@RPC_DOMAIN@") && !text.contains("@KMS_URL@"), "{text}");
    text
}

#[test]
fn the_appliance_template_takes_its_identity_from_the_agent() {
    let cfg = GatewayConfig::from_toml(&gateway_template(&[])).unwrap();
    assert_eq!(
        cfg.core.rpc.identity,
        dstack_gateway::rpc_identity::IdentitySource::Agent("/var/run/dstack.sock".into())
    );
    assert!(cfg.core.rpc.enabled && cfg.core.rpc.cert_chain.is_none());
    assert_eq!(cfg.core.rpc_domain, "gateway.dstack.local");
    assert_eq!(cfg.core.kms.url, "");
    assert!(cfg.core.kms.root_ca.is_none(), "the KMS root is the agent chain's root");
    let cfg = GatewayConfig::from_toml(&gateway_template(&[
        ("KMS_URL", "https://kms.example.com:8000"),
        ("KMS_CRL_REQUIRED", "true"),
    ]))
    .unwrap();
    assert_eq!(cfg.core.kms.url, "https://kms.example.com:8000");
    assert!(cfg.core.kms.crl_required);
}
