//! Fault injection: `kill -9` of the `dstack-kms` binary during its auto-bootstrap, at three points found by
//! watching the key directory (before any file, at the first file, after the last file), then a restart.
//!
//! (Plus a fourth point, right after the first key file is moved into place, which leaves a partial set.)
//! What must hold whatever the kill point: every key file present is complete and parses (atomic writes), secret
//! files are 0600 (temporary ones too), a complete set survives and is served unchanged after the restart (same
//! root CA and root k256 key: no second bootstrap), an empty directory bootstraps cleanly, and a *partial* set
//! (killed between two moves) is completed with the keys that were generated, never replaced by fresh ones.

#[path = "common/kill.rs"]
mod kill;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_kms::store::{ALL_FILES, BOOTSTRAP_INFO, ROOT_CA_CERT, ROOT_CA_KEY, ROOT_K256_KEY};
use dstack_rpc::Client;
use dstack_rpc::kms::KmsClient;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use kill::{KmsProc as Kms, kill_when, spawn_kms};

struct Node {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    cfg: PathBuf,
    port: u16,
    log: PathBuf,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("kms.toml");
    std::fs::write(
        &cfg,
        format!(
            "[rpc]\naddress = \"127.0.0.1\"\nport = {port}\n[core]\ncert_dir = \"{}\"\ntee = \"none\"\n\
             [core.onboard]\nauto_bootstrap_domain = \"localhost\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("kms.log");
    Node {
        certs,
        cfg,
        port,
        log,
        _dir: dir,
    }
}

impl Node {
    fn spawn(&self) -> Kms {
        spawn_kms(&self.cfg, &self.log)
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

    fn read(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.certs.join(f)).unwrap()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KillPoint {
    /// As soon as the process runs (normally before any key file).
    Start,
    /// When the first entry (normally the root CA key's temporary file) appears in the key directory.
    FirstFile,
    /// When the first key file (`root-ca.key`) has been renamed into place: the rest of the set is not.
    FirstKey,
    /// When the last file (`bootstrap-info.json`) exists.
    Complete,
}

/// Spawns the KMS and SIGKILLs it at `point` (busy-polling the directory, so the kill lands within microseconds).
fn kill_at(n: &Node, point: KillPoint) {
    let mut kms = n.spawn();
    kill_when(
        &mut kms,
        &format!("{point:?}"),
        Duration::from_secs(30),
        &n.log,
        || match point {
            KillPoint::Start => true,
            KillPoint::FirstFile => !n.entries().is_empty(),
            KillPoint::FirstKey => n.certs.join(ROOT_CA_KEY).exists(),
            KillPoint::Complete => n.certs.join(BOOTSTRAP_INFO).exists(),
        },
    );
}

/// Which of the KMS's files exist after the kill.
#[derive(Debug, PartialEq)]
enum KeyState {
    Absent,
    Partial(Vec<&'static str>),
    Complete,
}

/// Checks the files left behind: complete, parseable, private; returns which of them exist.
fn inspect(n: &Node) -> KeyState {
    for e in n.entries() {
        let meta = std::fs::metadata(n.certs.join(&e)).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        // Secret files and any temporary left by the kill (which may hold a secret) are owner-only.
        if e.ends_with(".key") || (e.starts_with('.') && e.contains(".key.tmp")) {
            assert_eq!(mode, 0o600, "{e} has mode {mode:o}");
        }
    }
    let present: Vec<&'static str> = ALL_FILES.iter().copied().filter(|f| n.certs.join(f).exists()).collect();
    for f in &present {
        let data = n.read(f);
        assert!(!data.is_empty(), "{f} is empty");
        match *f {
            ROOT_K256_KEY => assert_eq!(data.len(), 32, "{f} is truncated"),
            f if f.ends_with(".crt") => {
                CertificateDer::from_pem_slice(&data).unwrap_or_else(|e| panic!("{f} does not parse: {e}"));
            }
            f if f.ends_with(".key") => {
                let text = String::from_utf8(data).unwrap();
                assert!(text.contains("-----END PRIVATE KEY-----"), "{f} is truncated");
            }
            BOOTSTRAP_INFO => {
                serde_json::from_slice::<serde_json::Value>(&data).unwrap_or_else(|e| panic!("{f}: {e}"));
            }
            _ => {}
        }
    }
    match present.len() {
        0 => KeyState::Absent,
        n if n == ALL_FILES.len() => KeyState::Complete,
        _ => KeyState::Partial(present),
    }
}

/// Starts the KMS again and waits until it serves; returns `GetMeta` (CA cert PEM and k256 public key), or
/// `Err(log)` if the process exited instead.
async fn restart_and_meta(n: &Node) -> (Kms, Result<(String, Vec<u8>), String>) {
    let mut kms = n.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = kms.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            return (kms, Err(format!("exited with {status}: {log}")));
        }
        if n.certs.join(BOOTSTRAP_INFO).exists() && tokio::net::TcpStream::connect(("127.0.0.1", n.port)).await.is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "KMS did not come back within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root = CertificateDer::from_pem_file(n.certs.join(ROOT_CA_CERT)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = KmsClient::new(
        Client::new(&format!("https://127.0.0.1:{}/prpc", n.port))
            .unwrap()
            .with_tls(Arc::new(tls))
            .with_server_name("localhost")
            .unwrap(),
    );
    let meta = client.get_meta().await.unwrap();
    (kms, Ok((meta.ca_cert, meta.k256_pubkey)))
}

fn bootstrap_pubkey(n: &Node) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(&n.read(BOOTSTRAP_INFO)).unwrap();
    hex::decode(v["k256_pubkey"].as_str().unwrap()).unwrap()
}

async fn kill_then_restart(point: KillPoint) -> KeyState {
    let n = node();
    kill_at(&n, point);
    let state = inspect(&n);
    eprintln!("killed at {point:?}: {state:?}; entries {:?}", n.entries());
    let before: Vec<Option<Vec<u8>>> = ALL_FILES.iter().map(|f| std::fs::read(n.certs.join(f)).ok()).collect();
    let (_kms, served) = restart_and_meta(&n).await;
    match (&state, served) {
        (KeyState::Complete, Ok((ca, k256))) => {
            // The same root keys, from the same files: nothing was bootstrapped again.
            assert_eq!(ca.as_bytes(), &before[0].clone().unwrap()[..], "served root CA changed");
            assert_eq!(k256, bootstrap_pubkey(&n));
            for (f, b) in ALL_FILES.iter().zip(&before) {
                assert_eq!(Some(n.read(f)), *b, "{f} changed on restart");
            }
        }
        (KeyState::Complete, Err(log)) => panic!("a complete key set did not restart: {log}"),
        (KeyState::Absent, Ok((_, k256))) => {
            assert_eq!(inspect(&n), KeyState::Complete);
            assert_eq!(k256, bootstrap_pubkey(&n));
        }
        (KeyState::Absent, Err(log)) => panic!("an empty key directory did not bootstrap: {log}"),
        (KeyState::Partial(present), Ok(_)) => {
            // Recovered: whatever root files existed before were kept, not replaced by new ones.
            for (f, b) in ALL_FILES.iter().zip(&before) {
                if present.contains(f) && [ROOT_CA_KEY, ROOT_K256_KEY].contains(f) {
                    assert_eq!(Some(n.read(f)), *b, "{f} was replaced by a second bootstrap");
                }
            }
            assert_eq!(inspect(&n), KeyState::Complete);
        }
        (KeyState::Partial(present), Err(log)) => {
            panic!("a partial key set ({present:?}) did not recover on restart: {log}")
        }
    }
    state
}

#[tokio::test]
async fn kill_before_any_key_file_then_restart_bootstraps() {
    kill_then_restart(KillPoint::Start).await;
}

#[tokio::test]
async fn kill_at_first_key_file_never_leaves_torn_or_replaced_keys() {
    kill_then_restart(KillPoint::FirstFile).await;
}

#[tokio::test]
async fn kill_between_key_files_rolls_forward_without_a_second_bootstrap() {
    kill_then_restart(KillPoint::FirstKey).await;
}

#[tokio::test]
async fn kill_after_bootstrap_then_restart_serves_the_same_root_keys() {
    assert_eq!(kill_then_restart(KillPoint::Complete).await, KeyState::Complete);
}

/// #13: after a crash the key set is complete and valid or absent, never partial, so a restart always
/// recovers. The set is staged completely before the first file is moved into place, so a kill between two
/// moves is rolled forward on restart (`KeyStore::recover_interrupted`).
#[tokio::test]
async fn partial_key_set_recovers_on_restart() {
    let n = node();
    kill_at(&n, KillPoint::FirstKey);
    let (_kms, served) = restart_and_meta(&n).await;
    assert!(served.is_ok(), "{served:?}");
    assert_eq!(inspect(&n), KeyState::Complete);
}
