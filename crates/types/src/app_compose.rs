//! `app-compose.json`: the measured application manifest (field names compatible with dstack's `AppCompose`).
//!
//! Strict where dstack is lenient, because these bytes are measured and an ignored field is a silent
//! security surprise:
//! - unknown fields are rejected at every level, with the path and name in the error;
//! - enumerations are closed (`runner`, `snapshotter`, `key_provider`, `storage_fs`, `event_log_version`,
//!   `requirements.platforms`);
//! - cross-field rules are checked (see [`AppCompose::validate`]).
//!
//! Every optional field is kept as `Option` so [`AppCompose::to_normalized_json`] writes back exactly the
//! fields that were given, in the form they were given (number vs string, single vs list), which is what
//! dstack's SDK `get_compose_hash` serializes. Defaults are applied by the accessor methods instead.
//!
//! Legacy inputs accepted: `tproxy_enabled` (OR-ed with `gateway_enabled`, as dstack does), feature
//! `"tproxy-net"`, `features`, `bash_script`, `docker_config`, numeric `manifest_version` 1 or 2.

use serde::{Deserialize, Deserializer, Serialize};

use crate::{canonical_json, hex::decode_hex, size::HumanSize};

/// dstack allows at most this many init scripts (each becomes an RTMR3 event).
pub const MAX_INIT_SCRIPTS: usize = 5;
/// Largest `app-compose.json` we parse (ours; dstack has no limit).
pub const MAX_APP_COMPOSE_SIZE: usize = 4 << 20;

/// Errors from parsing or validating an app-compose document.
#[derive(Debug, thiserror::Error)]
pub enum AppComposeError {
    #[error("app-compose.json is {0} bytes, larger than the {MAX_APP_COMPOSE_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("app-compose.json: {path}: {message}")]
    Json { path: String, message: String },
    #[error("app-compose.json: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> AppComposeError {
    AppComposeError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Deserializes a present value, refusing `null` (dstack's non-`Option` fields reject `null` too).
fn non_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The application manifest. Field docs give dstack's default where the field is absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCompose {
    /// `"2"`, `"3"`, … (canonical positive integer string) or legacy number 1 or 2.
    pub manifest_version: ManifestVersion,
    pub name: String,
    pub runner: Runner,
    /// Deprecated feature flags (`"kms"`, `"tproxy-net"`).
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// containerd snapshotter; only valid with the `nerdctl-compose` runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<Snapshotter>,
    /// The docker-compose YAML; required by the compose runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_compose_file: Option<String>,
    /// Legacy registry credentials block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_config: Option<DockerConfig>,
    /// Legacy script for the `bash` runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bash_script: Option<String>,
    /// Script sourced before the runner starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_launch_script: Option<String>,
    /// Scripts run before the runner; each is hashed into an `init-script-hash` RTMR3 event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_script: Option<InitScript>,
    /// Default false.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub public_logs: Option<bool>,
    /// Default false.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub public_sysinfo: Option<bool>,
    /// Default **true**.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub public_tcbinfo: Option<bool>,
    /// Default false; used to derive the key provider when `key_provider` is absent.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub kms_enabled: Option<bool>,
    /// Default false.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub gateway_enabled: Option<bool>,
    /// Legacy name of `gateway_enabled`; the two are OR-ed.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub tproxy_enabled: Option<bool>,
    /// Default false; used to derive the key provider when `key_provider` is absent.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub local_key_provider_enabled: Option<bool>,
    /// Explicit key provider; wins over the booleans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_provider: Option<KeyProviderKind>,
    /// Hex pin of the key provider id (KMS: root CA SPKI DER; local: SGX MR). Empty = no pin.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub key_provider_id: Option<HexField>,
    /// Env names that may come from the encrypted env. Default empty.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub allowed_envs: Option<Vec<String>>,
    /// Default false; true = empty instance id.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub no_instance_id: Option<bool>,
    /// Default **true**: wait for NTP sync before setup.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub secure_time: Option<bool>,
    /// Data disk filesystem; dstack's guest default when absent is zfs, ours is ext4 (see guest-init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_fs: Option<StorageFs>,
    /// Swap file size (`"4G"` or bytes). Default 0 = no swap.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub swap_size: Option<HumanSize>,
    /// RTMR3 digest format, 1 (default) or 2.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub event_log_version: Option<EventLogVersion>,
    /// Per-port gateway policy.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub port_policy: Option<PortPolicy>,
    /// Guest-side requirements (newer dstack; use manifest_version "3").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Requirements>,
    /// Read-only dm-verity volumes.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub verity_volumes: Option<Vec<VerityVolume>>,
}

/// `manifest_version`, kept in the form written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ManifestVersion {
    Number(u32),
    Text(String),
}

impl ManifestVersion {
    /// The version as a number (always parseable after validation).
    pub fn as_u32(&self) -> u32 {
        match self {
            Self::Number(n) => *n,
            Self::Text(s) => s.parse().unwrap_or(0),
        }
    }
}

impl<'de> Deserialize<'de> for ManifestVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ManifestVersion;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a manifest version string like \"2\", or legacy number 1 or 2")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
                match v {
                    1 | 2 => Ok(ManifestVersion::Number(v as u32)),
                    _ => Err(E::custom(
                        "numeric manifest_version must be 1 or 2; write newer versions as strings",
                    )),
                }
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
                let v = u64::try_from(v).map_err(|_| E::custom("manifest_version must be positive"))?;
                self.visit_u64(v)
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
                let n: u32 = v
                    .parse()
                    .map_err(|_| E::custom(format!("manifest_version must be a positive integer string, got {v:?}")))?;
                if n == 0 || n.to_string() != v {
                    return Err(E::custom(format!(
                        "manifest_version must be a canonical positive integer, got {v:?}"
                    )));
                }
                Ok(ManifestVersion::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// How the app is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runner {
    DockerCompose,
    NerdctlCompose,
    Bash,
}

/// containerd snapshotter for `nerdctl-compose`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Snapshotter {
    Overlayfs,
    Stargz,
}

/// Where app keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyProviderKind {
    None,
    Kms,
    Local,
    Tpm,
}

/// Data disk filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageFs {
    Ext4,
    Zfs,
}

/// RTMR3 event digest format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventLogVersion {
    #[default]
    V1,
    V2,
}

impl Serialize for EventLogVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(match self {
            Self::V1 => 1,
            Self::V2 => 2,
        })
    }
}

impl<'de> Deserialize<'de> for EventLogVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            1 => Ok(Self::V1),
            2 => Ok(Self::V2),
            v => Err(serde::de::Error::custom(format!(
                "unknown event_log_version {v} (supported: 1, 2)"
            ))),
        }
    }
}

/// `init_script`: one script or a list, kept in the form written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitScript {
    One(String),
    Many(Vec<String>),
}

impl InitScript {
    /// The scripts in execution order.
    pub fn scripts(&self) -> &[String] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }
}

/// A hex string validated at parse time and written back exactly as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct HexField(String);

impl HexField {
    /// Validates `s` as plain hex.
    pub fn new(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        decode_hex("hex field", &s)?;
        Ok(Self(s))
    }
    /// The decoded bytes.
    pub fn bytes(&self) -> Vec<u8> {
        hex::decode(&self.0).unwrap_or_default()
    }
    /// The string as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HexField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Legacy private registry settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Name of the encrypted env var holding the registry token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_key: Option<String>,
}

/// Gateway per-port policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortPolicy {
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortAttrs>>,
    /// Only forward to listed ports. Default false.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub restrict_mode: Option<bool>,
}

/// One port's attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortAttrs {
    pub port: u16,
    /// Send a PROXY protocol header. Default false.
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub pp: Option<bool>,
}

/// Guest-side requirements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Semver requirement on the OS version, e.g. `">=0.6.0"` (kept as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// Allowed TEE platforms; an explicit empty list allows none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tdx_measure_acpi_tables: Option<bool>,
    /// Hex sha256 of the launch token carried in `.user-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_token_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_policy: Option<GpuPolicy>,
}

/// TEE platform names accepted in `requirements.platforms` (dstack's `TeeVariant`).
pub const KNOWN_PLATFORMS: &[&str] = &[
    "dstack-tdx",
    "dstack-gcp-tdx",
    "dstack-nitro-enclave",
    "dstack-amd-sev-snp",
    "dstack-aws-nitro-tpm",
];

/// GPU attestation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuPolicy {
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub attest_gpu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<String>,
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub allow_devtools: Option<bool>,
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub allow_debug: Option<bool>,
    #[serde(default, deserialize_with = "non_null", skip_serializing_if = "Option::is_none")]
    pub allow_insecure_boot: Option<bool>,
}

/// A pre-built dm-verity volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityVolume {
    /// Bare image file name under the VMM's volumes dir.
    pub source: String,
    /// dm-verity root hash, 32 bytes hex.
    pub verity_root: HexField,
    /// Absolute mount path.
    pub target: String,
}

impl AppCompose {
    /// Parses and validates raw `app-compose.json` bytes.
    pub fn from_slice(raw: &[u8]) -> Result<Self, AppComposeError> {
        if raw.len() > MAX_APP_COMPOSE_SIZE {
            return Err(AppComposeError::TooLarge(raw.len()));
        }
        let de = &mut serde_json::Deserializer::from_slice(raw);
        let compose: Self = serde_path_to_error::deserialize(de).map_err(|e| AppComposeError::Json {
            path: if e.path().to_string() == "." {
                "(top level)".into()
            } else {
                e.path().to_string()
            },
            message: e.inner().to_string(),
        })?;
        compose.validate()?;
        Ok(compose)
    }

    /// Cross-field and value checks that serde's types do not express.
    pub fn validate(&self) -> Result<(), AppComposeError> {
        match self.runner {
            Runner::DockerCompose | Runner::NerdctlCompose => {
                if self.docker_compose_file.as_deref().is_none_or(|f| f.trim().is_empty()) {
                    return Err(invalid(
                        "docker_compose_file",
                        "required (non-empty) for compose runners",
                    ));
                }
            }
            Runner::Bash => {}
        }
        if self.snapshotter.is_some() && self.runner != Runner::NerdctlCompose {
            return Err(invalid("snapshotter", "only valid with runner \"nerdctl-compose\""));
        }
        let scripts = self.init_scripts();
        if scripts.len() > MAX_INIT_SCRIPTS {
            return Err(invalid(
                "init_script",
                format!("at most {MAX_INIT_SCRIPTS} scripts, got {}", scripts.len()),
            ));
        }
        for name in self.allowed_envs() {
            if let Err(reason) = validate_env_name(name) {
                return Err(invalid("allowed_envs", reason));
            }
        }
        if let Some(ports) = self.port_policy.as_ref().and_then(|p| p.ports.as_ref()) {
            let mut seen = std::collections::BTreeSet::new();
            for p in ports {
                if p.port == 0 {
                    return Err(invalid("port_policy.ports", "port 0 is not a valid port"));
                }
                if !seen.insert(p.port) {
                    return Err(invalid("port_policy.ports", format!("port {} listed twice", p.port)));
                }
            }
        }
        if let Some(req) = &self.requirements {
            for p in req.platforms.iter().flatten() {
                if !KNOWN_PLATFORMS.contains(&p.as_str()) {
                    return Err(invalid(
                        "requirements.platforms",
                        format!("unknown platform {p:?} (known: {})", KNOWN_PLATFORMS.join(", ")),
                    ));
                }
            }
            if let Some(h) = &req.launch_token_hash
                && (h.len() != 64 || hex::decode(h).is_err())
            {
                return Err(invalid(
                    "requirements.launch_token_hash",
                    "must be 64 hex characters (sha256)",
                ));
            }
        }
        let mut targets = std::collections::BTreeSet::new();
        for v in self.verity_volumes.iter().flatten() {
            if v.verity_root.bytes().len() != 32 {
                return Err(invalid("verity_volumes.verity_root", "must be 32 bytes of hex"));
            }
            if v.source.is_empty() || v.source.contains('/') || v.source == "." || v.source == ".." {
                return Err(invalid(
                    "verity_volumes.source",
                    format!("{:?} must be a bare file name", v.source),
                ));
            }
            if !v.target.starts_with('/') {
                return Err(invalid(
                    "verity_volumes.target",
                    format!("{:?} must be an absolute path", v.target),
                ));
            }
            if !targets.insert(v.target.as_str()) {
                return Err(invalid(
                    "verity_volumes.target",
                    format!("duplicate target {:?}", v.target),
                ));
            }
        }
        Ok(())
    }

    /// Deterministic JSON (sorted keys, compact, UTF-8 unescaped) of exactly the fields present, as
    /// dstack's SDK `get_compose_hash` serializes a compose before hashing it.
    pub fn to_normalized_json(&self) -> Result<String, AppComposeError> {
        let value = serde_json::to_value(self).map_err(|e| invalid("(serialize)", e.to_string()))?;
        Ok(canonical_json::to_canonical_string(&value))
    }

    /// Effective key provider: explicit `key_provider`, else `kms` if `kms_enabled`, else `local` if
    /// `local_key_provider_enabled`, else `none` (dstack's rule).
    pub fn key_provider(&self) -> KeyProviderKind {
        match self.key_provider {
            Some(kp) => kp,
            None if self.kms_enabled == Some(true) => KeyProviderKind::Kms,
            None if self.local_key_provider_enabled == Some(true) => KeyProviderKind::Local,
            None => KeyProviderKind::None,
        }
    }

    /// True when keys come from a KMS.
    pub fn kms_enabled(&self) -> bool {
        self.key_provider() == KeyProviderKind::Kms
    }

    /// `gateway_enabled || tproxy_enabled || features ∋ "tproxy-net"`.
    pub fn gateway_enabled(&self) -> bool {
        self.gateway_enabled == Some(true)
            || self.tproxy_enabled == Some(true)
            || self.features.iter().flatten().any(|f| f == "tproxy-net")
    }

    /// Pinned key provider id bytes (empty = not pinned).
    pub fn key_provider_id(&self) -> Vec<u8> {
        self.key_provider_id.as_ref().map(HexField::bytes).unwrap_or_default()
    }

    /// Init scripts in order.
    pub fn init_scripts(&self) -> &[String] {
        self.init_script.as_ref().map(InitScript::scripts).unwrap_or_default()
    }

    /// Names allowed from the encrypted env.
    pub fn allowed_envs(&self) -> &[String] {
        self.allowed_envs.as_deref().unwrap_or_default()
    }

    pub fn public_logs(&self) -> bool {
        self.public_logs.unwrap_or(false)
    }
    pub fn public_sysinfo(&self) -> bool {
        self.public_sysinfo.unwrap_or(false)
    }
    pub fn public_tcbinfo(&self) -> bool {
        self.public_tcbinfo.unwrap_or(true)
    }
    pub fn no_instance_id(&self) -> bool {
        self.no_instance_id.unwrap_or(false)
    }
    pub fn secure_time(&self) -> bool {
        self.secure_time.unwrap_or(true)
    }
    /// Swap size in bytes (0 = none).
    pub fn swap_size(&self) -> u64 {
        self.swap_size.as_ref().map_or(0, HumanSize::bytes)
    }
    pub fn event_log_version(&self) -> EventLogVersion {
        self.event_log_version.unwrap_or_default()
    }
    pub fn restrict_mode(&self) -> bool {
        self.port_policy.as_ref().and_then(|p| p.restrict_mode).unwrap_or(false)
    }
}

/// dstack's env name rule (`parse_env_file.rs`): `^[A-Za-z_][A-Za-z0-9_]*$`, at most 255 bytes.
pub fn validate_env_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("invalid env name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"));
    }
    if name.len() > 255 {
        return Err(format!("env name of {} bytes is longer than 255", name.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
