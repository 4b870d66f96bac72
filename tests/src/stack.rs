//! Starting and driving the stack: registry, KMS, VM manager, deployed apps.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack_host_vmm::manager::backend::TcgBackend;
use dstack_host_vmm::manager::{Manager, VmmApi, VmmConfig};
use dstack_keys::EnvVar;
use dstack_rpc::LocalTransport;
use dstack_rpc::vmm::{Id, PortMapping, VmConfiguration, VmInfo, VmmClient, VmmServer};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::gateway::{Gateway, GatewayIdentity, GatewayPorts};
use crate::gateway_cvm::{self, CvmPorts, GatewayCvm, GatewayCvmInputs, Prepared};

/// The guest image's name inside the VM manager's image directory.
pub const IMAGE_NAME: &str = "dstack-dev";
/// Repository of the demo app in the local registry (a docker.io-style name: the CVM's dockerd pulls it
/// through the registry mirror the VM manager configures).
pub const APP_REPO: &str = "dstack-demo/hello";
/// The port the demo app listens on inside its container.
pub const APP_PORT: u16 = 8080;

/// Errors starting or driving the stack; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("missing input {what}: {hint}")]
    Missing { what: String, hint: String },
    #[error("{what}: {reason}")]
    Failed { what: String, reason: String },
    #[error("timed out after {after:?} waiting for {what}{last}")]
    Timeout {
        what: String,
        after: Duration,
        last: String,
    },
}

fn failed(what: impl Into<String>) -> impl FnOnce(String) -> StackError {
    let what = what.into();
    move |reason| StackError::Failed { what, reason }
}

/// Everything the stack runs, located from the environment (see the crate docs).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub image_dir: PathBuf,
    pub demo_app_bin: PathBuf,
    pub vhost_vsock: PathBuf,
    pub registry: PathBuf,
    pub qemu: PathBuf,
    pub mkfs_erofs: PathBuf,
}

/// What a test does when an input is missing: fail under `DSTACK_REQUIRE_FIXTURES=1`, otherwise print that it
/// is skipped and why.
pub fn skip_or_fail(test: &str, e: &StackError) {
    assert_ne!(
        std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
        Ok("1"),
        "{test}: {e}"
    );
    eprintln!("SKIPPED {test}: {e}");
}

impl Inputs {
    /// [`Inputs::from_env`] for `test`, or `None` after [`skip_or_fail`].
    pub fn for_test(test: &str) -> Option<Self> {
        Self::from_env().map_err(|e| skip_or_fail(test, &e)).ok()
    }

    pub fn from_env() -> Result<Self, StackError> {
        let path = |var: &str, hint: &str| -> Result<PathBuf, StackError> {
            std::env::var_os(var)
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .ok_or_else(|| StackError::Missing {
                    what: var.to_owned(),
                    hint: hint.to_owned(),
                })
        };
        let image_dir = path(
            "DSTACK_E2E_IMAGE",
            "an image directory built by `dstack-image-build build`",
        )?;
        let demo_app_bin = path("DSTACK_DEMO_APP_BIN", "the static dstack-demo-app binary")?;
        let vhost_vsock = path("VHOST_DEVICE_VSOCK", "cargo install vhost-device-vsock --version 0.3.0")?;
        let registry = std::env::var_os("DSTACK_DOCKER_REGISTRY")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/docker-registry".into());
        if !registry.exists() {
            return Err(StackError::Missing {
                what: registry.display().to_string(),
                hint: "apt-get install docker-registry".into(),
            });
        }
        Ok(Self {
            image_dir,
            demo_app_bin,
            vhost_vsock,
            registry,
            qemu: "qemu-system-x86_64".into(),
            mkfs_erofs: "mkfs.erofs".into(),
        })
    }
}

/// How the KMS is configured.
#[derive(Debug, Clone, Copy)]
pub struct KmsOptions {
    /// Accept quotes of the VM manager's simulated TDX module (pinned root). Without it every simulated
    /// CVM is refused.
    pub allow_simulated: bool,
    /// Check the quote's MRTD/RTMR0-2 against the image the CVM claims (the image is in the KMS's cache).
    pub verify_image: bool,
}

impl Default for KmsOptions {
    fn default() -> Self {
        Self {
            allow_simulated: true,
            verify_image: true,
        }
    }
}

/// An app to deploy.
#[derive(Debug, Clone)]
pub struct AppSpec {
    pub name: String,
    /// docker-compose.yaml text.
    pub compose: String,
    /// Env vars, encrypted against the KMS's per-app key before they leave this process.
    pub env: Vec<(String, String)>,
    /// Host port mapped to the app's port.
    pub host_port: u16,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_gb: u32,
    /// Register with the stack's gateway (app-compose `gateway_enabled`); needs [`Stack::start_with_gateway`].
    pub gateway: bool,
    /// The guest image (a directory name under the VM manager's `images/`; default [`IMAGE_NAME`]).
    pub image: String,
}

impl AppSpec {
    /// The demo app: the registry image, the agent socket mounted, `GREETING` from the encrypted env.
    pub fn demo(image_ref: &str, greeting: &str, host_port: u16) -> Self {
        let compose = format!(
            "services:\n  web:\n    image: {image_ref}\n    ports: [\"{APP_PORT}:{APP_PORT}\"]\n    volumes: \
             [\"/var/run/dstack.sock:/var/run/dstack.sock\"]\n    environment:\n      GREETING: \"${{GREETING}}\"\n"
        );
        Self {
            name: "demo".into(),
            compose,
            env: vec![("GREETING".into(), greeting.into())],
            host_port,
            vcpus: 2,
            memory_mb: 2048,
            disk_gb: 2,
            gateway: false,
            image: IMAGE_NAME.into(),
        }
    }

    /// `app-compose.json` as dstack's vmm-cli writes it for a KMS app.
    pub fn app_compose(&self) -> String {
        let allowed: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        serde_json::json!({
            "manifest_version": 2,
            "name": self.name,
            "runner": "docker-compose",
            "docker_compose_file": self.compose,
            "kms_enabled": true,
            "gateway_enabled": self.gateway,
            "local_key_provider_enabled": false,
            "key_provider": "kms",
            "public_logs": true,
            "public_sysinfo": true,
            "allowed_envs": allowed,
            "no_instance_id": false,
            "secure_time": false,
        })
        .to_string()
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> Result<u16, StackError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("picking a free port")(e.to_string()))
}

/// Polls `f` every 200 ms until it returns `Some`, or fails with the last note it produced.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, StackError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(v) => return Ok(v),
            Err(note) => note,
        };
        if Instant::now() >= deadline {
            return Err(StackError::Timeout {
                what: what.to_owned(),
                after: timeout,
                last: if last.is_empty() {
                    last
                } else {
                    format!(" (last: {last})")
                },
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET http://127.0.0.1:<port><path>` → (status, body). Plain HTTP/1.1, `Connection: close`.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((status, body.to_owned()))
}

type Vmm = VmmClient<LocalTransport>;

/// The running stack. Dropping it stops every VM, the KMS and the registry.
pub struct Stack {
    pub dir: PathBuf,
    pub inputs: Inputs,
    registry: Child,
    pub registry_port: u16,
    /// The demo app image reference CVMs pull (pinned by digest, so the compose hash covers the code).
    pub app_image: String,
    kms: Option<JoinHandle<()>>,
    pub kms_port: u16,
    pub kms_options: KmsOptions,
    pub mgr: Arc<Manager>,
    vmm: Vmm,
    monitor: JoinHandle<()>,
    gateway_identity: Option<GatewayIdentity>,
    /// The gateway, when started with [`Stack::start_with_gateway`].
    pub gateway: Option<Gateway>,
    /// The gateway CVM, when started with [`Stack::start_with_gateway_cvm`].
    pub gateway_cvm: Option<GatewayCvm>,
    /// The gateway appliance's app id (`gateway_app_id` in the KMS's dev policy) in CVM mode.
    gateway_cvm_app_id: Option<String>,
}

/// Which gateway a stack runs.
enum GatewayKind {
    None,
    /// In-process on the host with a simulated identity ([`crate::gateway`]).
    Host,
    /// The appliance in a CVM ([`crate::gateway_cvm`]).
    Cvm(GatewayCvmInputs),
}

impl Stack {
    /// Starts the registry (and pushes the demo app), the VM manager and the KMS under `dir`.
    pub async fn start(dir: &Path, inputs: Inputs, kms_options: KmsOptions) -> Result<Self, StackError> {
        Self::start_inner(dir, inputs, kms_options, GatewayKind::None)
            .await
            .map(|(s, _)| s)
    }

    /// [`Stack::start`] plus the gateway (see [`crate::gateway`]): pebble, the gateway's KMS-issued RPC
    /// certificate, WireGuard and the proxy; CVMs get its URL in `gateway_urls`. The KMS runs without OS image
    /// verification (the gateway's simulated identity has no image; see the gateway module docs).
    pub async fn start_with_gateway(dir: &Path, inputs: Inputs, kms_options: KmsOptions) -> Result<Self, StackError> {
        Self::start_inner(dir, inputs, kms_options, GatewayKind::Host)
            .await
            .map(|(s, _)| s)
    }

    /// [`Stack::start`] plus the gateway appliance as a CVM (see [`crate::gateway_cvm`]): packaged and pushed,
    /// the KMS told its app id, deployed, waited for (each new boot progress line goes to `progress`) and its
    /// attestation verified ([`GatewayCvm::attestation`]; the stack starts even when a check fails: callers
    /// decide). CVMs get its forwarded RPC port in `gateway_urls`. The KMS may verify OS images
    /// (`kms_options.verify_image`): the gateway CVM boots from the same image as the apps.
    pub async fn start_with_gateway_cvm(
        dir: &Path,
        inputs: Inputs,
        kms_options: KmsOptions,
        gateway: GatewayCvmInputs,
        progress: impl FnMut(&str),
    ) -> Result<Self, StackError> {
        let (mut stack, prepared) = Self::start_inner(dir, inputs, kms_options, GatewayKind::Cvm(gateway)).await?;
        let prepared = prepared.ok_or_else(|| failed("gateway CVM")("not prepared".into()))?;
        let gw = stack.launch_gateway_cvm(prepared, progress).await?;
        stack.gateway_cvm = Some(gw);
        Ok(stack)
    }

    async fn launch_gateway_cvm(
        &self,
        prepared: Prepared,
        progress: impl FnMut(&str),
    ) -> Result<GatewayCvm, StackError> {
        let p = prepared.ports;
        let port = |protocol: &str, host: u16, vm: u32| PortMapping {
            protocol: protocol.into(),
            host_port: u32::from(host),
            vm_port: vm,
            host_address: "127.0.0.1".into(),
        };
        let req = VmConfiguration {
            name: "dstack-gateway".into(),
            image: IMAGE_NAME.into(),
            compose_file: prepared.package.app_compose.clone(),
            vcpu: gateway_cvm::VCPUS,
            memory: gateway_cvm::MEMORY_MB,
            disk_size: 2,
            ports: vec![
                port("tcp", p.rpc, 8000),
                port("tcp", p.proxy, 443),
                port("udp", p.wg, 51820),
            ],
            ..Default::default()
        };
        let id = self
            .vmm
            .create_vm(req)
            .await
            .map_err(|e| failed("CreateVm (gateway)")(e.to_string()))?
            .id;
        let (kms_root, sim_root) = (self.dir.join("kms-certs/root-ca.crt"), self.sim_root());
        let measurements = self.inputs.image_dir.join("measurements.json");
        let expected = gateway_cvm::Expected {
            kms_root: &kms_root,
            sim_root: &sim_root,
            measurements: &measurements,
        };
        let poll = || async {
            let i = self.info(&id).await?;
            Ok((i.status, i.boot_progress, i.boot_error))
        };
        let result =
            gateway_cvm::launch(prepared, id.clone(), expected, Duration::from_secs(900), poll, progress).await;
        result.map_err(|e| match e {
            StackError::Failed { what, reason } => StackError::Failed {
                what,
                reason: format!("{reason}; serial tail:\n{}", tail(&self.serial_log(&id), 40)),
            },
            other => other,
        })
    }

    async fn start_inner(
        dir: &Path,
        inputs: Inputs,
        kms_options: KmsOptions,
        gateway_kind: GatewayKind,
    ) -> Result<(Self, Option<Prepared>), StackError> {
        let gateway = matches!(gateway_kind, GatewayKind::Host);
        if gateway && kms_options.verify_image {
            return Err(failed("stack options")(
                "the gateway's simulated identity has no OS image: use verify_image = false with the gateway".into(),
            ));
        }
        if !matches!(gateway_kind, GatewayKind::None) {
            crate::pebble::binaries()?;
        }
        std::fs::create_dir_all(dir.join("images"))
            .map_err(|e| failed("creating the work directory")(e.to_string()))?;
        let image_link = dir.join("images").join(IMAGE_NAME);
        if !image_link.exists() {
            std::os::unix::fs::symlink(&inputs.image_dir, &image_link)
                .map_err(|e| failed("linking the guest image")(e.to_string()))?;
        }
        let (registry, registry_port) = start_registry(dir, &inputs.registry).await?;
        let app_image = push_demo_app(&inputs.demo_app_bin, registry_port).await?;

        let kms_port = free_port()?;
        let gw_ports = if gateway { Some(GatewayPorts::pick()?) } else { None };
        let cvm_ports = match gateway_kind {
            GatewayKind::Cvm(_) => Some(CvmPorts::pick()?),
            _ => None,
        };
        let gateway_urls = gw_ports
            .map(|p| p.guest_url())
            .or(cvm_ports.map(|p| p.guest_url()))
            .map(|u| format!("\"{u}\""))
            .unwrap_or_default();
        let cfg = VmmConfig::parse(&format!(
            "address = \"unix:{dir}/vmm.sock\"\n[image]\npath = \"{dir}/images\"\n[cvm]\nbackend = \"tcg\"\n\
             run_path = \"{dir}/run/vm\"\nkms_urls = [\"https://10.0.2.2:{kms_port}\"]\n\
             gateway_urls = [{gateway_urls}]\n\
             docker_registry = \"http://10.0.2.2:{registry_port}\"\n\
             [cvm.port_mapping]\nenabled = true\naddress = \"127.0.0.1\"\n\
             range = [{{ protocol = \"tcp\", from = 1024, to = 65535 }}, \
             {{ protocol = \"udp\", from = 1024, to = 65535 }}]\n",
            dir = dir.display()
        ))
        .map_err(|e| failed("VM manager configuration")(e.to_string()))?;
        let backend = TcgBackend {
            qemu: inputs.qemu.clone(),
            vhost_vsock: inputs.vhost_vsock.clone(),
            mkfs_erofs: inputs.mkfs_erofs.clone(),
            net: cfg.cvm.networking.net.clone(),
            dhcp_start: cfg.cvm.networking.dhcp_start.clone(),
        };
        let mgr = Manager::open(cfg, Box::new(backend)).map_err(|e| failed("opening the VM manager")(e.to_string()))?;
        let monitor = mgr.spawn_monitor();
        let vmm = VmmClient::new(LocalTransport::new(VmmServer::new(VmmApi::new(mgr.clone()))));
        let mut stack = Self {
            dir: dir.to_owned(),
            inputs,
            registry,
            registry_port,
            app_image,
            kms: None,
            kms_port,
            kms_options,
            mgr,
            vmm,
            monitor,
            gateway_identity: if gateway {
                Some(GatewayIdentity::new(dir)?)
            } else {
                None
            },
            gateway: None,
            gateway_cvm: None,
            gateway_cvm_app_id: None,
        };
        // The gateway appliance is packaged for this run before the KMS starts: the KMS names its app id.
        let prepared = match (&gateway_kind, cvm_ports) {
            (GatewayKind::Cvm(gw_inputs), Some(ports)) => {
                let signer = dstack_sim_tdx::ensure_signer(&stack.mgr.config.sim_tdx_state_dir())
                    .map_err(|e| failed("the VM manager's simulator root")(e.to_string()))?;
                let p =
                    gateway_cvm::prepare(dir, gw_inputs, ports, registry_port, signer.root_pin_spki_sha256()).await?;
                stack.gateway_cvm_app_id = Some(p.package.app_id.clone());
                Some(p)
            }
            _ => None,
        };
        stack.start_kms(kms_options).await?;
        if let (Some(ports), Some(id)) = (gw_ports, &stack.gateway_identity) {
            let gw = Gateway::start(
                dir,
                ports,
                id,
                stack.kms_port,
                &dir.join("kms-certs/root-ca.crt"),
                &stack.sim_root(),
            )
            .await?;
            stack.gateway = Some(gw);
        }
        Ok((stack, prepared))
    }

    /// The simulated TDX module's root certificate (what verifiers pin to accept this host's CVMs).
    pub fn sim_root(&self) -> PathBuf {
        self.mgr.config.sim_tdx_state_dir().join("sim-root.pem")
    }

    /// (Re)starts the in-process KMS with `options` on the same port and key directory.
    pub async fn start_kms(&mut self, options: KmsOptions) -> Result<(), StackError> {
        if let Some(old) = self.kms.take() {
            old.abort();
            let _ = old.await;
        }
        let image_cache = self.dir.join("kms-image-cache");
        let hash = std::fs::read_to_string(self.inputs.image_dir.join("os_image_hash"))
            .map_err(|e| failed("reading the image's os_image_hash")(e.to_string()))?;
        let cached = image_cache.join("images").join(hash.trim());
        if !cached.exists() {
            std::fs::create_dir_all(image_cache.join("images"))
                .map_err(|e| failed("KMS image cache")(e.to_string()))?;
            std::os::unix::fs::symlink(&self.inputs.image_dir, &cached)
                .map_err(|e| failed("KMS image cache")(e.to_string()))?;
        }
        // With the gateway: its simulator root is pinned too, and the dev policy names its app.
        let (gw_root, gw_app) = match (&self.gateway_identity, &self.gateway_cvm_app_id) {
            (Some(g), _) => (format!(", \"{}\"", g.sim_root.display()), hex::encode(g.app_id)),
            // The gateway CVM is attested by the VM manager's simulator like any CVM.
            (None, Some(app_id)) => (String::new(), app_id.clone()),
            (None, None) => (String::new(), String::new()),
        };
        let toml = format!(
            "[rpc]\naddress = \"127.0.0.1\"\nport = {port}\n[core]\ncert_dir = \"{dir}/kms-certs\"\ntee = \"none\"\n\
             attest_rpc_cert = false\n[core.attestation]\nallow_simulated = {sim}\nsimulated_roots = [\"{root}\"{gw_root}]\n\
             [core.auth_api]\ntype = \"dev\"\ndev.gateway_app_id = \"{gw_app}\"\n[core.onboard]\nauto_bootstrap_domain = \"kms.local\"\n\
             [core.image]\nverify = {verify}\ncache_dir = \"{cache}\"\n",
            port = self.kms_port,
            dir = self.dir.display(),
            sim = options.allow_simulated,
            root = self.sim_root().display(),
            verify = options.verify_image,
            cache = image_cache.display(),
        );
        let config = dstack_kms::KmsConfig::from_toml(&toml).map_err(|e| failed("KMS configuration")(e.to_string()))?;
        let kms = dstack_kms::Kms::new(config).map_err(|e| failed("starting the KMS")(e.to_string()))?;
        self.kms = Some(tokio::spawn(async move {
            if let Err(e) = kms.run().await {
                tracing::error!("KMS stopped: {e}");
            }
        }));
        self.kms_options = options;
        let port = self.kms_port;
        wait_until("the KMS to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Whether a gateway (host or CVM) runs in this stack.
    pub fn has_gateway(&self) -> bool {
        self.gateway.is_some() || self.gateway_cvm.is_some()
    }

    /// `GET` through the stack's gateway (the CVM one if any) with SNI `<app_id>-<port>.<base>`.
    pub async fn gateway_get(&self, app_id: &str, port: u16, path: &str) -> Result<(u16, String), String> {
        match (&self.gateway_cvm, &self.gateway) {
            (Some(g), _) => g.get(app_id, port, path).await,
            (None, Some(g)) => g.get(app_id, port, path).await,
            (None, None) => Err("no gateway in this stack".into()),
        }
    }

    /// The app's URL through the stack's gateway and the curl command that fetches it from this host.
    pub fn gateway_url(&self, app_id: &str, port: u16) -> Option<(String, String)> {
        match (&self.gateway_cvm, &self.gateway) {
            (Some(g), _) => Some((g.url(app_id, port), g.curl(app_id, port))),
            (None, Some(g)) => Some((g.url(app_id, port), g.curl(app_id, port))),
            (None, None) => None,
        }
    }

    /// The KMS URL as seen from this host.
    pub fn kms_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.kms_port)
    }

    /// Encrypts the env, then creates and starts the CVM. Returns the VM id.
    pub async fn deploy(&self, app: &AppSpec) -> Result<String, StackError> {
        let app_compose = app.app_compose();
        let app_id_hex = hex::encode(&Sha256::digest(app_compose.as_bytes())[..20]);
        let encrypted_env = if app.env.is_empty() {
            Vec::new()
        } else {
            let kms = dstack_host_vmm::cli::kms::kms_client(&self.kms_url())
                .map_err(|e| failed("KMS client")(e.to_string()))?;
            let meta = kms.get_meta().await.map_err(|e| failed("KMS GetMeta")(e.to_string()))?;
            // The env key must be signed by this KMS's k256 root: pin it.
            let pin = vec![hex::encode(&meta.k256_pubkey)];
            let (pubkey, _signer) = dstack_host_vmm::cli::kms::fetch_env_pubkey(&self.kms_url(), &app_id_hex, &pin)
                .await
                .map_err(|e| failed("fetching the app's env encryption key")(e.to_string()))?;
            let vars: Vec<EnvVar> = app.env.iter().map(|(k, v)| EnvVar::new(k.clone(), v.clone())).collect();
            dstack_keys::encrypt_env(&pubkey, &vars).map_err(|e| failed("encrypting the env")(e.to_string()))?
        };
        let req = VmConfiguration {
            name: app.name.clone(),
            image: app.image.clone(),
            compose_file: app_compose,
            vcpu: app.vcpus,
            memory: app.memory_mb,
            disk_size: app.disk_gb,
            ports: vec![PortMapping {
                protocol: "tcp".into(),
                host_port: u32::from(app.host_port),
                vm_port: u32::from(APP_PORT),
                host_address: "127.0.0.1".into(),
            }],
            encrypted_env,
            ..Default::default()
        };
        let id = self
            .vmm
            .create_vm(req)
            .await
            .map_err(|e| failed("CreateVm")(e.to_string()))?;
        Ok(id.id)
    }

    pub async fn info(&self, id: &str) -> Result<VmInfo, StackError> {
        let r = self
            .vmm
            .get_info(Id { id: id.to_owned() })
            .await
            .map_err(|e| failed("GetInfo")(e.to_string()))?;
        r.info.ok_or_else(|| failed("GetInfo")(format!("no VM {id}")))
    }

    pub async fn stop(&self, id: &str) -> Result<(), StackError> {
        self.vmm
            .stop_vm(Id { id: id.to_owned() })
            .await
            .map(drop)
            .map_err(|e| failed("StopVm")(e.to_string()))
    }

    pub async fn start_vm(&self, id: &str) -> Result<(), StackError> {
        self.vmm
            .start_vm(Id { id: id.to_owned() })
            .await
            .map(drop)
            .map_err(|e| failed("StartVm")(e.to_string()))
    }

    /// The CVM's serial console log.
    pub fn serial_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join("run/vm").join(id).join("serial.log")).unwrap_or_default()
    }

    /// Waits until the app answers `GET /` on its host port, reporting each new boot progress message.
    /// Fails early with the guest's own reason when it reports a boot error.
    pub async fn wait_app(
        &self,
        id: &str,
        port: u16,
        timeout: Duration,
        mut progress: impl FnMut(&str),
    ) -> Result<String, StackError> {
        let deadline = Instant::now() + timeout;
        let mut shown = String::new();
        loop {
            let info = self.info(id).await?;
            if !info.boot_error.is_empty() {
                return Err(failed("the CVM's boot")(info.boot_error));
            }
            if info.boot_progress != shown {
                shown = info.boot_progress.clone();
                progress(&shown);
            }
            if let Ok((200, body)) = http_get(port, "/") {
                return Ok(body);
            }
            if info.status == "exited" || info.status == "stopped" {
                return Err(failed("the CVM")(format!(
                    "status {} before the app answered; serial tail:\n{}",
                    info.status,
                    tail(&self.serial_log(id), 30)
                )));
            }
            if Instant::now() >= deadline {
                return Err(StackError::Timeout {
                    what: format!("the app on port {port}"),
                    after: timeout,
                    last: format!(
                        " (boot progress {shown:?}); serial tail:\n{}",
                        tail(&self.serial_log(id), 30)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the CVM reports a boot error and returns it.
    pub async fn wait_boot_error(&self, id: &str, timeout: Duration) -> Result<String, StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info(id).await?;
            if !info.boot_error.is_empty() {
                return Ok(info.boot_error);
            }
            if Instant::now() >= deadline {
                return Err(StackError::Timeout {
                    what: "a boot error".into(),
                    after: timeout,
                    last: format!(" (boot progress {:?})", info.boot_progress),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Stop every VM hard (the test or demo is over), then the services.
        for vm in self.mgr.snapshots() {
            let _ = self.mgr.stop(&vm.manifest.id, Duration::from_secs(2));
        }
        self.monitor.abort();
        if let Some(k) = self.kms.take() {
            k.abort();
        }
        let _ = self.registry.kill();
        let _ = self.registry.wait();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn start_registry(dir: &Path, bin: &Path) -> Result<(Child, u16), StackError> {
    let port = free_port()?;
    let storage = dir.join("registry");
    std::fs::create_dir_all(&storage).map_err(|e| failed("registry storage")(e.to_string()))?;
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .map_err(|e| failed("registry config")(e.to_string()))?;
    let log = std::fs::File::create(dir.join("registry.log")).map_err(|e| failed("registry log")(e.to_string()))?;
    let err = log.try_clone().map_err(|e| failed("registry log")(e.to_string()))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| failed(format!("starting {}", bin.display()))(e.to_string()))?;
    wait_until(
        "the registry to answer /v2/",
        Duration::from_secs(20),
        || match http_get(port, "/v2/") {
            Ok((200, _)) => Ok(()),
            Ok((s, _)) => Err(format!("HTTP {s}")),
            Err(e) => Err(e),
        },
    )
    .await?;
    Ok((child, port))
}

/// Packages the demo app as a reproducible OCI image, pushes it and returns `repo@digest`.
async fn push_demo_app(bin: &Path, port: u16) -> Result<String, StackError> {
    let binary = std::fs::read(bin).map_err(|e| failed(format!("reading {}", bin.display()))(e.to_string()))?;
    let image = dstack_oci::build(&dstack_oci::ImageSpec {
        binary,
        env: vec![format!("PORT={APP_PORT}")],
        ports: vec![APP_PORT],
        epoch: 0,
        media: dstack_oci::MediaTypes::Docker,
    })
    .map_err(|e| failed("building the demo app image")(e.to_string()))?;
    let registry = dstack_oci::Registry::new(&format!("http://127.0.0.1:{port}"))
        .map_err(|e| failed("registry client")(e.to_string()))?;
    let digest = registry
        .push_image(APP_REPO, "latest", &image)
        .await
        .map_err(|e| failed("pushing the demo app image")(e.to_string()))?;
    Ok(format!("{APP_REPO}@{digest}"))
}
