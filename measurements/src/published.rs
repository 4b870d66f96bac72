//! The published `measurements.json` (written by image-build) and a register-by-register
//! diff against a quote (+ event log).
//!
//! ```json
//! {
//!   "version": 1,
//!   "image": "dstack-rs-0.1.0",
//!   "os_image_hash": "<sha256 hex>",
//!   "inputs": {"firmware": "<sha256>", "kernel": "<sha256>", "initrd": "<sha256>",
//!              "cmdline": "console=ttyS0 …"},
//!   "shapes": [{"vcpus": 1, "memory_mb": 2048, "mrtd": "…", "rtmr0": "…", "rtmr1": "…",
//!               "rtmr2": "…"}]
//! }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::eventlog::{TdxEvent, replay};
use crate::quote::TdReport;

/// Current format version.
pub const MEASUREMENTS_VERSION: u32 = 1;

/// Expected registers for one VM shape (hex, lowercase, 48 bytes each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeMeasurements {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub mrtd: String,
    pub rtmr0: String,
    pub rtmr1: String,
    pub rtmr2: String,
}

/// `measurements.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasurementsJson {
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub os_image_hash: String,
    /// Input name → SHA-256 hex of the file (or the literal value for `cmdline`).
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    pub shapes: Vec<ShapeMeasurements>,
}

/// Errors loading `measurements.json`.
#[derive(Debug, thiserror::Error)]
pub enum MeasurementsError {
    #[error("measurements.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("measurements.json: {field}: {reason}")]
    Field { field: String, reason: String },
}

fn check_hex(field: String, value: &str, len: usize) -> Result<(), MeasurementsError> {
    let ok = value.len() == 2 * len && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(MeasurementsError::Field {
            field,
            reason: format!("expected {len} bytes of lowercase hex"),
        })
    }
}

impl MeasurementsJson {
    /// Parse and validate (version, hex lengths, at least one shape).
    pub fn parse(data: &[u8]) -> Result<Self, MeasurementsError> {
        let m: Self = serde_json::from_slice(data)?;
        if m.version != MEASUREMENTS_VERSION {
            return Err(MeasurementsError::Field {
                field: "version".into(),
                reason: format!("{} unsupported (expected {MEASUREMENTS_VERSION})", m.version),
            });
        }
        check_hex("os_image_hash".into(), &m.os_image_hash, 32)?;
        if m.shapes.is_empty() {
            return Err(MeasurementsError::Field {
                field: "shapes".into(),
                reason: "empty".into(),
            });
        }
        for (i, s) in m.shapes.iter().enumerate() {
            for (name, v) in [
                ("mrtd", &s.mrtd),
                ("rtmr0", &s.rtmr0),
                ("rtmr1", &s.rtmr1),
                ("rtmr2", &s.rtmr2),
            ] {
                check_hex(format!("shapes[{i}].{name}"), v, 48)?;
            }
        }
        Ok(m)
    }
}

/// One row of the diff table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRow {
    pub register: String,
    pub expected: String,
    pub actual: String,
    pub matches: bool,
}

/// Result of [`diff`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    /// Index of the shape compared against.
    pub shape: usize,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub rows: Vec<DiffRow>,
    pub matches: bool,
}

/// What the attestation says besides the quote.
#[derive(Debug, Clone, Default)]
pub struct AttestationExtras<'a> {
    pub events: Option<&'a [TdxEvent]>,
    /// `(cpu_count, memory_size bytes, os_image_hash hex)` from vm_config, when known.
    pub vcpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub os_image_hash: Option<String>,
}

/// Compare published measurements with a quote. The shape is chosen from vm_config when
/// given, else the shape with the most matching registers.
pub fn diff(m: &MeasurementsJson, report: &TdReport, extras: &AttestationExtras<'_>) -> DiffReport {
    let actual = [
        hex::encode(report.mr_td),
        hex::encode(report.rtmr[0]),
        hex::encode(report.rtmr[1]),
        hex::encode(report.rtmr[2]),
    ];
    let score = |s: &ShapeMeasurements| {
        [&s.mrtd, &s.rtmr0, &s.rtmr1, &s.rtmr2]
            .iter()
            .zip(&actual)
            .filter(|(e, a)| **e == *a)
            .count()
    };
    let by_config = m
        .shapes
        .iter()
        .position(|s| Some(s.vcpus) == extras.vcpus && extras.memory_bytes.map(|b| b / (1 << 20)) == Some(s.memory_mb));
    let idx = by_config.unwrap_or_else(|| {
        (0..m.shapes.len())
            .max_by_key(|&i| (score(&m.shapes[i]), std::cmp::Reverse(i)))
            .unwrap_or(0)
    });
    let mut rows = Vec::new();
    if let Some(s) = m.shapes.get(idx) {
        for ((name, e), a) in [
            ("mrtd", &s.mrtd),
            ("rtmr0", &s.rtmr0),
            ("rtmr1", &s.rtmr1),
            ("rtmr2", &s.rtmr2),
        ]
        .into_iter()
        .zip(actual)
        {
            rows.push(DiffRow {
                register: name.into(),
                matches: *e == a,
                expected: e.clone(),
                actual: a,
            });
        }
    }
    if let Some(events) = extras.events {
        let q = hex::encode(report.rtmr[3]);
        let (replayed, ok) = match replay(events) {
            Ok(r) => (hex::encode(r[3]), r[3] == report.rtmr[3]),
            Err(e) => (format!("replay error: {e}"), false),
        };
        rows.push(DiffRow {
            register: "rtmr3 (event log replay)".into(),
            expected: replayed,
            actual: q,
            matches: ok,
        });
    }
    if let Some(os) = &extras.os_image_hash {
        rows.push(DiffRow {
            register: "os_image_hash".into(),
            expected: m.os_image_hash.clone(),
            matches: os.eq_ignore_ascii_case(&m.os_image_hash),
            actual: os.to_lowercase(),
        });
    }
    let (vcpus, memory_mb) = m.shapes.get(idx).map_or((0, 0), |s| (s.vcpus, s.memory_mb));
    DiffReport {
        shape: idx,
        vcpus,
        memory_mb,
        matches: !rows.is_empty() && rows.iter().all(|r| r.matches),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(report: &TdReport) -> MeasurementsJson {
        MeasurementsJson {
            version: 1,
            image: Some("test".into()),
            os_image_hash: "ab".repeat(32),
            inputs: BTreeMap::from([("kernel".into(), "cd".repeat(32))]),
            shapes: vec![
                ShapeMeasurements {
                    vcpus: 1,
                    memory_mb: 2048,
                    mrtd: "00".repeat(48),
                    rtmr0: "00".repeat(48),
                    rtmr1: "00".repeat(48),
                    rtmr2: "00".repeat(48),
                },
                ShapeMeasurements {
                    vcpus: 2,
                    memory_mb: 4096,
                    mrtd: hex::encode(report.mr_td),
                    rtmr0: hex::encode(report.rtmr[0]),
                    rtmr1: hex::encode(report.rtmr[1]),
                    rtmr2: hex::encode(report.rtmr[2]),
                },
            ],
        }
    }

    fn report() -> TdReport {
        let mut r = TdReport::zeroed();
        r.mr_td = [1; 48];
        r.rtmr[0] = [2; 48];
        r.rtmr[1] = [3; 48];
        r.rtmr[2] = [4; 48];
        r
    }

    #[test]
    fn round_trip_and_validation() {
        let m = sample(&report());
        let text = serde_json::to_vec(&m).unwrap();
        assert_eq!(MeasurementsJson::parse(&text).unwrap(), m);
        let mut bad = m.clone();
        bad.shapes[0].rtmr1 = "XY".into();
        let e = MeasurementsJson::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("shapes[0].rtmr1"), "{e}");
        assert!(MeasurementsJson::parse(b"{\"version\":1}").is_err());
    }

    #[test]
    fn diff_picks_best_shape_and_flags_differences() {
        let r = report();
        let m = sample(&r);
        let d = diff(&m, &r, &AttestationExtras::default());
        assert_eq!(d.shape, 1);
        assert!(d.matches);
        let mut r2 = r.clone();
        r2.rtmr[1] = [9; 48];
        let d = diff(&m, &r2, &AttestationExtras::default());
        assert!(!d.matches);
        assert_eq!(
            d.rows
                .iter()
                .filter(|x| !x.matches)
                .map(|x| x.register.as_str())
                .collect::<Vec<_>>(),
            ["rtmr1"]
        );
        // vm_config selects the shape explicitly.
        let ex = AttestationExtras {
            vcpus: Some(1),
            memory_bytes: Some(2048 << 20),
            os_image_hash: Some("AB".repeat(32)),
            ..Default::default()
        };
        let d = diff(&m, &r, &ex);
        assert_eq!(d.shape, 0);
        assert!(!d.matches);
        assert!(d.rows.last().unwrap().matches); // os_image_hash compared case-insensitively
    }
}
