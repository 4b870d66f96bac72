//! `.appkeys.json`: the app's keys as the guest stores them (dstack's `AppKeys`). Written by our own guest,
//! so unknown fields are rejected. Secret fields are zeroized on drop and redacted from `Debug`.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::hex::hex_vec;
use crate::sys_config::{ConfigError, parse_json};

/// The app key set.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppKeys {
    /// 32 bytes; the LUKS passphrase is its lowercase hex.
    #[serde(with = "hex_vec")]
    pub disk_crypt_key: Vec<u8>,
    /// X25519 secret for the encrypted env (may be empty for non-KMS providers).
    #[serde(default, with = "hex_vec")]
    pub env_crypt_key: Vec<u8>,
    /// App root secp256k1 secret (32 bytes).
    #[serde(with = "hex_vec")]
    pub k256_key: Vec<u8>,
    /// KMS root signature over the app k256 public key (65 bytes r‖s‖v).
    #[serde(with = "hex_vec")]
    pub k256_signature: Vec<u8>,
    pub gateway_app_id: String,
    /// KMS root CA certificate (PEM).
    pub ca_cert: String,
    pub key_provider: KeyProvider,
}

/// Where the keys came from (externally tagged, as dstack writes it: `{"Kms": {...}}`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum KeyProvider {
    None {
        /// PKCS#8 PEM of the locally generated app CA key.
        key: String,
    },
    Local {
        key: String,
        /// Measurement of the local (SGX) key provider.
        #[serde(with = "hex_vec")]
        mr: Vec<u8>,
    },
    Tpm {
        key: String,
        #[serde(with = "hex_vec")]
        pubkey: Vec<u8>,
    },
    Kms {
        url: String,
        /// KMS root CA public key (SPKI DER).
        #[serde(with = "hex_vec")]
        pubkey: Vec<u8>,
        tmp_ca_key: String,
        tmp_ca_cert: String,
    },
}

impl KeyProvider {
    /// The provider kind.
    pub fn kind(&self) -> crate::KeyProviderKind {
        match self {
            Self::None { .. } => crate::KeyProviderKind::None,
            Self::Local { .. } => crate::KeyProviderKind::Local,
            Self::Tpm { .. } => crate::KeyProviderKind::Tpm,
            Self::Kms { .. } => crate::KeyProviderKind::Kms,
        }
    }

    /// Stable provider id as measured and pinned: KMS root CA pubkey, local MR; empty for none/TPM.
    pub fn id(&self) -> &[u8] {
        match self {
            Self::Local { mr, .. } => mr,
            Self::Kms { pubkey, .. } => pubkey,
            Self::None { .. } | Self::Tpm { .. } => &[],
        }
    }
}

impl AppKeys {
    /// Parses `.appkeys.json`, checking key lengths.
    pub fn from_slice(raw: &[u8]) -> Result<Self, ConfigError> {
        let keys: Self = parse_json(crate::shared_files::APP_KEYS, raw, 1 << 20)?;
        let bad = |field, reason: String| ConfigError::Invalid {
            file: crate::shared_files::APP_KEYS,
            field,
            reason,
        };
        if keys.disk_crypt_key.len() != 32 {
            return Err(bad(
                "disk_crypt_key",
                format!("expected 32 bytes, got {}", keys.disk_crypt_key.len()),
            ));
        }
        if !(keys.env_crypt_key.is_empty() || keys.env_crypt_key.len() == 32) {
            return Err(bad(
                "env_crypt_key",
                format!("expected 32 bytes, got {}", keys.env_crypt_key.len()),
            ));
        }
        if keys.k256_key.len() != 32 {
            return Err(bad(
                "k256_key",
                format!("expected 32 bytes, got {}", keys.k256_key.len()),
            ));
        }
        if !(keys.k256_signature.is_empty() || keys.k256_signature.len() == 65) {
            return Err(bad(
                "k256_signature",
                format!("expected 65 bytes, got {}", keys.k256_signature.len()),
            ));
        }
        Ok(keys)
    }
}

impl Drop for AppKeys {
    fn drop(&mut self) {
        self.disk_crypt_key.zeroize();
        self.env_crypt_key.zeroize();
        self.k256_key.zeroize();
    }
}

impl Drop for KeyProvider {
    fn drop(&mut self) {
        match self {
            Self::None { key } | Self::Local { key, .. } | Self::Tpm { key, .. } => key.zeroize(),
            Self::Kms { tmp_ca_key, .. } => tmp_ca_key.zeroize(),
        }
    }
}

impl fmt::Debug for AppKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppKeys")
            .field("disk_crypt_key", &"<redacted>")
            .field("env_crypt_key", &"<redacted>")
            .field("k256_key", &"<redacted>")
            .field("k256_signature", &hex::encode(&self.k256_signature))
            .field("gateway_app_id", &self.gateway_app_id)
            .field("key_provider", &self.key_provider)
            .finish()
    }
}

impl fmt::Debug for KeyProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None { .. } => f.write_str("None { key: <redacted> }"),
            Self::Local { mr, .. } => write!(f, "Local {{ mr: {} }}", hex::encode(mr)),
            Self::Tpm { pubkey, .. } => write!(f, "Tpm {{ pubkey: {} }}", hex::encode(pubkey)),
            Self::Kms { url, pubkey, .. } => write!(f, "Kms {{ url: {url}, pubkey: {} }}", hex::encode(pubkey)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sdk/simulator/appkeys.json` from Dstack-TEE/dstack (a file dstack itself produced).
    const SIMULATOR_APPKEYS: &str = include_str!("../tests/fixtures/simulator-appkeys.json");

    #[test]
    fn parses_dstack_simulator_appkeys() {
        let keys = AppKeys::from_slice(SIMULATOR_APPKEYS.as_bytes()).unwrap();
        assert_eq!(keys.gateway_app_id, "any");
        assert_eq!(keys.key_provider.kind(), crate::KeyProviderKind::None);
        assert!(keys.key_provider.id().is_empty());
        assert_eq!(
            hex::encode(&keys.k256_key),
            "d6e88992cdeeee35fe70b5db61ab66cdb191fb9b6ec9313757ef162dd7214d5d"
        );
        let dbg = format!("{keys:?}");
        assert!(!dbg.contains("d6e88992"), "secret leaked into Debug: {dbg}");
        assert!(!dbg.contains("PRIVATE KEY"), "secret leaked into Debug: {dbg}");
        // Round trip keeps the externally tagged enum shape.
        let json = serde_json::to_value(&keys).unwrap();
        assert!(json["key_provider"]["None"]["key"].is_string());
    }

    #[test]
    fn kms_provider_and_bad_inputs() {
        let mut v: serde_json::Value = serde_json::from_str(SIMULATOR_APPKEYS).unwrap();
        v["key_provider"] = serde_json::json!({"Kms": {"url": "https://kms", "pubkey": "abcd",
            "tmp_ca_key": "k", "tmp_ca_cert": "c"}});
        let keys = AppKeys::from_slice(v.to_string().as_bytes()).unwrap();
        assert_eq!(keys.key_provider.id(), &[0xab, 0xcd]);

        let mut unknown = v.clone();
        unknown["key_provider"] = serde_json::json!({"Sgx": {"key": "k"}});
        let err = AppKeys::from_slice(unknown.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("Sgx"), "{err}");

        let mut short = v.clone();
        short["disk_crypt_key"] = "00".into();
        let err = AppKeys::from_slice(short.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("disk_crypt_key") && err.contains("32"), "{err}");

        let mut extra = v;
        extra["surprise"] = 1.into();
        let err = AppKeys::from_slice(extra.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("surprise"), "{err}");
    }
}
