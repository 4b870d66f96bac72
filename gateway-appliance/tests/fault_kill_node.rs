//! Fault injection (#13): `kill -9` of a gateway node under load, then a restart on the same state directory.
//!
//! Three nodes sync over mutually attested RA-TLS (every node and CVM has its own simulated TDX module, every
//! certificate is checked against the pinned simulator roots). Nodes 1 and 3 run in-process (as in
//! `sync_cluster.rs`) with an SNI proxy each; node 2 is the real `dstack-gateway` binary — WireGuard tun
//! device, `RegisterCvm` + sync over RA-TLS, SNI proxy, admin `/status`, state in `core.state_dir` — and is the
//! one killed. Everything runs inside a private network namespace (loopback only; the CVMs' WireGuard
//! addresses are put on its `lo`, where one echo backend answers for every CVM).
//!
//! While clients continuously connect through all three proxies, node 2 is SIGKILLed. Checked: clients of
//! nodes 1 and 3 see no failure; the survivors still hold every registration (also the one made at node 2);
//! node 2, restarted on its state directory, restores its persisted state (registrations with the CVMs'
//! WireGuard keys, the certificate published by node 1 — its proxy certificate files, deleted while it was
//! down, are rewritten) before it syncs, then catches up on a registration made while it was down and routes
//! to it. Needs root, `/dev/net/tun` and iproute2 (skips otherwise; fails with `DSTACK_REQUIRE_FIXTURES=1`).

mod common;

use common::cluster::{GW_APP, RecordingWg, node_toml, pkcs8, ra_cert, serve_node, sim, wg_key};

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::backend::{NoTxt, echo_backend};
use common::netns::{in_netns, prerequisites_missing, run};
use dstack_gateway::attest::RaTlsIdentity;
use dstack_gateway::config::{GatewayConfig, ProxyConfig};
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::registration::{AdmissionPolicy, Registrar};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::sync::{SameAppServerVerifier, client_tls};
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier};
use dstack_rpc::Client;
use dstack_rpc::gateway::{GatewayClient, GatewayState, RegisterCvmRequest, RegisterCvmResponse};
use dstack_sim_tdx::SimTdx;
use rcgen::KeyPair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CVM_APP: [u8; 20] = [0xa1; 20];
const WAIT: Duration = Duration::from_secs(20);
/// Load per proxy: this many client loops, each connection a fresh TCP + ClientHello + echo.
const LOOPS_PER_NODE: usize = 3;
/// Upper bound of connections per proxy (the run is also bounded in time).
const MAX_PER_NODE: u64 = 5_000;
const BASE: &str = "app.test";

fn b64(bytes: [u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An in-process node (registration, sync, routing) with its own SNI proxy.
struct Node {
    url: String,
    proxy: SocketAddr,
    registrar: Arc<Registrar>,
    table: RoutingTable,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

fn proxy_config() -> ProxyConfig {
    let mut c = ProxyConfig {
        base_domain: BASE.into(),
        ..ProxyConfig::default()
    };
    c.timeouts.connect = Duration::from_secs(1);
    c.timeouts.handshake = Duration::from_secs(2);
    c
}

async fn start_node(id: u32, gw_sim: &SimTdx, verifier: Arc<AttestationVerifier>, bootnodes: &[&str]) -> Node {
    let (cert, _, key) = ra_cert(gw_sim, "dstack-gateway");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let toml = node_toml(id, &url, bootnodes, BASE, "");
    let cfg = Arc::new(GatewayConfig::from_toml(&toml).unwrap());
    let table = RoutingTable::new();
    let registrar = Arc::new(Registrar::new(
        cfg,
        table.clone(),
        Box::new(RaTlsIdentity::new(verifier.clone())),
        Arc::new(RecordingWg::default()),
        AdmissionPolicy::default(),
    ));
    let [server, sync_task] = serve_node(&registrar, verifier, cert, &key, listener);
    let state = Arc::new(ProxyState {
        config: proxy_config(),
        table: table.clone(),
        resolver: Arc::new(NoTxt),
        tls: Arc::new(TlsTerminator::new(vec![&rustls::version::TLS13])),
        stats: Stats::default(),
    });
    let pl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = pl.local_addr().unwrap();
    let proxy_task = tokio::spawn(dstack_gateway::proxy::run(pl, state, std::future::pending()));
    Node {
        url,
        proxy,
        registrar,
        table,
        tasks: vec![server, sync_task, proxy_task],
    }
}

/// Node 2: the `dstack-gateway` binary, its files and ports.
struct BinNode {
    dir: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
    url: String,
    proxy: SocketAddr,
    admin: SocketAddr,
    wg_public: String,
    cert_chain: PathBuf,
    cert_key: PathBuf,
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl BinNode {
    fn new(dir: &Path, gw_sim: &SimTdx, pins: &[PathBuf], bootnode: &str) -> Self {
        let (_, cert_pem, key) = ra_cert(gw_sim, "dstack-gateway");
        let rpc_cert = dir.join("rpc.crt");
        let rpc_key = dir.join("rpc.key");
        std::fs::write(&rpc_cert, cert_pem).unwrap();
        std::fs::write(&rpc_key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&rpc_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let private = [0x42u8; 32];
        let wg_public = dstack_gateway::wg::public_key_b64(&private);
        let rpc = SocketAddr::from(([127, 0, 0, 1], free_tcp()));
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_tcp()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp()));
        let state_dir = dir.join("state2");
        let (cert_chain, cert_key) = (dir.join("proxy-cert.pem"), dir.join("proxy-key.pem"));
        let pins: Vec<String> = pins.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
        let cfg = dir.join("gateway2.toml");
        std::fs::write(
            &cfg,
            format!(
                "[core]\nrpc_domain = \"gw2.test\"\nstate_dir = {state:?}\n\
                 [core.wg]\nprivate_key = \"{private}\"\nip = \"10.0.0.130/24\"\nendpoint = \"192.0.2.2:51820\"\n\
                 interface = \"dgwk2\"\nlisten_port = {udp}\n\
                 [core.proxy]\nbase_domain = \"{BASE}\"\nlisten_addr = \"127.0.0.1\"\nlisten_port = {pport}\n\
                 cert_chain = {chain:?}\ncert_key = {ckey:?}\n\
                 [core.proxy.timeouts]\nconnect = \"1s\"\nhandshake = \"2s\"\n\
                 [core.recycle]\nenabled = false\n\
                 [core.sync]\nenabled = true\nnode_id = 2\nmy_url = \"https://{rpc}\"\nbootnodes = [\"{bootnode}\"]\n\
                 interval = \"300ms\"\ntimeout = \"2s\"\nnode_timeout = \"3s\"\ngateway_app_id = \"{app}\"\n\
                 [core.attestation]\nallow_simulated = true\nsimulated_roots = [{pins}]\n\
                 [core.rpc]\nenabled = true\naddress = \"{rpc}\"\ncert_chain = {rc:?}\ncert_key = {rk:?}\n\
                 [core.admin]\nenabled = true\naddress = \"{admin}\"\n",
                state = state_dir.display().to_string(),
                private = b64(private),
                udp = free_udp(),
                pport = proxy.port(),
                chain = cert_chain.display().to_string(),
                ckey = cert_key.display().to_string(),
                app = hex::encode(GW_APP),
                pins = pins.join(", "),
                rc = rpc_cert.display().to_string(),
                rk = rpc_key.display().to_string(),
            ),
        )
        .unwrap();
        Self {
            dir: dir.to_owned(),
            log: dir.join("gateway2.log"),
            cfg,
            state_dir,
            url: format!("https://{rpc}"),
            proxy,
            admin,
            wg_public,
            cert_chain,
            cert_key,
        }
    }

    fn spawn(&self) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Proc(
            Command::new(env!("CARGO_BIN_EXE_dstack-gateway"))
                .arg("--config")
                .arg(&self.cfg)
                .current_dir(&self.dir)
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /status` from the admin listener: the instance ids it routes.
    async fn status_instances(&self) -> Option<Vec<String>> {
        let mut s = TcpStream::connect(self.admin).await.ok()?;
        s.write_all(b"GET /status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&resp);
        let body = text.split("\r\n\r\n").nth(1)?;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        Some(
            v["hosts"]
                .as_array()?
                .iter()
                .filter_map(|h| h["instance_id"].as_str().map(str::to_owned))
                .collect(),
        )
    }

    /// The persisted state (`cluster-state.json`), checked to be owner-only.
    fn saved_state(&self) -> Option<GatewayState> {
        let path = self.state_dir.join("cluster-state.json");
        let text = std::fs::read(&path).ok()?;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "state file mode {mode:o}");
        let env: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(env["version"], 1);
        Some(serde_json::from_value(env["state"].clone()).unwrap())
    }
}

fn cvm_client(url: &str, verifier: &Arc<AttestationVerifier>, cvm: &SimTdx) -> GatewayClient<Client> {
    let (cert, _, key) = ra_cert(cvm, "dstack-guest-agent");
    let v = SameAppServerVerifier::new(verifier.clone(), Vec::new(), &hex::encode(GW_APP)).unwrap();
    let tls = client_tls(v, vec![cert], pkcs8(&key)).unwrap();
    GatewayClient::new(Client::new(&format!("{url}/prpc")).unwrap().with_tls(tls))
}

/// Registers `cvm` at the node at `url` and puts its WireGuard address on `lo` (where the backend answers).
async fn register(url: &str, verifier: &Arc<AttestationVerifier>, cvm: &SimTdx, k: u8) -> RegisterCvmResponse {
    let r = cvm_client(url, verifier, cvm)
        .register_cvm(RegisterCvmRequest {
            client_public_key: wg_key(k),
            port_policy: None,
        })
        .await
        .unwrap();
    let ip = r.wg.as_ref().unwrap().client_ip.clone();
    // Already there when two registrations got the same address: fine.
    let _ = run(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    r
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn live_ids(r: &Registrar) -> Vec<u32> {
    r.live_nodes().iter().map(|n| n.id).collect()
}

/// One proxied connection: the ClientHello for `<instance>-<port>s.<BASE>` goes through untouched and the
/// backend's `ok:` + echo comes back.
async fn via_proxy(proxy: SocketAddr, instance: &str, port: u16) -> Result<(), String> {
    let hello = common::hello::client_hello(&format!("{instance}-{port}s.{BASE}"), &[b"h2"]);
    let mut s = TcpStream::connect(proxy).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(&hello).await.map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; 3 + hello.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .map_err(|_| "no reply within 5 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if &got[..3] != b"ok:" || got[3..] != hello[..] {
        return Err("reply differs from the echoed hello".into());
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

#[test]
fn kill_a_node_under_load_then_restart_it_on_its_state() {
    if prerequisites_missing() {
        return;
    }
    let ns = format!("dgwk{}", std::process::id());
    run(&["ip", "netns", "add", &ns]).unwrap();
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = run(&["ip", "netns", "del", &self.0]);
        }
    }
    let _del = DelNs(ns.clone());
    run(&["ip", "-n", &ns, "link", "set", "lo", "up"]).unwrap();
    let started = Instant::now();
    let outcome = in_netns(&ns, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario())
    })
    .join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    let elapsed = started.elapsed();
    eprintln!("fault_kill_node: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gw_sims: Vec<SimTdx> = (1..=3).map(|i| sim(&GW_APP, 0x40 + i)).collect();
    let cvms: Vec<SimTdx> = [0x0a, 0x0b, 0x0c].iter().map(|i| sim(&CVM_APP, *i)).collect();
    let insts: Vec<String> = [0x0au8, 0x0b, 0x0c].iter().map(|i| hex::encode([*i; 20])).collect();
    let mut pins = Vec::new();
    for (i, s) in gw_sims.iter().chain(&cvms).enumerate() {
        let p = d.join(format!("pin{i}.pem"));
        std::fs::write(&p, s.root_cert_pem()).unwrap();
        pins.push(p);
    }
    let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: gw_sims.iter().chain(&cvms).map(SimTdx::root_pin).collect(),
        ..Default::default()
    }));
    let port = echo_backend([0, 0, 0, 0], "ok").await;

    let n1 = start_node(1, &gw_sims[0], verifier.clone(), &[]).await;
    let n2 = BinNode::new(d, &gw_sims[1], &pins, &n1.url);
    let mut p2 = n2.spawn();
    let n3 = start_node(3, &gw_sims[2], verifier.clone(), &[&n1.url]).await;
    wait_for("the three nodes know each other", || {
        live_ids(&n1.registrar) == [1, 2, 3] && live_ids(&n3.registrar) == [1, 2, 3]
    })
    .await;
    assert!(p2.0.try_wait().unwrap().is_none(), "node 2 exited: {}", n2.log_text());

    // CVM a registers at node 1, CVM b at node 2 (the binary); a certificate is published at node 1.
    let ra = register(&n1.url, &verifier, &cvms[0], 1).await;
    // (Registrations at two nodes before they synced would claim the same address; the older one wins.)
    let deadline = Instant::now() + WAIT;
    while !n2.status_instances().await.unwrap_or_default().contains(&insts[0]) {
        assert!(
            Instant::now() < deadline,
            "node 2 never learned CVM a: {}",
            n2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rb = register(&n2.url, &verifier, &cvms[1], 2).await;
    assert_ne!(rb.wg.as_ref().unwrap().client_ip, ra.wg.as_ref().unwrap().client_ip);
    let servers: Vec<(String, String)> = rb
        .wg
        .as_ref()
        .unwrap()
        .servers
        .iter()
        .map(|s| (s.endpoint.clone(), s.pk.clone()))
        .collect();
    assert!(
        servers.contains(&("192.0.2.2:51820".into(), n2.wg_public.clone())),
        "node 2 announces its WireGuard key: {servers:?}"
    );
    let cert_key = KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![format!("*.{BASE}")])
        .unwrap()
        .self_signed(&cert_key)
        .unwrap();
    let (chain_pem, key_pem) = (cert.pem(), cert_key.serialize_pem());
    n1.registrar.publish_cert(BASE, chain_pem.clone(), key_pem.clone());
    let deadline = Instant::now() + WAIT;
    while ![&n1, &n3]
        .iter()
        .all(|n| n.table.get(&insts[0]).is_some() && n.table.get(&insts[1]).is_some())
    {
        assert!(
            Instant::now() < deadline,
            "survivors do not route both CVMs: node 1 {:?}, node 3 {:?}; node 2 log: {}",
            n1.table.instances().iter().map(|i| &i.instance_id).collect::<Vec<_>>(),
            n3.table.instances().iter().map(|i| &i.instance_id).collect::<Vec<_>>(),
            n2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let saved = n2.saved_state();
        let has = |s: &GatewayState| {
            s.certs.iter().any(|c| c.domain == BASE)
                && insts[..2]
                    .iter()
                    .all(|i| s.instances.iter().any(|x| &x.instance_id == i))
        };
        if saved.as_ref().is_some_and(has) && std::fs::read_to_string(&n2.cert_chain).ok() == Some(chain_pem.clone()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 never persisted both CVMs and the certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load through all three proxies, alternating between the two CVMs.
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = (0..3).map(|_| Arc::new(Tally::default())).collect();
    let mut loops = tokio::task::JoinSet::new();
    for (proxy, tally) in [n1.proxy, n2.proxy, n3.proxy].into_iter().zip(&tallies) {
        for l in 0..LOOPS_PER_NODE {
            let (stop, tally, insts) = (stop.clone(), tally.clone(), insts.clone());
            loops.spawn(async move {
                let mut i = l;
                while !stop.load(Ordering::Relaxed)
                    && tally.ok.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed) < MAX_PER_NODE
                {
                    match via_proxy(proxy, &insts[i % 2], port).await {
                        Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tally.first_error.lock().unwrap().get_or_insert(e);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            tally.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    i += 1;
                }
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill: Vec<u64> = tallies.iter().map(|t| t.ok.load(Ordering::Relaxed)).collect();
    p2.0.kill().unwrap();
    p2.0.wait().unwrap();
    let after_kill_n2 = tallies[1].ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    while loops.join_next().await.is_some() {}
    let ok: Vec<u64> = tallies.iter().map(|t| t.ok.load(Ordering::Relaxed)).collect();
    let failed: Vec<u64> = tallies.iter().map(|t| t.failed.load(Ordering::Relaxed)).collect();
    eprintln!("load: served {ok:?} (before the kill {before_kill:?}), failed {failed:?} per node 1/2/3");
    for (i, t) in tallies.iter().enumerate() {
        if i != 1 {
            assert_eq!(
                failed[i],
                0,
                "clients of surviving node {} failed: {:?}",
                i + 1,
                t.first_error.lock().unwrap()
            );
            assert!(
                ok[i] > before_kill[i] && before_kill[i] > 0,
                "node {} served {ok:?}",
                i + 1
            );
        }
    }
    assert!(before_kill[1] > 0, "node 2 served nothing before the kill");
    // A connection may finish in the instant of the kill; none is served afterwards.
    assert!(
        ok[1] <= after_kill_n2 + LOOPS_PER_NODE as u64,
        "node 2 served after its kill: {ok:?}"
    );
    assert!(failed[1] > 0, "clients of the killed node saw no failure");

    // Survivors hold every registration, also the one made at node 2.
    for n in [&n1, &n3] {
        for inst in &insts[..2] {
            assert!(n.table.get(inst).is_some(), "a survivor lost {inst}");
        }
    }
    // While node 2 is down: CVM c registers at node 3; node 2's installed certificate files vanish.
    wait_for("node 3 routes CVMs a and b", || {
        n3.table.get(&insts[0]).is_some() && n3.table.get(&insts[1]).is_some()
    })
    .await;
    let rc = register(&n3.url, &verifier, &cvms[2], 3).await;
    wait_for("node 1 routes CVM c", || n1.table.get(&insts[2]).is_some()).await;
    let saved_before = n2.saved_state().expect("node 2 left a state file");
    assert!(!saved_before.instances.iter().any(|x| x.instance_id == insts[2]));
    std::fs::remove_file(&n2.cert_chain).unwrap();
    std::fs::remove_file(&n2.cert_key).unwrap();

    // Restart on the same state directory: restored from disk first, then caught up by sync.
    let log_len = n2.log_text().len();
    let mut p2 = n2.spawn();
    let deadline = Instant::now() + WAIT;
    let restored_line = loop {
        let log = n2.log_text();
        if let Some(line) = log[log_len..].lines().find(|l| l.contains("restored cluster state")) {
            break line.to_owned();
        }
        if let Some(status) = p2.0.try_wait().unwrap() {
            panic!("node 2 did not restart ({status}): {}", &log[log_len..]);
        }
        assert!(
            Instant::now() < deadline,
            "node 2 did not restore its state: {}",
            &log[log_len..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("node 2 after restart: {restored_line}");
    let count = |field: &str| -> usize {
        restored_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field}= in {restored_line:?}"))
    };
    assert_eq!(count("instances"), saved_before.instances.len());
    assert!(
        count("instances") >= 2 && count("certs") == 1 && count("nodes") == 3,
        "{restored_line}"
    );
    // The certificate came back from the state file through the install hook, owner-only.
    wait_for("node 2 reinstalls the certificate", || {
        std::fs::read_to_string(&n2.cert_chain).ok().as_deref() == Some(chain_pem.as_str())
    })
    .await;
    assert_eq!(std::fs::read_to_string(&n2.cert_key).unwrap(), key_pem);
    assert_eq!(
        std::fs::metadata(&n2.cert_key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // It rejoins and catches up on CVM c, and routes to it.
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = n2.status_instances().await.unwrap_or_default();
        if insts.iter().all(|i| seen.contains(i)) {
            break;
        }
        assert!(p2.0.try_wait().unwrap().is_none(), "node 2 died: {}", n2.log_text());
        assert!(Instant::now() < deadline, "node 2 did not catch up: routes {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for inst in &insts {
        via_proxy(n2.proxy, inst, port)
            .await
            .unwrap_or_else(|e| panic!("node 2 routing {inst}: {e}"));
    }
    wait_for("node 1 sees node 2 again", || live_ids(&n1.registrar) == [1, 2, 3]).await;
    // The persisted state now also holds CVM c, with every CVM's WireGuard key as registered.
    let deadline = Instant::now() + WAIT;
    let saved = loop {
        let s = n2.saved_state().unwrap();
        if s.instances.iter().any(|x| x.instance_id == insts[2]) {
            break s;
        }
        assert!(Instant::now() < deadline, "node 2 never persisted CVM c");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (inst, k, reg) in [(&insts[0], 1, &ra), (&insts[1], 2, &rb), (&insts[2], 3, &rc)] {
        let rec = saved.instances.iter().find(|x| &x.instance_id == inst).unwrap();
        assert_eq!(rec.public_key, wg_key(k), "{inst}");
        assert_eq!(rec.ip, reg.wg.as_ref().unwrap().client_ip, "{inst}");
    }
    let own = saved.nodes.iter().find(|n| n.id == 2).unwrap();
    assert_eq!(own.wg_public_key, n2.wg_public);
    assert_eq!(own.url, n2.url);
}
