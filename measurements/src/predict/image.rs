//! Predicting an image directory (image-build's output) and writing its published measurements.
//!
//! Inputs read from DIR: `metadata.json` (`bios`, `kernel`, `initrd`, `cmdline`; other fields ignored), the
//! three files it names, and `sha256sum.txt` (every listed file is re-hashed and must match; the
//! `os_image_hash` is SHA-256 of `sha256sum.txt`, dstack's definition).
//!
//! Outputs written by [`write_measurements`] (image-build calls it last):
//! - `measurements.json` ([`MEASUREMENTS_FILE`]): [`MeasurementsJson`] for each shape in order.
//! - `boot-eventlog-<vcpus>vcpu-<memory_mb>mb.json` ([`event_log_file`]) per shape: the predicted boot
//!   event log as a JSON array of [`crate::eventlog::TdxEvent`] (dstack's JSON event-log form), which the
//!   simulated TDX module can be initialised with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{BootInputs, PredictError, Prediction, VmShape, predict};
use crate::published::{MEASUREMENTS_VERSION, MeasurementsJson, ShapeMeasurements};

/// Name of the published measurements file.
pub const MEASUREMENTS_FILE: &str = "measurements.json";
/// The shapes image-build publishes: 1 vCPU / 2 GiB and 2 vCPUs / 4 GiB.
pub const STANDARD_SHAPES: [VmShape; 2] = [
    VmShape {
        vcpus: 1,
        memory_bytes: 2 << 30,
    },
    VmShape {
        vcpus: 2,
        memory_bytes: 4 << 30,
    },
];
/// Largest image file we read (firmware, kernel, initrd).
const MAX_FILE: u64 = 1 << 30;

/// The predicted boot event log's file name for `shape`.
pub fn event_log_file(shape: &VmShape) -> String {
    format!("boot-eventlog-{}vcpu-{}mb.json", shape.vcpus, shape.memory_bytes >> 20)
}

/// Errors reading or writing an image directory.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}")]
    Predict(#[from] PredictError),
}

#[derive(Deserialize)]
struct ImageMetadata {
    bios: String,
    kernel: String,
    initrd: String,
    cmdline: String,
}

/// The boot inputs of an image directory.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    pub firmware: Vec<u8>,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub cmdline: String,
    /// SHA-256 of `sha256sum.txt`, lowercase hex.
    pub os_image_hash: String,
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE {
        return Err(ImageError::Invalid {
            path: path.to_owned(),
            reason: format!("{len} bytes, larger than {MAX_FILE}"),
        });
    }
    std::fs::read(path).map_err(io)
}

/// A file name from metadata.json: a plain name inside the directory.
fn member(dir: &Path, field: &str, name: &str) -> Result<PathBuf, ImageError> {
    let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    if plain {
        Ok(dir.join(name))
    } else {
        Err(ImageError::Invalid {
            path: dir.join("metadata.json"),
            reason: format!("{field}: {name:?} is not a file name inside the image directory"),
        })
    }
}

impl ImageFiles {
    /// Reads and checks an image directory.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let meta_path = dir.join("metadata.json");
        let meta: ImageMetadata = serde_json::from_slice(&read(&meta_path)?).map_err(|e| ImageError::Invalid {
            path: meta_path.clone(),
            reason: e.to_string(),
        })?;
        let sums_path = dir.join("sha256sum.txt");
        let sums = read(&sums_path)?;
        let text = std::str::from_utf8(&sums).map_err(|_| ImageError::Invalid {
            path: sums_path.clone(),
            reason: "not UTF-8".into(),
        })?;
        for (n, line) in text.lines().enumerate() {
            let bad = |reason: String| ImageError::Invalid {
                path: sums_path.clone(),
                reason: format!("line {}: {reason}", n + 1),
            };
            let (hash, name) = line
                .split_once("  ")
                .ok_or_else(|| bad("expected `<sha256>  <file>`".into()))?;
            let actual = hex::encode(Sha256::digest(read(&member(dir, "sha256sum.txt", name)?)?));
            if !actual.eq_ignore_ascii_case(hash) {
                return Err(bad(format!("{name} has SHA-256 {actual}, listed {hash}")));
            }
        }
        Ok(Self {
            firmware: read(&member(dir, "bios", &meta.bios)?)?,
            kernel: read(&member(dir, "kernel", &meta.kernel)?)?,
            initrd: read(&member(dir, "initrd", &meta.initrd)?)?,
            cmdline: meta.cmdline,
            os_image_hash: hex::encode(Sha256::digest(&sums)),
        })
    }

    pub fn inputs(&self) -> BootInputs<'_> {
        BootInputs {
            firmware: &self.firmware,
            kernel: &self.kernel,
            initrd: &self.initrd,
            cmdline: &self.cmdline,
        }
    }

    pub fn predict(&self, shape: &VmShape) -> Result<Prediction, PredictError> {
        predict(&self.inputs(), shape)
    }

    /// `measurements.json` content for `shapes`, with the predictions (same order).
    pub fn measurements(
        &self,
        image: Option<String>,
        shapes: &[VmShape],
    ) -> Result<(MeasurementsJson, Vec<Prediction>), PredictError> {
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let mut preds = Vec::new();
        let mut out = Vec::new();
        for s in shapes {
            let p = self.predict(s)?;
            out.push(ShapeMeasurements {
                vcpus: s.vcpus,
                memory_mb: s.memory_bytes >> 20,
                mrtd: hex::encode(p.mrtd),
                rtmr0: hex::encode(p.rtmr[0]),
                rtmr1: hex::encode(p.rtmr[1]),
                rtmr2: hex::encode(p.rtmr[2]),
            });
            preds.push(p);
        }
        let inputs = BTreeMap::from([
            ("firmware".to_owned(), sha(&self.firmware)),
            ("kernel".to_owned(), sha(&self.kernel)),
            ("initrd".to_owned(), sha(&self.initrd)),
            ("cmdline".to_owned(), self.cmdline.clone()),
        ]);
        let m = MeasurementsJson {
            version: MEASUREMENTS_VERSION,
            image,
            os_image_hash: self.os_image_hash.clone(),
            inputs,
            shapes: out,
        };
        Ok((m, preds))
    }
}

/// Predicts `shapes` for the image in `dir` and writes `measurements.json` and one boot event log per shape.
pub fn write_measurements(
    dir: &Path,
    image: Option<String>,
    shapes: &[VmShape],
) -> Result<MeasurementsJson, ImageError> {
    let files = ImageFiles::load(dir)?;
    let (m, preds) = files.measurements(image, shapes)?;
    write_json(dir, MEASUREMENTS_FILE, &m)?;
    for (s, p) in shapes.iter().zip(&preds) {
        write_json(dir, &event_log_file(s), &p.events)?;
    }
    Ok(m)
}

fn write_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> Result<(), ImageError> {
    let path = dir.join(name);
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ImageError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(&path, text).map_err(|source| ImageError::Io { path, source })
}
