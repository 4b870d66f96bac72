//! `gateway.toml`. Field names follow dstack's gateway where the meaning is the same; every
//! field has a default, so an empty file is a valid (loopback-only) configuration.
//!
//! ```toml
//! [core]
//! rpc_domain = "gateway.example.com"   # name in the gateway's RPC certificate
//! # state_dir = "/var/lib/dstack-gateway"   # cluster state (registrations, certificates, nodes)
//! #                                        # persisted here (0600) and reloaded at start; unset = memory only
//!
//! [core.wg]
//! listen_port = 51820
//! ip = "10.0.0.1/24"                   # the gateway's own tunnel address and prefix
//! reserved_net = ["10.0.0.1/32"]       # never handed to CVMs
//! client_ip_range = "10.0.0.0/25"      # CVM addresses are allocated from here
//! interface = "wg0"
//! endpoint = "203.0.113.1:51820"       # what CVMs dial
//! # key_file = "/var/lib/dstack-gateway/wg-keys.json"   # rotated keys persist here (0600)
//! rotate_interval = "0s"               # rotate the gateway's WireGuard key this often (0 = never)
//! rotate_grace = "1d"                  # old key still accepted this long (> CVM refresh period)
//!
//! [core.proxy]
//! base_domain = "app.example.com"      # `<id>[-<port>][s|g].<base_domain>`
//! cert_chain = "/etc/dstack-gateway/certs/cert.pem"
//! cert_key = "/etc/dstack-gateway/certs/key.pem"
//! listen_addr = "0.0.0.0"
//! listen_port = 8443
//! external_port = 443
//! agent_port = 8090
//! buffer_size = 65536                  # largest copy buffer per direction per connection (starts at
//!                                      # 4 KiB, doubles while transfers fill it)
//! max_client_hello = 16384             # ClientHello bytes read before giving up
//! connect_top_n = 3
//! app_address_ns_prefix = "_dstack-app-address"
//! app_address_ns_compat = true         # also try `_tapp-address`
//! max_connections_per_app = 2000       # 0 = unlimited
//! inbound_pp_enabled = false
//! pp_version = 2                       # PROXY header version sent to `pp` ports
//! tls_versions = ["1.2", "1.3"]
//!
//! [core.proxy.timeouts]                # "500ms", "5s", "10m", "5h", "1d"
//! connect = "5s"
//! handshake = "5s"
//! dns_resolve = "5s"
//! idle = "10m"
//! write = "5s"
//! total = "5h"
//! pp_header = "5s"
//! handshake_stale = "30m"              # older WireGuard handshakes count as unhealthy
//!
//! [core.recycle]
//! enabled = true
//! interval = "5m"
//! timeout = "10h"
//!
//! [core.auth]                          # registration webhook (alongside allowed_apps)
//! enabled = false
//! url = "http://127.0.0.1:9000/auth"   # POST {app_id, instance_id, compose_hash}; 2xx = allowed
//! timeout = "5s"                       # no answer in time = refused (fail closed)
//! # ca_file = "/etc/ssl/certs/ca-certificates.crt"   # roots for https URLs
//!
//! [core.sync]                          # several gateway nodes sharing state over RA-TLS
//! enabled = false
//! node_id = 1                          # unique per node
//! my_url = "https://gw1.example.com:8000"   # where peers reach this node's [core.rpc]
//! bootnodes = []                       # other nodes' URLs to start from
//! interval = "30s"                     # anti-entropy round (a registration is pushed at once)
//! timeout = "5s"                       # per peer call
//! node_timeout = "2m"                  # nodes silent longer are left out of CVM configs
//! tombstone_ttl = "1d"                 # how long recycled instances are remembered
//! gateway_app_id = ""                  # hex app id peers must attest; required when enabled
//!
//! [core.certbot]
//! enabled = false
//! acme_url = "https://acme-v02.api.letsencrypt.org/directory"
//! work_dir = "/etc/dstack-gateway/certbot"   # account credentials (0600)
//! renew_before_expiration = "30d"
//! renew_interval = "1h"
//!
//! [core.attestation]
//! allow_simulated = false              # development only
//! simulated_roots = []                 # pinned simulator roots (hex or pin file path)
//! allow_debug = false
//! allowed_apps = []                    # empty = any attested app
//!
//! [core.rpc]
//! enabled = false
//! address = "0.0.0.0:8000"             # RegisterCvm (and GatewaySync) over mTLS at /prpc
//! # cert_chain / cert_key: PEM files; when absent the identity below is used
//! identity = "self-signed"             # "self-signed" (for rpc_domain; clients must pin it) or
//! #                                    # "agent:/var/run/dstack.sock": inside a CVM, GetTlsKey from the
//! #                                    # guest agent (RA-TLS, chain to the KMS root), renewed at 2/3 of
//! #                                    # its lifetime; the chain's root is also trusted for client chains
//! identity_validity = "0s"             # lifetime asked of the agent (0 = the agent's/KMS's default)
//!
//! [core.kms]                           # the KMS whose certificates registering CVMs may present
//! url = ""                             # "https://kms.example.com:8000": Revocation.GetCrl polled here
//! # root_ca = "/etc/dstack-gateway/kms-root-ca.pem"   # client chains under it are accepted and checked
//! #                                    # against its CRL; default in agent mode: the agent chain's root
//! crl_required = false                 # refuse KMS-issued chains until a first CRL arrived
//! crl_refresh = "10m"                  # CRL poll interval (clamped to 5s..6h; sooner near nextUpdate)
//!
//! [core.admin]
//! enabled = true
//! address = "127.0.0.1:8011"           # GET /health, /status (JSON), /metrics (Prometheus)
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use dstack_wg::Cidr;
use thiserror::Error;

/// Config loading errors.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is invalid or a field has a bad value.
    #[error("parsing gateway config: {0}")]
    Parse(#[from] toml::de::Error),
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `[core]`.
    pub core: CoreConfig,
}

/// `[core]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoreConfig {
    /// Host name of the registration RPC endpoint.
    pub rpc_domain: String,
    /// Where the cluster state is persisted (`cluster-state.json`); `None` keeps it in memory only.
    pub state_dir: Option<PathBuf>,
    /// `[core.wg]`.
    pub wg: WgConfig,
    /// `[core.proxy]`.
    pub proxy: ProxyConfig,
    /// `[core.recycle]`.
    pub recycle: RecycleConfig,
    /// `[core.certbot]`.
    pub certbot: CertbotConfig,
    /// `[core.attestation]`.
    pub attestation: AttestationConfig,
    /// `[core.rpc]`.
    pub rpc: RpcConfig,
    /// `[core.admin]`.
    pub admin: AdminConfig,
    /// `[core.auth]`.
    pub auth: AuthConfig,
    /// `[core.sync]`.
    pub sync: SyncConfig,
    /// `[core.kms]`.
    pub kms: KmsConfig,
}

/// `[core.kms]`: trust in (and revocations of) certificates issued under a KMS root.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmsConfig {
    /// KMS base URL (`https://host:port`; `/prpc` is appended); empty = no revocation list.
    pub url: String,
    /// PEM file of the KMS root CA; `None` in agent mode = the root of the agent-issued chain.
    pub root_ca: Option<PathBuf>,
    /// Refuse chains under the root until a first list was fetched.
    pub crl_required: bool,
    /// How often the list is fetched.
    #[serde(deserialize_with = "de_duration")]
    pub crl_refresh: Duration,
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            root_ca: None,
            crl_required: false,
            crl_refresh: Duration::from_secs(600),
        }
    }
}

/// `[core.auth]`: an external webhook asked about every registration (fail closed).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Ask the webhook.
    pub enabled: bool,
    /// `http://` or `https://` URL that receives the POST.
    pub url: String,
    /// Whole-request timeout.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// PEM roots for `https` URLs (default: the system bundle).
    pub ca_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: String::new(),
            timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

/// `[core.sync]`: state shared between gateway nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Run the sync loop and serve `GatewaySync`.
    pub enabled: bool,
    /// Unique node id.
    pub node_id: u32,
    /// This node's RPC URL as peers reach it.
    pub my_url: String,
    /// Peers to contact first.
    pub bootnodes: Vec<String>,
    /// Full-state exchange period.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Per-call timeout.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Nodes not heard of for this long are considered down.
    #[serde(deserialize_with = "de_duration")]
    pub node_timeout: Duration,
    /// Tombstone lifetime.
    #[serde(deserialize_with = "de_duration")]
    pub tombstone_ttl: Duration,
    /// Hex app id every peer must attest (the gateway app's id).
    pub gateway_app_id: String,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_id: 0,
            my_url: String::new(),
            bootnodes: Vec::new(),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            node_timeout: Duration::from_secs(120),
            tombstone_ttl: Duration::from_secs(86400),
            gateway_app_id: String::new(),
        }
    }
}

/// `[core.admin]`: health, status and Prometheus metrics over plain HTTP (keep it on loopback).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve `/health`, `/status`, `/metrics`.
    pub enabled: bool,
    /// Listen address.
    pub address: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 8011)),
        }
    }
}

/// `[core.attestation]`: what a registering CVM's RA-TLS certificate must prove.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestationConfig {
    /// Accept simulated quotes (development only; needs `simulated_roots`).
    pub allow_simulated: bool,
    /// Pinned simulator roots: 64 hex digits each, or a path to a pin file.
    pub simulated_roots: Vec<String>,
    /// Accept TDs with the DEBUG attribute.
    pub allow_debug: bool,
    /// Only these app ids (hex) may register; empty = any attested app.
    pub allowed_apps: Vec<String>,
}

/// `[core.rpc]`: the registration listener (mTLS, `/prpc`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Serve `RegisterCvm`.
    pub enabled: bool,
    /// Listen address.
    pub address: std::net::SocketAddr,
    /// Server certificate chain (PEM); a self-signed one for `rpc_domain` is made when absent.
    pub cert_chain: Option<PathBuf>,
    /// Server key (PEM).
    pub cert_key: Option<PathBuf>,
    /// Where the identity comes from without `cert_chain`/`cert_key`.
    pub identity: crate::rpc_identity::IdentitySource,
    /// Lifetime requested for agent-issued certificates (zero = the issuer's default).
    #[serde(deserialize_with = "de_duration")]
    pub identity_validity: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: std::net::SocketAddr::from(([0, 0, 0, 0], 8000)),
            cert_chain: None,
            cert_key: None,
            identity: crate::rpc_identity::IdentitySource::SelfSigned,
            identity_validity: Duration::ZERO,
        }
    }
}

/// `[core.wg]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WgConfig {
    /// Gateway WireGuard public key (base64).
    pub public_key: String,
    /// Gateway WireGuard private key (base64).
    pub private_key: String,
    /// UDP port.
    pub listen_port: u16,
    /// Gateway tunnel address with prefix length.
    pub ip: Cidr,
    /// Networks never allocated to CVMs.
    pub reserved_net: Vec<Cidr>,
    /// CVM address pool.
    pub client_ip_range: Cidr,
    /// Interface name.
    pub interface: String,
    /// `host:port` CVMs connect to.
    pub endpoint: String,
    /// Where rotated keys are persisted (JSON, 0600); rotation is off without it.
    pub key_file: Option<PathBuf>,
    /// Key rotation period (zero = never).
    #[serde(deserialize_with = "de_duration")]
    pub rotate_interval: Duration,
    /// How long the previous key keeps working after a rotation.
    #[serde(deserialize_with = "de_duration")]
    pub rotate_grace: Duration,
}

impl Default for WgConfig {
    fn default() -> Self {
        Self {
            public_key: String::new(),
            private_key: String::new(),
            listen_port: 51820,
            ip: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
            reserved_net: vec![Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 32)],
            client_ip_range: Cidr::v4(Ipv4Addr::new(10, 0, 0, 0), 25),
            interface: "wg0".into(),
            endpoint: String::new(),
            key_file: None,
            rotate_interval: Duration::ZERO,
            rotate_grace: Duration::from_secs(86400),
        }
    }
}

/// `[core.proxy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Apps live at `<id>[-<port>][s|g].<base_domain>`.
    pub base_domain: String,
    /// PEM certificate chain for `*.<base_domain>`.
    pub cert_chain: PathBuf,
    /// PEM private key of the certificate.
    pub cert_key: PathBuf,
    /// Listen address.
    pub listen_addr: IpAddr,
    /// Listen port.
    pub listen_port: u16,
    /// Port clients see (announced to CVMs).
    pub external_port: u16,
    /// Guest agent port inside CVMs (announced to CVMs).
    pub agent_port: u16,
    /// Largest copy buffer per direction per connection, bytes (grown from 4 KiB on demand).
    pub buffer_size: usize,
    /// Largest ClientHello accepted, bytes.
    pub max_client_hello: usize,
    /// Load-balance over this many of an app's freshest instances.
    pub connect_top_n: usize,
    /// TXT record prefix for custom domains.
    pub app_address_ns_prefix: String,
    /// Also look up the legacy `_tapp-address` prefix.
    pub app_address_ns_compat: bool,
    /// Concurrent connections per app (0 = unlimited).
    pub max_connections_per_app: usize,
    /// Expect a PROXY protocol header from the load balancer in front.
    pub inbound_pp_enabled: bool,
    /// PROXY protocol version sent to backends whose port policy has `pp` (1 or 2).
    pub pp_version: u8,
    /// TLS versions offered when terminating ("1.2", "1.3").
    pub tls_versions: Vec<String>,
    /// `[core.proxy.timeouts]`.
    pub timeouts: Timeouts,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            base_domain: "localhost".into(),
            cert_chain: PathBuf::from("/etc/dstack-gateway/certs/cert.pem"),
            cert_key: PathBuf::from("/etc/dstack-gateway/certs/key.pem"),
            listen_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            listen_port: 8443,
            external_port: 443,
            agent_port: 8090,
            buffer_size: 64 * 1024,
            max_client_hello: 16 * 1024,
            connect_top_n: 3,
            app_address_ns_prefix: "_dstack-app-address".into(),
            app_address_ns_compat: true,
            max_connections_per_app: 2000,
            inbound_pp_enabled: false,
            pp_version: 2,
            tls_versions: vec!["1.2".into(), "1.3".into()],
            timeouts: Timeouts::default(),
        }
    }
}

/// `[core.proxy.timeouts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Backend TCP connect.
    #[serde(deserialize_with = "de_duration")]
    pub connect: Duration,
    /// Reading the ClientHello and completing a terminating TLS handshake.
    #[serde(deserialize_with = "de_duration")]
    pub handshake: Duration,
    /// TXT lookups.
    #[serde(deserialize_with = "de_duration")]
    pub dns_resolve: Duration,
    /// No bytes in either direction.
    #[serde(deserialize_with = "de_duration")]
    pub idle: Duration,
    /// One write blocked on a slow peer.
    #[serde(deserialize_with = "de_duration")]
    pub write: Duration,
    /// Whole connection lifetime.
    #[serde(deserialize_with = "de_duration")]
    pub total: Duration,
    /// Reading an inbound PROXY header.
    #[serde(deserialize_with = "de_duration")]
    pub pp_header: Duration,
    /// Instances whose last WireGuard handshake is older are not preferred.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_stale: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            dns_resolve: Duration::from_secs(5),
            idle: Duration::from_secs(600),
            write: Duration::from_secs(5),
            total: Duration::from_secs(5 * 3600),
            pp_header: Duration::from_secs(5),
            handshake_stale: Duration::from_secs(1800),
        }
    }
}

/// `[core.recycle]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecycleConfig {
    /// Remove stale instances.
    pub enabled: bool,
    /// How often to look.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Instances without a WireGuard handshake (or re-registration) for this long are removed.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for RecycleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(300),
            timeout: Duration::from_secs(10 * 3600),
        }
    }
}

/// `[core.certbot]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertbotConfig {
    /// Run the ACME client.
    pub enabled: bool,
    /// ACME directory URL.
    pub acme_url: String,
    /// PEM file with extra roots to trust for the ACME server (test CAs only).
    pub acme_ca_file: Option<PathBuf>,
    /// Contact e-mail addresses (`mailto:` is added).
    pub contacts: Vec<String>,
    /// Account credentials live here.
    pub work_dir: PathBuf,
    /// Renew when the certificate expires within this.
    #[serde(deserialize_with = "de_duration")]
    pub renew_before_expiration: Duration,
    /// How often to check.
    #[serde(deserialize_with = "de_duration")]
    pub renew_interval: Duration,
}

impl Default for CertbotConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            acme_url: "https://acme-v02.api.letsencrypt.org/directory".into(),
            acme_ca_file: None,
            contacts: Vec::new(),
            work_dir: PathBuf::from("/etc/dstack-gateway/certbot"),
            renew_before_expiration: Duration::from_secs(30 * 86400),
            renew_interval: Duration::from_secs(3600),
        }
    }
}

impl GatewayConfig {
    /// Parse TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }
}

/// Parse "500ms", "5s", "10m", "5h", "1d" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected <number><unit>"))?;
    let secs = |mul: u64| n.checked_mul(mul).map(Duration::from_secs);
    let d = match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => return Err(format!("duration {s:?}: unknown unit (ms, s, m, h, d)")),
    };
    d.ok_or_else(|| format!("duration {s:?} overflows"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = GatewayConfig::from_toml("").unwrap();
        assert_eq!(c.core.proxy.listen_port, 8443);
        assert_eq!(c.core.proxy.connect_top_n, 3);
        assert_eq!(c.core.proxy.max_connections_per_app, 2000);
        assert_eq!(c.core.proxy.timeouts.idle, Duration::from_secs(600));
        assert_eq!(c.core.wg.client_ip_range.to_string(), "10.0.0.0/25");
        assert_eq!(c.core.recycle.timeout, Duration::from_secs(36000));
    }

    #[test]
    fn module_doc_example_parses_to_the_same_values() {
        // The example in this module's docs, between the ```toml fences.
        let src = include_str!("config.rs");
        let start = src.find("//! ```toml\n").unwrap() + 12;
        let end = start + src[start..].find("//! ```\n").unwrap();
        let toml: String = src[start..end]
            .lines()
            .map(|l| l.strip_prefix("//! ").or_else(|| l.strip_prefix("//!")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = GatewayConfig::from_toml(&toml).unwrap();
        assert_eq!(c.core.proxy.base_domain, "app.example.com");
        assert_eq!(c.core.proxy.timeouts.total, Duration::from_secs(5 * 3600));
        assert_eq!(c.core.certbot.renew_before_expiration, Duration::from_secs(30 * 86400));
        assert_eq!(c.core.wg.endpoint, "203.0.113.1:51820");
        assert_eq!(c.core.sync.node_timeout, Duration::from_secs(120));
        assert_eq!(c.core.auth.timeout, Duration::from_secs(5));
        assert_eq!(c.core.wg.rotate_grace, Duration::from_secs(86400));
        assert_eq!(c.core.rpc.identity, crate::rpc_identity::IdentitySource::SelfSigned);
        assert_eq!(c.core.rpc.identity_validity, Duration::ZERO);
        assert_eq!(c.core.kms.crl_refresh, Duration::from_secs(600));
        assert!(!c.core.kms.crl_required && c.core.kms.url.is_empty() && c.core.kms.root_ca.is_none());
    }

    #[test]
    fn rpc_identity_and_kms_sections() {
        let c = GatewayConfig::from_toml(
            "[core.rpc]\nidentity = \"agent:/var/run/dstack.sock\"\nidentity_validity = \"1d\"\n\
             [core.kms]\nurl = \"https://kms:8000\"\nroot_ca = \"/k.pem\"\ncrl_required = true\ncrl_refresh = \"30s\"",
        )
        .unwrap();
        assert_eq!(
            c.core.rpc.identity,
            crate::rpc_identity::IdentitySource::Agent("/var/run/dstack.sock".into())
        );
        assert_eq!(c.core.rpc.identity_validity, Duration::from_secs(86400));
        assert_eq!(c.core.kms.root_ca.as_deref(), Some(Path::new("/k.pem")));
        assert!(c.core.kms.crl_required);
        assert_eq!(c.core.kms.crl_refresh, Duration::from_secs(30));
        let e = GatewayConfig::from_toml("[core.rpc]\nidentity = \"agent\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("self-signed"), "{e}");
        assert!(GatewayConfig::from_toml("[core.kms]\nroot = \"x\"").is_err());
    }

    #[test]
    fn durations_and_errors() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("m").is_err());
        assert!(GatewayConfig::from_toml("[core.proxy]\nbogus = 1").is_err());
        assert!(GatewayConfig::from_toml("[core.wg]\nclient_ip_range = \"10.0.0.0/33\"").is_err());
        let c = GatewayConfig::from_toml("[core.proxy.timeouts]\nidle = \"1m\"\nconnect = 2").unwrap();
        assert_eq!(c.core.proxy.timeouts.idle, Duration::from_secs(60));
        assert_eq!(c.core.proxy.timeouts.connect, Duration::from_secs(2));
    }

    #[test]
    fn cidr_math() {
        let c: Cidr = "10.0.0.1/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert!(c.contains(Ipv4Addr::new(10, 0, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 0, 1, 0)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let host: Cidr = "10.0.0.7".parse().unwrap();
        assert_eq!(host.prefix, 32);
    }
}
