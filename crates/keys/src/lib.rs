//! dstack-compatible key handling: HKDF derivation ([`kdf`]), per-app KMS keys and the `GetKey` chain
//! ([`app_keys`]), secp256k1 recoverable signatures over Keccak-256 ([`sig`]) and the encrypted env
//! ([`env`]). Byte-for-byte compatible with dstack; each module cites the dstack source it matches and its
//! tests carry dstack's own known-answer vectors.
//!
//! Secrets are returned in `Zeroizing` wrappers and wiped on drop.

pub mod app_keys;
pub mod env;
pub mod kdf;
pub mod sig;

pub use app_keys::{AppKeyMaterial, DerivedKey, KeyAlgorithm, derive_app_keys, get_key, verify_key_chain};
pub use env::{EnvError, EnvVar, decrypt_env, encrypt_env, filter_allowed};
pub use kdf::{derive_dh_secret, derive_key, derive_p256};
pub use sig::{recover, sign_message, sign_message_with_timestamp};

/// Errors from derivation and signatures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("derived key length {len} is outside 1..={max}")]
    KeyLength { len: usize, max: usize },
    #[error("derived bytes are not a valid {0} secret scalar")]
    InvalidScalar(&'static str),
    #[error("{what}: expected {expected} bytes, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("key encoding: {0}")]
    Encoding(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}
