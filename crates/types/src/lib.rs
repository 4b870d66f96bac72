//! dstack-compatible configuration types shared by guest-init, the KMS, the gateway and the VMM:
//! `app-compose.json` ([`AppCompose`]), `.sys-config.json` ([`SysConfig`], [`VmConfig`]),
//! `.instance_info` ([`InstanceInfo`]), `.appkeys.json` ([`AppKeys`]), the app identities
//! ([`identity`]) and MRCONFIGID ([`mr_config`]).
//!
//! Compatibility reference: dstack's `dstack-types` crate (field names, defaults, aliases). Deliberate
//! differences are stricter parsing, documented on each type.

pub mod app_compose;
pub mod app_keys;
pub mod canonical_json;
pub mod hex;
pub mod identity;
pub mod mr_config;
pub mod size;
pub mod sys_config;

pub use app_compose::{AppCompose, AppComposeError, EventLogVersion, KeyProviderKind, Runner};
pub use app_keys::{AppKeys, KeyProvider};
pub use hex::{AppId, ComposeHash, InstanceId, InstanceIdSeed};
pub use identity::{AppIdentity, app_id, compose_hash, instance_id, random_seed, resolve_identity};
pub use mr_config::MrConfig;
pub use sys_config::{ConfigError, InstanceInfo, SysConfig, VmConfig};

/// Errors for identities and lengths.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: expected {expected} bytes, got {got}")]
    Length {
        field: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("OS random number generator failed: {0}")]
    Random(String),
}

/// Files the host shares with the guest, under [`shared_files::HOST_SHARED_DIR`] (dstack's names).
pub mod shared_files {
    /// Where the guest sees the host-shared files.
    pub const HOST_SHARED_DIR: &str = "/dstack/.host-shared";
    /// Environment variable that overrides [`HOST_SHARED_DIR`] (dstack's name).
    pub const HOST_SHARED_DIR_ENV: &str = "DSTACK_HOST_SHARED_DIR";
    /// The measured app manifest.
    pub const APP_COMPOSE: &str = "app-compose.json";
    /// Host configuration (URLs, `vm_config`).
    pub const SYS_CONFIG: &str = ".sys-config.json";
    /// Encrypted env blob (X25519 + AES-256-GCM).
    pub const ENCRYPTED_ENV: &str = ".encrypted-env";
    /// Free-form user config (not measured).
    pub const USER_CONFIG: &str = ".user-config";
    /// Instance id seed / pinned app id.
    pub const INSTANCE_INFO: &str = ".instance_info";
    /// App keys written by the guest after key provisioning.
    pub const APP_KEYS: &str = ".appkeys.json";
    /// Decrypted env as shell-escaped `KEY=VALUE` lines.
    pub const DECRYPTED_ENV: &str = ".decrypted-env";
    /// Decrypted env as a JSON object.
    pub const DECRYPTED_ENV_JSON: &str = ".decrypted-env.json";
    /// Older hosts' names (dstack `compat_v3`).
    pub mod compat_v3 {
        pub const SYS_CONFIG: &str = "config.json";
        pub const ENCRYPTED_ENV: &str = "encrypted-env";
    }
}
