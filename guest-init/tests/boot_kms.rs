//! The boot steps (not as PID 1: [`guest_init::boot::run`] against a temporary root) with the production
//! backends: the TEE is a real `dstack-sim-tdx` module on a unix socket selected through the kernel-command-line
//! syntax `dstack.tee=simulated:unix:<path>`, the KMS a real `dstack-kms` started in-process (dev policy,
//! `allow_simulated` with the guest module's root pinned, its own RPC certificate attested by a second
//! simulated module), the host API a unix-socket server recording notifications.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dstack_kms::Kms;
use dstack_kms::bootstrap::SelfTee;
use dstack_kms::config::KmsConfig;
use dstack_kms::store::KeyStore;
use dstack_measurements::eventlog::{RuntimeEvent as LogEvent, TdxEvent, replay_digests};
use dstack_measurements::sim::SimulatedQuoteSigner;
use dstack_measurements::verify::{VerifyOptions, verify_quote};
use dstack_ra_tls::AttestationPolicy;
use dstack_rpc::host_api::{
    GetSealingKeyRequest, GetSealingKeyResponse, HostApiRpc, HostApiServer, HostInfo, Notification,
};
use dstack_rpc::{CallContext, Empty, RpcError};
use dstack_sim_tdx::{InitialState, SimTdx};
use dstack_tee::tdx::TdxPaths;
use dstack_tee::{SimEndpoint, SimulatedTee, TeeConfig, TeeRequest};
use dstack_types::shared_files as names;
use guest_init::backends::{Backends, GuestApiListen, GuestApiSetup, agent_sockets};
use guest_init::boot::config::HostSharedSource;
use guest_init::boot::{BootEnv, DataDisk};
use tokio::runtime::Runtime;

const COMPOSE: &str =
    r#"{"key_provider":"kms","manifest_version":"2","name":"kmsapp","runner":"bash","bash_script":"true"}"#;
const OS_HASH: &str = "5eed00000000000000000000000000000000000000000000000000000000beef";

fn sim(mrtd: u8) -> Arc<SimTdx> {
    let boot = (0..3u32)
        .map(|imr| TdxEvent {
            imr,
            event_type: 0x8000_0001,
            digest: vec![imr as u8 + mrtd; 48],
            event: String::new(),
            event_payload: Vec::new(),
            version: None,
        })
        .collect();
    let init = InitialState {
        mrtd: vec![mrtd; 48],
        boot_event_log: boot,
        ..Default::default()
    };
    Arc::new(SimTdx::new(&init, SimulatedQuoteSigner::generate().unwrap()).unwrap())
}

fn serve_sim(rt: &Runtime, sim: &Arc<SimTdx>, sock: &Path) {
    // An owned path: the server task outlives this call.
    let path: PathBuf = sock.into();
    rt.spawn(dstack_sim_tdx::serve_unix(
        Arc::clone(sim),
        path,
        std::future::pending(),
    ));
    for _ in 0..200 {
        if sock.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("simulator socket {} did not appear", sock.display());
}

struct Host(Arc<Mutex<Vec<(String, String)>>>);

impl HostApiRpc for Host {
    async fn info(&self, _: &CallContext, _: Empty) -> Result<HostInfo, RpcError> {
        Ok(Default::default())
    }
    async fn notify(&self, _: &CallContext, n: Notification) -> Result<Empty, RpcError> {
        self.0.lock().unwrap().push((n.event, n.payload));
        Ok(Empty {})
    }
    async fn get_sealing_key(
        &self,
        _: &CallContext,
        _: GetSealingKeyRequest,
    ) -> Result<GetSealingKeyResponse, RpcError> {
        Err(RpcError::handler("no sealing key"))
    }
}

/// Everything a test boot needs.
struct World {
    dir: tempfile::TempDir,
    infra: Runtime,
    guest_sim: Arc<SimTdx>,
    kms_sim: Arc<SimTdx>,
    guest_sock: PathBuf,
    notes: Arc<Mutex<Vec<(String, String)>>>,
    host_sock: PathBuf,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let infra = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let guest_sim = sim(0x21);
    let kms_sim = sim(0x41);
    let guest_sock = dir.path().join("guest-sim.sock");
    serve_sim(&infra, &guest_sim, &guest_sock);
    serve_sim(&infra, &kms_sim, &dir.path().join("kms-sim.sock"));
    let notes = Arc::new(Mutex::new(Vec::new()));
    let host_sock = dir.path().join("host-api.sock");
    let router = Arc::new(dstack_rpc::RpcRouter::new("/api").service(HostApiServer::new(Host(Arc::clone(&notes)))));
    let listener = infra
        .block_on(async { dstack_rpc::bind_unix(&host_sock, 0o600) })
        .unwrap();
    infra.spawn(dstack_rpc::serve_unix(listener, router, std::future::pending()));
    World {
        dir,
        infra,
        guest_sim,
        kms_sim,
        guest_sock,
        notes,
        host_sock,
    }
}

impl World {
    /// A bootstrapped KMS on loopback; `allow_simulated` with the guest module's root pinned.
    fn kms(&self, allow_simulated: bool) -> (Kms, dstack_kms::KmsHandle) {
        self.kms_with(allow_simulated, None)
    }

    /// Like [`World::kms`], with the `webhook` policy at `webhook` when given.
    fn kms_with(&self, allow_simulated: bool, webhook: Option<&str>) -> (Kms, dstack_kms::KmsHandle) {
        let pin = self.dir.path().join("guest-sim-root.pem");
        std::fs::write(&pin, self.guest_sim.root_cert_pem()).unwrap();
        let mut c = KmsConfig::default();
        c.core.cert_dir = self.dir.path().join("kms-certs");
        c.core.attestation.allow_simulated = allow_simulated;
        c.core.attestation.simulated_roots = vec![pin.display().to_string()];
        if let Some(url) = webhook {
            c.core.auth_api.kind = dstack_kms::config::AuthApiKind::Webhook;
            c.core.auth_api.webhook.url = url.into();
            c.core.auth_api.webhook.timeout_ms = 2000;
        }
        let own = SelfTee {
            tee: Arc::new(SimulatedTee::new(&SimEndpoint::Unix(
                self.dir.path().join("kms-sim.sock"),
            ))),
            runtime_log: self.dir.path().join("kms-runtime.log"),
        };
        let kms = Kms::with_tee(c, Some(own)).unwrap();
        let handle = self.infra.block_on(async {
            kms.bootstrap("kms.test").await.unwrap();
            kms.start(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
                .await
                .unwrap()
        });
        (kms, handle)
    }

    /// The guest's backends: TEE chosen by the command-line selector, KMS certificate attestation checked
    /// against the KMS module's root.
    fn backends(&self) -> Backends {
        let cmdline = format!("console=ttyS0 dstack.tee=simulated:unix:{}", self.guest_sock.display());
        let cfg = TeeConfig {
            tdx_paths: TdxPaths::under(&self.dir.path().join("no-tdx")),
            request: TeeRequest::from_cmdline(&cmdline).unwrap(),
        };
        let tee = dstack_tee::detect(&cfg).unwrap();
        let policy = AttestationPolicy {
            allow_simulated: true,
            simulated_roots: vec![self.kms_sim.root_pin()],
            required_usage: Some("kms:rpc".into()),
            ..Default::default()
        };
        Backends::new(tee, self.dir.path().join("run/runtime_events.log"), Some(policy)).unwrap()
    }

    fn env(&self, kms_urls: &[String]) -> BootEnv {
        self.env_with(COMPOSE, kms_urls)
    }

    fn env_with(&self, compose: &str, kms_urls: &[String]) -> BootEnv {
        let host = self.dir.path().join("host-shared");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join(names::APP_COMPOSE), compose).unwrap();
        let vm_config =
            serde_json::json!({"os_image_hash": OS_HASH, "cpu_count": 1, "memory_size": 1u64 << 30}).to_string();
        let sys = serde_json::json!({
            "kms_urls": kms_urls,
            "gateway_urls": [],
            "host_api_url": format!("unix:{}", self.host_sock.display()),
            "vm_config": vm_config,
        });
        std::fs::write(host.join(names::SYS_CONFIG), sys.to_string()).unwrap();
        let root = self.dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        BootEnv {
            root,
            host_shared: HostSharedSource::Dir(host),
            data: DataDisk::Directory,
            host_api: None,
            start_app: false,
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn boot_gets_kms_keys_measures_and_serves_the_agent() {
    let w = world();
    let (kms, handle) = w.kms(true);
    // The first KMS is down: the boot moves on to the next.
    let urls = vec![
        "https://127.0.0.1:1".to_owned(),
        format!("https://127.0.0.1:{}", handle.addr.port()),
    ];
    let env = w.env(&urls);
    let backends = w.backends();
    // The host-facing guest API on a unix socket (a CVM uses vsock 8000); Shutdown only counts here.
    let guest_api = w.dir.path().join("guest-api.sock");
    let shutdowns = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = Arc::clone(&shutdowns);
    backends.agent.set_guest_api(GuestApiSetup {
        listen: GuestApiListen::Unix(guest_api.clone()),
        on_shutdown: Arc::new(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
    });
    let report = guest_init::boot::run(&env, &backends.deps(None)).unwrap();

    // Keys equal crates/keys' derivation from the KMS's stored roots for the computed identity.
    let stored = KeyStore::new(&kms.config.core.cert_dir).load().unwrap();
    let app_id: [u8; 20] = report.identity.app_id.0;
    let instance_id: [u8; 20] = report.identity.instance_id_bytes().try_into().unwrap();
    let expected =
        dstack_keys::derive_app_keys(&stored.root_ca_secret, &stored.root_k256, &app_id, &instance_id).unwrap();
    assert_eq!(report.keys.disk_crypt_key, expected.disk_crypt_key.to_vec());
    assert_eq!(report.keys.env_crypt_key, expected.env_crypt_key.to_vec());
    assert_eq!(report.keys.k256_key, expected.k256_key.to_vec());
    assert_eq!(report.keys.k256_signature, expected.k256_signature.to_vec());
    // app_id = compose_hash[..20], computed independently here.
    use sha2::Digest;
    assert_eq!(app_id[..], sha2::Sha256::digest(COMPOSE.as_bytes())[..20]);

    // .appkeys.json: work dir, mode 0600, not in the host-shared copy.
    let keys_file = env.work_dir().join(names::APP_KEYS);
    assert_eq!(
        std::fs::metadata(&keys_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!env.shared_dir().join(names::APP_KEYS).exists());
    let on_disk = dstack_types::AppKeys::from_slice(&std::fs::read(&keys_file).unwrap()).unwrap();
    assert_eq!(on_disk.disk_crypt_key, expected.disk_crypt_key.to_vec());

    // RTMR3 at the module equals the replay of the persisted log; events in dstack order.
    let text = std::fs::read_to_string(w.dir.path().join("run/runtime_events.log")).unwrap();
    let events = dstack_tee::parse_runtime_log(&text).unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "system-preparing",
            "app-id",
            "compose-hash",
            "instance-id",
            "boot-mr-done",
            "os-image-hash",
            "key-provider",
            "storage-fs",
            "system-ready"
        ]
    );
    let digests: Vec<[u8; 48]> = events.iter().map(LogEvent::digest).collect();
    assert_eq!(replay_digests(&digests), w.guest_sim.registers().rtmr[3]);
    let root_spki = stored.bootstrap_info.ca_pubkey.clone();
    assert_eq!(
        events[6].payload,
        format!(r#"{{"name":"kms","id":"{}"}}"#, hex::encode(&root_spki)).into_bytes()
    );
    assert_eq!(hex::encode(&events[5].payload), OS_HASH);

    // The agent answers Info and GetQuote with a real (simulated-module) quote.
    let (sockets, aliases) = agent_sockets(&env.root);
    let agent = dstack_rpc::agent::DstackGuestClient::new(dstack_rpc::Client::unix(&sockets.dstack, ""));
    let (info, quote, tls, ra) = w.infra.block_on(async {
        let info = agent.info().await.unwrap();
        let q = agent
            .get_quote(dstack_rpc::agent::RawQuoteArgs {
                report_data: b"hello".to_vec(),
            })
            .await
            .unwrap();
        let tls = agent
            .get_tls_key(dstack_rpc::agent::GetTlsKeyArgs {
                subject: "app.test".into(),
                alt_names: vec!["app.test".into()],
                usage_server_auth: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let ra = agent
            .get_tls_key(dstack_rpc::agent::GetTlsKeyArgs {
                subject: "ra.test".into(),
                usage_ra_tls: true,
                usage_server_auth: true,
                ..Default::default()
            })
            .await
            .unwrap();
        (info, q, tls, ra)
    });
    assert_eq!(info.app_id, app_id.to_vec());
    assert_eq!(info.instance_id, instance_id.to_vec());
    assert!(info.key_provider_info.contains(&hex::encode(&root_spki)));
    // The guest API started with the agent answers for the same app, and its Shutdown reaches the hook.
    let gapi = dstack_rpc::guest_api::GuestApiClient::new(dstack_rpc::Client::unix(&guest_api, "/api"));
    let ginfo = w.infra.block_on(gapi.info()).unwrap();
    assert_eq!(ginfo.app_id, app_id.to_vec());
    assert_eq!(ginfo.instance_id, instance_id.to_vec());
    w.infra.block_on(gapi.shutdown()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shutdowns.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "guest API Shutdown never ran its hook"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let verified = verify_quote(
        &quote.quote,
        None,
        &VerifyOptions {
            now: now(),
            allow_simulated: true,
            simulated_roots: vec![w.guest_sim.root_pin()],
            allow_debug: false,
        },
    )
    .unwrap();
    let mut rd = [0u8; 64];
    rd[..5].copy_from_slice(b"hello");
    assert_eq!(verified.quote.report.report_data, rd);
    assert_eq!(verified.quote.report.rtmr[3], w.guest_sim.registers().rtmr[3]);
    // GetTlsKey goes through KMS SignCert: [leaf, app CA, KMS root CA], the leaf under the app CA.
    assert_eq!(tls.certificate_chain.len(), 3, "{:?}", tls.certificate_chain);
    assert_eq!(tls.certificate_chain[2].trim(), stored.root_ca.cert_pem().trim());
    let chain: Vec<_> = tls
        .certificate_chain
        .iter()
        .map(|p| {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(p.as_bytes()).unwrap()
        })
        .collect();
    let leaf = dstack_ra_tls::parse_cert(&chain[0]).unwrap();
    assert_eq!(leaf.special_usage.as_deref(), Some("app:custom"));
    assert_eq!(leaf.app_id.as_deref(), Some(&app_id[..]));
    let app_ca = dstack_ra_tls::parse_cert(&chain[1]).unwrap();
    assert_eq!(app_ca.special_usage.as_deref(), Some("app:ca"));
    assert!(tls.key.starts_with("-----BEGIN PRIVATE KEY-----"));
    // usage_ra_tls for a KMS app: the KMS-signed leaf carries the quote and event log and verifies as RA-TLS.
    assert_eq!(ra.certificate_chain.len(), 3);
    let ra_leaf = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(ra.certificate_chain[0].as_bytes()).unwrap()
    };
    let verifier = dstack_ra_tls::AttestationVerifier::new(dstack_ra_tls::AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![w.guest_sim.root_pin()],
        ..Default::default()
    });
    let id = verifier
        .verify_cert(&ra_leaf, now())
        .unwrap()
        .expect("RA-TLS leaf has an attestation");
    assert_eq!(id.app_id, app_id.to_vec());
    assert_eq!(id.instance_id, instance_id.to_vec());
    assert_eq!(
        dstack_ra_tls::parse_cert(&ra_leaf).unwrap().app_id.as_deref(),
        Some(&app_id[..])
    );
    assert!(aliases.iter().all(|a| a.exists()), "alias sockets linked");
    assert_eq!(
        std::fs::metadata(&sockets.dstack).unwrap().permissions().mode() & 0o777,
        0o777
    );

    // Host notifications.
    let notes = w.notes.lock().unwrap().clone();
    assert!(
        notes.contains(&("boot.progress".into(), "requesting app keys".into())),
        "{notes:?}"
    );
    let info_note = notes
        .iter()
        .find(|(e, _)| e == "instance.info")
        .expect("instance.info sent");
    assert!(info_note.1.contains(&hex::encode(instance_id)), "{info_note:?}");
    assert!(!notes.iter().any(|(e, _)| e == "boot.error"));
    w.infra.block_on(handle.shutdown()).unwrap();
}

#[test]
fn kms_refusal_stops_the_boot_without_keys() {
    let w = world();
    let (_kms, handle) = w.kms(false); // simulated attestation not accepted
    let url = format!("https://127.0.0.1:{}", handle.addr.port());
    let env = w.env(std::slice::from_ref(&url));
    let backends = w.backends();
    let err = guest_init::boot::run(&env, &backends.deps(None))
        .unwrap_err()
        .to_string();
    eprintln!("refusal: {err}");
    assert!(err.contains(&url) && err.contains("GetAppKey"), "{err}");
    assert!(err.to_lowercase().contains("simulated"), "{err}");
    assert!(!env.work_dir().join(names::APP_KEYS).exists());
    let names: Vec<String> =
        dstack_tee::parse_runtime_log(&std::fs::read_to_string(w.dir.path().join("run/runtime_events.log")).unwrap())
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("boot-mr-done"),
        "nothing measured after the refusal"
    );
    let notes = w.notes.lock().unwrap().clone();
    assert!(
        notes.iter().any(|(e, p)| e == "boot.error" && p.contains(&url)),
        "{notes:?}"
    );
    assert!(!agent_sockets(&env.root).0.dstack.exists(), "no agent without keys");
    w.infra.block_on(handle.shutdown()).unwrap();
}

#[test]
fn kms_root_not_matching_the_pin_is_refused_before_key_release() {
    let w = world();
    let (_kms, handle) = w.kms(true);
    let url = format!("https://127.0.0.1:{}", handle.addr.port());
    let compose = r#"{"key_provider":"kms","key_provider_id":"3059301306072a8648ce3d020106082a8648ce3d03010703420004aa","manifest_version":"2","name":"kmsapp","runner":"bash","bash_script":"true"}"#;
    let env = w.env_with(compose, std::slice::from_ref(&url));
    let backends = w.backends();
    let err = guest_init::boot::run(&env, &backends.deps(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match app-compose key_provider_id"), "{err}");
    assert!(!err.contains("GetAppKey"), "refused before asking for keys: {err}");
    assert!(!env.work_dir().join(names::APP_KEYS).exists());
    w.infra.block_on(handle.shutdown()).unwrap();
}

/// A webhook that denies every app (`POST /bootAuth/app` → `isAllowed: false`), counting requests.
fn deny_webhook(rt: &Runtime) -> (String, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&paths);
    rt.spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head and the body announced by content-length.
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            seen.lock().unwrap().push(head.split_whitespace().nth(1).unwrap_or_default().to_owned());
            let body = r#"{"isAllowed":false,"reason":"app not registered","gatewayAppId":""}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    (url, paths)
}

#[test]
fn webhook_denial_stops_the_boot_without_keys() {
    let w = world();
    let (hook, paths) = deny_webhook(&w.infra);
    let (_kms, handle) = w.kms_with(true, Some(&hook));
    let url = format!("https://127.0.0.1:{}", handle.addr.port());
    let env = w.env(std::slice::from_ref(&url));
    let backends = w.backends();
    let err = guest_init::boot::run(&env, &backends.deps(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&url) && err.contains("app not registered"), "{err}");
    assert!(!env.work_dir().join(names::APP_KEYS).exists());
    assert_eq!(*paths.lock().unwrap(), ["/bootAuth/app"], "the policy was asked once");
    assert!(w.notes.lock().unwrap().iter().any(|(e, _)| e == "boot.error"));
    w.infra.block_on(handle.shutdown()).unwrap();
}
