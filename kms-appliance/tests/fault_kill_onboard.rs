//! Fault injection (#13): `kill -9` during onboarding. Two `dstack-kms` binaries, each inside the "CVM" of its
//! own real guest agent (host simulation mode: a simulated TDX module, its own signing root, the runtime log
//! kept by the agent): the source A auto-bootstraps; the new node B serves `Onboard` and is told to onboard
//! from A. B is SIGKILLed at points found by watching A's policy webhook and B's key directory — mid-protocol
//! (before any key file), at the first entry in the key directory, while the key set is staged, after the first
//! key file is moved into place, after the last — and, separately, A is killed while it decides whether to
//! release its keys to B.
//!
//! What must hold: every key file left is complete, parses and (secrets) is 0600; nothing B holds differs from
//! A's root keys (no mixture, no self-generated root: B has no `auto_bootstrap_domain` and nobody calls
//! `Bootstrap`); on restart B either serves exactly A's keys (same root CA and k256 key in `GetMeta`, the same
//! derived keys for a test CVM in `GetAppKey`) or holds none and onboards again cleanly; A is unaffected (its
//! files and `GetMeta` unchanged, also across its own kill and restart).

mod common;
#[path = "common/kill.rs"]
mod kill;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dstack_guest_agent::simulate::{BackgroundSimulator, SimulateOptions};
use dstack_kms::store::{
    ALL_FILES, BOOTSTRAP_INFO, ROOT_CA_CERT, ROOT_CA_KEY, ROOT_K256_KEY, STAGING_DIR, TMP_CA_CERT, TMP_CA_KEY,
};
use dstack_rpc::Client;
use dstack_rpc::kms::{AppKeyResponse, GetAppKeyRequest, KmsClient, OnboardClient, OnboardRequest};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];
const VM_CONFIG: &str = r#"{"os_image_hash":"5eed00000000000000000000000000000000000000000000000000000000beef"}"#;
/// The root key files that must be A's, byte for byte, wherever they appear in B's directory.
const ROOT_FILES: [&str; 5] = [ROOT_CA_CERT, ROOT_CA_KEY, ROOT_K256_KEY, TMP_CA_CERT, TMP_CA_KEY];
const WAIT: Duration = Duration::from_secs(30);

/// The tests busy-poll and run two KMS processes and two agents each: one at a time on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use kill::{KmsProc as Proc, kill_when, spawn_kms};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent(dir: &Path, name: &str) -> BackgroundSimulator {
    let opts = SimulateOptions {
        socket: dir.join(format!("{name}-dstack.sock")),
        tappd_socket: None,
        state_dir: Some(dir.join(format!("{name}-agent-state"))),
        app_compose: None,
    };
    BackgroundSimulator::start(opts, WAIT).expect("the simulated agent did not come up")
}

fn agent_app(a: &BackgroundSimulator) -> [u8; 20] {
    hex::decode(a.ready()["app_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

fn agent_pin(a: &BackgroundSimulator) -> String {
    a.ready()["root_cert"].as_str().unwrap().to_owned()
}

/// One KMS binary's configuration and files.
struct Node {
    certs: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    onboard_port: u16,
}

impl Node {
    fn new(dir: &Path, name: &str, agent: &BackgroundSimulator, pins: &[String], hook: &str, source: bool) -> Self {
        let certs = dir.join(format!("certs-{name}"));
        let (rpc_port, onboard_port) = (free_port(), free_port());
        let pins: Vec<String> = pins.iter().map(|p| format!("{p:?}")).collect();
        let onboard = if source {
            "auto_bootstrap_domain = \"localhost\"\n".to_owned()
        } else {
            format!("enabled = true\naddress = \"127.0.0.1\"\nport = {onboard_port}\nrevocation_sync_secs = 0\n")
        };
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[rpc]\naddress = \"127.0.0.1\"\nport = {rpc_port}\n\
                 [core]\ncert_dir = {certs:?}\ntee = \"agent:{sock}\"\n\
                 [core.attestation]\nallow_simulated = true\nsimulated_roots = [{pins}]\n\
                 [core.auth_api]\ntype = \"webhook\"\nwebhook.url = \"{hook}\"\nwebhook.timeout_ms = 40000\n\
                 [core.onboard]\n{onboard}",
                certs = certs.display().to_string(),
                sock = agent.socket().display(),
                pins = pins.join(", "),
            ),
        )
        .unwrap();
        Self {
            log: dir.join(format!("{name}.log")),
            certs,
            cfg,
            rpc_port,
            onboard_port,
        }
    }

    fn spawn(&self) -> Proc {
        spawn_kms(&self.cfg, &self.log)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn read(&self, f: &str) -> Option<Vec<u8>> {
        std::fs::read(self.certs.join(f)).ok()
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.certs)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn staged(&self) -> Vec<String> {
        std::fs::read_dir(self.certs.join(STAGING_DIR))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn onboard_client(&self) -> OnboardClient<Client> {
        OnboardClient::new(Client::new(&format!("http://127.0.0.1:{}/prpc", self.onboard_port)).unwrap())
    }

    /// A client of this node's KMS RPC: webpki against its own root CA file, SAN `localhost`, optionally with
    /// a CVM's RA-TLS client certificate.
    fn kms_client(&self, client: Option<(CertificateDer<'static>, &rcgen::KeyPair)>) -> KmsClient<Client> {
        let root = CertificateDer::from_pem_file(self.certs.join(ROOT_CA_CERT)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let tls = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![cert],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        KmsClient::new(
            Client::new(&format!("https://127.0.0.1:{}/prpc", self.rpc_port))
                .unwrap()
                .with_tls(Arc::new(tls))
                .with_server_name("localhost")
                .unwrap(),
        )
    }
}

async fn connects(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// Waits until `port` accepts connections; fails if the process exits first.
async fn wait_port(p: &mut Proc, n: &Node, port: u16, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !connects(port).await {
        if let Some(status) = p.0.try_wait().unwrap() {
            panic!("{what}: KMS exited with {status}: {}", n.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{what}: port {port} not up within {WAIT:?}: {}",
            n.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The source's keys as served and as stored.
#[derive(Debug, Clone, PartialEq)]
struct Served {
    ca_cert: String,
    k256_pubkey: Vec<u8>,
    app_key: (Vec<u8>, Vec<u8>, Vec<u8>),
}

async fn served(n: &Node, cvm: &dstack_sim_tdx::SimTdx) -> Served {
    let meta = n.kms_client(None).get_meta().await.unwrap();
    let (cert, key) = common::client_cert(cvm, |_| {});
    let k: AppKeyResponse = n
        .kms_client(Some((cert, &key)))
        .get_app_key(GetAppKeyRequest {
            api_version: 1,
            vm_config: VM_CONFIG.into(),
        })
        .await
        .unwrap();
    assert_eq!(k.disk_crypt_key.len(), 32);
    Served {
        ca_cert: meta.ca_cert,
        k256_pubkey: meta.k256_pubkey,
        app_key: (k.disk_crypt_key.to_vec(), k.env_crypt_key.to_vec(), k.k256_key.to_vec()),
    }
}

/// The whole fixture: agents, webhooks, the CVM, A running and bootstrapped, B configured.
struct World {
    _dir: tempfile::TempDir,
    _agents: (BackgroundSimulator, BackgroundSimulator),
    a: Node,
    b: Node,
    a_hook: common::Webhook,
    a_proc: Proc,
    a_files: Vec<Vec<u8>>,
    a_served: Served,
    cvm: dstack_sim_tdx::SimTdx,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (agent_a, agent_b) = (agent(d, "a"), agent(d, "b"));
    let cvm = common::cvm(APP, INSTANCE);
    let cvm_pin = common::write_pin(d, "cvm.pem", &cvm);
    // A's policy: B's app (a KMS) and the test CVM; B's policy: A's app as a source KMS.
    let a_hook = common::webhook(vec![agent_app(&agent_b), APP]).await;
    let b_hook = common::webhook(vec![agent_app(&agent_a), APP]).await;
    let a = Node::new(
        d,
        "a",
        &agent_a,
        &[agent_pin(&agent_b), cvm_pin.clone()],
        &a_hook.url,
        true,
    );
    let b = Node::new(d, "b", &agent_b, &[agent_pin(&agent_a), cvm_pin], &b_hook.url, false);
    let mut a_proc = a.spawn();
    wait_port(&mut a_proc, &a, a.rpc_port, "source KMS").await;
    assert!(a.certs.join(BOOTSTRAP_INFO).exists());
    let a_files = ALL_FILES.iter().map(|f| a.read(f).unwrap()).collect();
    let a_served = served(&a, &cvm).await;
    World {
        _dir: dir,
        _agents: (agent_a, agent_b),
        a,
        b,
        a_hook,
        a_proc,
        a_files,
        a_served,
        cvm,
    }
}

impl World {
    fn a_file(&self, f: &str) -> &[u8] {
        let i = ALL_FILES.iter().position(|x| *x == f).unwrap();
        &self.a_files[i]
    }

    fn onboard_req(&self) -> OnboardRequest {
        OnboardRequest {
            source_url: format!("https://localhost:{}", self.a.rpc_port),
            domain: "localhost".into(),
        }
    }

    /// A's files and answers are what they were before anything happened to B (or to A).
    async fn assert_source_unaffected(&self) {
        for (f, before) in ALL_FILES.iter().zip(&self.a_files) {
            assert_eq!(self.a.read(f).as_ref(), Some(before), "source {f} changed");
        }
        assert_eq!(
            served(&self.a, &self.cvm).await,
            self.a_served,
            "the source serves other keys"
        );
    }

    /// B's directory after a kill: key files complete, parseable and private; root files (in place or staged)
    /// only ever A's. Returns the key files in place.
    fn inspect_b(&self) -> Vec<&'static str> {
        let b = &self.b;
        let staged = b.staged();
        for (name, path) in b
            .entries()
            .into_iter()
            .map(|e| (e.clone(), b.certs.join(&e)))
            .chain(staged.iter().map(|e| (e.clone(), b.certs.join(STAGING_DIR).join(e))))
        {
            if path.is_dir() {
                continue;
            }
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            if name.ends_with(".key") || (name.starts_with('.') && name.contains(".key.")) {
                assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
            }
            if ROOT_FILES.contains(&name.as_str()) {
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    self.a_file(&name),
                    "{} is not the source's",
                    path.display()
                );
            }
        }
        let present: Vec<&'static str> = ALL_FILES.iter().copied().filter(|f| b.certs.join(f).exists()).collect();
        for f in &present {
            let data = b.read(f).unwrap();
            assert!(!data.is_empty(), "{f} is empty");
            match *f {
                ROOT_K256_KEY => assert_eq!(data.len(), 32, "{f} is truncated"),
                f if f.ends_with(".crt") => {
                    CertificateDer::from_pem_slice(&data).unwrap_or_else(|e| panic!("{f} does not parse: {e}"));
                }
                f if f.ends_with(".key") => {
                    assert!(
                        String::from_utf8(data).unwrap().contains("-----END PRIVATE KEY-----"),
                        "{f} truncated"
                    );
                }
                BOOTSTRAP_INFO => {
                    serde_json::from_slice::<serde_json::Value>(&data).unwrap_or_else(|e| panic!("{f}: {e}"));
                }
                _ => {}
            }
        }
        present
    }

    /// B (already running, serving `Onboard`) onboards from A and is told to finish.
    async fn onboard_b(&self, b: &mut Proc) {
        wait_port(b, &self.b, self.b.onboard_port, "B's Onboard service").await;
        let client = self.b.onboard_client();
        let resp = client.onboard(self.onboard_req()).await.unwrap();
        assert_eq!(resp.k256_pubkey, self.a_served.k256_pubkey);
        client.finish().await.unwrap();
    }

    /// B serves exactly A's keys, from a complete directory of A's root files.
    async fn assert_b_serves_source_keys(&self, b: &mut Proc) {
        wait_port(b, &self.b, self.b.rpc_port, "B's KMS RPC").await;
        assert_eq!(self.inspect_b(), ALL_FILES.to_vec());
        assert!(self.b.staged().is_empty());
        assert_eq!(
            served(&self.b, &self.cvm).await,
            self.a_served,
            "B serves other keys than the source"
        );
        assert_ne!(
            self.b.read("rpc.key").unwrap(),
            self.a_file("rpc.key"),
            "B must have its own RPC key"
        );
        // And it follows A's revocations: the source is recorded whenever the keys are (written before them).
        let source = dstack_kms::replication::load_source(&self.b.certs).unwrap();
        assert_eq!(
            source.map(|s| s.source_url),
            Some(format!("{}/prpc", self.onboard_req().source_url)),
            "B holds A's keys but does not know to follow A"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KillB {
    /// While A's policy decides on B (B is mid-protocol, nothing received yet).
    Protocol,
    /// When the first entry appears in B's key directory.
    FirstEntry,
    /// When the staging directory holds a file (the set is being written, nothing in place).
    Staging,
    /// When `root-ca.crt`, the first file moved into place, exists.
    FirstKey,
    /// When `bootstrap-info.json`, the last one, exists.
    Complete,
}

/// Busy-polls B's directory and SIGKILLs B at `point` (within microseconds of the file appearing).
fn kill_b_at(b: &Node, proc: &mut Proc, point: KillB, hook: &common::Webhook) {
    kill_when(proc, &format!("B at {point:?}"), WAIT, &b.log, || match point {
        KillB::Protocol => hook.count("/bootAuth/kms") > 0,
        KillB::FirstEntry => !b.entries().is_empty(),
        KillB::Staging => !b.staged().is_empty(),
        KillB::FirstKey => b.certs.join(ROOT_CA_CERT).exists(),
        KillB::Complete => b.certs.join(BOOTSTRAP_INFO).exists(),
    });
}

async fn kill_new_node_then_restart(point: KillB) {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let w = world().await;
    let mut b = w.b.spawn();
    wait_port(&mut b, &w.b, w.b.onboard_port, "B's Onboard service").await;
    // A's decision is held only for the mid-protocol kill point.
    w.a_hook.hold.store(point == KillB::Protocol, Ordering::SeqCst);
    let call = {
        let (client, req) = (w.b.onboard_client(), w.onboard_req());
        tokio::spawn(async move { client.onboard(req).await })
    };
    let w = Arc::new(w);
    let (w2, point2) = (Arc::clone(&w), point);
    let killed = tokio::task::spawn_blocking(move || {
        kill_b_at(&w2.b, &mut b, point2, &w2.a_hook);
        b
    })
    .await
    .unwrap();
    drop(killed);
    w.a_hook.hold.store(false, Ordering::SeqCst);
    let call = tokio::time::timeout(WAIT, call)
        .await
        .expect("onboard call hangs")
        .unwrap();
    let present = w.inspect_b();
    eprintln!(
        "B killed at {point:?}: onboard call {}; in place {present:?}; staged {:?}; entries {:?}",
        if call.is_ok() { "completed" } else { "failed" },
        w.b.staged(),
        w.b.entries()
    );
    if point == KillB::Protocol {
        assert!(
            present.is_empty() && w.b.staged().is_empty(),
            "keys written before A released them"
        );
    }
    w.assert_source_unaffected().await;

    // Restart B: it serves A's keys (the set was complete, maybe partly moved into place) or holds none and
    // serves Onboard again.
    let mut b = w.b.spawn();
    let deadline = Instant::now() + WAIT;
    let serving = loop {
        if connects(w.b.rpc_port).await {
            break true;
        }
        if connects(w.b.onboard_port).await {
            break false;
        }
        if let Some(status) = b.0.try_wait().unwrap() {
            panic!(
                "B did not restart after a kill at {point:?} ({status}): {}",
                w.b.log_text()
            );
        }
        assert!(Instant::now() < deadline, "B came back neither serving nor onboarding");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if serving {
        eprintln!("  restarted B serves the onboarded keys");
        assert!(!present.is_empty() || !w.b.staged().is_empty() || w.b.certs.join(BOOTSTRAP_INFO).exists());
    } else {
        eprintln!("  restarted B holds no keys and onboards again");
        assert!(w.inspect_b().is_empty(), "B serves Onboard while holding key files");
        w.onboard_b(&mut b).await;
    }
    w.assert_b_serves_source_keys(&mut b).await;
    w.assert_source_unaffected().await;
    drop(b);
    let elapsed = started.elapsed();
    eprintln!("  {point:?}: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_new_kms_mid_protocol_leaves_no_keys_and_onboards_again() {
    kill_new_node_then_restart(KillB::Protocol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_new_kms_at_first_key_directory_entry() {
    kill_new_node_then_restart(KillB::FirstEntry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_new_kms_while_the_key_set_is_staged() {
    kill_new_node_then_restart(KillB::Staging).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_new_kms_between_key_files_rolls_forward_to_the_source_keys() {
    kill_new_node_then_restart(KillB::FirstKey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_new_kms_after_onboarding_keeps_the_source_keys() {
    kill_new_node_then_restart(KillB::Complete).await;
}

/// A dies (SIGKILL) while its policy decides whether B may have the keys: B's onboarding fails and B writes
/// nothing and keeps serving Onboard; A restarts on its directory with the same keys (no second bootstrap);
/// B then onboards cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_source_kms_mid_onboarding() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut w = world().await;
    let mut b = w.b.spawn();
    wait_port(&mut b, &w.b, w.b.onboard_port, "B's Onboard service").await;
    w.a_hook.hold.store(true, Ordering::SeqCst);
    let call = {
        let (client, req) = (w.b.onboard_client(), w.onboard_req());
        tokio::spawn(async move { client.onboard(req).await })
    };
    let deadline = Instant::now() + WAIT;
    while w.a_hook.count("/bootAuth/kms") == 0 {
        assert!(
            Instant::now() < deadline,
            "A never asked its policy about B: {}",
            w.a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    w.a_proc.0.kill().unwrap();
    w.a_proc.0.wait().unwrap();
    w.a_hook.hold.store(false, Ordering::SeqCst);
    let e = tokio::time::timeout(WAIT, call)
        .await
        .expect("onboard call hangs after the source died")
        .unwrap()
        .expect_err("onboarding succeeded although the source died before releasing the keys")
        .to_string();
    eprintln!("onboarding with the source killed: {e}");
    assert!(e.contains("Onboard failed"), "{e}");
    assert!(w.inspect_b().is_empty(), "B holds key files after a failed onboarding");
    assert!(w.b.staged().is_empty());
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "B died with the source: {}",
        w.b.log_text()
    );

    w.a_proc = w.a.spawn();
    wait_port(&mut w.a_proc, &w.a, w.a.rpc_port, "restarted source KMS").await;
    w.assert_source_unaffected().await;
    w.onboard_b(&mut b).await;
    w.assert_b_serves_source_keys(&mut b).await;
    let elapsed = started.elapsed();
    eprintln!("source kill: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}
