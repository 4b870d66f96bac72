//! Three gateway nodes in one process, on loopback, syncing over mutually attested RA-TLS: every
//! node and every CVM has its own in-process simulated TDX module (`dstack-sim-tdx`), and every
//! certificate is verified against the pinned simulator roots.
//!
//! Node 1 starts alone, node 2 joins through node 1, node 3 joins late through node 2 and catches
//! up; a registration at node 1 reaches nodes 2 and 3; node 2 is killed and registration, sync and
//! routing carry on through nodes 1 and 3, whose answers to CVMs stop listing node 2.

mod common;

use common::cluster::{GW_APP, RecordingWg, node_toml, pkcs8, ra_cert, serve_node, sim, wg_key};

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dstack_gateway::attest::RaTlsIdentity;
use dstack_gateway::config::GatewayConfig;
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgPeer};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::sync::{SameAppServerVerifier, client_tls};
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier};
use dstack_rpc::Client;
use dstack_rpc::gateway::{GatewayClient, GatewayState, GatewaySyncClient, RegisterCvmRequest, RegisterCvmResponse};
use dstack_sim_tdx::SimTdx;

const CVM_APP: [u8; 20] = [0xa1; 20];
const WAIT: Duration = Duration::from_secs(20);

struct Node {
    id: u32,
    url: String,
    registrar: Arc<Registrar>,
    table: RoutingTable,
    wg: Arc<RecordingWg>,
    certs: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    fn kill(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn start_node(id: u32, gw_sim: &SimTdx, verifier: Arc<AttestationVerifier>, bootnodes: &[&str]) -> Node {
    start_node_in(id, gw_sim, verifier, bootnodes, None).await
}

/// A node whose state persists in `state_dir` (restored before it serves or syncs, as in main).
async fn start_node_in(
    id: u32,
    gw_sim: &SimTdx,
    verifier: Arc<AttestationVerifier>,
    bootnodes: &[&str],
    state_dir: Option<&std::path::Path>,
) -> Node {
    let (cert, _, key) = ra_cert(gw_sim, "dstack-gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let state = state_dir.map_or(String::new(), |d| {
        format!("state_dir = {:?}\n", d.display().to_string())
    });
    let toml = node_toml(id, &url, bootnodes, "app.test", &state);
    let cfg = Arc::new(GatewayConfig::from_toml(&toml).unwrap());
    let wg = Arc::new(RecordingWg::default());
    let table = RoutingTable::new();
    let registrar = Arc::new(Registrar::new(
        cfg,
        table.clone(),
        Box::new(RaTlsIdentity::new(verifier.clone())),
        wg.clone(),
        AdmissionPolicy::default(),
    ));
    let certs = Arc::new(Mutex::new(Vec::new()));
    let seen = certs.clone();
    registrar.set_cert_hook(Box::new(move |c| seen.lock().unwrap().push(c.chain_pem.clone())));
    registrar.load_state().unwrap();

    let [server, sync_task] = serve_node(&registrar, verifier, cert, &key, listener);
    Node {
        id,
        url,
        registrar,
        table,
        wg,
        certs,
        tasks: vec![server, sync_task],
    }
}

/// A CVM's client: its RA-TLS certificate, and the gateway checked for the gateway app's identity.
fn cvm_client(node: &Node, verifier: &Arc<AttestationVerifier>, cvm: &SimTdx) -> GatewayClient<Client> {
    let (cert, _, key) = ra_cert(cvm, "dstack-guest-agent");
    let v = SameAppServerVerifier::new(verifier.clone(), Vec::new(), &hex::encode(GW_APP)).unwrap();
    let tls = client_tls(v, vec![cert], pkcs8(&key)).unwrap();
    GatewayClient::new(Client::new(&format!("{}/prpc", node.url)).unwrap().with_tls(tls))
}

async fn register(node: &Node, verifier: &Arc<AttestationVerifier>, cvm: &SimTdx, k: u8) -> RegisterCvmResponse {
    cvm_client(node, verifier, cvm)
        .register_cvm(RegisterCvmRequest {
            client_public_key: wg_key(k),
            port_policy: None,
        })
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn live_ids(n: &Node) -> Vec<u32> {
    n.registrar.live_nodes().iter().map(|n| n.id).collect()
}

fn servers(r: &RegisterCvmResponse) -> Vec<String> {
    let mut v: Vec<String> =
        r.wg.as_ref()
            .unwrap()
            .servers
            .iter()
            .map(|s| s.endpoint.clone())
            .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_state_catch_up_and_route_around_a_dead_node() {
    // Every simulated module has its own signing root; the verifier pins them all.
    let gw_sims: Vec<SimTdx> = (1..=3).map(|i| sim(&GW_APP, 0x40 + i)).collect();
    let cvm_a = sim(&CVM_APP, 0x0a);
    let cvm_b = sim(&CVM_APP, 0x0b);
    let mut pins: Vec<_> = gw_sims.iter().map(SimTdx::root_pin).collect();
    pins.extend([cvm_a.root_pin(), cvm_b.root_pin()]);
    let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: pins,
        ..Default::default()
    }));

    let n1 = start_node(1, &gw_sims[0], verifier.clone(), &[]).await;
    let mut n2 = start_node(2, &gw_sims[1], verifier.clone(), &[&n1.url]).await;
    wait_for("nodes 1 and 2 know each other", || {
        live_ids(&n1) == [1, 2] && live_ids(&n2) == [1, 2]
    })
    .await;

    // Registration on node 1: the CVM is told about both nodes, and node 2 carries it too.
    let a = register(&n1, &verifier, &cvm_a, 1).await;
    assert_eq!(servers(&a), ["192.0.2.1:51820", "192.0.2.2:51820"]);
    let a_ip = a.wg.as_ref().unwrap().client_ip.clone();
    assert_eq!(a_ip, "10.0.0.2");
    let inst_a = hex::encode([0x0a; 20]);
    wait_for("node 2 routes CVM a", || n2.table.get(&inst_a).is_some()).await;
    assert_eq!(n2.table.get(&inst_a).unwrap().app_id, hex::encode(CVM_APP));
    assert_eq!(
        n2.wg.0.lock().unwrap().as_slice(),
        [WgPeer {
            public_key: wg_key(1),
            ip: a_ip.parse().unwrap()
        }],
        "node 2's WireGuard has CVM a as a peer"
    );

    // A certificate published on node 1 (as after an ACME renewal).
    n1.registrar.publish_cert("app.test", "CHAIN-1".into(), "KEY-1".into());

    // Node 3 joins late, knowing only node 2, and catches up on everything.
    let n3 = start_node(3, &gw_sims[2], verifier.clone(), &[&n2.url]).await;
    wait_for("node 3 caught up", || {
        n3.table.get(&inst_a).is_some() && n3.registrar.cert("app.test").is_some() && live_ids(&n3) == [1, 2, 3]
    })
    .await;
    assert_eq!(
        n3.certs.lock().unwrap().as_slice(),
        ["CHAIN-1"],
        "cert hook installed it"
    );
    assert_eq!(n3.registrar.cert("app.test").unwrap().key_pem, "KEY-1");
    assert_eq!(n3.wg.0.lock().unwrap().len(), 1);
    wait_for("node 1 learns of node 3 through the others", || {
        live_ids(&n1) == [1, 2, 3]
    })
    .await;
    let again = register(&n3, &verifier, &cvm_a, 1).await;
    assert_eq!(again.wg.as_ref().unwrap().client_ip, a_ip, "same address from any node");
    assert_eq!(servers(&again).len(), 3);

    // Node 2 dies.
    n2.kill();
    let t_kill = Instant::now();
    // Registration on node 3 still reaches node 1 promptly: the dead peer delays nothing.
    let b = register(&n3, &verifier, &cvm_b, 2).await;
    let b_ip = b.wg.as_ref().unwrap().client_ip.clone();
    assert_ne!(b_ip, a_ip);
    let inst_b = hex::encode([0x0b; 20]);
    wait_for("node 1 routes CVM b", || n1.table.get(&inst_b).is_some()).await;
    assert!(
        t_kill.elapsed() < Duration::from_secs(3),
        "sync with a dead peer took {:?}",
        t_kill.elapsed()
    );
    // Node 1 routes to both CVMs over its tunnel addresses.
    let route = n1
        .table
        .resolve(&inst_b, 8080, SystemTime::now(), 3, Duration::from_secs(1800))
        .unwrap();
    assert_eq!(route.preferred[0].addr.to_string(), format!("{b_ip}:8080"));
    assert!(
        n1.table
            .resolve(&inst_a, 80, SystemTime::now(), 3, Duration::from_secs(1800))
            .is_ok()
    );
    // After node_timeout, CVMs are no longer sent to node 2.
    wait_for("node 2 considered down", || {
        live_ids(&n1) == [1, 3] && live_ids(&n3) == [1, 3]
    })
    .await;
    let refreshed = register(&n1, &verifier, &cvm_b, 2).await;
    assert_eq!(servers(&refreshed), ["192.0.2.1:51820", "192.0.2.3:51820"]);
    assert_eq!(refreshed.wg.unwrap().client_ip, b_ip);
    let gateways: Vec<u32> = refreshed.gateways.iter().map(|g| g.id).collect();
    assert_eq!(gateways, [1, 3]);
    // Both survivors carry both CVMs as WireGuard peers.
    for n in [&n1, &n3] {
        let peers: Vec<Ipv4Addr> = n.wg.0.lock().unwrap().iter().map(|p| p.ip).collect();
        assert_eq!(peers.len(), 2, "node {} peers {peers:?}", n.id);
    }
}

/// `UpdateState` requires the caller to attest the gateway app: a CVM (another app) is refused
/// and nothing it sent is merged; a node refuses to talk to a server of another app.
#[tokio::test]
async fn sync_refuses_peers_of_another_app() {
    let gw_sim = sim(&GW_APP, 0x41);
    let cvm = sim(&CVM_APP, 0x0a);
    let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![gw_sim.root_pin(), cvm.root_pin()],
        ..Default::default()
    }));
    let node = start_node(1, &gw_sim, verifier.clone(), &[]).await;
    let (cert, _, key) = ra_cert(&cvm, "dstack-guest-agent");
    let v = SameAppServerVerifier::new(verifier.clone(), Vec::new(), &hex::encode(GW_APP)).unwrap();
    let client = Client::new(&format!("{}/prpc", node.url))
        .unwrap()
        .with_tls(client_tls(v, vec![cert.clone()], pkcs8(&key)).unwrap());
    let mut forged = node.registrar.snapshot();
    forged.sender_id = 9;
    forged.certs.push(dstack_rpc::gateway::SyncCert {
        domain: "app.test".into(),
        chain_pem: "EVIL".into(),
        key_pem: "EVIL".into(),
        updated_ms: u64::MAX,
        origin: 9,
    });
    let err = GatewaySyncClient::new(client).update_state(forged).await.unwrap_err();
    assert!(err.to_string().contains("sync refused"), "{err}");
    assert!(node.registrar.cert("app.test").is_none());

    // Client side: a peer whose server certificate attests another app fails the handshake.
    let v = SameAppServerVerifier::new(verifier, Vec::new(), &hex::encode([0x55; 20])).unwrap();
    let (gcert, _, gkey) = ra_cert(&gw_sim, "dstack-gateway");
    let client = Client::new(&format!("{}/prpc", node.url))
        .unwrap()
        .with_tls(client_tls(v, vec![gcert], pkcs8(&gkey)).unwrap());
    let err = GatewaySyncClient::new(client)
        .update_state(GatewayState::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
}

/// A node restarted on the same `state_dir` routes to the CVMs it knew before talking to anyone,
/// reinstalls the cluster certificate, keeps addresses stable, and catches up with what a peer
/// learned while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_restores_state_and_catches_up() {
    use std::os::unix::fs::PermissionsExt;
    let gw_sims: Vec<SimTdx> = (1..=2).map(|i| sim(&GW_APP, 0x40 + i)).collect();
    let (cvm_a, cvm_b, cvm_c) = (sim(&CVM_APP, 0x0a), sim(&CVM_APP, 0x0b), sim(&CVM_APP, 0x0c));
    let mut pins: Vec<_> = gw_sims.iter().map(SimTdx::root_pin).collect();
    pins.extend([cvm_a.root_pin(), cvm_b.root_pin(), cvm_c.root_pin()]);
    let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: pins,
        ..Default::default()
    }));
    let dir = tempfile::tempdir().unwrap();
    let d1 = dir.path().join("gw1");

    let mut n1 = start_node_in(1, &gw_sims[0], verifier.clone(), &[], Some(&d1)).await;
    let n2 = start_node(2, &gw_sims[1], verifier.clone(), &[&n1.url]).await;
    let a = register(&n1, &verifier, &cvm_a, 1).await;
    let a_ip = a.wg.as_ref().unwrap().client_ip.clone();
    n1.registrar.publish_cert("app.test", "CHAIN-1".into(), "KEY-1".into());
    let inst_a = hex::encode([0x0a; 20]);
    wait_for("node 2 has CVM a and the certificate", || {
        n2.table.get(&inst_a).is_some() && n2.registrar.cert("app.test").is_some()
    })
    .await;

    let file = d1.join(dstack_gateway::sync::persist::STATE_FILE);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the state file holds certificate keys");
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains(&inst_a) && saved.contains("KEY-1"));

    // Node 1 goes down; CVM b registers at node 2 meanwhile.
    n1.kill();
    drop(n1);
    let b = register(&n2, &verifier, &cvm_b, 2).await;
    let inst_b = hex::encode([0x0b; 20]);

    // Restarted with no bootnode: it knows node 2 from its saved node records and catches up.
    let n1 = start_node_in(1, &gw_sims[0], verifier.clone(), &[], Some(&d1)).await;
    assert!(n1.table.get(&inst_a).is_some(), "restored before any sync");
    wait_for("restarted node 1 catches up with CVM b", || {
        n1.table.get(&inst_b).is_some()
    })
    .await;
    assert_eq!(n1.wg.0.lock().unwrap().len(), 2);
    // Addresses stay stable across the restart.
    let again = register(&n1, &verifier, &cvm_a, 1).await;
    assert_eq!(again.wg.unwrap().client_ip, a_ip);
    let b_ip = b.wg.unwrap().client_ip;
    let b_again = register(&n1, &verifier, &cvm_b, 2).await;
    assert_eq!(b_again.wg.unwrap().client_ip, b_ip);

    // Both nodes down; node 1 restarted with no live peer: everything comes from the state file.
    drop((n1, n2));
    let alone = start_node_in(1, &gw_sims[0], verifier.clone(), &[], Some(&d1)).await;
    for (inst, ip) in [(&inst_a, &a_ip), (&inst_b, &b_ip)] {
        let route = alone
            .table
            .resolve(inst, 8080, SystemTime::now(), 3, Duration::from_secs(1800))
            .expect("restored node routes to the CVM");
        assert_eq!(route.preferred[0].addr.to_string(), format!("{ip}:8080"));
    }
    let mut peers: Vec<String> = alone
        .wg
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.public_key.clone())
        .collect();
    peers.sort();
    assert_eq!(peers, [wg_key(1), wg_key(2)], "both CVMs are WireGuard peers again");
    assert_eq!(
        alone.certs.lock().unwrap().as_slice(),
        ["CHAIN-1"],
        "certificate reinstalled"
    );
    assert_eq!(alone.registrar.cert("app.test").unwrap().key_pem, "KEY-1");
    let c = register(&alone, &verifier, &cvm_c, 3).await;
    let c_ip = c.wg.unwrap().client_ip;
    assert!(
        c_ip != a_ip && c_ip != b_ip,
        "restored addresses are not handed out again"
    );
}
