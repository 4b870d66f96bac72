//! The gateway as a CVM, as in dstack: the `gateway` appliance (`image-build/appliances/gateway`, packaged by
//! `cargo xtask appliance`) booted by the VM manager from the same guest image as the apps. Its RPC
//! certificate comes from its guest agent (`identity = "agent:/var/run/dstack.sock"`: an RA-TLS leaf under the
//! app CA the KMS issued to the gateway app), its proxy certificate from pebble through its own ACME client,
//! and the KMS names its app id as `gateway_app_id`, so app CVMs accept it only because it is that attested app.
//!
//! Per stack run (ports, pins and the pebble address are part of the measured configuration, so every run
//! packages its own appliance, as every real deployment publishes its own `appliances.json`):
//! 1. [`prepare`]: pebble on the host; the appliance packaged by `xtask appliance --only gateway --binaries …
//!    --set …` (the simulator root pin of this VM manager, the WireGuard endpoint, ACME settings); its image
//!    pushed to the stack's registry;
//! 2. the KMS starts with the packaged app id as `gateway_app_id` (and OS image verification on: the gateway
//!    CVM boots from the image the KMS has);
//! 3. [`launch`]: the CVM is deployed with its ports forwarded, then we wait until its RPC port serves a
//!    certificate chain, verify it ([`verify_gateway`]: chain to the KMS root, quote, event log replay,
//!    published measurements, compose hash and app id equal to the packaging's), and wait until its proxy
//!    listens. Its ACME client gets the wildcard certificate from pebble meanwhile; clients check it against
//!    pebble's root on every request ([`GatewayCvm::get`]).
//!
//! Networking (QEMU user networking, `tcg` backend): RPC 8000/tcp, proxy 443/tcp and WireGuard 51820/udp are
//! forwarded from free ports on the host's 127.0.0.1; every CVM reaches them at `10.0.2.2:<host port>` (user
//! networking maps 10.0.2.2 to the host's loopback): the registration URL app CVMs get, the WireGuard endpoint
//! the gateway advertises, and how the gateway reaches pebble and challtestsrv.
//!
//! Inputs: `DSTACK_GATEWAY_BIN`, the static `dstack-gateway` binary (`cargo xtask appliance --only gateway`
//! builds it into `target-static`); `DSTACK_XTASK`, the xtask binary that packages it (default
//! `cargo run -p xtask`, which `cargo xtask demo` avoids by passing itself).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dstack_measurements::eventlog::parse_json_log;
use dstack_measurements::published::{AttestationExtras, MeasurementsJson, diff};
use dstack_measurements::quote::Quote;
use dstack_measurements::sim::SimRootPin;
use dstack_ra_tls::parse_cert;
use dstack_ra_tls::verify::{AttestationPolicy, AttestationVerifier};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::gateway::BASE_DOMAIN;
use crate::pebble::Pebble;
use crate::stack::StackError;
use crate::verify::{Check, Verdict};

/// Name in the gateway's RPC certificate (`rpc_domain`, asked of its agent).
pub const RPC_DOMAIN: &str = "gateway.dstack.test";
/// Shape of the gateway CVM (one of the image's published measurement shapes).
pub const VCPUS: u32 = 1;
pub const MEMORY_MB: u32 = 2048;
/// Where the appliance's compose file mounts the ACME CA inside the container.
const ACME_CA_IN_CVM: &str = "/etc/dstack-gateway/acme-ca.pem";

fn failed(what: &str, e: impl std::fmt::Display) -> StackError {
    StackError::Failed {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gateway appliance's inputs (see the module docs).
#[derive(Debug, Clone)]
pub struct GatewayCvmInputs {
    pub gateway_bin: PathBuf,
    pub xtask: Option<PathBuf>,
}

impl GatewayCvmInputs {
    pub fn from_env() -> Result<Self, StackError> {
        crate::pebble::binaries()?;
        let gateway_bin = std::env::var_os("DSTACK_GATEWAY_BIN")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or_else(|| StackError::Missing {
                what: "DSTACK_GATEWAY_BIN".into(),
                hint: "the static dstack-gateway binary (cargo xtask appliance --only gateway builds it into \
                       target-static/x86_64-unknown-linux-gnu/release)"
                    .into(),
            })?;
        let xtask = std::env::var_os("DSTACK_XTASK").map(PathBuf::from);
        Ok(Self { gateway_bin, xtask })
    }
}

/// Host ports forwarded to the gateway CVM.
#[derive(Debug, Clone, Copy)]
pub struct CvmPorts {
    pub rpc: u16,
    pub proxy: u16,
    pub wg: u16,
}

impl CvmPorts {
    pub fn pick() -> Result<Self, StackError> {
        let wg = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(|e| failed("picking a WireGuard port", e))?
            .port();
        Ok(Self {
            rpc: crate::stack::free_port()?,
            proxy: crate::stack::free_port()?,
            wg,
        })
    }

    /// The registration URL CVMs get (sys-config `gateway_urls`).
    pub fn guest_url(&self) -> String {
        format!("https://10.0.2.2:{}", self.rpc)
    }
}

/// One packaging of an appliance (`appliances.json`'s `gateway` entry, or `kms` through
/// [`package_appliance`], and its files).
#[derive(Debug, Clone)]
pub struct PackagedGateway {
    pub dir: PathBuf,
    /// `app-compose.json` exactly as published (what is deployed).
    pub app_compose: String,
    pub compose_hash: String,
    pub app_id: String,
    pub image: String,
}

/// What [`prepare`] made before the KMS starts.
pub struct Prepared {
    pub ports: CvmPorts,
    pub package: PackagedGateway,
    pub acme_root_pem: String,
    pub acme_root_path: PathBuf,
    pebble: Pebble,
}

/// Starts pebble, packages the appliance for this run and pushes its image to the registry.
pub async fn prepare(
    dir: &Path,
    inputs: &GatewayCvmInputs,
    ports: CvmPorts,
    registry_port: u16,
    sim_root_pin: [u8; 32],
) -> Result<Prepared, StackError> {
    let pebble = Pebble::start(&dir.join("pebble")).await?;
    let acme_root_pem = pebble.issuing_root().await?;
    let acme_root_path = dir.join("gateway-acme-root.pem");
    std::fs::write(&acme_root_path, &acme_root_pem).map_err(|e| failed("pebble root", e))?;
    let listener_ca = std::fs::read_to_string(&pebble.listener_ca_pem).map_err(|e| failed("pebble CA", e))?;
    let certbot = format!(
        "{{ enabled = true, acme_url = \"https://10.0.2.2:{}/dir\", acme_ca_file = \"{ACME_CA_IN_CVM}\", contacts = \
         [\"ops@dstack.test\"], work_dir = \"/var/lib/dstack-gateway/certbot\", renew_interval = \"1h\" }}",
        pebble.acme_port
    );
    let sets = [
        ("RPC_DOMAIN", RPC_DOMAIN.to_owned()),
        ("BASE_DOMAIN", BASE_DOMAIN.to_owned()),
        ("WG_ENDPOINT", format!("10.0.2.2:{}", ports.wg)),
        ("ALLOW_SIMULATED", "true".to_owned()),
        ("SIMULATED_ROOTS", format!("\"{}\"", hex::encode(sim_root_pin))),
        ("CERTBOT", certbot),
        ("ACME_CA", listener_ca.trim_end().to_owned()),
        (
            "GATEWAY_ARGS",
            format!(", \"--challtestsrv\", \"10.0.2.2:{}\"", pebble.chall_mgmt.port()),
        ),
    ];
    let package = package(inputs, &dir.join("appliance"), &sets)?;
    push(registry_port, &package).await?;
    Ok(Prepared {
        ports,
        package,
        acme_root_pem,
        acme_root_path,
        pebble,
    })
}

/// `xtask appliance --only gateway --binaries <dir of DSTACK_GATEWAY_BIN> --out <out> --set …`, then its
/// `appliances.json`.
pub fn package(inputs: &GatewayCvmInputs, out: &Path, sets: &[(&str, String)]) -> Result<PackagedGateway, StackError> {
    package_appliance("gateway", &inputs.gateway_bin, inputs.xtask.as_deref(), out, sets)
}

/// `xtask appliance --only <key> --binaries <dir holding binary as dstack-<key>> --out <out> --set <key>.…`,
/// then `appliances.json`'s `<key>` entry and the files under `<out>/<key>` (`xtask` as in
/// [`GatewayCvmInputs::xtask`]). Used for the `gateway` and `kms` appliances.
pub fn package_appliance(
    key: &str,
    binary: &Path,
    xtask: Option<&Path>,
    out: &Path,
    sets: &[(&str, String)],
) -> Result<PackagedGateway, StackError> {
    // `--binaries` takes a directory holding `dstack-<key>`.
    let bin_name = format!("dstack-{key}");
    let bins = out.with_extension("bin");
    std::fs::create_dir_all(&bins).map_err(|e| failed("appliance binaries directory", e))?;
    let link = bins.join(&bin_name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(binary, &link).map_err(|e| failed(&format!("linking {bin_name}"), e))?;
    std::fs::create_dir_all(out).map_err(|e| failed("appliance directory", e))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = match xtask {
        Some(x) => Command::new(x),
        None => {
            let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            c.args(["run", "--quiet", "--locked", "-p", "xtask", "--"]);
            c
        }
    };
    cmd.current_dir(&root).args(["appliance", "--only", key, "--binaries"]);
    cmd.arg(&bins).arg("--out").arg(out);
    for (name, value) in sets {
        cmd.arg("--set").arg(format!("{key}.{name}={value}"));
    }
    let output = cmd.output().map_err(|e| failed("running xtask appliance", e))?;
    if !output.status.success() {
        return Err(failed(
            &format!("xtask appliance --only {key}"),
            format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        ));
    }
    let published = std::fs::read(out.join("appliances.json")).map_err(|e| failed("appliances.json", e))?;
    let published: serde_json::Value = serde_json::from_slice(&published).map_err(|e| failed("appliances.json", e))?;
    let entry = &published[key];
    let field = |name: &str| -> Result<String, StackError> {
        entry[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| failed("appliances.json", format!("{key}.{name} missing")))
    };
    let dir = out.join(key);
    let app_compose = std::fs::read_to_string(dir.join("app-compose.json"))
        .map_err(|e| failed(&format!("{key} app-compose.json"), e))?;
    Ok(PackagedGateway {
        app_compose,
        compose_hash: field("compose_hash")?,
        app_id: field("app_id")?,
        image: field("image")?,
        dir,
    })
}

/// Pushes the appliance's OCI layout (`<dir>/oci`) under the repository its compose file names and checks the
/// registry's digest is the published one.
pub async fn push(registry_port: u16, pkg: &PackagedGateway) -> Result<(), StackError> {
    let key = pkg.dir.file_name().and_then(|n| n.to_str()).unwrap_or("appliance");
    let image =
        dstack_oci::read_layout(&pkg.dir.join("oci"), None).map_err(|e| failed(&format!("{key} OCI layout"), e))?;
    let (repo, digest) = pkg
        .image
        .split_once('@')
        .ok_or_else(|| failed(&format!("{key} image reference"), &pkg.image))?;
    let registry = dstack_oci::Registry::new(&format!("http://127.0.0.1:{registry_port}"))
        .map_err(|e| failed("registry client", e))?;
    let what = format!("pushing the {key} image");
    let pushed = registry
        .push_image(repo, "latest", &image)
        .await
        .map_err(|e| failed(&what, e))?;
    if pushed.to_string() != digest {
        return Err(failed(
            &what,
            format!("registry digest {pushed} is not the published {digest}"),
        ));
    }
    Ok(())
}

/// Phases of the gateway CVM's start, from `CreateVm`.
#[derive(Debug, Clone, Copy)]
pub struct GatewayTimings {
    /// Until its RPC port served its agent-issued certificate chain.
    pub rpc_up: Duration,
    /// Until its proxy answered (TLS alert for an unknown name).
    pub proxy_up: Duration,
}

/// The running gateway CVM.
pub struct GatewayCvm {
    pub vm_id: String,
    pub ports: CvmPorts,
    pub package: PackagedGateway,
    pub acme_root_pem: String,
    pub acme_root_path: PathBuf,
    /// Its RPC certificate chain (leaf first) as served.
    pub rpc_chain: Vec<CertificateDer<'static>>,
    /// The verification of its attestation ([`verify_gateway`]).
    pub attestation: Verdict,
    pub timings: GatewayTimings,
    _pebble: Pebble,
}

/// What [`launch`] checks the gateway against.
pub struct Expected<'a> {
    pub kms_root: &'a Path,
    pub sim_root: &'a Path,
    pub measurements: &'a Path,
}

/// Waits for the deployed gateway CVM `vm_id` (see the module docs). `info` polls the VM (boot error,
/// status, progress); `progress` gets each new progress line.
pub async fn launch<F, Fut>(
    prepared: Prepared,
    vm_id: String,
    expected: Expected<'_>,
    timeout: Duration,
    mut info: F,
    mut progress: impl FnMut(&str),
) -> Result<GatewayCvm, StackError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(String, String, String), StackError>>,
{
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let rpc = SocketAddr::from(([127, 0, 0, 1], prepared.ports.rpc));
    let mut shown = String::new();
    let mut last: String;
    let chain = loop {
        let (status, boot_progress, boot_error) = info().await?;
        if !boot_error.is_empty() {
            return Err(failed("the gateway CVM's boot", boot_error));
        }
        if boot_progress != shown {
            progress(&format!("[{:>6.1}s] {boot_progress}", t0.elapsed().as_secs_f64()));
            shown = boot_progress;
        }
        if status == "exited" || status == "stopped" {
            return Err(failed(
                "the gateway CVM",
                format!("status {status} before its RPC answered"),
            ));
        }
        match fetch_chain(rpc).await {
            Ok(chain) => break chain,
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(StackError::Timeout {
                what: "the gateway CVM's RPC certificate".into(),
                after: timeout,
                last: format!(" (boot progress {shown:?}, last {last})"),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rpc_up = t0.elapsed();
    progress(&format!(
        "[{:>6.1}s] RPC serves its agent-issued certificate",
        rpc_up.as_secs_f64()
    ));
    let os_image_hash = std::fs::read_to_string(expected.measurements.with_file_name("os_image_hash"))
        .map_err(|e| failed("the image's os_image_hash", e))?;
    let attestation = verify_gateway(&chain, &expected, os_image_hash.trim(), &prepared.package)?;

    // The proxy answers a name no app has with TLS's unrecognized_name alert: it is listening. (Its
    // certificate can only be seen through a registered app: the first request through it checks it.)
    let root =
        CertificateDer::from_pem_slice(prepared.acme_root_pem.as_bytes()).map_err(|e| failed("pebble root", e))?;
    let proxy = SocketAddr::from(([127, 0, 0, 1], prepared.ports.proxy));
    let probe = ServerName::try_from(format!("probe.{BASE_DOMAIN}")).map_err(|e| failed("probe name", e))?;
    loop {
        match tls_handshake(proxy, probe.clone(), &root).await {
            Ok(()) => break,
            Err(e) if e.contains("UnrecognisedName") => break,
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(StackError::Timeout {
                what: "the gateway CVM's proxy".into(),
                after: timeout,
                last: format!(" (last {last})"),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let proxy_up = t0.elapsed();
    progress(&format!(
        "[{:>6.1}s] proxy listening for *.{BASE_DOMAIN}",
        proxy_up.as_secs_f64()
    ));
    Ok(GatewayCvm {
        vm_id,
        ports: prepared.ports,
        package: prepared.package,
        acme_root_pem: prepared.acme_root_pem,
        acme_root_path: prepared.acme_root_path,
        rpc_chain: chain,
        attestation,
        timings: GatewayTimings { rpc_up, proxy_up },
        _pebble: prepared.pebble,
    })
}

impl GatewayCvm {
    /// `https://<app_id>-<port>.<base>:<proxy>/`.
    pub fn url(&self, app_id: &str, port: u16) -> String {
        format!("https://{}:{}/", crate::Gateway::host(app_id, port), self.ports.proxy)
    }

    /// The curl command that fetches the app through the gateway CVM from this host.
    pub fn curl(&self, app_id: &str, port: u16) -> String {
        format!(
            "curl --resolve {}:{}:127.0.0.1 --cacert {} {}",
            crate::Gateway::host(app_id, port),
            self.ports.proxy,
            self.acme_root_path.display(),
            self.url(app_id, port)
        )
    }

    /// `GET` through the gateway CVM's proxy with SNI `<app_id>-<port>.<base>`, verified against pebble's root.
    pub async fn get(&self, app_id: &str, port: u16, path: &str) -> Result<(u16, String), String> {
        let root = CertificateDer::from_pem_slice(self.acme_root_pem.as_bytes()).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(crate::Gateway::host(app_id, port)).map_err(|e| e.to_string())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.ports.proxy));
        let (status, body) = crate::gateway::https_get(addr, name, &root, path).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Records the server's chain and accepts it: [`fetch_chain`] verifies it afterwards, itself.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<CertificateDer<'static>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &ring().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ring().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ring().signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate chain the TLS server at `addr` presents (the gateway's RPC asks for a client certificate
/// we do not have: the handshake may then fail, after the chain arrived).
pub async fn fetch_chain(addr: SocketAddr) -> Result<Vec<CertificateDer<'static>>, String> {
    let recorder = Arc::new(Recorder::default());
    let cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(RPC_DOMAIN).map_err(|e| e.to_string())?;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await;
        Ok::<_, String>(())
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| "timed out".to_owned())??;
    let chain = std::mem::take(&mut *recorder.0.lock().unwrap_or_else(|p| p.into_inner()));
    if chain.is_empty() {
        return Err("no certificate received".into());
    }
    Ok(chain)
}

/// A TLS handshake with SNI `name` that verifies the server against `root` only.
async fn tls_handshake(
    addr: SocketAddr,
    name: ServerName<'static>,
    root: &CertificateDer<'static>,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| e.to_string())?;
    let cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map(drop)
            .map_err(|e| format!("TLS: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

fn row(what: &str, expected: impl Into<String>, actual: impl Into<String>) -> Check {
    let (expected, actual) = (expected.into(), actual.into());
    Check {
        what: what.into(),
        ok: expected == actual,
        expected,
        actual,
    }
}

fn verdict_row(what: &str, result: Result<String, String>) -> Check {
    let (ok, actual) = match result {
        Ok(a) => (true, a),
        Err(e) => (false, e),
    };
    Check {
        what: what.into(),
        expected: "valid".into(),
        actual,
        ok,
    }
}

/// Verifies the gateway CVM from its RPC certificate chain, as a relying party would: the chain to the KMS
/// root CA for `RPC_DOMAIN`; the leaf's RA-TLS quote (signature under the pinned simulator root, report data
/// binding the leaf's key, event log replaying to RTMR3); MRTD and RTMR0-2 against the image's published
/// measurements for the gateway's shape; the OS image hash; and the compose hash and app id from the
/// replayed events equal to the packaging's published ones.
pub fn verify_gateway(
    chain: &[CertificateDer<'static>],
    expected: &Expected<'_>,
    os_image_hash: &str,
    package: &PackagedGateway,
) -> Result<Verdict, StackError> {
    let leaf = chain.first().ok_or_else(|| failed("gateway chain", "empty"))?;
    let mut checks = Vec::new();

    let kms_root = std::fs::read(expected.kms_root).map_err(|e| failed("KMS root CA", e))?;
    let kms_root = CertificateDer::from_pem_slice(&kms_root).map_err(|e| failed("KMS root CA", e))?;
    checks.push(verdict_row(
        "RPC chain → KMS root CA",
        chain_to_root(chain, kms_root).map(|()| format!("{} certificates, name {RPC_DOMAIN}", chain.len())),
    ));

    let sim_root = std::fs::read(expected.sim_root).map_err(|e| failed("simulator root", e))?;
    let pin = SimRootPin::parse(&sim_root).map_err(|e| failed("simulator root", e))?;
    let verifier = AttestationVerifier::new(AttestationPolicy {
        allow_simulated: true,
        simulated_roots: vec![pin],
        ..Default::default()
    });
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| failed("clock", e))?
        .as_secs();
    let identity = match verifier.verify_cert(leaf, now) {
        Ok(Some(id)) => id,
        Ok(None) => return Err(failed("gateway RPC certificate", "carries no attestation")),
        Err(e) => return Err(failed("gateway RPC certificate attestation", e)),
    };
    checks.push(verdict_row(
        "RA-TLS quote, key binding, RTMR3 replay",
        Ok(format!("{} (simulated: {})", identity.tcb_status, identity.simulated)),
    ));

    // The published measurements for the gateway's shape.
    let cert = parse_cert(leaf).map_err(|e| failed("gateway RPC certificate", e))?;
    let quote_raw = cert.quote.unwrap_or_default();
    let quote = Quote::parse(&quote_raw).map_err(|e| failed("gateway quote", e))?;
    let events = parse_json_log(cert.event_log.as_deref().unwrap_or_default()).map_err(|e| failed("event log", e))?;
    let published = std::fs::read(expected.measurements).map_err(|e| failed("measurements.json", e))?;
    let published = MeasurementsJson::parse(&published).map_err(|e| failed("measurements.json", e))?;
    let extras = AttestationExtras {
        events: Some(&events),
        vcpus: Some(VCPUS),
        memory_bytes: Some(u64::from(MEMORY_MB) << 20),
        os_image_hash: Some(hex::encode(&identity.os_image_hash)),
    };
    for r in diff(&published, &quote.report, &extras).rows {
        checks.push(Check {
            what: r.register,
            ok: r.matches,
            expected: r.expected,
            actual: r.actual,
        });
    }
    checks.push(row(
        "os_image_hash = the image's",
        os_image_hash,
        hex::encode(&identity.os_image_hash),
    ));
    checks.push(row(
        "compose hash = published",
        package.compose_hash.as_str(),
        hex::encode(&identity.compose_hash),
    ));
    checks.push(row(
        "app id = published",
        package.app_id.as_str(),
        hex::encode(&identity.app_id),
    ));
    Ok(Verdict {
        tcb_status: identity.tcb_status.to_string(),
        checks,
    })
}

/// webpki path validation of `chain` (leaf first) to `root` for [`RPC_DOMAIN`], now.
fn chain_to_root(chain: &[CertificateDer<'static>], root: CertificateDer<'static>) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).map_err(|e| e.to_string())?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring())
        .build()
        .map_err(|e| e.to_string())?;
    let (leaf, rest) = chain.split_first().ok_or("empty chain")?;
    let name = ServerName::try_from(RPC_DOMAIN).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
        .map(drop)
        .map_err(|e| e.to_string())
}
