//! `vmm.toml`: the VM manager daemon's configuration. Every field has a documented default, so an empty file
//! is a valid configuration. Names follow dstack's `vmm.toml` where dstack has the concept (`[cvm]`
//! `cid_start`, `cid_pool_size`, `max_allocable_vcpu`, `max_allocable_memory_in_mb`, `[cvm.port_mapping]`,
//! `[cvm.auto_restart]`, `[cvm.log]`, `[auth]`, `[host_api]`); the rest is ours.
//!
//! ```toml
//! address = "unix:./vmm.sock"      # pRPC listener (unix socket)
//! tcp_address = "127.0.0.1:9080"   # optional TCP listener; requires [auth] tokens
//! [image]
//! path = "./images"                # one sub-directory per image (bzImage, initramfs.cpio.gz, metadata.json, …)
//! [cvm]
//! backend = "kvm"                  # "kvm" | "tcg" | "tdx" (real TDX; starts fail clearly without it)
//! run_path = "./run/vm"
//! cid_start = 1000
//! cid_pool_size = 1000
//! max_allocable_vcpu = 8
//! max_allocable_memory_in_mb = 16384
//! [cvm.networking]
//! mode = "user"                    # default mode: "user" | "bridge" (bridge needs [cvm.networking.bridge])
//! [cvm.networking.bridge]          # optional: a managed bridge (needs root / CAP_NET_ADMIN)
//! name = "dstackbr0"
//! address = "10.88.0.1/24"         # the host's address on the bridge: gateway and subnet of the VMs
//! dhcp_range = ["10.88.0.10", "10.88.0.250"]
//! isolate_vms = true               # VMs cannot reach each other (bridge ports `isolated on`)
//! nat = false                      # masquerade the subnet out of the host's uplink
//! nat_uplink = ""                  # with nat: only out of this interface (empty: any)
//! dnsmasq_path = "dnsmasq"
//! [cvm.port_mapping]
//! enabled = true
//! address = "127.0.0.1"
//! range = [{ protocol = "tcp", from = 1, to = 20000 }]
//! [cvm.auto_restart]
//! enabled = true
//! interval = 1.0
//! max_retries = 5
//! initial_backoff = 5.0
//! max_backoff = 300.0
//! reset_window = 300.0
//! [cvm.tdx]                       # only for backend = "tdx"
//! qgs_socket = "/var/run/tdx-qgs/qgs.socket"  # Intel QGS for GetQuote ("none": guests get QGS_UNAVAILABLE)
//! use_mrconfigid = true            # bind MRCONFIGID to the app config (V1/V2 as dstack's use_mrconfigid)
//! [cvm.log]
//! max_bytes = 10485760
//! max_backups = 3
//! [host_api]
//! port = 10000
//! [sim_tdx]
//! port = 10001
//! state_dir = "./run/vm/.sim-tdx"   # the host's simulated attestation key and sim-root.pem
//! [auth]
//! enabled = false
//! tokens = []
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors loading or checking `vmm.toml`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("vmm.toml {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmmConfig {
    /// pRPC listener: `unix:<path>` (default `unix:./vmm.sock`, dstack's default).
    pub address: String,
    /// Optional TCP listener (`host:port`); every call on it needs `Authorization: Bearer <token>`.
    pub tcp_address: Option<String>,
    /// Name reported by `HostApi.Info`.
    pub node_name: String,
    /// Guest events kept per VM (oldest dropped first).
    pub event_buffer_size: usize,
    pub image: ImageConfig,
    pub cvm: CvmConfig,
    pub host_api: HostApiConfig,
    pub sim_tdx: SimTdxConfig,
    pub auth: AuthConfig,
    pub gateway: GatewayConfig,
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            address: "unix:./vmm.sock".into(),
            tcp_address: None,
            node_name: String::new(),
            event_buffer_size: 20,
            image: ImageConfig::default(),
            cvm: CvmConfig::default(),
            host_api: HostApiConfig::default(),
            sim_tdx: SimTdxConfig::default(),
            auth: AuthConfig::default(),
            gateway: GatewayConfig::default(),
        }
    }
}

/// `[image]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// Directory holding one sub-directory per image (image-build's output layout). Default `./images`.
    pub path: PathBuf,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            path: "./images".into(),
        }
    }
}

/// Which hypervisor runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Our VMM (`dstack-vmm-run`) on /dev/kvm, with the simulated TDX module.
    Kvm,
    /// QEMU software emulation (`qemu-system-x86_64 -accel tcg`): development and CI only.
    Tcg,
    /// Our VMM launching Intel TDX guests (`manager::tdx_backend`); on a host without TDX every start fails
    /// with the capability error.
    Tdx,
}

/// `[cvm]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CvmConfig {
    /// Default `kvm`.
    pub backend: BackendKind,
    /// Per-VM work directories `<run_path>/<uuid>/`. Default `./run/vm`.
    pub run_path: PathBuf,
    /// `dstack-vmm-run` binary for the `kvm` backend (default: next to this executable, else `$PATH`).
    pub vmm_run_path: Option<PathBuf>,
    /// QEMU for the `tcg` backend. Default `qemu-system-x86_64`.
    pub qemu_path: PathBuf,
    /// vhost-user vsock daemon for the `tcg` backend. Default `vhost-device-vsock`.
    pub vhost_vsock_path: PathBuf,
    /// passt, the user-mode networking of the `kvm` backend (Debian `passt`). Default `passt`; empty: VMs get
    /// no network device and port mappings are refused.
    pub passt_path: PathBuf,
    /// Builds the read-only host-shared disk (erofs) from `shared/` at each start. Default `mkfs.erofs`.
    pub mkfs_erofs_path: PathBuf,
    /// First guest CID (≥ 3: 0–2 are reserved). Default 1000.
    pub cid_start: u32,
    /// Number of CIDs, which is also the VM count limit. Default 1000.
    pub cid_pool_size: u32,
    /// vCPUs summed over running VMs. Default: the host's CPU count.
    pub max_allocable_vcpu: u32,
    /// MB summed over running VMs. Default 16384.
    pub max_allocable_memory_in_mb: u32,
    /// Per-VM limits on requests (defaults 8 vCPUs, 65536 MB, 1024 GB).
    pub max_vcpu_per_vm: u32,
    pub max_memory_per_vm_mb: u32,
    pub max_disk_size_gb: u32,
    /// `RLIMIT_NOFILE` for VM processes. Default 4096.
    pub rlimit_nofile: u64,
    pub kms_urls: Vec<String>,
    pub gateway_urls: Vec<String>,
    pub pccs_url: Option<String>,
    pub docker_registry: Option<String>,
    pub networking: NetworkingConfig,
    pub port_mapping: PortMappingConfig,
    pub auto_restart: AutoRestartConfig,
    pub log: LogConfig,
    pub tdx: TdxCvmConfig,
}

/// `[cvm.tdx]`: options of the `tdx` backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TdxCvmConfig {
    /// Intel QGS unix socket handed to the VMM (`none` disables GetQuote). Default: the VMM's,
    /// `/var/run/tdx-qgs/qgs.socket`.
    pub qgs_socket: Option<PathBuf>,
    /// Launch each TD with the MRCONFIGID binding its app configuration (`tdx::mr_config`). Default true.
    pub use_mrconfigid: bool,
}

impl Default for TdxCvmConfig {
    fn default() -> Self {
        Self {
            qgs_socket: None,
            use_mrconfigid: true,
        }
    }
}

impl Default for CvmConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Kvm,
            run_path: "./run/vm".into(),
            vmm_run_path: None,
            qemu_path: "qemu-system-x86_64".into(),
            vhost_vsock_path: "vhost-device-vsock".into(),
            passt_path: "passt".into(),
            mkfs_erofs_path: "mkfs.erofs".into(),
            cid_start: 1000,
            cid_pool_size: 1000,
            max_allocable_vcpu: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            max_allocable_memory_in_mb: 16384,
            max_vcpu_per_vm: 8,
            max_memory_per_vm_mb: 65536,
            max_disk_size_gb: 1024,
            rlimit_nofile: 4096,
            kms_urls: Vec::new(),
            gateway_urls: Vec::new(),
            pccs_url: None,
            docker_registry: None,
            networking: NetworkingConfig::default(),
            port_mapping: PortMappingConfig::default(),
            auto_restart: AutoRestartConfig::default(),
            log: LogConfig::default(),
            tdx: TdxCvmConfig::default(),
        }
    }
}

/// `[cvm.networking]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkingConfig {
    /// Default mode for VMs that do not ask: `user` (default) or `bridge` (needs [`Self::bridge`]).
    pub mode: String,
    /// Guest subnet of user-mode networking. Default `10.0.2.0/24`.
    pub net: String,
    pub dhcp_start: String,
    /// The managed bridge; absent: bridge mode is refused.
    pub bridge: Option<BridgeConfig>,
}

impl Default for NetworkingConfig {
    fn default() -> Self {
        Self {
            mode: "user".into(),
            net: "10.0.2.0/24".into(),
            dhcp_start: "10.0.2.10".into(),
            bridge: None,
        }
    }
}

/// `[cvm.networking.bridge]`: a bridge the manager creates and owns, one tap per VM attached to it,
/// addresses by a dnsmasq DHCP server bound to the bridge (leases under `<run_path>/.bridge/`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    /// Interface name. Default `dstackbr0`.
    pub name: String,
    /// The host's address on the bridge with the prefix length, e.g. `10.88.0.1/24` (default): the VMs'
    /// gateway, and the subnet they get addresses in.
    pub address: String,
    /// First and last address handed out by DHCP. Default: `.10` to the last host address but one.
    pub dhcp_range: Option<[String; 2]>,
    /// DHCP lease time in seconds. Default 3600.
    pub lease_secs: u32,
    /// Keep VMs from reaching each other over the bridge (ports `isolated on`). Default true.
    pub isolate_vms: bool,
    /// Masquerade traffic from the subnet leaving the host (nftables table `dstack_<name>`, and
    /// `net.ipv4.ip_forward=1`). Default false.
    pub nat: bool,
    /// With `nat`: masquerade only out of this interface (empty: out of any interface but the bridge).
    pub nat_uplink: String,
    /// Default `dnsmasq` (Debian `dnsmasq-base`).
    pub dnsmasq_path: PathBuf,
    /// Default `ip` (iproute2).
    pub ip_path: PathBuf,
    /// Default `nft`.
    pub nft_path: PathBuf,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            name: "dstackbr0".into(),
            address: "10.88.0.1/24".into(),
            dhcp_range: None,
            lease_secs: 3600,
            isolate_vms: true,
            nat: false,
            nat_uplink: String::new(),
            dnsmasq_path: "dnsmasq".into(),
            ip_path: "ip".into(),
            nft_path: "nft".into(),
        }
    }
}

/// `[cvm.port_mapping]`: host ports a VM may forward (user networking only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortMappingConfig {
    pub enabled: bool,
    /// Host address used when a mapping leaves `host_address` empty. Default `127.0.0.1`.
    pub address: String,
    /// Allowed host-port ranges. Default: tcp and udp 1–20000 (dstack's example).
    pub range: Vec<PortRange>,
}

impl Default for PortMappingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: "127.0.0.1".into(),
            range: vec![
                PortRange {
                    protocol: "tcp".into(),
                    from: 1,
                    to: 20000,
                },
                PortRange {
                    protocol: "udp".into(),
                    from: 1,
                    to: 20000,
                },
            ],
        }
    }
}

/// One allowed range, inclusive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub protocol: String,
    pub from: u16,
    pub to: u16,
}

impl PortMappingConfig {
    /// Whether `protocol`/`port` lies in an allowed range.
    pub fn allows(&self, protocol: &str, port: u32) -> bool {
        self.enabled
            && self
                .range
                .iter()
                .any(|r| r.protocol == protocol && u32::from(r.from) <= port && port <= u32::from(r.to))
    }
}

/// `[cvm.auto_restart]`. Durations are seconds (fractions allowed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoRestartConfig {
    pub enabled: bool,
    /// How often VM processes are checked for exits and due restarts run. Default 1 s (dstack scans every 20 s;
    /// checking a PID is cheap, so we look more often).
    pub interval: f64,
    /// Restarts in a row before giving up (the VM then shows `exited`). Default 5.
    pub max_retries: u32,
    /// Delay before the first restart; doubled for each further one. Default 5 s.
    pub initial_backoff: f64,
    /// Cap on the delay. Default 300 s.
    pub max_backoff: f64,
    /// A VM that stayed up this long has its retry counter reset. Default 300 s.
    pub reset_window: f64,
}

impl Default for AutoRestartConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: 1.0,
            max_retries: 5,
            initial_backoff: 5.0,
            max_backoff: 300.0,
            reset_window: 300.0,
        }
    }
}

impl AutoRestartConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval)
    }
    pub fn reset_window(&self) -> Duration {
        Duration::from_secs_f64(self.reset_window)
    }
    /// Delay before restart number `attempt` (1-based): `initial · 2^(attempt-1)`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2f64.powi(attempt.saturating_sub(1).min(62) as i32);
        Duration::from_secs_f64((self.initial_backoff * factor).min(self.max_backoff))
    }
}

/// `[cvm.log]`: size-based rotation of `stdout.log`/`stderr.log` (copy to `.1`, …, then truncate).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Default 10 MiB.
    pub max_bytes: u64,
    /// Default 3.
    pub max_backups: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_bytes: 10 << 20,
            max_backups: 3,
        }
    }
}

/// `[host_api]`: the service guests reach at vsock CID 2 (the host).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostApiConfig {
    /// Default 10000 (dstack's).
    pub port: u32,
}

impl Default for HostApiConfig {
    fn default() -> Self {
        Self { port: 10000 }
    }
}

/// `[sim_tdx]`: the simulated TDX module each VM reaches at vsock CID 2.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimTdxConfig {
    /// Default 10001 (ours: next to the host API; dstack's QGS port 4050 carries a different protocol).
    pub port: u32,
    /// Where the host's one simulated attestation key lives (`sim-signer.pem`, 0600) with the root
    /// certificate verifiers pin (`sim-root.pem`). Default `<cvm.run_path>/.sim-tdx`.
    pub state_dir: Option<PathBuf>,
}

impl Default for SimTdxConfig {
    fn default() -> Self {
        Self {
            port: 10001,
            state_dir: None,
        }
    }
}

impl VmmConfig {
    /// The simulated TDX module's state directory (see [`SimTdxConfig::state_dir`]).
    pub fn sim_tdx_state_dir(&self) -> PathBuf {
        self.sim_tdx
            .state_dir
            .clone()
            .unwrap_or_else(|| self.cvm.run_path.join(".sim-tdx"))
    }
}

/// `[auth]`: bearer tokens for the TCP listener (the unix socket relies on file permissions).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub enabled: bool,
    pub tokens: Vec<String>,
}

/// `[gateway]`: reported by `GetMeta`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub base_domain: String,
    pub port: u32,
    pub agent_port: u32,
}

impl VmmConfig {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("vmm.toml"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let cvm = &self.cvm;
        if cvm.cid_start < 3 {
            return Err(invalid("cvm.cid_start", "must be ≥ 3 (CIDs 0–2 are reserved)"));
        }
        if cvm.cid_pool_size == 0 || cvm.cid_start.checked_add(cvm.cid_pool_size).is_none() {
            return Err(invalid(
                "cvm.cid_pool_size",
                "must be ≥ 1 and cid_start + size must fit in 32 bits",
            ));
        }
        for r in &cvm.port_mapping.range {
            if r.protocol != "tcp" && r.protocol != "udp" {
                return Err(invalid(
                    "cvm.port_mapping.range",
                    format!("protocol {:?}: tcp or udp", r.protocol),
                ));
            }
            if r.from == 0 || r.from > r.to {
                return Err(invalid(
                    "cvm.port_mapping.range",
                    format!("{}..{} is empty", r.from, r.to),
                ));
            }
        }
        match (cvm.networking.mode.as_str(), &cvm.networking.bridge) {
            ("user", _) | ("bridge", Some(_)) => {}
            ("bridge", None) => {
                return Err(invalid(
                    "cvm.networking.mode",
                    "\"bridge\" needs a [cvm.networking.bridge] section",
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "cvm.networking.mode",
                    format!("{other:?}: \"user\" or \"bridge\""),
                ));
            }
        }
        if let Some(b) = &cvm.networking.bridge {
            super::bridge::BridgePlan::from_config(b).map_err(|e| invalid("cvm.networking.bridge", e.to_string()))?;
        }
        let ar = &cvm.auto_restart;
        for (field, v) in [
            ("cvm.auto_restart.interval", ar.interval),
            ("cvm.auto_restart.initial_backoff", ar.initial_backoff),
            ("cvm.auto_restart.max_backoff", ar.max_backoff),
            ("cvm.auto_restart.reset_window", ar.reset_window),
        ] {
            if !(v.is_finite() && (0.0..=86400.0 * 365.0).contains(&v)) {
                return Err(invalid(field, format!("{v} is not a duration in seconds")));
            }
        }
        if ar.interval <= 0.0 {
            return Err(invalid("cvm.auto_restart.interval", "must be > 0"));
        }
        if self.host_api.port == self.sim_tdx.port {
            return Err(invalid("sim_tdx.port", "must differ from host_api.port"));
        }
        if self.auth.enabled && self.auth.tokens.iter().all(|t| t.is_empty()) {
            return Err(invalid("auth.tokens", "auth is enabled but no token is configured"));
        }
        if self.tcp_address.is_some() && !self.auth.enabled {
            return Err(invalid(
                "tcp_address",
                "a TCP listener needs [auth] enabled = true with tokens",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = VmmConfig::parse("").unwrap();
        assert_eq!(c.address, "unix:./vmm.sock");
        assert_eq!(c.cvm.backend, BackendKind::Kvm);
        assert_eq!((c.cvm.cid_start, c.cvm.cid_pool_size), (1000, 1000));
        assert_eq!(c.host_api.port, 10000);
        assert_eq!(c.sim_tdx.port, 10001);
        assert!(c.cvm.port_mapping.allows("tcp", 8080));
        assert!(!c.cvm.port_mapping.allows("tcp", 30000));
        assert!(!c.cvm.port_mapping.allows("sctp", 80));
    }

    #[test]
    fn tdx_backend_parses() {
        // The host check happens when the backend is built (`manager::tdx_backend`), not here.
        let c = VmmConfig::parse("[cvm]\nbackend = \"tdx\"\n").unwrap();
        assert_eq!(c.cvm.backend, BackendKind::Tdx);
        assert_eq!((c.cvm.tdx.qgs_socket.as_ref(), c.cvm.tdx.use_mrconfigid), (None, true));
        let c = VmmConfig::parse("[cvm.tdx]\nqgs_socket = \"/run/qgs.sock\"\nuse_mrconfigid = false\n").unwrap();
        assert_eq!(c.cvm.tdx.qgs_socket, Some(PathBuf::from("/run/qgs.sock")));
        assert!(!c.cvm.tdx.use_mrconfigid);
        assert!(
            VmmConfig::parse("[cvm.tdx]\nqgs_port = 4050\n").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn bad_values_refused() {
        for (text, field) in [
            ("[cvm]\ncid_start = 2\n", "cid_start"),
            ("[cvm]\ncid_pool_size = 0\n", "cid_pool_size"),
            (
                "[cvm.port_mapping]\nrange = [{protocol=\"tcp\", from=10, to=5}]\n",
                "range",
            ),
            ("tcp_address = \"127.0.0.1:1\"\n", "tcp_address"),
            ("[auth]\nenabled = true\n", "auth.tokens"),
            ("[cvm]\nbogus = 1\n", "bogus"),
            ("[cvm.networking]\nmode = \"bridge\"\n", "[cvm.networking.bridge]"),
            ("[cvm.networking]\nmode = \"tap\"\n", "cvm.networking.mode"),
            (
                "[cvm.networking.bridge]\naddress = \"10.88.0.0/24\"\n",
                "cvm.networking.bridge",
            ),
        ] {
            let e = VmmConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let ar = AutoRestartConfig {
            initial_backoff: 2.0,
            max_backoff: 10.0,
            ..Default::default()
        };
        let secs: Vec<u64> = (1..=5).map(|n| ar.backoff(n).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 10, 10]);
    }
}
