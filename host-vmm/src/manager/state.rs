//! Persisted per-VM state in `<run_path>/<uuid>/` (dstack's file names): `vm-manifest.json` (what the VM is:
//! configuration, CID), `vm-state.json` (what it is doing: desired state, PIDs, guest progress),
//! `shared/` (the host-shared files the guest reads), logs and disks. Plus the CID pool and UUIDs.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use dstack_rpc::vmm::{GuestEvent, VmConfiguration};
use serde::{Deserialize, Serialize};

/// Errors reading or writing a VM's files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Paths of one VM's work directory.
#[derive(Debug, Clone)]
pub struct Workdir(PathBuf);

impl Workdir {
    pub fn new(run_path: &Path, id: &str) -> Self {
        Workdir(run_path.join(id))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn manifest(&self) -> PathBuf {
        self.0.join("vm-manifest.json")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("vm-state.json")
    }
    pub fn shared(&self) -> PathBuf {
        self.0.join("shared")
    }
    pub fn shared_file(&self, name: &str) -> PathBuf {
        self.shared().join(name)
    }
    pub fn serial_log(&self) -> PathBuf {
        self.0.join("serial.log")
    }
    pub fn stdout_log(&self) -> PathBuf {
        self.0.join("stdout.log")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.0.join("stderr.log")
    }
    /// Raw, sparse data disk (dstack uses qcow2 `hda.img`; ours is raw because our VMM reads raw files).
    pub fn data_disk(&self) -> PathBuf {
        self.0.join("hda.img")
    }
    /// The vsock host-side socket; guest connections to host port P arrive at `<this>_P`.
    pub fn vsock_uds(&self) -> PathBuf {
        self.0.join("vsock.sock")
    }
    pub fn vsock_port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.vsock_uds().display()))
    }
    /// vhost-user control socket between QEMU and vhost-device-vsock (`tcg`).
    pub fn vhost_user_sock(&self) -> PathBuf {
        self.0.join("vhost-vsock.sock")
    }
    /// Marker written before deletion so a crash mid-removal does not resurrect the VM.
    pub fn removing_marker(&self) -> PathBuf {
        self.0.join(".removing")
    }
}

/// `vm-manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub id: String,
    /// Guest CID, reserved for the VM's lifetime (kept across daemon restarts).
    pub cid: u32,
    /// Milliseconds since the UNIX epoch.
    pub created_at_ms: u64,
    /// The request, with `compose_file`, `encrypted_env` and `user_config` cleared: those live in `shared/`.
    pub config: VmConfiguration,
}

/// Whether the operator wants the VM running.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    #[default]
    Stopped,
}

/// A process recorded for re-adoption.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcRecord {
    pub name: String,
    pub pid: u32,
    /// `/proc/<pid>/stat` start time, so a recycled PID is not adopted.
    pub start_time: u64,
}

/// `vm-state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct VmState {
    pub desired: Desired,
    /// Processes of the current run (sidecars first, the VM process last).
    pub processes: Vec<ProcRecord>,
    pub started_at_ms: Option<u64>,
    pub exited_at_ms: Option<u64>,
    /// Human-readable reason of the last exit.
    pub last_exit: Option<String>,
    /// Consecutive automatic restarts (reset after `reset_window` of uptime).
    pub restarts: u32,
    pub boot_progress: String,
    pub boot_error: String,
    pub shutdown_progress: String,
    pub events: Vec<GuestEvent>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StateError> {
    let data = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&data).map_err(|e| StateError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Writes via a temporary file and rename, so a crash never leaves half a file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    let data = serde_json::to_vec_pretty(v).map_err(|e| StateError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    write_atomic(path, &data)
}

impl Workdir {
    pub fn load_manifest(&self) -> Result<Manifest, StateError> {
        read_json(&self.manifest())
    }
    pub fn save_manifest(&self, m: &Manifest) -> Result<(), StateError> {
        write_json(&self.manifest(), m)
    }
    /// A missing state file means "stopped, never ran".
    pub fn load_state(&self) -> Result<VmState, StateError> {
        if !self.state().exists() {
            return Ok(VmState::default());
        }
        read_json(&self.state())
    }
    pub fn save_state(&self, s: &VmState) -> Result<(), StateError> {
        write_json(&self.state(), s)
    }
    /// Creates the directory tree.
    pub fn create(&self) -> Result<(), StateError> {
        std::fs::create_dir_all(self.shared()).map_err(io_err(&self.shared()))
    }
    /// Reads a shared file, empty if absent.
    pub fn read_shared(&self, name: &str) -> Result<Vec<u8>, StateError> {
        let path = self.shared_file(name);
        match std::fs::read(&path) {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
    pub fn write_shared(&self, name: &str, data: &[u8]) -> Result<(), StateError> {
        write_atomic(&self.shared_file(name), data)
    }
    /// Creates the sparse raw data disk of `gb` GiB if it does not exist yet (never shrinks or wipes one).
    pub fn ensure_data_disk(&self, gb: u32) -> Result<(), StateError> {
        let path = self.data_disk();
        if path.exists() {
            return Ok(());
        }
        let f = std::fs::File::create(&path).map_err(io_err(&path))?;
        f.set_len(u64::from(gb) << 30).map_err(io_err(&path))
    }
}

/// Lowest-free allocation of guest CIDs in `[start, start + size)`.
#[derive(Debug, Clone)]
pub struct CidPool {
    start: u32,
    size: u32,
    used: BTreeSet<u32>,
}

impl CidPool {
    pub fn new(start: u32, size: u32) -> Self {
        CidPool {
            start,
            size,
            used: BTreeSet::new(),
        }
    }
    /// Marks a CID from a persisted manifest as taken; false if it is outside the pool or already taken.
    pub fn reserve(&mut self, cid: u32) -> bool {
        cid >= self.start && cid - self.start < self.size && self.used.insert(cid)
    }
    /// The lowest free CID.
    pub fn allocate(&mut self) -> Option<u32> {
        let cid = (self.start..self.start.saturating_add(self.size)).find(|c| !self.used.contains(c))?;
        self.used.insert(cid);
        Some(cid)
    }
    pub fn release(&mut self, cid: u32) {
        self.used.remove(&cid);
    }
}

/// A random (version 4) UUID in the usual text form.
pub fn new_uuid() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Whether `id` looks like a UUID we created (guards path joins against `../`).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_pool_lowest_free_and_reuse() {
        let mut p = CidPool::new(3, 3);
        assert!(p.reserve(4));
        assert!(!p.reserve(4), "double reservation");
        assert!(!p.reserve(6), "outside the pool");
        assert_eq!(p.allocate(), Some(3));
        assert_eq!(p.allocate(), Some(5));
        assert_eq!(p.allocate(), None);
        p.release(4);
        assert_eq!(p.allocate(), Some(4));
    }

    #[test]
    fn uuid_shape() {
        let a = new_uuid().unwrap();
        assert!(is_valid_id(&a), "{a}");
        assert_eq!(a.as_bytes()[14], b'4');
        assert_ne!(a, new_uuid().unwrap());
        assert!(!is_valid_id("../../etc/passwd-000000000000000000000"));
    }

    #[test]
    fn manifest_and_state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let wd = Workdir::new(dir.path(), "x");
        wd.create().unwrap();
        assert_eq!(wd.load_state().unwrap(), VmState::default());
        let m = Manifest {
            id: "x".into(),
            cid: 7,
            created_at_ms: 1,
            config: VmConfiguration {
                name: "n".into(),
                vcpu: 2,
                ..Default::default()
            },
        };
        wd.save_manifest(&m).unwrap();
        assert_eq!(wd.load_manifest().unwrap(), m);
        wd.ensure_data_disk(1).unwrap();
        assert_eq!(std::fs::metadata(wd.data_disk()).unwrap().len(), 1 << 30);
        assert_eq!(wd.vsock_port_path(10000), dir.path().join("x/vsock.sock_10000"));
    }
}
