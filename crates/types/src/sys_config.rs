//! Host-provided configuration: `.sys-config.json` (with `vm_config`, a JSON *string* of [`VmConfig`]) and
//! `.instance_info`.
//!
//! Strictness (host input is untrusted, but must parse what dstack's VMM writes):
//! - [`SysConfig`]: unknown fields rejected. Accepted: every field dstack's VMM writes (`kms_urls`,
//!   `gateway_urls` / legacy `tproxy_urls`, `pccs_url`, `collateral_urls{pccs,amd_kds}`,
//!   `nvidia_attestation_proxy_url`, `docker_registry`, `host_api_url`, `mr_config`, `vm_config`);
//!   optional strings may be `null` (dstack writes `null` for unset ones).
//! - [`VmConfig`]: unknown fields rejected. Accepted: the TDX fields of dstack's `VmConfig` plus the
//!   `spec_version` its VMM appends; `tdx_measurement` (lite-verification material we do not use) is kept
//!   as opaque JSON so dstack configs still parse. Fields for other platforms (`gcp_measurement`,
//!   `aws_measurement`, `aws_pcr_replay`, `gcp_tpm_replay`, `mr_config`, SEV data) are rejected: we only
//!   run TDX and simulated TDX.
//! - [`InstanceInfo`]: unknown fields rejected; all fields hex and optional (empty = unset).

use serde::{Deserialize, Serialize};

use crate::hex::hex_vec;

/// Largest `.sys-config.json` we parse (ours).
pub const MAX_SYS_CONFIG_SIZE: usize = 1 << 20;

/// Errors from the host-config parsers.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {size} bytes is larger than the {limit}-byte limit")]
    TooLarge {
        file: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("{file}: {path}: {message}")]
    Json {
        file: &'static str,
        path: String,
        message: String,
    },
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: &'static str,
        field: &'static str,
        reason: String,
    },
}

/// Parses JSON with a size limit and a path-bearing error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    file: &'static str,
    raw: &[u8],
    limit: usize,
) -> Result<T, ConfigError> {
    if raw.len() > limit {
        return Err(ConfigError::TooLarge {
            file,
            size: raw.len(),
            limit,
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(raw);
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Json {
        file,
        path: if e.path().to_string() == "." {
            "(top level)".into()
        } else {
            e.path().to_string()
        },
        message: e.inner().to_string(),
    })
}

/// `.sys-config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysConfig {
    #[serde(default)]
    pub kms_urls: Vec<String>,
    #[serde(default, alias = "tproxy_urls")]
    pub gateway_urls: Vec<String>,
    /// Legacy PCCS URL (dstack now also writes `collateral_urls.pccs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pccs_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collateral_urls: Option<CollateralUrls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvidia_attestation_proxy_url: Option<String>,
    /// Registry mirror for dockerd.
    #[serde(default)]
    pub docker_registry: Option<String>,
    /// Host API URL, e.g. `vsock://2:10000/api`.
    #[serde(default)]
    pub host_api_url: Option<String>,
    /// MrConfigV3 document (platform config binding); hashed as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mr_config: Option<String>,
    /// JSON-serialized [`VmConfig`] (kept as a string: it is passed on verbatim to the KMS).
    pub vm_config: String,
    /// Ours: the TEE selector (`dstack.tee` grammar, e.g. `simulated:vsock:2:10001`) used when the kernel
    /// command line names none. Unmeasured on purpose and harmless: a simulated TEE is refused on a machine
    /// that has TDX, and simulated quotes are refused by every verifier unless it allows simulation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee: Option<String>,
}

/// Attestation collateral endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollateralUrls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pccs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amd_kds: Option<String>,
}

impl SysConfig {
    /// Parses `.sys-config.json` and checks that `vm_config` parses too.
    pub fn from_slice(raw: &[u8]) -> Result<Self, ConfigError> {
        let cfg: Self = parse_json(crate::shared_files::SYS_CONFIG, raw, MAX_SYS_CONFIG_SIZE)?;
        cfg.vm_config()?;
        Ok(cfg)
    }

    /// Parses the embedded `vm_config` string.
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(&self.vm_config)
    }

    /// PCCS URL: `collateral_urls.pccs`, else the legacy `pccs_url`; empty strings count as unset.
    pub fn pccs_url(&self) -> Option<&str> {
        self.collateral_urls
            .as_ref()
            .and_then(|c| c.pccs.as_deref())
            .or(self.pccs_url.as_deref())
            .filter(|s| !s.is_empty())
    }
}

fn default_num_nics() -> u32 {
    1
}
fn is_one(n: &u32) -> bool {
    *n == 1
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// The VM's shape, as the measurement predictor and the KMS need it. Field order and skip rules follow
/// dstack's `VmConfig` so our serialization matches theirs field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// sha256 of the image's `sha256sum.txt` (hex).
    #[serde(default, with = "hex_vec")]
    pub os_image_hash: Vec<u8>,
    #[serde(default)]
    pub cpu_count: u32,
    /// Bytes.
    #[serde(default)]
    pub memory_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_single_pass_add_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    #[serde(default)]
    pub pci_hole64_size: u64,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default)]
    pub num_gpus: u32,
    #[serde(default)]
    pub num_nvswitches: u32,
    #[serde(default = "default_num_nics", skip_serializing_if = "is_one")]
    pub num_nics: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_verity_volumes: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub swtpm: bool,
    #[serde(default)]
    pub hotplug_off: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `""`/`"9p"`, `"vvfat"` or `"vhd"`.
    #[serde(default)]
    pub host_share_mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ovmf_variant: Option<OvmfVariant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx_attestation_variant: Option<TdxAttestationVariant>,
    /// dstack's TDX "lite" measurement document; carried opaquely, not interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx_measurement: Option<serde_json::Value>,
    /// dstack's VMM adds `"spec_version": 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_version: Option<u32>,
}

/// OVMF measurement layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OvmfVariant {
    Pre202505,
    Stable202505,
}

/// TDX verification scheme selected by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TdxAttestationVariant {
    Legacy,
    Lite,
}

impl VmConfig {
    /// Parses the `vm_config` JSON string.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let cfg: Self = parse_json("vm_config", s.as_bytes(), MAX_SYS_CONFIG_SIZE)?;
        if !(cfg.os_image_hash.is_empty() || cfg.os_image_hash.len() == 32) {
            return Err(ConfigError::Invalid {
                file: "vm_config",
                field: "os_image_hash",
                reason: format!("expected 32 bytes, got {}", cfg.os_image_hash.len()),
            });
        }
        Ok(cfg)
    }

    /// Compact JSON, as stored in `SysConfig::vm_config`.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `.instance_info` (written by the VMM, updated from the guest's `instance.info` notification).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    #[serde(default, with = "hex_vec")]
    pub instance_id_seed: Vec<u8>,
    #[serde(default, with = "hex_vec")]
    pub instance_id: Vec<u8>,
    #[serde(default, with = "hex_vec")]
    pub app_id: Vec<u8>,
}

impl InstanceInfo {
    /// Parses `.instance_info`; each id must be empty or 20 bytes.
    pub fn from_slice(raw: &[u8]) -> Result<Self, ConfigError> {
        let info: Self = parse_json(crate::shared_files::INSTANCE_INFO, raw, 64 << 10)?;
        for (field, v) in [
            ("instance_id_seed", &info.instance_id_seed),
            ("instance_id", &info.instance_id),
            ("app_id", &info.app_id),
        ] {
            if !(v.is_empty() || v.len() == 20) {
                return Err(ConfigError::Invalid {
                    file: crate::shared_files::INSTANCE_INFO,
                    field,
                    reason: format!("expected empty or 20 bytes, got {}", v.len()),
                });
            }
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests;
