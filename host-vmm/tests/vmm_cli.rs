//! `dstack-vmm-cli` end to end against a manager with a fake backend (see `support/fake.rs`): deploy with env
//! encryption against a fake KMS over HTTPS (the test decrypts the blob the manager stored with
//! `dstack_keys`), boot progress following, list/info/logs/stop (graceful, through a fake guest agent behind
//! hybrid vsock)/start/resize/upgrade/remove, bearer tokens on TCP, and the guest API proxy.
//! Needs only /bin/sh and sleep.

#[path = "support/fake.rs"]
mod fake;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dstack_keys::sig::{ENV_PUBKEY_PREFIX, compressed, k256_signing_key};
use dstack_rpc::host_api::{HostApiClient, Notification};
use dstack_rpc::kms::*;
use dstack_rpc::{CallContext, Client, Empty, RpcError, RpcRouter};
use fake::{Served, TOKEN};
use sha2::{Digest, Sha256};

const ENV_SECRET: [u8; 32] = [0x42; 32];
const SIGNER_SECRET: [u8; 32] = [0x07; 32];

/// `GetAppEnvEncryptPubKey` like dstack's KMS (one X25519 key for every app here), both signatures.
struct FakeKms {
    asked: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl KmsRpc for FakeKms {
    async fn get_app_env_encrypt_pub_key(&self, _ctx: &CallContext, req: AppId) -> Result<PublicKeyResponse, RpcError> {
        self.asked.lock().unwrap().push(req.app_id.clone());
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(ENV_SECRET)).to_bytes();
        let key = k256_signing_key(&SIGNER_SECRET).unwrap();
        let ts = 1_750_000_000;
        Ok(PublicKeyResponse {
            public_key: public.to_vec(),
            signature: dstack_keys::sign_message(&key, ENV_PUBKEY_PREFIX, &req.app_id, &public).to_vec(),
            timestamp: ts,
            signature_v1: dstack_keys::sign_message_with_timestamp(&key, ENV_PUBKEY_PREFIX, &req.app_id, ts, &public)
                .to_vec(),
        })
    }
    async fn get_app_key(&self, _: &CallContext, _: GetAppKeyRequest) -> Result<AppKeyResponse, RpcError> {
        Err(RpcError::handler("not in this test"))
    }
    async fn get_kms_key(&self, _: &CallContext, _: GetKmsKeyRequest) -> Result<KmsKeyResponse, RpcError> {
        Err(RpcError::handler("not in this test"))
    }
    async fn get_meta(&self, _: &CallContext, _: Empty) -> Result<GetMetaResponse, RpcError> {
        Err(RpcError::handler("not in this test"))
    }
    async fn get_temp_ca_cert(&self, _: &CallContext, _: Empty) -> Result<GetTempCaCertResponse, RpcError> {
        Err(RpcError::handler("not in this test"))
    }
    async fn sign_cert(&self, _: &CallContext, _: SignCertRequest) -> Result<SignCertResponse, RpcError> {
        Err(RpcError::handler("not in this test"))
    }
}

/// The fake KMS on `https://127.0.0.1:<port>` with a self-signed certificate (the CLI does not verify KMS
/// TLS, as dstack's `vmm-cli.py`; the signature authenticates the key).
async fn start_kms() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["kms.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let router = Arc::new(RpcRouter::new("/prpc").service(KmsServer::new(FakeKms { asked: asked.clone() })));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(dstack_rpc::serve_tls(
        listener,
        Arc::new(tls),
        router,
        std::future::pending(),
    ));
    (url, asked)
}

fn signer_hex() -> String {
    hex::encode(compressed(k256_signing_key(&SIGNER_SECRET).unwrap().verifying_key()))
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the CLI binary (off the async threads, so the in-process manager keeps serving).
async fn cli(url: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dstack-vmm-cli"));
    cmd.env_remove("DSTACK_VMM_TOKEN").arg("--url").arg(url).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn notify(s: &Served, id: &str, event: &str, payload: &str) {
    let host = HostApiClient::new(Client::unix(s.run_dir(id).join("vsock.sock_10000"), "/api"));
    host.notify(Notification {
        event: event.into(),
        payload: payload.into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_with_encrypted_env_and_full_lifecycle() {
    let s = Served::start().await;
    let (kms_url, asked) = start_kms().await;
    let url = s.unix_url();
    let dir = s.dir.path();
    let compose = dir.join("docker-compose.yaml");
    std::fs::write(&compose, "services:\n  web:\n    image: nginx\n").unwrap();
    let env = dir.join("app.env");
    std::fs::write(&env, "# secrets\nAPI_KEY = abc123\nDB_URL=postgres://u:p@db/x?a=b\n").unwrap();

    // A wrong pinned signer fails closed: nothing is created.
    let bad = cli(
        &url,
        &[
            "deploy",
            "--name",
            "web",
            "--image",
            "test-img",
            "--compose",
            compose.to_str().unwrap(),
            "--env-file",
            env.to_str().unwrap(),
            "--kms-url",
            &kms_url,
            "--kms-signer",
            &"02".repeat(33),
            "--memory",
            "256",
            "--disk",
            "1",
        ],
    )
    .await;
    assert!(
        !bad.ok && bad.stderr.contains("not one of the --kms-signer"),
        "{}",
        bad.stderr
    );
    assert!(s.vm_ids().is_empty());

    // Deploy; the CLI follows boot progress while the "guest" reports it through the host API.
    let signer = signer_hex();
    let args: Vec<String> = [
        "deploy",
        "--name",
        "web",
        "--image",
        "test-img",
        "--compose",
        compose.to_str().unwrap(),
        "--env-file",
        env.to_str().unwrap(),
        "--kms-url",
        &kms_url,
        "--kms-signer",
        &signer,
        "--vcpu",
        "1",
        "--memory",
        "256",
        "--disk",
        "1",
        "--port",
        "tcp:18080:80",
        "--public-logs",
        "--timeout",
        "30",
    ]
    .map(String::from)
    .to_vec();
    let url2 = url.clone();
    let deploy = tokio::spawn(async move {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&url2, &a).await
    });
    let id = wait_for("VM created", Duration::from_secs(20), || s.vm_ids().pop()).await;
    wait_for("host API up", Duration::from_secs(10), || {
        s.run_dir(&id).join("vsock.sock_10000").exists().then_some(())
    })
    .await;
    notify(&s, &id, "boot.progress", "requesting app keys").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    notify(&s, &id, "boot.progress", "app started").await;
    let out = deploy.await.unwrap();
    assert!(out.ok, "stdout: {}\nstderr: {}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&format!("Created VM {id}")), "{}", out.stdout);
    assert!(out.stdout.contains("status: running"), "{}", out.stdout);
    assert!(
        out.stdout.contains("boot.progress: requesting app keys"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains(&format!("VM {id} is up")), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("trusted KMS key {signer} (signature_v1")),
        "{}",
        out.stdout
    );

    // What the manager stored: app-compose.json as built, its hash and app id as printed, env decryptable
    // with the KMS's secret.
    let shared = s.run_dir(&id).join("shared");
    let app_compose = std::fs::read(shared.join("app-compose.json")).unwrap();
    let hash = hex::encode(Sha256::digest(&app_compose));
    assert!(out.stdout.contains(&format!("Compose hash: {hash}")), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("App ID: {}", &hash[..40])),
        "{}",
        out.stdout
    );
    assert_eq!(
        asked.lock().unwrap().last().unwrap(),
        &hex::decode(&hash[..40]).unwrap()
    );
    let doc: serde_json::Value = serde_json::from_slice(&app_compose).unwrap();
    assert_eq!(doc["docker_compose_file"], "services:\n  web:\n    image: nginx\n");
    assert_eq!(doc["allowed_envs"], serde_json::json!(["API_KEY", "DB_URL"]));
    assert_eq!(
        (doc["kms_enabled"].as_bool(), doc["public_logs"].as_bool()),
        (Some(true), Some(true))
    );
    let blob = std::fs::read(shared.join(".encrypted-env")).unwrap();
    let vars = dstack_keys::decrypt_env(&ENV_SECRET, &blob).unwrap();
    let kv: Vec<(&str, &str)> = vars.iter().map(|v| (v.key.as_str(), v.value.as_str())).collect();
    assert_eq!(kv, [("API_KEY", "abc123"), ("DB_URL", "postgres://u:p@db/x?a=b")]);

    // list / info (by name) / logs.
    let ls = cli(&url, &["list"]).await;
    assert!(ls.ok, "{}", ls.stderr);
    let row = ls.stdout.lines().find(|l| l.starts_with(&id)).unwrap().to_owned();
    for want in ["web", "running", "256M", "1G", "tcp:127.0.0.1:18080->80", "app started"] {
        assert!(row.contains(want), "{want:?} in {row:?}");
    }
    let info = cli(&url, &["info", "web"]).await;
    assert!(
        info.ok && info.stdout.contains(&format!("Compose hash       {hash}")),
        "{}",
        info.stdout
    );
    assert!(
        info.stdout.contains("boot.progress: requesting app keys"),
        "{}",
        info.stdout
    );
    let logs = cli(&url, &["logs", &id]).await;
    assert_eq!(logs.stdout, "booted cid=1000\n", "{}", logs.stderr);

    // logs -f picks up appended output.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_dstack-vmm-cli"))
        .args(["--url", &url, "logs", "-f", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line == "second line";
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(s.run_dir(&id).join("stdout.log"))
        .unwrap()
        .write_all(b"second line\n")
        .unwrap();
    let lines = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert_eq!(lines, ["booted cid=1000", "second line"]);

    // The guest API proxy and graceful stop through the (fake) guest agent behind hybrid vsock.
    let shutdowns = fake::spawn_fake_guest(&s.run_dir(&id));
    let guest = dstack_rpc::guest_api::ProxiedGuestApiClient::new(Client::unix(&s.sock, "/guest"));
    let gi = guest.info(dstack_rpc::guest_api::Id { id: id.clone() }).await.unwrap();
    assert_eq!((gi.version.as_str(), gi.app_id), ("fake-guest 1", vec![0xab; 20]));
    let t = Instant::now();
    let stop = cli(&url, &["stop", &id]).await;
    assert!(
        stop.ok && stop.stdout.contains("is stopped"),
        "{}{}",
        stop.stdout,
        stop.stderr
    );
    assert_eq!(
        shutdowns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "asked the guest to power off"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "did not wait out the 30 s grace: {:?}",
        t.elapsed()
    );
    let e = guest
        .info(dstack_rpc::guest_api::Id { id: id.clone() })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs it running"), "{e}");

    // resize and upgrade (stopped), then start.
    let r = cli(&url, &["resize", &id, "--vcpu", "2", "--memory", "512", "--disk", "2"]).await;
    assert!(r.ok, "{}", r.stderr);
    let r = cli(&url, &["resize", &id]).await;
    assert!(!r.ok && r.stderr.contains("at least one"), "{}", r.stderr);
    let compose2 = dir.join("docker-compose-2.yaml");
    std::fs::write(&compose2, "services:\n  web:\n    image: nginx:2\n").unwrap();
    std::fs::write(&env, "API_KEY=rotated\n").unwrap();
    let up = cli(
        &url,
        &[
            "upgrade",
            &id,
            "--compose",
            compose2.to_str().unwrap(),
            "--env-file",
            env.to_str().unwrap(),
            "--kms-url",
            &kms_url,
            "--kms-signer",
            &signer,
        ],
    )
    .await;
    assert!(up.ok, "{}{}", up.stdout, up.stderr);
    let doc2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("app-compose.json")).unwrap()).unwrap();
    assert_eq!(doc2["docker_compose_file"], "services:\n  web:\n    image: nginx:2\n");
    assert_eq!(doc2["allowed_envs"], serde_json::json!(["API_KEY"]));
    assert_eq!(doc2["name"], "web", "the rest of app-compose.json is kept");
    let vars = dstack_keys::decrypt_env(&ENV_SECRET, &std::fs::read(shared.join(".encrypted-env")).unwrap()).unwrap();
    assert_eq!((vars.len(), vars[0].value.as_str()), (1, "rotated"));
    let info = cli(&url, &["info", &id, "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(
        (
            v["configuration"]["vcpu"].as_u64(),
            v["configuration"]["memory"].as_u64()
        ),
        (Some(2), Some(512))
    );
    assert_eq!(v["configuration"]["disk_size"], 2);
    assert_eq!(
        std::fs::metadata(s.run_dir(&id).join("hda.img")).unwrap().len(),
        2 << 30
    );

    let st = cli(&url, &["start", &id, "--detach"]).await;
    assert!(
        st.ok && st.stdout.contains(&format!("Started VM {id}")),
        "{}",
        st.stderr
    );
    let up = cli(&url, &["upgrade", &id, "--compose", compose.to_str().unwrap()]).await;
    assert!(!up.ok && up.stderr.contains("stop it first"), "{}", up.stderr);
    let stop = cli(&url, &["stop", &id, "--force"]).await;
    assert!(stop.ok && stop.stdout.contains("(forced)"), "{}", stop.stderr);

    let rm = cli(&url, &["rm", &id]).await;
    assert!(rm.ok, "{}", rm.stderr);
    assert!(!s.run_dir(&id).exists());
    let gone = cli(&url, &["info", &id]).await;
    assert!(
        !gone.ok && gone.stderr.contains("no VM with id or name"),
        "{}",
        gone.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_token_and_boot_failures_are_reported() {
    let s = Served::start().await;
    let url = format!("http://{}", s.tcp);
    let anon = cli(&url, &["list"]).await;
    assert!(!anon.ok && anon.stderr.contains("unauthorized"), "{}", anon.stderr);
    let wrong = cli(&url, &["--token", "nope", "list"]).await;
    assert!(!wrong.ok && wrong.stderr.contains("unauthorized"), "{}", wrong.stderr);
    let ok = cli(&url, &["--token", TOKEN, "list"]).await;
    assert!(ok.ok && ok.stdout.contains("No VMs"), "{}{}", ok.stdout, ok.stderr);

    // No KMS anywhere: kms_enabled false, and an env file is refused before anything is created.
    let compose = s.dir.path().join("dc.yaml");
    std::fs::write(&compose, "services: {}\n").unwrap();
    let env = s.dir.path().join(".env");
    std::fs::write(&env, "A=1\n").unwrap();
    let base = [
        "--token",
        TOKEN,
        "deploy",
        "--name",
        "b",
        "--image",
        "test-img",
        "--compose",
    ];
    let mut a: Vec<&str> = base.to_vec();
    a.extend([
        compose.to_str().unwrap(),
        "--memory",
        "256",
        "--disk",
        "1",
        "--env-file",
        env.to_str().unwrap(),
    ]);
    let r = cli(&url, &a).await;
    assert!(!r.ok && r.stderr.contains("--env-file needs the KMS"), "{}", r.stderr);
    assert!(s.vm_ids().is_empty());

    // A guest that reports a boot error makes deploy fail with it.
    let mut a: Vec<&str> = base.to_vec();
    a.extend([
        compose.to_str().unwrap(),
        "--memory",
        "256",
        "--disk",
        "1",
        "--timeout",
        "30",
    ]);
    let owned: Vec<String> = a.iter().map(|x| x.to_string()).collect();
    let url2 = url.clone();
    let deploy = tokio::spawn(async move {
        let a: Vec<&str> = owned.iter().map(String::as_str).collect();
        cli(&url2, &a).await
    });
    let id = wait_for("VM created", Duration::from_secs(20), || s.vm_ids().pop()).await;
    wait_for("host API up", Duration::from_secs(10), || {
        s.run_dir(&id).join("vsock.sock_10000").exists().then_some(())
    })
    .await;
    notify(&s, &id, "boot.error", "disk full").await;
    let out = deploy.await.unwrap();
    assert!(
        !out.ok && out.stderr.contains("boot failed: disk full"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.run_dir(&id).join("shared/app-compose.json")).unwrap()).unwrap();
    assert_eq!(doc["kms_enabled"], false);
    // Detached deploys return at once.
    let mut a: Vec<&str> = base.to_vec();
    a.extend([compose.to_str().unwrap(), "--memory", "256", "--disk", "1", "--detach"]);
    let r = cli(&url, &a).await;
    assert!(r.ok && r.stdout.contains("Follow its boot with"), "{}", r.stderr);

    // Names are accepted where unique; graceful stop of a guest without an agent is an immediate hard stop.
    let r = cli(&url, &["--token", TOKEN, "stop", "b"]).await;
    assert!(!r.ok && r.stderr.contains("2 VMs are named \"b\""), "{}", r.stderr);
    for id in s.vm_ids() {
        let t = Instant::now();
        let r = cli(&url, &["--token", TOKEN, "stop", &id]).await;
        assert!(r.ok && r.stdout.contains("is stopped"), "{}{}", r.stdout, r.stderr);
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }
}
