//! OS image verification (`[core.image] verify = true`): the caller's MRTD and RTMR0-2 must be what the OS image
//! named by its vm_config (`os_image_hash`) boots to in the VM shape its vm_config names (`cpu_count`,
//! `memory_size`).
//!
//! Cache layout under `cache_dir` (dstack's `[core.image] cache_dir`):
//! - `images/<os_image_hash hex>/`: an image directory as image-build writes it (`metadata.json`,
//!   `sha256sum.txt` and the files it lists). It is re-hashed with
//!   [`dstack_measurements::predict::image::ImageFiles::load`]; its hash must be the requested `os_image_hash`.
//! - `measurements/<config_hash>.json`: the registers the KMS predicted for one (image, shape), written by the
//!   KMS ([`MeasurementsJson`] with exactly one shape), so the prediction runs once per shape.
//!   `config_hash` = hex SHA-256 of `"<os_image_hash hex>:<cpu_count>:<memory_size>"` ([`config_hash`]).
//!
//! `Admin.ClearImageCache{image_hash, config_hash}` removes `images/<image_hash>` and
//! `measurements/<config_hash>.json` (`"all"` clears that whole part; empty leaves it alone), and always forgets
//! the in-memory predictions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use dstack_measurements::predict::VmShape;
use dstack_measurements::predict::image::ImageFiles;
use dstack_measurements::published::{MEASUREMENTS_VERSION, MeasurementsJson, ShapeMeasurements};
use dstack_ra_tls::AttestedIdentity;
use sha2::{Digest, Sha256};

use crate::store::write_atomic;

/// Why an image check refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("vm_config: {0}")]
    VmConfig(String),
    #[error("OS image {0} is not in the image cache")]
    NotCached(String),
    #[error("image cache entry {dir}: {reason}")]
    BadEntry { dir: String, reason: String },
    #[error(
        "the quote does not match OS image {image} ({vcpus} vCPUs, {memory} bytes): {register} is {actual}, expected {expected}"
    )]
    Mismatch {
        image: String,
        vcpus: u32,
        memory: u64,
        register: &'static str,
        expected: String,
        actual: String,
    },
    #[error("invalid cache key {0:?} (hex or \"all\")")]
    Key(String),
    #[error("image cache I/O: {0}")]
    Io(String),
}

/// `os_image_hash` (hex, optional `0x`) of a vm_config JSON document, if it has one.
///
/// Same semantics as `dstack_measurements`' `eventlog::identity::os_image_hash_from_vm_config`, which that
/// crate does not export; this copy uses the crate's hex decoding and should be replaced by it once exported.
pub fn os_image_hash_from_vm_config(vm_config: &str) -> Result<Option<Vec<u8>>, String> {
    let v: serde_json::Value = serde_json::from_str(vm_config).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("os_image_hash") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(h)) => dstack_measurements::hexser::decode(h)
            .map(Some)
            .map_err(|e| format!("os_image_hash: {e}")),
        Some(_) => Err("os_image_hash is not a string".into()),
    }
}

/// What the check needs from vm_config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    pub os_image_hash: Vec<u8>,
    pub shape: VmShape,
}

impl ImageRequest {
    /// Parses `os_image_hash`, `cpu_count` and `memory_size` (bytes) from a vm_config JSON document.
    pub fn from_vm_config(vm_config: &str) -> Result<Self, ImageError> {
        let bad = |m: String| ImageError::VmConfig(m);
        if vm_config.trim().is_empty() {
            return Err(bad("empty: image verification needs the caller's vm_config".into()));
        }
        let os_image_hash = os_image_hash_from_vm_config(vm_config)
            .map_err(bad)?
            .ok_or_else(|| bad("has no os_image_hash".into()))?;
        if os_image_hash.len() != 32 {
            return Err(bad(format!(
                "os_image_hash is {} bytes, expected 32",
                os_image_hash.len()
            )));
        }
        let v: serde_json::Value = serde_json::from_str(vm_config).map_err(|e| bad(e.to_string()))?;
        let cpus = v
            .get("cpu_count")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("cpu_count is missing or not a number".into()))?;
        let vcpus = u32::try_from(cpus)
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| bad(format!("cpu_count {cpus} out of range")))?;
        let memory_bytes = v
            .get("memory_size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("memory_size is missing or not a number".into()))?;
        Ok(Self {
            os_image_hash,
            shape: VmShape { vcpus, memory_bytes },
        })
    }

    pub fn config_hash(&self) -> String {
        config_hash(&self.os_image_hash, self.shape.vcpus, self.shape.memory_bytes)
    }
}

/// The measurement cache key of an (image, shape).
pub fn config_hash(os_image_hash: &[u8], vcpus: u32, memory_bytes: u64) -> String {
    let text = format!("{}:{vcpus}:{memory_bytes}", hex::encode(os_image_hash));
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Expected registers (lowercase hex): MRTD, RTMR0, RTMR1, RTMR2.
type Expected = [String; 4];

/// Verifies callers' boot measurements against cached OS images.
#[derive(Debug)]
pub struct ImageVerifier {
    cache_dir: PathBuf,
    memo: Mutex<HashMap<String, Expected>>,
}

fn io_err(what: &Path, e: impl std::fmt::Display) -> ImageError {
    ImageError::Io(format!("{}: {e}", what.display()))
}

impl ImageVerifier {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            memo: Mutex::new(HashMap::new()),
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.cache_dir.join("images")
    }

    pub fn measurements_dir(&self) -> PathBuf {
        self.cache_dir.join("measurements")
    }

    /// Checks `id`'s MRTD and RTMR0-2 against the image and shape `vm_config` names; returns the verified
    /// `os_image_hash`.
    pub async fn verify(&self, vm_config: &str, id: &AttestedIdentity) -> Result<Vec<u8>, ImageError> {
        let req = ImageRequest::from_vm_config(vm_config)?;
        let expected = self.expected(&req).await?;
        let actual = [
            hex::encode(&id.mrtd),
            id.rtmrs[0].to_ascii_lowercase(),
            id.rtmrs[1].to_ascii_lowercase(),
            id.rtmrs[2].to_ascii_lowercase(),
        ];
        for (i, register) in ["MRTD", "RTMR0", "RTMR1", "RTMR2"].into_iter().enumerate() {
            if actual[i] != expected[i] {
                return Err(ImageError::Mismatch {
                    image: hex::encode(&req.os_image_hash),
                    vcpus: req.shape.vcpus,
                    memory: req.shape.memory_bytes,
                    register,
                    expected: expected[i].clone(),
                    actual: actual[i].clone(),
                });
            }
        }
        Ok(req.os_image_hash)
    }

    /// The expected registers: memory, then the measurement cache file, then a prediction from the image.
    async fn expected(&self, req: &ImageRequest) -> Result<Expected, ImageError> {
        let key = req.config_hash();
        if let Some(e) = self.memo.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(e.clone());
        }
        let cache_file = self.measurements_dir().join(format!("{key}.json"));
        let images = self.images_dir();
        let req2 = req.clone();
        let expected = tokio::task::spawn_blocking(move || load_or_predict(&cache_file, &images, &req2))
            .await
            .map_err(|e| ImageError::Io(format!("prediction task: {e}")))??;
        self.memo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, expected.clone());
        Ok(expected)
    }

    /// `Admin.ClearImageCache`.
    pub fn clear(&self, image_hash: &str, config_hash: &str) -> Result<(), ImageError> {
        remove_entry(&self.images_dir(), image_hash, "")?;
        remove_entry(&self.measurements_dir(), config_hash, ".json")?;
        self.memo.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }
}

fn shape_of(m: &MeasurementsJson, req: &ImageRequest) -> Option<Expected> {
    let s = m.shapes.first()?;
    (m.shapes.len() == 1
        && m.os_image_hash == hex::encode(&req.os_image_hash)
        && s.vcpus == req.shape.vcpus
        && s.memory_mb == req.shape.memory_bytes >> 20)
        .then(|| [s.mrtd.clone(), s.rtmr0.clone(), s.rtmr1.clone(), s.rtmr2.clone()])
}

fn load_or_predict(cache_file: &Path, images: &Path, req: &ImageRequest) -> Result<Expected, ImageError> {
    let image_hex = hex::encode(&req.os_image_hash);
    match std::fs::read(cache_file) {
        Ok(data) => {
            let bad = |reason: String| ImageError::BadEntry {
                dir: cache_file.display().to_string(),
                reason,
            };
            let m = MeasurementsJson::parse(&data).map_err(|e| bad(e.to_string()))?;
            return shape_of(&m, req).ok_or_else(|| bad("not the measurements of this image and shape".into()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(cache_file, e)),
    }
    let dir = images.join(&image_hex);
    if !dir.is_dir() {
        return Err(ImageError::NotCached(image_hex));
    }
    let bad = |reason: String| ImageError::BadEntry {
        dir: dir.display().to_string(),
        reason,
    };
    let files = ImageFiles::load(&dir).map_err(|e| bad(e.to_string()))?;
    if files.os_image_hash != image_hex {
        return Err(bad(format!(
            "its files hash to {}, not {image_hex}",
            files.os_image_hash
        )));
    }
    let p = files.predict(&req.shape).map_err(|e| bad(e.to_string()))?;
    let expected = [
        hex::encode(p.mrtd),
        hex::encode(p.rtmr[0]),
        hex::encode(p.rtmr[1]),
        hex::encode(p.rtmr[2]),
    ];
    let m = MeasurementsJson {
        version: MEASUREMENTS_VERSION,
        image: None,
        os_image_hash: image_hex,
        inputs: Default::default(),
        shapes: vec![ShapeMeasurements {
            vcpus: req.shape.vcpus,
            memory_mb: req.shape.memory_bytes >> 20,
            mrtd: expected[0].clone(),
            rtmr0: expected[1].clone(),
            rtmr1: expected[2].clone(),
            rtmr2: expected[3].clone(),
        }],
    };
    // The cache only saves work; failing to write it does not fail the check.
    let text = serde_json::to_vec_pretty(&m).map_err(|e| ImageError::Io(e.to_string()))?;
    let written = std::fs::create_dir_all(cache_file.parent().unwrap_or(Path::new(".")))
        .map_err(|e| e.to_string())
        .and_then(|()| write_atomic(cache_file, &text, 0o644).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::warn!(file = %cache_file.display(), "could not write the measurement cache: {e}");
    }
    Ok(expected)
}

/// Removes `parent/<key><suffix>` (`"all"`: everything under `parent`; empty: nothing). Keys are hex only,
/// so nothing outside the cache can be named.
fn remove_entry(parent: &Path, key: &str, suffix: &str) -> Result<(), ImageError> {
    let key = key.trim();
    if key.is_empty() {
        return Ok(());
    }
    if key == "all" {
        return match std::fs::remove_dir_all(parent) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(parent, e)),
        };
    }
    if !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageError::Key(key.to_owned()));
    }
    let path = parent.join(format!("{}{suffix}", key.to_ascii_lowercase()));
    let r = if path.is_dir() {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = r#"{"os_image_hash":"5eed00000000000000000000000000000000000000000000000000000000beef","cpu_count":2,"memory_size":4294967296}"#;

    #[test]
    fn vm_config_fields() {
        let r = ImageRequest::from_vm_config(VM).unwrap();
        assert_eq!(r.shape.vcpus, 2);
        assert_eq!(r.shape.memory_bytes, 4 << 30);
        assert_eq!(hex::encode(&r.os_image_hash)[..4], *"5eed");
        for (cfg, what) in [
            ("", "empty"),
            (r#"{"cpu_count":1,"memory_size":1}"#, "no os_image_hash"),
            (r#"{"os_image_hash":"abcd","cpu_count":1,"memory_size":1}"#, "2 bytes"),
            (&VM.replace("\"cpu_count\":2", "\"cpu_count\":0"), "out of range"),
            (
                &VM.replace("\"memory_size\":4294967296", "\"memory_size\":\"4G\""),
                "memory_size",
            ),
        ] {
            let e = ImageRequest::from_vm_config(cfg).unwrap_err().to_string();
            assert!(e.contains(what), "{cfg}: {e}");
        }
    }

    #[test]
    fn config_hash_is_sha256_of_the_documented_text() {
        // Python: hashlib.sha256(b"00:1:2").hexdigest()
        assert_eq!(
            config_hash(&[0], 1, 2),
            "c8da6a14343d4508da922285ed692e05a69053e9f5d705fc398fd9403d4df96b"
        );
        assert_ne!(config_hash(&[0], 1, 2), config_hash(&[0], 2, 2));
    }

    #[test]
    fn clear_only_touches_hex_names_inside_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let v = ImageVerifier::new(dir.path());
        std::fs::create_dir_all(v.images_dir().join("ab12")).unwrap();
        std::fs::create_dir_all(v.measurements_dir()).unwrap();
        std::fs::write(v.measurements_dir().join("cd34.json"), "{}").unwrap();
        std::fs::write(v.measurements_dir().join("ef56.json"), "{}").unwrap();
        assert!(matches!(v.clear("../x", ""), Err(ImageError::Key(_))));
        v.clear("AB12", "cd34").unwrap();
        assert!(!v.images_dir().join("ab12").exists());
        assert!(!v.measurements_dir().join("cd34.json").exists());
        assert!(v.measurements_dir().join("ef56.json").exists());
        v.clear("", "all").unwrap();
        assert!(!v.measurements_dir().exists());
        v.clear("0000", "").unwrap(); // absent entries are fine
    }
}
