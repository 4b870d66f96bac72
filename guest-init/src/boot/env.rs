//! Encrypted env (DESIGN.md §3 step 7): decrypt `.encrypted-env` with `env_crypt_key`, keep only names in
//! `allowed_envs`, write `.decrypted-env` (dstack's shell-escaped `KEY=VALUE`) and `.decrypted-env.json`
//! (a JSON object, as dstack's `BTreeMap` serializes), both mode 0600.

use std::collections::BTreeMap;
use std::path::Path;

use dstack_keys::env::{EnvVar, decrypt_env, filter_allowed, to_env_file};
use dstack_types::shared_files as names;

use super::config::write_private;

/// Errors with the env.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(transparent)]
    Decrypt(#[from] dstack_keys::EnvError),
    #[error("env_crypt_key is {0} bytes, expected 32")]
    KeyLength(usize),
    #[error("writing {file}: {source}")]
    Write {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Decrypts and filters. No blob → no variables. A blob without an env key (provider `none`) is
/// skipped with a warning, as dstack does.
pub fn decrypt(blob: &[u8], env_crypt_key: &[u8], allowed: &[String]) -> Result<Vec<EnvVar>, EnvError> {
    if blob.is_empty() {
        return Ok(Vec::new());
    }
    if env_crypt_key.is_empty() {
        tracing::warn!("encrypted env present but the key provider gives no env key; ignoring it");
        return Ok(Vec::new());
    }
    let key: [u8; 32] = env_crypt_key
        .try_into()
        .map_err(|_| EnvError::KeyLength(env_crypt_key.len()))?;
    let key = zeroize::Zeroizing::new(key);
    let vars = decrypt_env(&key, blob)?;
    let filtered = filter_allowed(vars, allowed)?;
    if !filtered.skipped.is_empty() {
        tracing::warn!(
            "encrypted env: dropped names not in allowed_envs: {}",
            filtered.skipped.join(", ")
        );
    }
    Ok(filtered.vars)
}

/// Writes both files into `dir`.
pub fn write_files(dir: &Path, vars: &[EnvVar]) -> Result<(), EnvError> {
    let text = to_env_file(vars);
    write_private(&dir.join(names::DECRYPTED_ENV), text.as_bytes()).map_err(|source| EnvError::Write {
        file: names::DECRYPTED_ENV,
        source,
    })?;
    let map: BTreeMap<&str, &str> = vars.iter().map(|v| (v.key.as_str(), v.value.as_str())).collect();
    let json = zeroize::Zeroizing::new(serde_json::to_vec(&map).unwrap_or_default());
    write_private(&dir.join(names::DECRYPTED_ENV_JSON), &json).map_err(|source| EnvError::Write {
        file: names::DECRYPTED_ENV_JSON,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrypts_filters_and_writes() {
        let secret = [9u8; 32];
        let public = dstack_keys::app_keys::x25519_public(&secret);
        let blob = dstack_keys::encrypt_env(
            &public,
            &[
                EnvVar::new("TOKEN", "a b$c"),
                EnvVar::new("EVIL", "x"),
                EnvVar::new("PLAIN", "v"),
            ],
        )
        .unwrap();
        let allowed = vec!["TOKEN".to_owned(), "PLAIN".to_owned()];
        let vars = decrypt(&blob, &secret, &allowed).unwrap();
        assert_eq!(
            vars.iter().map(|v| v.key.as_str()).collect::<Vec<_>>(),
            ["PLAIN", "TOKEN"]
        );
        let d = tempfile::tempdir().unwrap();
        write_files(d.path(), &vars).unwrap();
        let text = std::fs::read_to_string(d.path().join(names::DECRYPTED_ENV)).unwrap();
        assert_eq!(text, "PLAIN=v\nTOKEN=\"a b\\$c\"\n");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join(names::DECRYPTED_ENV_JSON)).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"PLAIN": "v", "TOKEN": "a b$c"}));
        assert!(!text.contains("EVIL"));
    }

    #[test]
    fn wrong_key_fails_and_missing_key_skips() {
        let public = dstack_keys::app_keys::x25519_public(&[9; 32]);
        let blob = dstack_keys::encrypt_env(&public, &[EnvVar::new("A", "1")]).unwrap();
        assert!(decrypt(&blob, &[8; 32], &["A".into()]).is_err());
        assert!(decrypt(&blob, &[], &["A".into()]).unwrap().is_empty());
        assert!(decrypt(&[], &[9; 32], &[]).unwrap().is_empty());
        assert!(matches!(decrypt(&blob, &[9; 31], &[]), Err(EnvError::KeyLength(31))));
    }
}
