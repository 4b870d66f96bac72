//! Boot step 8 end to end in two network namespaces made by this test, joined by a veth pair:
//! - "gateway": the real gateway (`dstack-gateway` library): its boringtun WireGuard device, `RegisterCvm` over
//!   RA-TLS (simulated quotes accepted with the CVM module's root pinned), and the SNI proxy for `apps.test`;
//!   plus an impostor RPC endpoint whose certificate names another app;
//! - "CVM": [`Gateway::setup`] exactly as the boot calls it (a report built from real host-shared files, app
//!   events measured into an in-process simulated TDX module), and an HTTP app on port 8080.
//!
//! The CVM tries an unreachable URL, then the impostor (refused: wrong app id in a KMS-issued certificate),
//! then the real gateway; a client in the gateway namespace then fetches `https://<app_id>-8080.apps.test`
//! through the proxy, which reaches the app over the tunnel.
//!
//! Needs root, `/dev/net/tun` and iproute2's `ip` (namespaces, the gateway's interface); without them it
//! prints SKIP, and fails instead when `DSTACK_REQUIRE_FIXTURES=1`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dstack_gateway::attest::{RaTlsIdentity, ServerIdentity, rpc_router, server_config};
use dstack_gateway::config::{Cidr, GatewayConfig, ProxyConfig};
use dstack_gateway::dns::{DnsError, TxtResolver};
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgBackend};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::wg::{DeviceConfig, WgDevice, generate_private_key, public_key_b64};
use dstack_guest_agent::simulate::InProcessSimTee;
use dstack_ra_tls::{AttestationPolicy, AttestationVerifier, CaCert, CertRequest};
use dstack_rpc::BoxFuture;
use dstack_sim_tdx::{SimTdx, fixture};
use dstack_types::{AppKeys, KeyProvider};
use guest_init::boot::config::{HostShared, HostSharedSource};
use guest_init::boot::gateway::{Gateway, GatewayPlan, IFNAME, RefreshPolicy, STATUS_FILE};
use guest_init::boot::measure::{self, Measurer};
use guest_init::boot::tee::TeeMeasurer;
use guest_init::boot::{BootEnv, BootReport, DataDisk};
use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const STEP: Duration = Duration::from_secs(15);
const GW_APP: [u8; 20] = [0x6a; 20];
const RPC_NAME: &str = "gateway.test";
const BASE: &str = "apps.test";
const GW_IP: &str = "192.168.79.1";
const COMPOSE: &str = r#"{"gateway_enabled":true,"key_provider":"kms","manifest_version":2,"name":"gwapp","runner":"bash","bash_script":"true"}"#;

fn skip_or_fail(reason: &str) -> bool {
    if std::env::var("DSTACK_REQUIRE_FIXTURES").is_ok_and(|v| v == "1") {
        panic!("required fixture missing: {reason}");
    }
    eprintln!("SKIP: {reason}");
    true
}

fn prerequisites_missing() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip_or_fail("gateway_register needs root (network namespaces, tun)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return skip_or_fail("gateway_register needs /dev/net/tun");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return skip_or_fail("gateway_register needs iproute2's `ip`");
    }
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by veth (`192.168.79.1/24` gateway, `.2` CVM); deleted on drop.
struct Namespaces {
    gw: String,
    cvm: String,
}

impl Namespaces {
    /// `tag` tells apart the namespaces of tests running at the same time.
    fn create(tag: char) -> Self {
        let id = std::process::id();
        let ns = Self {
            gw: format!("dgi{id}{tag}g"),
            cvm: format!("dgi{id}{tag}c"),
        };
        for n in [&ns.gw, &ns.cvm] {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", "vgig", "netns", &ns.gw, "type", "veth", "peer", "name", "vgic", "netns", &ns.cvm,
        ]);
        for (n, dev, addr) in [
            (&ns.gw, "vgig", "192.168.79.1/24"),
            (&ns.cvm, "vgic", "192.168.79.2/24"),
        ] {
            ip(&["-n", n, "addr", "add", addr, "dev", dev]);
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.gw, &self.cvm] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a new thread inside namespace `ns` (threads it spawns inherit the namespace).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: `file` is an open namespace file; setns only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// An RPC server certificate issued by `kms_root` for the gateway app `app_id`.
fn rpc_identity(kms_root: &CaCert, app_id: [u8; 20]) -> ServerIdentity {
    let key = p256();
    let req = CertRequest {
        subject: RPC_NAME.into(),
        alt_names: vec![RPC_NAME.into()],
        usage_server_auth: true,
        app_id: Some(app_id.to_vec()),
        ..Default::default()
    };
    let leaf = kms_root.issue(&req, &key).unwrap();
    ServerIdentity {
        chain: vec![leaf.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

struct NoTxt;
impl TxtResolver for NoTxt {
    fn lookup_txt<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The wildcard certificate the proxy terminates with, and its CA for the test client.
fn proxy_cert() -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    CertificateDer<'static>,
) {
    let ca = CaCert::self_signed(
        &CertRequest {
            subject: "proxy CA".into(),
            ..Default::default()
        },
        p256(),
    )
    .unwrap();
    let key = p256();
    let req = CertRequest {
        subject: BASE.into(),
        alt_names: vec![format!("*.{BASE}"), BASE.into()],
        usage_server_auth: true,
        ..Default::default()
    };
    let leaf = ca.issue(&req, &key).unwrap();
    (
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ca.cert_der().clone(),
    )
}

/// An HTTP/1.1 app answering every request with `hello from <tag>`.
fn http_app(addr: SocketAddr, tag: String) -> TcpListener {
    let l = TcpListener::bind(addr).unwrap();
    let server = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for s in server.incoming() {
            let Ok(mut s) = s else { return };
            let body = format!("hello from {tag}");
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    l
}

/// HTTPS GET through the proxy at `proxy` with SNI `host`, trusting `ca`; retried while the tunnel settles.
async fn https_get(proxy: SocketAddr, host: &str, ca: &CertificateDer<'static>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut last = String::new();
    for _ in 0..20 {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
            let name = ServerName::try_from(host.to_owned()).unwrap();
            let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
            tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
            String::from_utf8(out).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) if body.contains("200 OK") => return Ok(body),
            Ok(Ok(body)) => last = format!("unexpected answer {body:?}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

/// The CVM's boot inputs: host-shared files, app keys naming the KMS root and the gateway app.
fn boot_report(dir: &std::path::Path, kms_root_pem: &str) -> (BootEnv, BootReport) {
    let shared_dir = dir.join("dstack/.host-shared");
    std::fs::create_dir_all(&shared_dir).unwrap();
    std::fs::write(shared_dir.join("app-compose.json"), COMPOSE).unwrap();
    let urls = [
        format!("https://{GW_IP}:1"),    // nothing listens
        format!("https://{GW_IP}:8001"), // certified by the KMS, but for another app
        format!("https://{GW_IP}:8000"),
    ];
    let sys = serde_json::json!({ "kms_urls": [], "gateway_urls": urls, "vm_config": "{}" });
    std::fs::write(shared_dir.join(".sys-config.json"), sys.to_string()).unwrap();
    let shared = HostShared::load(&shared_dir).unwrap();
    let identity = guest_init::boot::identity(&shared).unwrap();
    let keys = AppKeys {
        disk_crypt_key: vec![1; 32],
        env_crypt_key: vec![2; 32],
        k256_key: vec![3; 32],
        k256_signature: vec![4; 65],
        gateway_app_id: hex::encode(GW_APP),
        ca_cert: kms_root_pem.to_owned(),
        key_provider: KeyProvider::Kms {
            url: "https://kms.test".into(),
            pubkey: Vec::new(),
            tmp_ca_key: String::new(),
            tmp_ca_cert: String::new(),
        },
    };
    let env = BootEnv {
        root: dir.to_owned(),
        host_shared: HostSharedSource::Dir(shared_dir),
        data: DataDisk::Directory,
        host_api: None,
        start_app: false,
    };
    (env, BootReport { identity, keys, shared })
}

/// What a gateway instance is started with; a restart is a new instance with the same (or a changed) spec.
struct GatewaySpec {
    key: [u8; 32],
    sim_pin: dstack_measurements::sim::SimRootPin,
    /// RPC ports on [`GW_IP`] and the certificate each serves.
    rpc: Vec<(u16, ServerIdentity)>,
    proxy_chain: Vec<CertificateDer<'static>>,
    proxy_key: PrivateKeyDer<'static>,
    /// More `[core.wg]` settings.
    extra_wg: String,
}

/// A gateway running in namespace `ns` on its own thread and runtime: WireGuard (`wg-gw`, 10.0.0.1/24, UDP
/// 51820), `RegisterCvm` over RA-TLS, the SNI proxy for [`BASE`] on 8443. Its state lives in memory only, so
/// [`RunningGateway::stop`] followed by [`spawn_gateway`] is a gateway restart that lost its peer table.
struct RunningGateway {
    table: RoutingTable,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<std::collections::HashMap<String, std::time::SystemTime>>,
}

impl RunningGateway {
    /// Stops everything (sockets and interface closed) and returns the handshakes the device saw.
    fn stop(self) -> std::collections::HashMap<String, std::time::SystemTime> {
        let _ = self.stop.send(());
        self.thread.join().unwrap()
    }
}

fn spawn_gateway(ns: &str, spec: GatewaySpec) -> RunningGateway {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<RoutingTable>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handshakes = rt.block_on(async move {
            let toml = format!(
                "[core]\nrpc_domain = \"{RPC_NAME}\"\n[core.wg]\nip = \"10.0.0.1/24\"\nendpoint = \
                 \"{GW_IP}:51820\"\npublic_key = \"{}\"\n{}\n[core.proxy]\nbase_domain = \"{BASE}\"\n",
                public_key_b64(&spec.key),
                spec.extra_wg
            );
            let cfg = Arc::new(GatewayConfig::from_toml(&toml).unwrap());
            let dev = Arc::new(
                WgDevice::start(DeviceConfig {
                    ifname: "wg-gw".into(),
                    private_key: spec.key,
                    listen: "0.0.0.0:51820".parse().unwrap(),
                    address: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
                    mtu: 1420,
                    routes: Vec::new(),
                })
                .await
                .unwrap(),
            );
            let verifier = Arc::new(AttestationVerifier::new(AttestationPolicy {
                allow_simulated: true,
                simulated_roots: vec![spec.sim_pin],
                ..Default::default()
            }));
            let table = RoutingTable::new();
            let registrar = Arc::new(Registrar::new(
                cfg,
                table.clone(),
                Box::new(RaTlsIdentity::new(verifier)),
                dev.clone(),
                AdmissionPolicy::default(),
            ));
            let router = Arc::new(rpc_router(registrar));
            for (port, id) in spec.rpc {
                let listener = tokio::net::TcpListener::bind((GW_IP, port)).await.unwrap();
                let tls = server_config(id, Vec::new()).unwrap();
                tokio::spawn(dstack_rpc::serve_tls(
                    listener,
                    tls,
                    router.clone(),
                    std::future::pending(),
                ));
            }
            let terminator = TlsTerminator::new(vec![&rustls::version::TLS12, &rustls::version::TLS13]);
            terminator.set_certificate(spec.proxy_chain, spec.proxy_key).unwrap();
            let proxy = Arc::new(ProxyState {
                config: ProxyConfig {
                    base_domain: BASE.into(),
                    ..ProxyConfig::default()
                },
                table: table.clone(),
                resolver: Arc::new(NoTxt),
                tls: Arc::new(terminator),
                stats: Stats::default(),
            });
            let listener = tokio::net::TcpListener::bind((GW_IP, 8443)).await.unwrap();
            tokio::spawn(dstack_gateway::proxy::run(listener, proxy, std::future::pending()));
            ready_tx.send(table).unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(300), stop_rx).await;
            dev.latest_handshakes()
        });
        // Dropping the runtime drops every task, and with them the sockets and the tun device.
        drop(rt);
        handshakes
    });
    let table = ready_rx.recv_timeout(STEP).unwrap();
    RunningGateway {
        table,
        stop: stop_tx,
        thread,
    }
}

#[test]
fn boot_registers_with_the_gateway_and_the_proxy_reaches_the_app_through_the_tunnel() {
    if prerequisites_missing() {
        return;
    }
    let ns = Namespaces::create('r');
    let sim: Arc<SimTdx> = Arc::new(fixture::booted(0x31, 0x60).unwrap());
    let pin = sim.root_pin();
    let kms_root = CaCert::self_signed(
        &CertRequest {
            subject: "test KMS root CA".into(),
            ..Default::default()
        },
        p256(),
    )
    .unwrap();
    let kms_root_pem = kms_root.cert_pem().to_owned();
    let good_rpc = rpc_identity(&kms_root, GW_APP);
    let impostor_rpc = rpc_identity(&kms_root, [0x11; 20]);
    let (proxy_chain, proxy_key, proxy_ca) = proxy_cert();

    // Gateway namespace.
    let gw_key = generate_private_key().unwrap();
    let gw = spawn_gateway(
        &ns.gw,
        GatewaySpec {
            key: gw_key,
            sim_pin: pin,
            rpc: vec![(8000, good_rpc), (8001, impostor_rpc)],
            proxy_chain,
            proxy_key,
            extra_wg: String::new(),
        },
    );
    let table = gw.table.clone();

    // CVM namespace: the boot's gateway step, then the app.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let (cvm_tx, cvm_rx) = std::sync::mpsc::channel();
    let (cvm_stop_tx, cvm_stop_rx) = std::sync::mpsc::channel::<()>();
    let cvm = in_netns(&ns.cvm, move || {
        // Built in the namespace, so its worker threads (which run the tunnel) live there too.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let measurer = Arc::new(TeeMeasurer::new(
            Arc::new(InProcessSimTee(sim)),
            root.join("runtime_events.log"),
            rt.handle().clone(),
        ));
        let (env, report) = boot_report(&root, &kms_root_pem);
        for e in measure::app_events(&report.identity, &report.shared.compose) {
            measurer.measure(report.shared.compose.event_log_version(), &e).unwrap();
        }
        let gateway = Gateway::new(Arc::clone(&measurer), rt.handle().clone());
        // Only the impostor: refused by the CVM before any registration, no tunnel.
        let impostor_only = GatewayPlan {
            urls: vec![format!("https://{GW_IP}:8001")],
            kms_root_pem: kms_root_pem.clone(),
            gateway_app_id: Some(GW_APP.to_vec()),
            port_policy: None,
        };
        let once = Gateway::new(Arc::clone(&measurer), rt.handle().clone()).with_attempts(1);
        let refused = once.start(&impostor_only).map(|r| r.url).unwrap_err().to_string();
        assert!(once.registration().is_none());
        let reg = gateway.setup(&env, &report);
        let instance = hex::encode(report.identity.instance_id_bytes());
        let _app = http_app("0.0.0.0:8080".parse().unwrap(), instance.clone());
        cvm_tx
            .send((refused, reg, report.identity.app_id.to_hex(), instance))
            .unwrap();
        let _ = cvm_stop_rx.recv_timeout(Duration::from_secs(120));
        let ages = gateway.handshake_ages();
        let link = |name: &str| {
            Command::new("ip")
                .args(["link", "show", name])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(link(IFNAME), "{IFNAME} exists while the tunnel runs");
        gateway.stop();
        assert!(!link(IFNAME), "{IFNAME} removed by stop()");
        drop(rt);
        ages
    });
    let (refused, reg, app_id, instance_id) = cvm_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        refused.contains(&format!(
            "app id is {}, expected {}",
            hex::encode([0x11; 20]),
            hex::encode(GW_APP)
        )),
        "{refused}"
    );
    let reg = reg.unwrap().expect("gateway_enabled with URLs registers");
    assert_eq!(reg.url, format!("https://{GW_IP}:8000"), "first two URLs refused");
    assert_eq!(reg.interface, IFNAME);
    assert_eq!(reg.client_ip, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(reg.domain, BASE);
    assert_eq!(reg.servers.len(), 1);
    assert_eq!(reg.servers[0].ip, "10.0.0.1");
    assert_eq!(reg.servers[0].endpoint, format!("{GW_IP}:51820"));
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
    assert_eq!(status["client_ip"], "10.0.0.2");

    // The gateway identified the CVM by the app and instance ids replayed from its RA-TLS certificate.
    let instances = table.instances();
    assert_eq!(instances.len(), 1, "one registration (the impostor got none)");
    assert_eq!(instances[0].app_id, app_id);
    assert_eq!(instances[0].instance_id, instance_id);
    assert_eq!(instances[0].public_key, reg.public_key);

    // A user at the gateway reaches the app by app id and port, through the proxy and the tunnel.
    let host = format!("{app_id}-8080.{BASE}");
    let body = in_netns(&ns.gw, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(https_get(format!("{GW_IP}:8443").parse().unwrap(), &host, &proxy_ca))
    })
    .join()
    .unwrap()
    .unwrap();
    assert!(body.ends_with(&format!("hello from {instance_id}")), "{body}");

    let _ = cvm_stop_tx.send(());
    let ages = cvm.join().unwrap();
    let handshakes = gw.stop();
    assert!(
        handshakes.contains_key(&reg.public_key),
        "gateway saw a handshake from the CVM"
    );
    assert_eq!(ages.len(), 1);
    assert!(ages[0].1.is_some(), "CVM saw a handshake with the gateway");
    drop(ns);
}

/// Polls `f` every 100 ms until it yields, for at most `limit`; returns the value and the time it took.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if let Some(v) = f() {
            return Some((v, t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The refresher against real gateway restarts (fresh processes in all but name: new runtime, sockets, tun
/// device and an empty peer table): same key and config, a rotated key, and an address change. The CVM must
/// notice each one through its probe (the periodic refresh is set to a minute, longer than the bound) and
/// register again; the app must answer through the proxy afterwards.
#[test]
fn cvm_registers_again_after_gateway_restarts_key_rotation_and_address_change() {
    if prerequisites_missing() {
        return;
    }
    let ns = Namespaces::create('s');
    let sim: Arc<SimTdx> = Arc::new(fixture::booted(0x32, 0x61).unwrap());
    let pin = sim.root_pin();
    let kms_root = CaCert::self_signed(
        &CertRequest {
            subject: "test KMS root CA".into(),
            ..Default::default()
        },
        p256(),
    )
    .unwrap();
    let kms_root_pem = kms_root.cert_pem().to_owned();
    let start = |key: [u8; 32], extra_wg: &str| {
        let (proxy_chain, proxy_key, proxy_ca) = proxy_cert();
        let gw = spawn_gateway(
            &ns.gw,
            GatewaySpec {
                key,
                sim_pin: pin.clone(),
                rpc: vec![(8000, rpc_identity(&kms_root, GW_APP))],
                proxy_chain,
                proxy_key,
                extra_wg: extra_wg.to_owned(),
            },
        );
        (gw, proxy_ca)
    };
    let key1 = generate_private_key().unwrap();
    let (gw, ca) = start(key1, "");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let (cvm_tx, cvm_rx) = std::sync::mpsc::channel();
    let (cvm_stop_tx, cvm_stop_rx) = std::sync::mpsc::channel::<()>();
    let cvm = in_netns(&ns.cvm, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let measurer = Arc::new(TeeMeasurer::new(
            Arc::new(InProcessSimTee(sim)),
            root.join("runtime_events.log"),
            rt.handle().clone(),
        ));
        let (env, report) = boot_report(&root, &kms_root_pem);
        for e in measure::app_events(&report.identity, &report.shared.compose) {
            measurer.measure(report.shared.compose.event_log_version(), &e).unwrap();
        }
        let policy = RefreshPolicy {
            interval: Duration::from_secs(60),
            check_every: Duration::from_millis(200),
            probe_after: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(2),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(2),
        };
        let gateway = Arc::new(Gateway::new(measurer, rt.handle().clone()).with_refresh(Some(policy)));
        gateway.setup(&env, &report).unwrap().expect("registered");
        let instance = hex::encode(report.identity.instance_id_bytes());
        let _app = http_app("0.0.0.0:8080".parse().unwrap(), instance.clone());
        cvm_tx
            .send((Arc::clone(&gateway), report.identity.app_id.to_hex(), instance))
            .unwrap();
        let _ = cvm_stop_rx.recv_timeout(Duration::from_secs(300));
        gateway.stop();
        drop(rt);
    });
    let (gateway, app_id, instance_id) = cvm_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let first = gateway.registration().unwrap();
    let host = format!("{app_id}-8080.{BASE}");
    let fetch = |ca: &CertificateDer<'static>| {
        let (host, ca) = (host.clone(), ca.clone());
        in_netns(&ns.gw, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(https_get(format!("{GW_IP}:8443").parse().unwrap(), &host, &ca))
        })
        .join()
        .unwrap()
    };
    let body = fetch(&ca).unwrap();
    assert!(body.ends_with(&format!("hello from {instance_id}")), "{body}");

    // A healthy tunnel: the CVM's probes (every 2 s of silence) are answered, so it does not register again.
    let registered_at = gw.table.get(&instance_id).unwrap().reg_time;
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        gw.table.get(&instance_id).map(|i| i.reg_time),
        Some(registered_at),
        "no re-registration while the gateway answers handshakes (handshake ages {:?})",
        gateway.handshake_ages()
    );
    let ages = gateway.handshake_ages();
    assert!(
        ages.iter().all(|(_, a)| a.is_some_and(|a| a < Duration::from_secs(5))),
        "probes keep the handshakes fresh: {ages:?}"
    );

    // Each step: stop the gateway, start another, wait for the CVM's registration to reach it.
    let steps: [(&str, [u8; 32], &str, Ipv4Addr); 3] = [
        ("restart, same key and config", key1, "", first.client_ip),
        (
            "restart with a rotated key",
            generate_private_key().unwrap(),
            "",
            first.client_ip,
        ),
        (
            "restart handing out another address",
            generate_private_key().unwrap(),
            "reserved_net = [\"10.0.0.1/32\", \"10.0.0.2/32\"]",
            Ipv4Addr::new(10, 0, 0, 3),
        ),
    ];
    let mut gw = gw;
    for (what, key, extra, want_ip) in steps {
        gw.stop();
        let t = std::time::Instant::now();
        let (next, ca) = start(key, extra);
        gw = next;
        let found = wait_for(Duration::from_secs(20), || gw.table.get(&instance_id));
        let (inst, took) = found.unwrap_or_else(|| {
            panic!(
                "{what}: the CVM did not register again within 20 s (its registration: {:?}, handshake ages {:?})",
                gateway.registration(),
                gateway.handshake_ages()
            )
        });
        assert_eq!(inst.public_key, first.public_key, "{what}: the same WireGuard key");
        assert_eq!(inst.ip.to_string(), want_ip.to_string(), "{what}");
        // The CVM applied the answer: its address and the gateway's (possibly new) key.
        let applied = wait_for(Duration::from_secs(5), || {
            gateway.registration().filter(|r| {
                r.client_ip == want_ip
                    && r.servers.first().map(|s| s.public_key.as_str()) == Some(&public_key_b64(&key))
            })
        });
        assert!(applied.is_some(), "{what}: CVM side {:?}", gateway.registration());
        let body = fetch(&ca).unwrap_or_else(|e| panic!("{what}: no answer through the proxy: {e}"));
        assert!(body.ends_with(&format!("hello from {instance_id}")), "{what}: {body}");
        eprintln!(
            "{what}: registered again {took:?} after the new gateway started, app answering after {:?}",
            t.elapsed()
        );
    }
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
    assert_eq!(status["client_ip"], "10.0.0.3", "the status file follows the refreshes");
    assert_eq!(gw.table.instances().len(), 1);

    let _ = cvm_stop_tx.send(());
    cvm.join().unwrap();
    let handshakes = gw.stop();
    assert!(handshakes.contains_key(&first.public_key));
    drop(ns);
}
