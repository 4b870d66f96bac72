//! Encrypted environment variables (dstack-compatible, DESIGN.md §3 step 7):
//! blob = `ephemeral X25519 public key (32) ‖ IV (12) ‖ AES-256-GCM(ciphertext ‖ tag(16))`, the AES key is
//! the raw X25519 shared secret (no KDF, no AAD; an all-zero shared secret is rejected), and the plaintext
//! is JSON `{"env":[{"key":…,"value":…},…]}`.
//!
//! Name and size rules follow dstack's `dstack-util/src/parse_env_file.rs`: names match
//! `[A-Za-z_][A-Za-z0-9_]*` and are at most 255 bytes, values at most 128 KiB, at most 1024 variables and
//! 1 MiB in total; names not in `allowed_envs` are skipped before validation; a repeated name keeps its
//! last value. Ours is stricter in one place: the JSON must have exactly the `env` list of `{key, value}`
//! objects (unknown fields are rejected rather than ignored).

use std::collections::{BTreeMap, BTreeSet};

use aes_gcm::{Aes256Gcm, KeyInit, aead::Aead};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// Ephemeral public key length.
pub const EPHEMERAL_LEN: usize = 32;
/// AES-GCM IV length.
pub const IV_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Largest blob accepted (ours): the 1 MiB env limit plus JSON overhead.
pub const MAX_BLOB_LEN: usize = 4 << 20;
/// dstack's limits.
pub const MAX_VARS: usize = 1024;
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_VALUE_LEN: usize = 128 * 1024;
pub const MAX_TOTAL_LEN: usize = 1024 * 1024;

/// Errors from env encryption, decryption and filtering.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("encrypted env: {0} bytes is too short (needs 32-byte key, 12-byte IV and a 16-byte tag)")]
    TooShort(usize),
    #[error("encrypted env: {0} bytes is larger than the {MAX_BLOB_LEN}-byte limit")]
    TooLarge(usize),
    #[error("encrypted env: X25519 shared secret is all zero (low-order public key)")]
    ZeroSharedSecret,
    #[error("encrypted env: decryption failed (wrong key or tampered data)")]
    Decrypt,
    #[error("encrypted env: encryption failed")]
    Encrypt,
    #[error("encrypted env: plaintext is not {{\"env\":[{{\"key\",\"value\"}}]}}: {0}")]
    Json(String),
    #[error("encrypted env: {0}")]
    Invalid(String),
    #[error("OS random number generator failed: {0}")]
    Random(String),
}

/// One variable. The value is zeroized on drop and redacted from `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

impl EnvVar {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

impl Drop for EnvVar {
    fn drop(&mut self) {
        self.value.zeroize();
    }
}

impl std::fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EnvVar {{ key: {:?}, value: <{} bytes> }}",
            self.key,
            self.value.len()
        )
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvDoc {
    env: Vec<EnvVar>,
}

fn shared_secret(secret: &StaticSecret, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, EnvError> {
    let shared = Zeroizing::new(secret.diffie_hellman(&PublicKey::from(*public)).to_bytes());
    if shared.iter().all(|b| *b == 0) {
        return Err(EnvError::ZeroSharedSecret);
    }
    Ok(shared)
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, EnvError> {
    let mut b = Zeroizing::new([0u8; N]);
    getrandom::fill(&mut b[..]).map_err(|e| EnvError::Random(e.to_string()))?;
    Ok(b)
}

/// Encrypts raw bytes to `public_key` with a fresh ephemeral key and IV.
pub fn encrypt_blob(public_key: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>, EnvError> {
    let eph = random::<32>()?;
    let iv = random::<IV_LEN>()?;
    encrypt_blob_with(public_key, plaintext, &eph, &iv)
}

/// Deterministic form of [`encrypt_blob`] (caller supplies ephemeral secret and IV; for test vectors).
pub fn encrypt_blob_with(
    public_key: &[u8; 32],
    plaintext: &[u8],
    ephemeral_secret: &[u8; 32],
    iv: &[u8; IV_LEN],
) -> Result<Vec<u8>, EnvError> {
    let eph = StaticSecret::from(*ephemeral_secret);
    let key = shared_secret(&eph, public_key)?;
    let cipher = Aes256Gcm::new(&(*key).into());
    let ct = cipher
        .encrypt(&(*iv).into(), plaintext)
        .map_err(|_| EnvError::Encrypt)?;
    let mut out = Vec::with_capacity(EPHEMERAL_LEN + IV_LEN + ct.len());
    out.extend_from_slice(PublicKey::from(&eph).as_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Decrypts a blob with the app's `env_crypt_key`.
pub fn decrypt_blob(secret: &[u8; 32], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvError> {
    if blob.len() > MAX_BLOB_LEN {
        return Err(EnvError::TooLarge(blob.len()));
    }
    let (eph, rest) = blob
        .split_first_chunk::<EPHEMERAL_LEN>()
        .ok_or(EnvError::TooShort(blob.len()))?;
    let (iv, ct) = rest
        .split_first_chunk::<IV_LEN>()
        .ok_or(EnvError::TooShort(blob.len()))?;
    if ct.len() < TAG_LEN {
        return Err(EnvError::TooShort(blob.len()));
    }
    let key = shared_secret(&StaticSecret::from(*secret), eph)?;
    let cipher = Aes256Gcm::new(&(*key).into());
    cipher
        .decrypt(&(*iv).into(), ct)
        .map(Zeroizing::new)
        .map_err(|_| EnvError::Decrypt)
}

/// Encrypts variables as dstack's SDKs do.
pub fn encrypt_env(public_key: &[u8; 32], envs: &[EnvVar]) -> Result<Vec<u8>, EnvError> {
    #[derive(Serialize)]
    struct Doc<'a> {
        env: &'a [EnvVar],
    }
    let json = Zeroizing::new(serde_json::to_vec(&Doc { env: envs }).map_err(|e| EnvError::Json(e.to_string()))?);
    encrypt_blob(public_key, &json)
}

/// Decrypts and parses a blob into its variables (no filtering; see [`filter_allowed`]).
pub fn decrypt_env(secret: &[u8; 32], blob: &[u8]) -> Result<Vec<EnvVar>, EnvError> {
    let plain = decrypt_blob(secret, blob)?;
    let doc: EnvDoc = serde_json::from_slice(&plain).map_err(|e| EnvError::Json(e.to_string()))?;
    if doc.env.len() > MAX_VARS {
        return Err(EnvError::Invalid(format!(
            "{} variables, more than {MAX_VARS}",
            doc.env.len()
        )));
    }
    Ok(doc.env)
}

/// Checks a variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes.
pub fn validate_env_name(name: &str) -> Result<(), EnvError> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(EnvError::Invalid(format!(
            "invalid env name {name:?}: must match [A-Za-z_][A-Za-z0-9_]*"
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(EnvError::Invalid(format!(
            "env name of {} bytes is longer than {MAX_NAME_LEN}",
            name.len()
        )));
    }
    Ok(())
}

/// Result of [`filter_allowed`].
#[derive(Debug, Default)]
pub struct FilteredEnv {
    /// Allowed variables, sorted by name, one per name (the last occurrence wins).
    pub vars: Vec<EnvVar>,
    /// Names dropped because they are not in `allowed_envs` (log them; never their values).
    pub skipped: Vec<String>,
}

/// Keeps only names in `allowed`, then validates them as dstack does.
pub fn filter_allowed(envs: Vec<EnvVar>, allowed: &[String]) -> Result<FilteredEnv, EnvError> {
    let allowed: BTreeSet<&str> = allowed.iter().map(String::as_str).collect();
    let mut kept: BTreeMap<String, EnvVar> = BTreeMap::new();
    let mut skipped = Vec::new();
    for var in envs {
        if !allowed.contains(var.key.as_str()) {
            skipped.push(var.key.clone());
            continue;
        }
        validate_env_name(&var.key)?;
        if var.value.len() > MAX_VALUE_LEN {
            return Err(EnvError::Invalid(format!(
                "value of {} is longer than {MAX_VALUE_LEN} bytes",
                var.key
            )));
        }
        kept.insert(var.key.clone(), var);
    }
    let total: usize = kept.values().map(|v| v.key.len() + v.value.len()).sum();
    if total > MAX_TOTAL_LEN {
        return Err(EnvError::Invalid(format!(
            "variables total {total} bytes, more than {MAX_TOTAL_LEN}"
        )));
    }
    Ok(FilteredEnv {
        vars: kept.into_values().collect(),
        skipped,
    })
}

/// `.decrypted-env` text: `KEY=VALUE` lines with dstack's escaping (`parse_env_file.rs::escape_value`):
/// newline, `"`, `$` and backquote are backslash-escaped, and the value is double-quoted when it contains
/// whitespace or a shell metacharacter.
pub fn to_env_file(vars: &[EnvVar]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for v in vars {
        out.push_str(&v.key);
        out.push('=');
        let quote = v.value.chars().any(|c| " \t|&;<>()$`\\\"'\n".contains(c));
        if quote {
            out.push('"');
        }
        for c in v.value.chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '"' => out.push_str("\\\""),
                '$' => out.push_str("\\$"),
                '`' => out.push_str("\\`"),
                c => out.push(c),
            }
        }
        if quote {
            out.push('"');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
