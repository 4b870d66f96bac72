//! `kms.toml`: the KMS configuration (dstack's field names where they exist; unknown fields are rejected).
//!
//! Every field has a default, so an empty file is a valid (development-only) configuration:
//!
//! ```toml
//! [rpc]
//! address = "0.0.0.0"       # listen address of the KMS RPC (HTTPS, RA-TLS)
//! port = 8000
//!
//! [core]
//! cert_dir = "/etc/kms/certs"   # key material (root-ca.key, root-k256.key, tmp-ca.key, rpc.key, ...)
//! tee = "auto"                  # auto | tdx | simulated:{unix:<path>,vsock:<cid>:<port>} | agent:<socket> | none
//! attest_rpc_cert = true        # put the KMS's own attestation into rpc.crt (needs a TEE)
//! site_name = ""                # reported by Onboard.GetAttestationInfo
//!
//! [core.attestation]            # how client CVMs' RA-TLS evidence is verified
//! allow_simulated = false       # accept quotes of the simulated TDX module (dev only)
//! simulated_roots = []          # pinned simulator roots: PEM file paths or 64-hex SPKI SHA-256 pins
//! allow_debug = false           # accept TDs with the DEBUG attribute
//! collateral_file = ""          # dcap-qvl QuoteCollateralV3 JSON for real quotes (offline verification)
//!
//! [core.auth_api]
//! type = "dev"                  # "dev" (allow everything, loudly) | "webhook" | "onchain"
//! dev.gateway_app_id = ""
//! webhook.url = "http://127.0.0.1:3000"
//! webhook.timeout_ms = 5000
//! onchain.rpc_url = "http://127.0.0.1:8545"   # Ethereum JSON-RPC (http://), asked with eth_call
//! onchain.kms_contract = ""                   # address of our KmsRegistry contract (contracts/KmsRegistry.sol)
//! onchain.timeout_ms = 5000
//!
//! [core.onboard]
//! enabled = true                # serve Onboard (Bootstrap, Onboard, Finish) while no keys exist
//! auto_bootstrap_domain = ""    # non-empty: bootstrap at start for this domain if no keys exist
//! address = "0.0.0.0"
//! port = 8000
//! vm_config_file = ""           # this KMS's vm_config (VmConfig JSON, or a sys-config JSON with a
//!                               # "vm_config" string); sent to the source KMS by Onboard.Onboard;
//!                               # empty with tee = "agent:<socket>": the guest agent's vm_config
//! revocation_sync_secs = 300    # an onboarded replica pulls the source's revocation list this often (0 = off)
//!                               # (a replica refuses Admin.RevokeCerts: revoke on the source it follows)
//!
//! [core.image]                  # OS image verification of key-release callers (dstack's [core.image])
//! verify = false                # recompute MRTD/RTMR0-2 from the cached image and refuse on mismatch
//! cache_dir = "/usr/share/dstack/images"  # images/<os_image_hash>/ (image-build output directories);
//!                               # measurements/<config_hash>.json is written by the KMS
//!
//! [core.admin]                  # the Admin service (ClearImageCache) on its own listener
//! enabled = false
//! address = "127.0.0.1"
//! port = 8001
//! auth_token = ""               # required (Authorization: Bearer <token>); empty refuses every call
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::KmsError;

/// The whole `kms.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmsConfig {
    pub rpc: RpcConfig,
    pub core: CoreConfig,
}

impl KmsConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, KmsError> {
        toml::from_str(text).map_err(|e| KmsError::Config(e.to_string()))
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, KmsError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| KmsError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| KmsError::Config(format!("{}: {e}", path.display())))
    }
}

fn default_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}

fn default_port() -> u16 {
    8000
}

/// `[rpc]`: the KMS RPC listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    pub address: IpAddr,
    pub port: u16,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            address: default_address(),
            port: default_port(),
        }
    }
}

impl RpcConfig {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// `[core]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoreConfig {
    pub cert_dir: PathBuf,
    /// Which TEE the KMS itself runs in (for its bootstrap attestation and the RPC certificate).
    pub tee: String,
    pub attest_rpc_cert: bool,
    /// Reported by `Onboard.GetAttestationInfo` (dstack's `site_name`).
    pub site_name: String,
    pub attestation: AttestationConfig,
    pub auth_api: AuthApiConfig,
    pub onboard: OnboardConfig,
    pub image: ImageConfig,
    pub admin: AdminConfig,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            cert_dir: PathBuf::from("/etc/kms/certs"),
            tee: "auto".into(),
            attest_rpc_cert: true,
            site_name: String::new(),
            attestation: AttestationConfig::default(),
            auth_api: AuthApiConfig::default(),
            onboard: OnboardConfig::default(),
            image: ImageConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

/// `[core.attestation]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestationConfig {
    pub allow_simulated: bool,
    /// Each entry: a path to the simulator's root certificate (PEM/DER) or a 64-hex SPKI SHA-256 pin.
    pub simulated_roots: Vec<String>,
    pub allow_debug: bool,
    /// dcap-qvl `QuoteCollateralV3` JSON used for every real quote (empty: real quotes are refused).
    pub collateral_file: Option<PathBuf>,
}

/// `[core.auth_api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthApiConfig {
    #[serde(rename = "type")]
    pub kind: AuthApiKind,
    pub dev: DevAuthConfig,
    pub webhook: WebhookConfig,
    pub onchain: OnchainConfig,
}

impl Default for AuthApiConfig {
    fn default() -> Self {
        Self {
            kind: AuthApiKind::Dev,
            dev: DevAuthConfig::default(),
            webhook: WebhookConfig::default(),
            onchain: OnchainConfig::default(),
        }
    }
}

/// Which authorization policy decides key release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthApiKind {
    Dev,
    Webhook,
    Onchain,
}

/// `[core.auth_api.dev]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevAuthConfig {
    pub gateway_app_id: String,
}

/// `[core.auth_api.webhook]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Base URL; the KMS posts to `{url}/bootAuth/app` and `{url}/bootAuth/kms`. `http://` only.
    pub url: String,
    pub timeout_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3000".into(),
            timeout_ms: 5000,
        }
    }
}

/// `[core.auth_api.onchain]`: our `KmsRegistry` contract.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnchainConfig {
    /// Ethereum JSON-RPC endpoint, `http://` only.
    pub rpc_url: String,
    /// The `KmsRegistry` address (`0x` + 40 hex).
    pub kms_contract: String,
    pub timeout_ms: u64,
}

impl Default for OnchainConfig {
    fn default() -> Self {
        Self {
            rpc_url: "http://127.0.0.1:8545".into(),
            kms_contract: String::new(),
            timeout_ms: 5000,
        }
    }
}

/// `[core.onboard]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnboardConfig {
    pub enabled: bool,
    pub auto_bootstrap_domain: String,
    pub address: IpAddr,
    pub port: u16,
    /// This KMS's vm_config for `GetKmsKey` (empty: none is sent).
    pub vm_config_file: Option<PathBuf>,
    /// A replica pulls its source's revocation list this often (seconds; 0 = never), see
    /// [`crate::replication`].
    pub revocation_sync_secs: u64,
}

impl Default for OnboardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            auto_bootstrap_domain: String::new(),
            address: default_address(),
            port: default_port(),
            vm_config_file: None,
            revocation_sync_secs: 300,
        }
    }
}

impl OnboardConfig {
    /// Reads `vm_config_file`: a VmConfig JSON document, or a sys-config JSON whose `vm_config` string is used.
    pub fn load_vm_config(&self) -> Result<String, KmsError> {
        let Some(path) = self.vm_config_file.as_ref().filter(|p| !p.as_os_str().is_empty()) else {
            return Ok(String::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| KmsError::Config(format!("vm_config_file {}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| KmsError::Config(format!("vm_config_file {}: not JSON: {e}", path.display())))?;
        Ok(match v.get("vm_config") {
            Some(serde_json::Value::String(inner)) => inner.clone(),
            _ => text,
        })
    }
}

/// `[core.image]`: OS image verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub verify: bool,
    pub cache_dir: PathBuf,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            verify: false,
            cache_dir: PathBuf::from("/usr/share/dstack/images"),
        }
    }
}

/// `[core.admin]`: the Admin service listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub enabled: bool,
    pub address: IpAddr,
    pub port: u16,
    /// Bearer token every Admin call must present; empty refuses all calls.
    pub auth_token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8001,
            auth_token: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = KmsConfig::from_toml("").unwrap();
        assert_eq!(c.rpc.port, 8000);
        assert_eq!(c.core.cert_dir, PathBuf::from("/etc/kms/certs"));
        assert_eq!(c.core.auth_api.kind, AuthApiKind::Dev);
        assert!(!c.core.attestation.allow_simulated);
        assert!(c.core.onboard.enabled);
        assert_eq!(c.core.auth_api.webhook.timeout_ms, 5000);
        assert!(!c.core.image.verify);
        assert_eq!(c.core.image.cache_dir, PathBuf::from("/usr/share/dstack/images"));
        assert!(!c.core.admin.enabled);
        assert_eq!(c.core.admin.port, 8001);
        assert_eq!(c.core.onboard.load_vm_config().unwrap(), "");
    }

    #[test]
    fn vm_config_file_accepts_sys_config_or_vm_config() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys.json");
        std::fs::write(&sys, r#"{"kms_urls":[],"vm_config":"{\"os_image_hash\":\"ab\"}"}"#).unwrap();
        let raw = dir.path().join("vm.json");
        std::fs::write(&raw, r#"{"os_image_hash":"cd","cpu_count":1}"#).unwrap();
        let mut o = OnboardConfig {
            vm_config_file: Some(sys),
            ..Default::default()
        };
        assert_eq!(o.load_vm_config().unwrap(), r#"{"os_image_hash":"ab"}"#);
        o.vm_config_file = Some(raw);
        assert_eq!(o.load_vm_config().unwrap(), r#"{"os_image_hash":"cd","cpu_count":1}"#);
        o.vm_config_file = Some(dir.path().join("missing"));
        assert!(o.load_vm_config().unwrap_err().to_string().contains("missing"));
    }

    #[test]
    fn dstack_style_file_parses_and_unknown_fields_are_refused() {
        let c = KmsConfig::from_toml(
            r#"
            [rpc]
            address = "127.0.0.1"
            port = 9100
            [core]
            cert_dir = "/tmp/kms"
            [core.attestation]
            allow_simulated = true
            simulated_roots = ["/tmp/sim-root.pem"]
            [core.auth_api]
            type = "webhook"
            webhook.url = "http://auth:3000"
            [core.onboard]
            auto_bootstrap_domain = "kms.local"
            "#,
        )
        .unwrap();
        assert_eq!(c.rpc.socket_addr().to_string(), "127.0.0.1:9100");
        assert_eq!(c.core.auth_api.kind, AuthApiKind::Webhook);
        assert_eq!(c.core.auth_api.webhook.url, "http://auth:3000");
        assert_eq!(c.core.onboard.auto_bootstrap_domain, "kms.local");
        let err = KmsConfig::from_toml("[core]\ncert_dri = \"/x\"\n").unwrap_err();
        assert!(err.to_string().contains("cert_dri"), "{err}");
        assert!(KmsConfig::from_toml("[core.auth_api]\ntype = \"chain\"\n").is_err());
        let c = KmsConfig::from_toml(
            "[core.auth_api]\ntype = \"onchain\"\nonchain.rpc_url = \"http://eth:8545\"\n\
             onchain.kms_contract = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"\n",
        )
        .unwrap();
        assert_eq!(c.core.auth_api.kind, AuthApiKind::Onchain);
        assert_eq!(c.core.auth_api.onchain.rpc_url, "http://eth:8545");
        assert_eq!(c.core.auth_api.onchain.timeout_ms, 5000);
    }
}
