//! App keys (DESIGN.md §3 step 5): provider `none` (a fresh random seed every boot → keys derived as
//! dstack's `gen_app_keys_from_seed`; the disk is therefore ephemeral) and `kms` through the [`KeySource`]
//! trait (RA-TLS `GetAppKey`, implemented in [`super::kms`]). After keys arrive: the pinned `key_provider_id` is
//! checked, then `os-image-hash` (KMS only) and `key-provider` are measured.

use dstack_types::{AppCompose, AppKeys, KeyProvider, KeyProviderKind};
use p256::pkcs8::EncodePrivateKey;
use zeroize::Zeroizing;

use super::measure::{RuntimeEvent, key_provider_payload, names};

/// Errors getting keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key provider {0:?} is not supported by this guest")]
    Unsupported(KeyProviderKind),
    #[error("key provider kms: no KMS client is available in this build")]
    NoKms,
    #[error("key provider {provider}: {reason}")]
    Provider { provider: &'static str, reason: String },
    #[error("key provider id mismatch: app-compose pins {pinned}, provider has {actual}")]
    PinMismatch { pinned: String, actual: String },
    #[error("keys: {0}")]
    Invalid(String),
}

/// What a KMS returned (the `GetAppKey` answer turned into `.appkeys.json` form).
#[derive(Debug, Clone)]
pub struct KmsKeys {
    pub keys: AppKeys,
    /// `AppKeyResponse.os_image_hash`, measured as `os-image-hash`.
    pub os_image_hash: Vec<u8>,
}

/// Gets app keys from a KMS (first working URL of `kms_urls`, over RA-TLS). Implemented by the KMS client.
pub trait KeySource: Send + Sync {
    /// `key_provider_id`: app-compose's pin of the KMS root CA SubjectPublicKeyInfo (empty = none).
    fn get_app_keys(&self, kms_urls: &[String], vm_config: &str, key_provider_id: &[u8]) -> Result<KmsKeys, KeyError>;
}

/// Keys for provider `none` from a 32-byte seed (dstack: app CA key from `["app-key"]`, disk key
/// `SHA256(PKCS#8(derive_p256(seed, ["app-disk-key"])))`, k256 from `["app-k256-key"]`; no env key).
pub fn none_keys_from_seed(seed: &[u8; 32]) -> Result<AppKeys, KeyError> {
    let k = dstack_keys::app_keys::derive_seed_app_keys(seed).map_err(|e| KeyError::Provider {
        provider: "none",
        reason: e.to_string(),
    })?;
    let pem = k
        .app_ca_key
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|e| KeyError::Provider {
            provider: "none",
            reason: format!("encoding the app CA key: {e}"),
        })?;
    Ok(AppKeys {
        disk_crypt_key: k.disk_crypt_key.to_vec(),
        env_crypt_key: Vec::new(),
        k256_key: k.k256_key.to_vec(),
        k256_signature: Vec::new(),
        gateway_app_id: String::new(),
        // dstack also self-signs an app CA certificate here; the agent session adds it (needs rcgen).
        ca_cert: String::new(),
        key_provider: KeyProvider::None { key: pem.to_string() },
    })
}

/// Provider `none`: a fresh seed from the OS RNG.
pub fn none_keys() -> Result<AppKeys, KeyError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..]).map_err(|e| KeyError::Provider {
        provider: "none",
        reason: format!("OS RNG: {e}"),
    })?;
    none_keys_from_seed(&seed)
}

/// Keys for the app's provider, plus the KMS-only `os-image-hash`.
pub fn provide(
    compose: &AppCompose,
    kms: Option<&dyn KeySource>,
    kms_urls: &[String],
    vm_config: &str,
) -> Result<(AppKeys, Option<Vec<u8>>), KeyError> {
    match compose.key_provider() {
        KeyProviderKind::None => Ok((none_keys()?, None)),
        KeyProviderKind::Kms => {
            if kms_urls.is_empty() {
                return Err(KeyError::Provider {
                    provider: "kms",
                    reason: "sys-config has no kms_urls".into(),
                });
            }
            let r = kms
                .ok_or(KeyError::NoKms)?
                .get_app_keys(kms_urls, vm_config, &compose.key_provider_id())?;
            Ok((r.keys, Some(r.os_image_hash)))
        }
        other => Err(KeyError::Unsupported(other)),
    }
}

/// Checks lengths and the app-compose `key_provider_id` pin.
pub fn verify(compose: &AppCompose, keys: &AppKeys) -> Result<(), KeyError> {
    if keys.disk_crypt_key.len() != 32 {
        return Err(KeyError::Invalid(format!(
            "disk_crypt_key is {} bytes, expected 32",
            keys.disk_crypt_key.len()
        )));
    }
    if !(keys.env_crypt_key.is_empty() || keys.env_crypt_key.len() == 32) {
        return Err(KeyError::Invalid(format!(
            "env_crypt_key is {} bytes",
            keys.env_crypt_key.len()
        )));
    }
    if keys.key_provider.kind() != compose.key_provider() {
        return Err(KeyError::Invalid(format!(
            "keys came from {:?}, app-compose wants {:?}",
            keys.key_provider.kind(),
            compose.key_provider()
        )));
    }
    let pinned = compose.key_provider_id();
    if !pinned.is_empty() && pinned != keys.key_provider.id() {
        return Err(KeyError::PinMismatch {
            pinned: hex::encode(pinned),
            actual: hex::encode(keys.key_provider.id()),
        });
    }
    Ok(())
}

/// `os-image-hash` (KMS only) and `key-provider`, in that order.
pub fn key_events(keys: &AppKeys, os_image_hash: Option<&[u8]>) -> Result<Vec<RuntimeEvent>, KeyError> {
    let mut ev = Vec::new();
    if let Some(h) = os_image_hash {
        ev.push(RuntimeEvent::new(names::OS_IMAGE_HASH, h));
    }
    let (name, id) = match &keys.key_provider {
        KeyProvider::None { .. } => ("none", String::new()),
        KeyProvider::Kms { pubkey, .. } => ("kms", hex::encode(pubkey)),
        KeyProvider::Local { mr, .. } => ("local-sgx", hex::encode(mr)),
        KeyProvider::Tpm { .. } => return Err(KeyError::Unsupported(KeyProviderKind::Tpm)),
    };
    ev.push(RuntimeEvent::new(names::KEY_PROVIDER, key_provider_payload(name, &id)));
    Ok(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compose(extra: &str) -> AppCompose {
        AppCompose::from_slice(format!(r#"{{"manifest_version":"2","name":"t","runner":"bash"{extra}}}"#).as_bytes())
            .unwrap()
    }

    #[test]
    fn none_keys_are_fresh_and_well_formed() {
        let a = none_keys().unwrap();
        let b = none_keys().unwrap();
        assert_ne!(a.disk_crypt_key, b.disk_crypt_key, "random seed per boot");
        verify(&compose(""), &a).unwrap();
        let KeyProvider::None { key } = &a.key_provider else {
            panic!()
        };
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        // Same seed, same keys (derivation is deterministic; crates/keys carries dstack's vectors).
        let s = [7u8; 32];
        assert_eq!(
            none_keys_from_seed(&s).unwrap().disk_crypt_key,
            none_keys_from_seed(&s).unwrap().disk_crypt_key
        );
    }

    #[test]
    fn pin_mismatch_and_wrong_provider_rejected() {
        let keys = AppKeys {
            disk_crypt_key: vec![1; 32],
            env_crypt_key: vec![2; 32],
            k256_key: vec![3; 32],
            k256_signature: vec![4; 65],
            gateway_app_id: String::new(),
            ca_cert: String::new(),
            key_provider: KeyProvider::Kms {
                url: "https://kms".into(),
                pubkey: vec![0xaa, 0xbb],
                tmp_ca_key: String::new(),
                tmp_ca_cert: String::new(),
            },
        };
        verify(&compose(r#","key_provider":"kms","key_provider_id":"aabb""#), &keys).unwrap();
        let err = verify(&compose(r#","key_provider":"kms","key_provider_id":"aabc""#), &keys).unwrap_err();
        assert!(matches!(err, KeyError::PinMismatch { .. }), "{err}");
        assert!(verify(&compose(""), &keys).is_err(), "kms keys for a none app");
        let ev = key_events(&keys, Some(&[9; 32])).unwrap();
        assert_eq!(ev[0].name, "os-image-hash");
        assert_eq!(ev[1].payload, br#"{"name":"kms","id":"aabb"}"#);
    }

    #[test]
    fn kms_without_client_or_urls_fails() {
        let c = compose(r#","key_provider":"kms""#);
        assert!(matches!(
            provide(&c, None, &["https://k".into()], "{}"),
            Err(KeyError::NoKms)
        ));
        assert!(provide(&c, None, &[], "{}").is_err());
        assert!(matches!(
            provide(&compose(r#","key_provider":"tpm""#), None, &[], "{}"),
            Err(KeyError::Unsupported(KeyProviderKind::Tpm))
        ));
    }
}
