//! Key material on disk, with dstack's file names in `cert_dir`:
//!
//! | file | content |
//! |---|---|
//! | `root-ca.crt` / `root-ca.key` | P-256 root CA "Dstack KMS CA" (org "Dstack", path length 1), PEM; key PKCS#8 |
//! | `root-k256.key` | raw 32-byte secp256k1 secret |
//! | `tmp-ca.crt` / `tmp-ca.key` | "Dstack Client Temp CA" (path length 0), PEM |
//! | `rpc.crt` / `rpc.key` | the KMS RPC certificate (usage `kms:rpc`, SAN = domain, signed by the root CA) |
//! | `rpc-domain` | the domain of `rpc.crt` |
//! | `bootstrap-info.json` | `BootstrapResponse` as JSON (hex bytes) |
//!
//! Every file is written atomically (temp file + fsync + rename + directory fsync); keys are mode 0600.
//!
//! A new set is first written completely into `.bootstrap-staging/` beside the files, then moved into place
//! file by file with `bootstrap-info.json` last. A crash therefore leaves either an incomplete staging
//! directory and nothing in place (discarded on restart: those keys were never used), or a complete staged
//! set partly moved (rolled forward on restart: the same keys, never a second bootstrap). See
//! [`KeyStore::recover_interrupted`].

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dstack_keys::kdf::p256_from_pkcs8_pem;
use dstack_keys::sig::{compressed, k256_signing_key};
use dstack_ra_tls::CaCert;
use dstack_rpc::kms::BootstrapResponse;
use k256::ecdsa::SigningKey;
use zeroize::Zeroizing;

use crate::KmsError;

pub const ROOT_CA_CERT: &str = "root-ca.crt";
pub const ROOT_CA_KEY: &str = "root-ca.key";
pub const ROOT_K256_KEY: &str = "root-k256.key";
pub const TMP_CA_CERT: &str = "tmp-ca.crt";
pub const TMP_CA_KEY: &str = "tmp-ca.key";
pub const RPC_CERT: &str = "rpc.crt";
pub const RPC_KEY: &str = "rpc.key";
pub const RPC_DOMAIN: &str = "rpc-domain";
pub const BOOTSTRAP_INFO: &str = "bootstrap-info.json";
/// Where a new key set is written completely before it is moved into place.
pub const STAGING_DIR: &str = ".bootstrap-staging";

/// All files a bootstrapped KMS has.
pub const ALL_FILES: [&str; 9] = [
    ROOT_CA_CERT,
    ROOT_CA_KEY,
    ROOT_K256_KEY,
    TMP_CA_CERT,
    TMP_CA_KEY,
    RPC_CERT,
    RPC_KEY,
    RPC_DOMAIN,
    BOOTSTRAP_INFO,
];

/// The KMS's keys in memory.
pub struct KeyMaterial {
    pub root_ca: CaCert,
    /// The root CA key as a P-256 scalar: the root of every app key derivation.
    pub root_ca_secret: p256::SecretKey,
    pub root_k256: SigningKey,
    pub tmp_ca: CaCert,
    pub rpc_cert_pem: String,
    pub rpc_key_pem: Zeroizing<String>,
    pub domain: String,
    pub bootstrap_info: BootstrapResponse,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("domain", &self.domain)
            .field("k256_pubkey", &hex::encode(self.k256_pubkey()))
            .finish_non_exhaustive()
    }
}

impl KeyMaterial {
    /// SEC1 compressed root k256 public key.
    pub fn k256_pubkey(&self) -> Vec<u8> {
        compressed(self.root_k256.verifying_key())
    }
}

/// The `cert_dir`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> KmsError {
    move |e| KmsError::Storage(format!("{what}: {e}"))
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Names of the key files that exist.
    pub fn existing_files(&self) -> Vec<&'static str> {
        ALL_FILES.into_iter().filter(|f| self.path(f).exists()).collect()
    }

    /// True when any key file exists (a bootstrap must not run). An interrupted write of a new set is
    /// recovered first ([`KeyStore::recover_interrupted`]).
    pub fn is_initialized(&self) -> bool {
        if let Err(e) = self.recover_interrupted() {
            tracing::error!("recovering an interrupted key-set write in {}: {e}", self.dir.display());
        }
        !self.existing_files().is_empty()
    }

    fn staging(&self) -> PathBuf {
        self.dir.join(STAGING_DIR)
    }

    /// Finishes or discards a key-set write that a crash interrupted. If every file of the set exists (in the
    /// staging directory or already in place), the staged files are moved into place: the set was complete
    /// before the first move, so this yields exactly the keys that were generated. Otherwise the crash hit
    /// while staging, nothing was moved into place and no key of that set was ever used: the staging directory
    /// is removed. Returns what was done, if anything.
    pub fn recover_interrupted(&self) -> Result<Option<&'static str>, KmsError> {
        let staging = self.staging();
        if !staging.is_dir() {
            return Ok(None);
        }
        let complete = ALL_FILES
            .iter()
            .all(|f| staging.join(f).is_file() || self.path(f).is_file());
        if complete {
            self.move_into_place(&staging)?;
            tracing::warn!(
                "{}: finished moving a key set whose write was interrupted (same keys, no new bootstrap)",
                self.dir.display()
            );
            Ok(Some("rolled forward"))
        } else {
            std::fs::remove_dir_all(&staging).map_err(io(format!("removing {}", staging.display())))?;
            tracing::warn!(
                "{}: discarded a key set whose write was interrupted before completion (never used)",
                self.dir.display()
            );
            Ok(Some("discarded"))
        }
    }

    /// Renames every staged file into place (`bootstrap-info.json` last), then removes the staging directory.
    fn move_into_place(&self, staging: &Path) -> Result<(), KmsError> {
        for f in ALL_FILES {
            let from = staging.join(f);
            if from.is_file() {
                std::fs::rename(&from, self.path(f)).map_err(io(format!("moving {f} into place")))?;
                sync_dir(&self.dir)?;
            }
        }
        std::fs::remove_dir_all(staging).map_err(io(format!("removing {}", staging.display())))?;
        sync_dir(&self.dir)
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, KmsError> {
        let path = self.path(name);
        std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KmsError::Storage(format!("incomplete key material: {} is missing", path.display()))
            } else {
                KmsError::Storage(format!("reading {}: {e}", path.display()))
            }
        })
    }

    fn read_text(&self, name: &str) -> Result<Zeroizing<String>, KmsError> {
        let bytes = self.read(name)?;
        String::from_utf8(bytes)
            .map(Zeroizing::new)
            .map_err(|_| KmsError::Storage(format!("{name} is not UTF-8")))
    }

    /// Loads every key file.
    pub fn load(&self) -> Result<KeyMaterial, KmsError> {
        self.recover_interrupted()?;
        let bad = |name: &str, e: &dyn std::fmt::Display| KmsError::Storage(format!("{name}: {e}"));
        let root_cert = self.read_text(ROOT_CA_CERT)?;
        let root_key = self.read_text(ROOT_CA_KEY)?;
        let root_ca = CaCert::from_pem(&root_cert, &root_key).map_err(|e| bad(ROOT_CA_KEY, &e))?;
        let root_ca_secret = p256_from_pkcs8_pem(&root_key).map_err(|e| bad(ROOT_CA_KEY, &e))?;
        let k256 = Zeroizing::new(self.read(ROOT_K256_KEY)?);
        let root_k256 = k256_signing_key(&k256).map_err(|e| bad(ROOT_K256_KEY, &e))?;
        let tmp_ca = CaCert::from_pem(&self.read_text(TMP_CA_CERT)?, &self.read_text(TMP_CA_KEY)?)
            .map_err(|e| bad(TMP_CA_KEY, &e))?;
        let info = self.read(BOOTSTRAP_INFO)?;
        let bootstrap_info: BootstrapResponse = serde_json::from_slice(&info).map_err(|e| bad(BOOTSTRAP_INFO, &e))?;
        Ok(KeyMaterial {
            root_ca,
            root_ca_secret,
            root_k256,
            tmp_ca,
            rpc_cert_pem: self.read_text(RPC_CERT)?.to_string(),
            rpc_key_pem: self.read_text(RPC_KEY)?,
            domain: self.read_text(RPC_DOMAIN)?.trim().to_owned(),
            bootstrap_info,
        })
    }

    /// Writes a complete key set; refuses when any key file already exists.
    pub fn save_new(&self, keys: &KeyMaterial) -> Result<(), KmsError> {
        create_private_dir(&self.dir)?;
        self.recover_interrupted()?;
        let existing = self.existing_files();
        if !existing.is_empty() {
            return Err(KmsError::AlreadyBootstrapped(format!(
                "{} already holds {}",
                self.dir.display(),
                existing.join(", ")
            )));
        }
        let info = serde_json::to_vec_pretty(&keys.bootstrap_info)
            .map_err(|e| KmsError::Storage(format!("encoding {BOOTSTRAP_INFO}: {e}")))?;
        let root_key = Zeroizing::new(keys.root_ca.key().serialize_pem());
        let tmp_key = Zeroizing::new(keys.tmp_ca.key().serialize_pem());
        let k256 = Zeroizing::new(keys.root_k256.to_bytes().to_vec());
        // Secrets first, bootstrap-info.json last: its presence marks a complete set for humans.
        let files: [(&str, &[u8], u32); 9] = [
            (ROOT_CA_KEY, root_key.as_bytes(), 0o600),
            (ROOT_K256_KEY, &k256, 0o600),
            (TMP_CA_KEY, tmp_key.as_bytes(), 0o600),
            (RPC_KEY, keys.rpc_key_pem.as_bytes(), 0o600),
            (ROOT_CA_CERT, keys.root_ca.cert_pem().as_bytes(), 0o644),
            (TMP_CA_CERT, keys.tmp_ca.cert_pem().as_bytes(), 0o644),
            (RPC_CERT, keys.rpc_cert_pem.as_bytes(), 0o644),
            (RPC_DOMAIN, keys.domain.as_bytes(), 0o644),
            (BOOTSTRAP_INFO, &info, 0o644),
        ];
        // A leftover staging directory is an earlier write that never completed (recovered above when it was).
        let staging = self.staging();
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(format!("removing {}", staging.display())))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io(format!("creating {}", staging.display())))?;
        for (name, data, mode) in files {
            write_atomic(&staging.join(name), data, mode)?;
        }
        sync_dir(&self.dir)?;
        self.move_into_place(&staging)
    }
}

fn sync_dir(dir: &Path) -> Result<(), KmsError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync {}", dir.display())))
}

/// Writes `data` to `path` atomically: a new temp file in the same directory (created with `mode`, so a
/// secret is never readable by others, not even briefly), fsync, rename over `path`, fsync the directory.
/// Creates `dir` (and its parents) private to the KMS user, if missing.
pub fn create_private_dir(dir: &Path) -> Result<(), KmsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))
}

pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), KmsError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| KmsError::Storage(format!("{} has no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        // The umask may have narrowed the mode; make it exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {}", tmp.display())))?;
        f.write_all(data).map_err(io(format!("writing {}", tmp.display())))?;
        f.sync_all().map_err(io(format!("fsync {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("fsync {}", dir.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.key");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn staged(dir: &Path, in_staging: &[&str], in_place: &[&str]) -> KeyStore {
        let store = KeyStore::new(dir);
        std::fs::create_dir_all(dir.join(STAGING_DIR)).unwrap();
        for f in in_staging {
            std::fs::write(dir.join(STAGING_DIR).join(f), format!("content of {f}")).unwrap();
        }
        for f in in_place {
            std::fs::write(dir.join(f), format!("content of {f}")).unwrap();
        }
        store
    }

    #[test]
    fn a_complete_staged_set_is_rolled_forward() {
        let dir = tempfile::tempdir().unwrap();
        // Killed after the first two files were moved into place.
        let store = staged(dir.path(), &ALL_FILES[2..], &ALL_FILES[..2]);
        assert_eq!(store.recover_interrupted().unwrap(), Some("rolled forward"));
        for f in ALL_FILES {
            assert_eq!(
                std::fs::read_to_string(dir.path().join(f)).unwrap(),
                format!("content of {f}")
            );
        }
        assert!(!dir.path().join(STAGING_DIR).exists());
        assert_eq!(store.recover_interrupted().unwrap(), None);
    }

    #[test]
    fn an_incomplete_staged_set_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        // Killed while staging: nothing was moved into place.
        let store = staged(dir.path(), &ALL_FILES[..4], &[]);
        std::fs::write(dir.path().join(STAGING_DIR).join(".tmp-ca.key.tmp1"), b"half").unwrap();
        assert!(!store.is_initialized());
        assert!(!dir.path().join(STAGING_DIR).exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn load_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = KeyStore::new(dir.path()).load().unwrap_err().to_string();
        assert!(err.contains("root-ca.crt is missing"), "{err}");
    }
}
