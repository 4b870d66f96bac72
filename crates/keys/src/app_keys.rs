//! Per-app key material the KMS derives (DESIGN.md §6, `dstack/kms/src/main_service.rs`), and the guest
//! agent's `GetKey` derivation and signature chain (DESIGN.md §5).
//!
//! - `disk_crypt_key = derive_dh_secret(root_ca, [app_id, instance_id, "app-disk-crypt-key"])`
//! - `env_crypt_key  = derive_dh_secret(root_ca, [app_id, "env-encrypt-key"])` (raw X25519 secret bytes)
//! - `k256_key       = derive_key(root_k256, [app_id, "app-key"], 32)`
//! - `k256_signature = sign_message(root_k256, "dstack-kms-issued", app_id, compressed(k256 pubkey))`
//! - app CA key      = `derive_p256(root_ca, [app_id, "app-ca"])`

use ed25519_dalek::SigningKey as Ed25519SigningKey;
use k256::ecdsa::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::{
    Error,
    kdf::{derive_dh_secret, derive_dh_secrets, derive_key32, derive_p256, derive_p256_from_bytes, p256_pkcs8_der},
    sig::{
        ENV_PUBKEY_PREFIX, KMS_ISSUED_PREFIX, RECOVERABLE_SIG_LEN, compressed, k256_signing_key, keccak256,
        message_digest, message_digest_with_timestamp, recover, sign_message, sign_message_with_timestamp,
        sign_prehash_recoverable,
    },
};

/// Length of app and instance ids.
pub const ID_LEN: usize = 20;

/// The keys `GetAppKey` returns (besides the CA certificate and metadata).
pub struct AppKeyMaterial {
    pub disk_crypt_key: Zeroizing<[u8; 32]>,
    pub env_crypt_key: Zeroizing<[u8; 32]>,
    pub k256_key: Zeroizing<[u8; 32]>,
    pub k256_signature: [u8; RECOVERABLE_SIG_LEN],
}

impl std::fmt::Debug for AppKeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKeyMaterial")
            .field("k256_signature", &hex::encode(self.k256_signature))
            .finish_non_exhaustive()
    }
}

fn check_instance_id(instance_id: &[u8]) -> Result<(), Error> {
    if instance_id.is_empty() || instance_id.len() == ID_LEN {
        Ok(())
    } else {
        Err(Error::Length {
            what: "instance_id",
            expected: ID_LEN,
            got: instance_id.len(),
        })
    }
}

/// Derives an app's keys. `instance_id` is 20 bytes, or empty for apps with `no_instance_id`.
pub fn derive_app_keys(
    root_ca: &p256::SecretKey,
    root_k256: &SigningKey,
    app_id: &[u8; ID_LEN],
    instance_id: &[u8],
) -> Result<AppKeyMaterial, Error> {
    check_instance_id(instance_id)?;
    // Both P-256 derivations in one batch (one shared field inversion); same bytes as
    // `AppLevelKeys::derive(..)?.for_instance(..)` (checked in the tests).
    let secrets = derive_dh_secrets(
        root_ca,
        &[
            &[app_id, instance_id, b"app-disk-crypt-key"],
            &[app_id, b"env-encrypt-key"],
        ],
    )?;
    let [disk_crypt_key, env_crypt_key] = <[_; 2]>::try_from(secrets)
        .map_err(|v| Error::Encoding(format!("expected 2 derived secrets, got {}", v.len())))?;
    let (app_key, k256_signature) = derive_k256_app_key(root_k256, app_id)?;
    Ok(AppKeyMaterial {
        disk_crypt_key,
        env_crypt_key,
        k256_key: Zeroizing::new(<[u8; 32]>::from(app_key.to_bytes())),
        k256_signature,
    })
}

/// The part of an app's keys that does not depend on the instance (env key, k256 key and its signature).
/// A KMS may cache it per app id; each instance then costs one P-256 derivation (the disk key).
#[derive(Clone)]
pub struct AppLevelKeys {
    app_id: [u8; ID_LEN],
    env_crypt_key: Zeroizing<[u8; 32]>,
    k256_key: Zeroizing<[u8; 32]>,
    k256_signature: [u8; RECOVERABLE_SIG_LEN],
}

impl std::fmt::Debug for AppLevelKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppLevelKeys")
            .field("app_id", &hex::encode(self.app_id))
            .finish_non_exhaustive()
    }
}

impl AppLevelKeys {
    /// Derives the instance-independent keys of `app_id`.
    pub fn derive(root_ca: &p256::SecretKey, root_k256: &SigningKey, app_id: &[u8; ID_LEN]) -> Result<Self, Error> {
        let env_crypt_key = env_crypt_key(root_ca, app_id)?;
        let (app_key, k256_signature) = derive_k256_app_key(root_k256, app_id)?;
        let k256_key = Zeroizing::new(<[u8; 32]>::from(app_key.to_bytes()));
        Ok(Self {
            app_id: *app_id,
            env_crypt_key,
            k256_key,
            k256_signature,
        })
    }

    /// Completes the key set for one instance (20-byte id, or empty).
    pub fn for_instance(&self, root_ca: &p256::SecretKey, instance_id: &[u8]) -> Result<AppKeyMaterial, Error> {
        Ok(AppKeyMaterial {
            disk_crypt_key: disk_crypt_key(root_ca, &self.app_id, instance_id)?,
            env_crypt_key: self.env_crypt_key.clone(),
            k256_key: self.k256_key.clone(),
            k256_signature: self.k256_signature,
        })
    }
}

/// The instance's disk key (the LUKS passphrase is its lowercase hex).
pub fn disk_crypt_key(
    root_ca: &p256::SecretKey,
    app_id: &[u8; ID_LEN],
    instance_id: &[u8],
) -> Result<Zeroizing<[u8; 32]>, Error> {
    check_instance_id(instance_id)?;
    derive_dh_secret(root_ca, &[app_id, instance_id, b"app-disk-crypt-key"])
}

/// The app's X25519 env secret (raw bytes; clamping happens at use, as in dstack).
pub fn env_crypt_key(root_ca: &p256::SecretKey, app_id: &[u8; ID_LEN]) -> Result<Zeroizing<[u8; 32]>, Error> {
    derive_dh_secret(root_ca, &[app_id, b"env-encrypt-key"])
}

/// Keys of apps without a KMS (key provider none / local / TPM), derived from a 32-byte seed the way
/// dstack-util's `gen_app_keys_from_seed` does: app CA key = `derive_p256_from_bytes(seed, ["app-key"])`,
/// disk key = `SHA256(PKCS#8 DER of derive_p256_from_bytes(seed, ["app-disk-key"]))`,
/// k256 key = `derive_key(seed, ["app-k256-key"], 32)`. No env key and no KMS signature.
pub struct SeedAppKeys {
    pub app_ca_key: p256::SecretKey,
    pub disk_crypt_key: Zeroizing<[u8; 32]>,
    pub k256_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SeedAppKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeedAppKeys { .. }")
    }
}

/// Derives [`SeedAppKeys`] from a provider seed.
pub fn derive_seed_app_keys(seed: &[u8]) -> Result<SeedAppKeys, Error> {
    let app_ca_key = derive_p256_from_bytes(seed, &[b"app-key"])?;
    let disk = derive_p256_from_bytes(seed, &[b"app-disk-key"])?;
    let disk_crypt_key = Zeroizing::new(Sha256::digest(&p256_pkcs8_der(&disk)?[..]).into());
    let k256_key = derive_key32(seed, &[b"app-k256-key"])?;
    k256_signing_key(&k256_key[..])?;
    Ok(SeedAppKeys {
        app_ca_key,
        disk_crypt_key,
        k256_key,
    })
}

/// X25519 public key for an env secret.
pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// App k256 key and the KMS root's signature over its compressed public key.
pub fn derive_k256_app_key(
    root_k256: &SigningKey,
    app_id: &[u8; ID_LEN],
) -> Result<(SigningKey, [u8; RECOVERABLE_SIG_LEN]), Error> {
    let root_bytes = Zeroizing::new(<[u8; 32]>::from(root_k256.to_bytes()));
    let derived = derive_key32(&root_bytes[..], &[app_id, b"app-key"])?;
    let key = k256_signing_key(&derived[..])?;
    let sig = sign_message(root_k256, KMS_ISSUED_PREFIX, app_id, &compressed(key.verifying_key()));
    Ok((key, sig))
}

/// App CA key for `SignCert`.
pub fn app_ca_key(root_ca: &p256::SecretKey, app_id: &[u8; ID_LEN]) -> Result<p256::SecretKey, Error> {
    derive_p256(root_ca, &[app_id, b"app-ca"])
}

/// `GetAppEnvEncryptPubKey` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPubKeyResponse {
    pub public_key: [u8; 32],
    /// Legacy signature without timestamp.
    pub signature: [u8; RECOVERABLE_SIG_LEN],
    pub timestamp: u64,
    /// Signature including the timestamp.
    pub signature_v1: [u8; RECOVERABLE_SIG_LEN],
}

/// Builds the KMS's `GetAppEnvEncryptPubKey` response at `timestamp` (seconds since the epoch).
pub fn env_pubkey_response(
    root_ca: &p256::SecretKey,
    root_k256: &SigningKey,
    app_id: &[u8; ID_LEN],
    timestamp: u64,
) -> Result<EnvPubKeyResponse, Error> {
    let secret = env_crypt_key(root_ca, app_id)?;
    let public_key = x25519_public(&secret);
    Ok(EnvPubKeyResponse {
        public_key,
        signature: sign_message(root_k256, ENV_PUBKEY_PREFIX, app_id, &public_key),
        timestamp,
        signature_v1: sign_message_with_timestamp(root_k256, ENV_PUBKEY_PREFIX, app_id, timestamp, &public_key),
    })
}

/// Recovers the KMS signer of an env public key (timestamped form); the caller checks the key is trusted
/// and the timestamp is fresh.
pub fn recover_env_pubkey_signer(
    app_id: &[u8],
    public_key: &[u8; 32],
    timestamp: u64,
    signature_v1: &[u8],
) -> Result<VerifyingKey, Error> {
    recover(
        &message_digest_with_timestamp(ENV_PUBKEY_PREFIX, app_id, timestamp, public_key),
        signature_v1,
    )
}

/// Recovers the KMS signer of an env public key (legacy form, replayable).
pub fn recover_env_pubkey_signer_legacy(
    app_id: &[u8],
    public_key: &[u8; 32],
    signature: &[u8],
) -> Result<VerifyingKey, Error> {
    recover(&message_digest(ENV_PUBKEY_PREFIX, app_id, public_key), signature)
}

/// `GetKey` algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Secp256k1,
    Ed25519,
}

impl KeyAlgorithm {
    /// dstack's names: `""`, `"secp256k1"`, `"k256"` → secp256k1; `"ed25519"`.
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "" | "secp256k1" | "k256" => Ok(Self::Secp256k1),
            "ed25519" => Ok(Self::Ed25519),
            other => Err(Error::Unsupported(format!("key algorithm {other:?}"))),
        }
    }
}

/// A `GetKey` result.
pub struct DerivedKey {
    /// 32-byte secret (secp256k1 scalar or ed25519 seed).
    pub key: Zeroizing<[u8; 32]>,
    /// SEC1 compressed (33 B) for secp256k1, 32 B for ed25519.
    pub public_key: Vec<u8>,
    /// `[app-k256 sig over Keccak256("{purpose}:{hex(public_key)}"), KMS k256_signature]`.
    pub signature_chain: [Vec<u8>; 2],
}

/// Message the app key signs for a derived key.
pub fn purpose_message(purpose: &str, public_key: &[u8]) -> String {
    format!("{purpose}:{}", hex::encode(public_key))
}

/// The guest agent's `GetKey`: `derive_key(app_k256_key, [path], 32)`, then the chain. The algorithm does
/// not domain-separate the derivation (dstack behaviour): both algorithms get the same secret bytes.
pub fn get_key(
    app_k256_key: &[u8; 32],
    kms_k256_signature: &[u8],
    path: &str,
    purpose: &str,
    algorithm: KeyAlgorithm,
) -> Result<DerivedKey, Error> {
    let key = derive_key32(app_k256_key, &[path.as_bytes()])?;
    let public_key = match algorithm {
        KeyAlgorithm::Secp256k1 => compressed(k256_signing_key(&key[..])?.verifying_key()),
        KeyAlgorithm::Ed25519 => Ed25519SigningKey::from_bytes(&key).verifying_key().to_bytes().to_vec(),
    };
    let app_key = k256_signing_key(app_k256_key)?;
    let digest = keccak256(&[purpose_message(purpose, &public_key).as_bytes()]);
    let sig = sign_prehash_recoverable(&app_key, &digest).to_vec();
    Ok(DerivedKey {
        key,
        public_key,
        signature_chain: [sig, kms_k256_signature.to_vec()],
    })
}

/// The keys a `GetKey` chain proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    /// The app's root k256 public key (compressed).
    pub app_public_key: Vec<u8>,
    /// The KMS root k256 public key (compressed) that issued the app key.
    pub kms_public_key: Vec<u8>,
}

/// Verifies a `GetKey` signature chain for `public_key` and returns the recovered app and KMS keys; the
/// caller compares `kms_public_key` with the KMS's published `k256_pubkey`.
pub fn verify_key_chain(
    app_id: &[u8],
    purpose: &str,
    public_key: &[u8],
    chain: &[Vec<u8>],
) -> Result<VerifiedChain, Error> {
    let [app_sig, kms_sig] = chain else {
        return Err(Error::Signature(format!(
            "chain must have 2 signatures, got {}",
            chain.len()
        )));
    };
    let app_key = recover(&keccak256(&[purpose_message(purpose, public_key).as_bytes()]), app_sig)?;
    let app_public_key = compressed(&app_key);
    let kms_key = recover(&message_digest(KMS_ISSUED_PREFIX, app_id, &app_public_key), kms_sig)?;
    Ok(VerifiedChain {
        app_public_key,
        kms_public_key: compressed(&kms_key),
    })
}

#[cfg(test)]
mod tests;
