//! The cluster state on disk, so that a restarted node routes to the instances it knew at once and
//! only needs the peers for what changed while it was down.
//!
//! One file, `<state_dir>/cluster-state.json`: the state in its sync wire form (the same records a
//! peer sends) inside a versioned envelope. It holds certificate private keys, so it is written
//! owner-only (0600). Writes are atomic: a temporary file in the same directory is written, fsynced
//! and renamed over the old one, then the directory is fsynced, so a crash leaves either the old or
//! the new state, never a torn one. Loading goes through [`super::store::Store::merge`], which
//! validates every record like one from a peer.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dstack_rpc::gateway::GatewayState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// File name inside the state directory.
pub const STATE_FILE: &str = "cluster-state.json";
const VERSION: u32 = 1;

/// Persistence errors (each names the file).
#[derive(Debug, Error)]
pub enum PersistError {
    /// Reading, writing, syncing or renaming failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a state file of ours.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    saved_ms: u64,
    state: GatewayState,
}

/// Reads and writes the state file of one state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// The state file in `dir` (created, 0700, on first save).
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
        move |source| PersistError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The saved state; `None` when nothing was saved yet.
    pub fn load(&self) -> Result<Option<GatewayState>, PersistError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&path)(e)),
        };
        let env: Envelope = serde_json::from_slice(&text).map_err(|e| PersistError::Format {
            path: path.clone(),
            reason: format!("not a gateway state file: {e}"),
        })?;
        if env.version != VERSION {
            return Err(PersistError::Format {
                path,
                reason: format!("version {} (this build reads {VERSION})", env.version),
            });
        }
        Ok(Some(env.state))
    }

    /// Replace the saved state atomically with `state`.
    pub fn save(&self, state: &GatewayState, saved_ms: u64) -> Result<(), PersistError> {
        let dir = &self.dir;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(Self::io(dir))?;
        }
        let env = Envelope {
            version: VERSION,
            saved_ms,
            state: state.clone(),
        };
        let data = serde_json::to_vec(&env).map_err(|e| PersistError::Format {
            path: self.path(),
            reason: format!("encoding: {e}"),
        })?;
        // Unique per process and call, so concurrent savers never share a temporary file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{STATE_FILE}.{}.{seq}.tmp", std::process::id()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode above is filtered by the umask; make sure it is exactly 0600.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&data)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Self::io(&tmp)(e));
        }
        let path = self.path();
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Self::io(&path)(e));
        }
        // The rename itself is durable only once the directory entry is.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dstack_rpc::gateway::{SyncCert, SyncNode};

    fn sample() -> GatewayState {
        GatewayState {
            sender_id: 3,
            nodes: vec![SyncNode {
                id: 3,
                url: "https://gw3.test:8000".into(),
                wg_public_key: "k".into(),
                wg_ip: "10.0.0.3".into(),
                wg_endpoint: "192.0.2.3:51820".into(),
                updated_ms: 10,
                last_seen_ms: 11,
            }],
            instances: Vec::new(),
            certs: vec![SyncCert {
                domain: "app.test".into(),
                chain_pem: "CHAIN".into(),
                key_pem: "KEY".into(),
                updated_ms: 5,
                origin: 3,
            }],
        }
    }

    #[test]
    fn missing_file_is_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(StateFile::new(&dir.path().join("nope")).load().unwrap().is_none());
    }

    #[test]
    fn round_trip_owner_only_and_no_temporaries_left() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        let f = StateFile::new(&sub);
        f.save(&sample(), 1).unwrap();
        let mut second = sample();
        second.certs[0].key_pem = "KEY2".into();
        f.save(&second, 2).unwrap();
        assert_eq!(f.load().unwrap().unwrap(), second);
        let mode = std::fs::metadata(f.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "state file holds certificate keys");
        let dmode = std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let names: Vec<String> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [STATE_FILE]);
    }

    #[test]
    fn corrupt_or_foreign_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        std::fs::write(f.path(), b"{\"version\":1,\"saved_ms\":1,\"sta").unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains(STATE_FILE) && e.contains("not a gateway state file"), "{e}");
        std::fs::write(f.path(), br#"{"version":9,"saved_ms":1,"state":{}}"#).unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
    }

    #[test]
    fn a_failed_save_keeps_the_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        f.save(&sample(), 1).unwrap();
        // A directory where the file should go makes the rename fail.
        let g = StateFile::new(&dir.path().join("sub"));
        std::fs::create_dir_all(g.path()).unwrap();
        assert!(g.save(&sample(), 2).is_err());
        assert_eq!(f.load().unwrap().unwrap(), sample());
        let left = std::fs::read_dir(dir.path().join("sub")).unwrap().count();
        assert_eq!(left, 1, "temporary file removed after the failed rename");
    }
}
