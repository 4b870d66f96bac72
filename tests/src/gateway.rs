//! The gateway in the stack, in-process on the host: `RegisterCvm` over RA-TLS, userspace WireGuard
//! (boringtun) on a tun device in the host's network namespace, and the SNI proxy terminating TLS with a
//! wildcard certificate from a local pebble.
//!
//! Dev path for the gateway's own identity (documented, not hidden): in production the gateway is itself a
//! CVM and its RPC certificate comes from the KMS for the gateway app. Here the gateway runs on the host, so
//! it gets a **simulated** CVM identity of its own: an in-process simulated TDX module (its own root, pinned
//! by the KMS next to the VM manager's) that measures dstack's boot events for the gateway app (app id =
//! the first 20 bytes of the SHA-256 of [`GATEWAY_COMPOSE`]). With an RA-TLS client certificate from that
//! module it asks the KMS to `SignCert` its RPC key, exactly as a CVM would; the KMS's dev policy names that
//! app as `gateway_app_id`, so CVMs accept the certificate (chain to the KMS root, app id). The simulated
//! gateway has no OS image, so the KMS cannot check one: a stack with the gateway runs the KMS with OS
//! image verification off (the app CVM's measurements are still verified from outside by `verify_cvm`).
//!
//! Networking (QEMU user networking): the guest reaches the host at 10.0.2.2, so `RegisterCvm` listens on
//! 127.0.0.1:<rpc> (slirp maps 10.0.2.2 to the host's loopback) and WireGuard on UDP 0.0.0.0:<wg>; CVMs get
//! addresses from [`CLIENT_NET`]; the proxy listens on 127.0.0.1:<proxy>.
//!
//! [`Gateway::restart`] kills the services (WireGuard device, `RegisterCvm`, proxy; the peer table lives in
//! memory only) and starts fresh ones from the same configuration (`gateway/gateway.toml`), certificates and
//! keys on the same ports: a gateway restart as the CVMs see it. pebble keeps running across it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dstack_gateway::acme::{AcmeClient, AcmeSettings, Certbot, ChallTestSrv, RenewOutcome};
use dstack_gateway::attest::{RaTlsIdentity, ServerIdentity, build_verifier, rpc_router, server_config};
use dstack_gateway::config::{Cidr, GatewayConfig};
use dstack_gateway::dns::{DnsError, TxtResolver};
use dstack_gateway::proxy::tls::TlsTerminator;
use dstack_gateway::proxy::{ProxyState, Stats};
use dstack_gateway::registration::{AdmissionPolicy, Registrar, WgBackend, WgError, WgPeer};
use dstack_gateway::routing::RoutingTable;
use dstack_gateway::wg::{DeviceConfig, WgDevice, generate_private_key, public_key_b64};
use dstack_ra_tls::{CertAttestation, CertRequest, ra_tls_report_data};
use dstack_rpc::kms::{KmsClient, SignCertRequest};
use dstack_rpc::{BoxFuture, Client};
use dstack_sim_tdx::{SimTdx, fixture};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rcgen::PublicKeyData;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::pebble::Pebble;
use crate::stack::{StackError, free_port};

/// The gateway "app" the simulated gateway identity measures (its app id is derived from it).
pub const GATEWAY_COMPOSE: &str =
    r#"{"manifest_version":2,"name":"dstack-e2e-gateway","runner":"host-process","kms_enabled":true}"#;
/// Base domain of the apps behind the gateway (`<app_id>-<port>.<BASE_DOMAIN>`).
pub const BASE_DOMAIN: &str = "apps.dstack.test";
/// The gateway's tunnel address and the range CVMs get addresses from.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const CLIENT_NET: &str = "10.77.0.0/24";
/// Name in the gateway's RPC certificate (CVMs check the chain and the app id, not the name).
const RPC_NAME: &str = "gateway.dstack.test";
/// The KMS's RPC certificate names this domain (`auto_bootstrap_domain` in the stack's kms.toml).
pub const KMS_DOMAIN: &str = "kms.local";

fn failed(what: &str, e: impl std::fmt::Display) -> StackError {
    StackError::Failed {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Ports chosen before the VM manager starts (its sys-config names the RPC URL).
#[derive(Debug, Clone, Copy)]
pub struct GatewayPorts {
    pub rpc: u16,
    pub wg: u16,
    pub proxy: u16,
}

impl GatewayPorts {
    pub fn pick() -> Result<Self, StackError> {
        let wg = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.local_addr())
            .map_err(|e| failed("picking a WireGuard port", e))?
            .port();
        Ok(Self {
            rpc: free_port()?,
            wg,
            proxy: free_port()?,
        })
    }

    /// The URL CVMs register at (sys-config `gateway_urls`).
    pub fn guest_url(&self) -> String {
        format!("https://10.0.2.2:{}", self.rpc)
    }
}

/// The gateway's simulated CVM identity (see the module docs).
pub struct GatewayIdentity {
    sim: SimTdx,
    pub app_id: [u8; 20],
    /// The simulated module's root certificate, for the KMS's `simulated_roots`.
    pub sim_root: PathBuf,
}

impl GatewayIdentity {
    pub fn new(dir: &Path) -> Result<Self, StackError> {
        let compose_hash: [u8; 32] = Sha256::digest(GATEWAY_COMPOSE.as_bytes()).into();
        let mut app_id = [0u8; 20];
        app_id.copy_from_slice(&compose_hash[..20]);
        let mut instance_id = [0u8; 20];
        getrandom::fill(&mut instance_id).map_err(|e| failed("gateway instance id", e))?;
        let sim = fixture::booted(0x9a, 0x70).map_err(|e| failed("gateway simulated TDX module", e))?;
        fixture::measure_dstack_boot(&sim, &app_id, &compose_hash, &instance_id)
            .map_err(|e| failed("gateway simulated boot", e))?;
        let sim_root = dir.join("gateway-sim-root.pem");
        std::fs::write(&sim_root, sim.root_cert_pem()).map_err(|e| failed("gateway simulator root", e))?;
        Ok(Self { sim, app_id, sim_root })
    }

    /// A fresh self-signed RA-TLS client certificate quoting its key (what a CVM presents to the KMS).
    fn client_cert(&self) -> Result<(CertificateDer<'static>, rcgen::KeyPair), StackError> {
        let e = |e: &dyn std::fmt::Display| failed("gateway RA-TLS client certificate", e);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|x| e(&x))?;
        let rd = ra_tls_report_data(&key.subject_public_key_info());
        let req = CertRequest {
            subject: "dstack-e2e-gateway".into(),
            usage_client_auth: true,
            attestation: Some(CertAttestation {
                quote: self.sim.quote(&rd).map_err(|x| e(&x))?,
                event_log: self.sim.full_event_log(),
            }),
            ..Default::default()
        };
        let cert = req.self_signed(&key).map_err(|x| e(&x))?;
        Ok((cert.der().clone(), key))
    }

    /// The gateway's RPC certificate from the KMS (`SignCert`, authenticated by the RA-TLS client
    /// certificate); the KMS's RPC certificate is verified against its root CA at `kms_root`.
    async fn rpc_identity(&self, kms_port: u16, kms_root: &Path) -> Result<ServerIdentity, StackError> {
        let e = |x: &dyn std::fmt::Display| failed("gateway RPC certificate from the KMS", x);
        let root_pem = std::fs::read(kms_root).map_err(|x| e(&x))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&root_pem).map_err(|x| e(&x))?)
            .map_err(|x| e(&x))?;
        let (cert, key) = self.client_cert()?;
        let tls = rustls::ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .map_err(|x| e(&x))?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|x| e(&x))?;
        let client = Client::new(&format!("https://127.0.0.1:{kms_port}/prpc"))
            .map_err(|x| e(&x))?
            .with_tls(Arc::new(tls))
            .with_server_name(KMS_DOMAIN)
            .map_err(|x| e(&x))?;
        // The RPC key: P-256, signed CSR (the KMS checks the signature against the key it certifies).
        let signing = loop {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|x| e(&x))?;
            if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&seed) {
                break k;
            }
        };
        let spki = signing.verifying_key().to_public_key_der().map_err(|x| e(&x))?;
        let csr = serde_json::json!({
            "confirm": "please sign cert:",
            "pubkey": hex::encode(spki.as_bytes()),
            "config": {"subject": RPC_NAME, "subject_alt_names": [RPC_NAME], "usage_server_auth": true,
                       "usage_client_auth": true}
        })
        .to_string();
        let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(&signing, csr.as_bytes());
        let resp = KmsClient::new(client)
            .sign_cert(SignCertRequest {
                api_version: 1,
                csr: csr.into_bytes(),
                signature: sig.to_der().as_bytes().to_vec(),
                vm_config: String::new(),
            })
            .await
            .map_err(|x| e(&x))?;
        // [leaf, app CA, KMS root]: serve leaf and app CA.
        let chain = resp
            .certificate_chain
            .iter()
            .take(2)
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|x| e(&x)))
            .collect::<Result<Vec<_>, _>>()?;
        let key = signing.to_pkcs8_der().map_err(|x| e(&x))?;
        Ok(ServerIdentity {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.as_bytes().to_vec())),
        })
    }
}

/// No custom domains in the stack: every name is under [`BASE_DOMAIN`].
struct NoTxt;
impl TxtResolver for NoTxt {
    fn lookup_txt<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The gateway's WireGuard device as the registrar sees it: [`Gateway::restart`] takes the device out, so
/// the device really goes (socket and tun closed) even while an old RPC connection still holds the registrar.
struct DeviceSlot(Mutex<Option<Arc<WgDevice>>>);

impl DeviceSlot {
    fn device(&self) -> Option<Arc<WgDevice>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl WgBackend for DeviceSlot {
    fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError> {
        match self.device() {
            Some(d) => d.set_peers(peers),
            None => Err(WgError("the gateway is stopped".into())),
        }
    }

    fn latest_handshakes(&self) -> HashMap<String, SystemTime> {
        self.device().map(|d| d.latest_handshakes()).unwrap_or_default()
    }
}

/// What a (re)start of the gateway's services is made from: its configuration and state on disk (the
/// wildcard certificate), its WireGuard key and its KMS-issued RPC certificate.
struct Launch {
    config: Arc<GatewayConfig>,
    wg_key: [u8; 32],
    ifname: String,
    rpc_chain: Vec<CertificateDer<'static>>,
    rpc_key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// The services of one gateway run: WireGuard, `RegisterCvm`, the proxy. Peer table in memory only.
struct Services {
    table: RoutingTable,
    tasks: Vec<JoinHandle<()>>,
    wg: Arc<DeviceSlot>,
}

/// The running gateway. Dropping it stops its tasks and the tun device, then pebble.
pub struct Gateway {
    pub ports: GatewayPorts,
    pub app_id: [u8; 20],
    /// pebble's issuing root (PEM): what clients trust for `*.BASE_DOMAIN`.
    pub acme_root_pem: String,
    pub acme_root_path: PathBuf,
    /// The routing table of the current run (a restart starts an empty one).
    pub table: RoutingTable,
    tasks: Vec<JoinHandle<()>>,
    wg: Arc<DeviceSlot>,
    launch: Launch,
    _pebble: Pebble,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Gateway {
    /// Starts pebble, obtains the wildcard certificate and the KMS-issued RPC certificate, then the
    /// WireGuard device, `RegisterCvm` and the proxy. `vmm_sim_root`: the VM manager's simulator root
    /// (registering CVMs' quotes are verified against it).
    pub async fn start(
        dir: &Path,
        ports: GatewayPorts,
        identity: &GatewayIdentity,
        kms_port: u16,
        kms_root: &Path,
        vmm_sim_root: &Path,
    ) -> Result<Self, StackError> {
        let pebble = Pebble::start(&dir.join("pebble")).await?;
        let work = dir.join("gateway");
        std::fs::create_dir_all(&work).map_err(|e| failed("gateway directory", e))?;
        let (cert_path, key_path) = (work.join("cert.pem"), work.join("key.pem"));
        let acme = AcmeClient::open(
            AcmeSettings {
                directory_url: pebble.directory_url.clone(),
                ca_file: Some(pebble.listener_ca_pem.clone()),
                contacts: vec!["ops@dstack.test".into()],
                credentials_path: work.join("acme-account.json"),
                order_timeout: Duration::from_secs(120),
            },
            Box::new(ChallTestSrv::new(pebble.chall_mgmt)),
        )
        .await
        .map_err(|e| failed("ACME account at pebble", e))?;
        let bot = Certbot {
            client: acme,
            base_domain: BASE_DOMAIN.into(),
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
            renew_before: Duration::from_secs(86400),
        };
        match bot.renew_if_needed(false).await {
            Ok(RenewOutcome::Renewed(_) | RenewOutcome::Fresh) => {}
            Err(e) => return Err(failed("wildcard certificate from pebble", e)),
        }
        let acme_root_pem = pebble.issuing_root().await?;
        let acme_root_path = work.join("acme-root.pem");
        std::fs::write(&acme_root_path, &acme_root_pem).map_err(|e| failed("pebble root", e))?;

        let rpc_id = identity.rpc_identity(kms_port, kms_root).await?;

        let wg_key = generate_private_key().map_err(|e| failed("WireGuard key", e))?;
        // Unique per process: another stack (a parallel test run) may have its own device.
        let ifname = format!("e2egw{}", std::process::id() % 100_000);
        let toml = format!(
            "[core]\nrpc_domain = \"{RPC_NAME}\"\n[core.wg]\nip = \"{GATEWAY_IP}/24\"\nreserved_net = \
             [\"{GATEWAY_IP}/32\"]\nclient_ip_range = \"{CLIENT_NET}\"\ninterface = \"{ifname}\"\nlisten_port = \
             {wg}\nendpoint = \"10.0.2.2:{wg}\"\npublic_key = \"{pk}\"\n[core.proxy]\nbase_domain = \
             \"{BASE_DOMAIN}\"\nlisten_addr = \"127.0.0.1\"\nlisten_port = {proxy}\ncert_chain = \"{chain}\"\n\
             cert_key = \"{key}\"\n[core.attestation]\nallow_simulated = true\nsimulated_roots = [\"{root}\"]\n",
            wg = ports.wg,
            pk = public_key_b64(&wg_key),
            proxy = ports.proxy,
            chain = cert_path.display(),
            key = key_path.display(),
            root = vmm_sim_root.display(),
        );
        std::fs::write(work.join("gateway.toml"), &toml).map_err(|e| failed("gateway configuration", e))?;
        let config = Arc::new(GatewayConfig::from_toml(&toml).map_err(|e| failed("gateway configuration", e))?);
        let launch = Launch {
            config,
            wg_key,
            ifname,
            rpc_chain: rpc_id.chain,
            rpc_key: rpc_id.key,
            cert_path,
            key_path,
        };
        let services = launch.start(ports).await?;
        Ok(Self {
            ports,
            app_id: identity.app_id,
            acme_root_pem,
            acme_root_path,
            table: services.table,
            tasks: services.tasks,
            wg: services.wg,
            launch,
            _pebble: pebble,
        })
    }

    /// Kills the gateway's services (tasks aborted, WireGuard device, sockets and the in-memory peer table
    /// gone, as a crashed process) and starts fresh ones from the same configuration, state and keys, on the
    /// same ports. Registered CVMs are unknown to the new run until they register again. Returns how long
    /// the restart took.
    pub async fn restart(&mut self) -> Result<Duration, StackError> {
        let t = Instant::now();
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let old = self.wg.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(old);
        // The device's tasks (holding the tun descriptor and the UDP socket) end once the runtime drops them.
        let sys = PathBuf::from("/sys/class/net").join(&self.launch.ifname);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sys.exists() {
            if Instant::now() >= deadline {
                return Err(failed(
                    "gateway restart",
                    format!("{} still present 10 s after stopping", self.launch.ifname),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let services = self.launch.start(self.ports).await?;
        self.table = services.table;
        self.tasks = services.tasks;
        self.wg = services.wg;
        Ok(t.elapsed())
    }

    /// The app's name behind the gateway.
    pub fn host(app_id: &str, port: u16) -> String {
        format!("{app_id}-{port}.{BASE_DOMAIN}")
    }

    /// `https://<app_id>-<port>.<base>:<proxy>/`.
    pub fn url(&self, app_id: &str, port: u16) -> String {
        format!("https://{}:{}/", Self::host(app_id, port), self.ports.proxy)
    }

    /// The curl command that fetches the app through the gateway from this host.
    pub fn curl(&self, app_id: &str, port: u16) -> String {
        format!(
            "curl --resolve {}:{}:127.0.0.1 --cacert {} {}",
            Self::host(app_id, port),
            self.ports.proxy,
            self.acme_root_path.display(),
            self.url(app_id, port)
        )
    }

    /// `GET /` through the proxy with SNI `<app_id>-<port>.<base>`, the name resolved to 127.0.0.1 here (no
    /// DNS) and the certificate verified against pebble's root.
    pub async fn get(&self, app_id: &str, port: u16, path: &str) -> Result<(u16, String), String> {
        let root = CertificateDer::from_pem_slice(self.acme_root_pem.as_bytes()).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(Self::host(app_id, port)).map_err(|e| e.to_string())?;
        let (status, body) = https_get(SocketAddr::from(([127, 0, 0, 1], self.ports.proxy)), name, &root, path).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// The registered instances: (app id, tunnel IP, registration time).
    pub fn registered(&self) -> Vec<(String, String, std::time::SystemTime)> {
        self.table
            .instances()
            .into_iter()
            .map(|i| (i.app_id.clone(), i.ip.to_string(), i.reg_time))
            .collect()
    }
}

impl Launch {
    /// The WireGuard device, `RegisterCvm` and the proxy, with an empty peer table.
    async fn start(&self, ports: GatewayPorts) -> Result<Services, StackError> {
        let ifname = &self.ifname;
        let device = WgDevice::start(DeviceConfig {
            ifname: ifname.clone(),
            private_key: self.wg_key,
            listen: SocketAddr::from(([0, 0, 0, 0], ports.wg)),
            address: Cidr::v4(GATEWAY_IP, 24),
            mtu: 1420,
            routes: Vec::new(),
        })
        .await
        .map_err(|e| failed(&format!("WireGuard device {ifname} (needs root and /dev/net/tun)"), e))?;
        let wg = Arc::new(DeviceSlot(Mutex::new(Some(Arc::new(device)))));
        let config = &self.config;
        let verifier = build_verifier(&config.core.attestation).map_err(|e| failed("gateway attestation", e))?;
        let table = RoutingTable::new();
        let registrar = Arc::new(Registrar::new(
            config.clone(),
            table.clone(),
            Box::new(RaTlsIdentity::new(verifier)),
            wg.clone(),
            AdmissionPolicy::default(),
        ));
        let rpc_id = ServerIdentity {
            chain: self.rpc_chain.clone(),
            key: self.rpc_key.clone_key(),
        };
        let tls = server_config(rpc_id, Vec::new()).map_err(|e| failed("gateway RPC TLS", e))?;
        let rpc = tokio::net::TcpListener::bind(("127.0.0.1", ports.rpc))
            .await
            .map_err(|e| failed("binding the gateway RPC port", e))?;
        let mut tasks = Vec::new();
        let router = Arc::new(rpc_router(registrar));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dstack_rpc::serve_tls(rpc, tls, router, std::future::pending()).await {
                tracing::warn!("gateway RPC stopped: {e}");
            }
        }));
        let terminator = TlsTerminator::new(vec![&rustls::version::TLS12, &rustls::version::TLS13]);
        terminator
            .load_files(&self.cert_path, &self.key_path)
            .map_err(|e| failed("loading the wildcard certificate", e))?;
        let proxy = Arc::new(ProxyState {
            config: config.core.proxy.clone(),
            table: table.clone(),
            resolver: Arc::new(NoTxt),
            tls: Arc::new(terminator),
            stats: Stats::default(),
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", ports.proxy))
            .await
            .map_err(|e| failed("binding the gateway proxy port", e))?;
        tasks.push(tokio::spawn(dstack_gateway::proxy::run(
            listener,
            proxy,
            std::future::pending(),
        )));
        Ok(Services { table, tasks, wg })
    }
}

/// HTTP/1.1 `GET` over TLS to `addr` with SNI `name`, trusting only `root`. Returns (status, body).
pub async fn https_get(
    addr: SocketAddr,
    name: ServerName<'static>,
    root: &CertificateDer<'static>,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| e.to_string())?;
    let cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = match &name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        _ => addr.to_string(),
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        // Servers that close without close_notify still delivered the whole answer (Connection: close).
        if let Err(e) = tls.read_to_end(&mut raw).await
            && raw.is_empty()
        {
            return Err(format!("read: {e}"));
        }
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| "timed out".to_owned())??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((status, raw[split + 4..].to_vec()))
}
