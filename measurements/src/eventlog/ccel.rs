//! TCG PC Client crypto-agile event log, as found in the CCEL ACPI table's log area.
//!
//! The first record is a legacy `TCG_PCR_EVENT` (SHA-1 layout) whose data is the
//! `TCG_EfiSpecIDEvent` ("Spec ID Event03") listing the digest algorithms and sizes. Every
//! later record is a `TCG_PCR_EVENT2`: `u32 mr_index, u32 type, u32 count, {u16 alg,
//! digest}×count, u32 size, data`. The log ends at the end of the area, at a record whose
//! header is all 0xFF (erased flash fill) or all zero.

use crate::quote::{ParseError, Reader};

use super::{EV_NO_ACTION, TdxEvent};

/// TPM_ALG_SHA384.
pub const TPM_ALG_SHA384: u16 = 0x000c;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";

/// A digest algorithm announced in the Spec ID event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmSize {
    pub alg_id: u16,
    pub digest_size: u16,
}

/// The parsed `TCG_EfiSpecIDEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecIdEvent {
    pub platform_class: u32,
    pub spec_version: (u8, u8, u8),
    pub uintn_size: u8,
    pub algorithms: Vec<AlgorithmSize>,
    pub vendor_info: Vec<u8>,
}

/// One `TCG_PCR_EVENT2` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcgEvent {
    /// Offset of the record in the log area.
    pub offset: usize,
    /// MR index: 0 = MRTD, 1..=4 = RTMR0..3.
    pub mr_index: u32,
    pub event_type: u32,
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl TcgEvent {
    /// The SHA-384 digest, if logged.
    pub fn sha384(&self) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(alg, _)| *alg == TPM_ALG_SHA384)
            .map(|(_, d)| d.as_slice())
    }
}

/// A parsed CCEL log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CcelLog {
    pub spec_id: SpecIdEvent,
    pub events: Vec<TcgEvent>,
    /// Bytes of the area actually used by records.
    pub used: usize,
}

/// Errors parsing a CCEL log.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CcelError {
    #[error("malformed CCEL log: {0}")]
    Parse(#[from] ParseError),
}

fn invalid(field: &'static str, offset: usize, reason: impl Into<String>) -> CcelError {
    CcelError::Parse(ParseError::Invalid {
        field,
        offset,
        reason: reason.into(),
    })
}

fn parse_spec_id(data: &[u8], base: usize) -> Result<SpecIdEvent, CcelError> {
    let mut r = Reader::new(data);
    let sig: [u8; 16] = r.array("spec_id.signature").map_err(|e| e.rebase(base))?;
    if &sig != SPEC_ID_SIGNATURE {
        return Err(invalid("spec_id.signature", base, "not \"Spec ID Event03\""));
    }
    let inner = |r: &mut Reader<'_>| -> Result<SpecIdEvent, ParseError> {
        let platform_class = r.u32("spec_id.platform_class")?;
        let minor = r.u8("spec_id.spec_version_minor")?;
        let major = r.u8("spec_id.spec_version_major")?;
        let errata = r.u8("spec_id.spec_errata")?;
        let uintn_size = r.u8("spec_id.uintn_size")?;
        let n = r.u32("spec_id.number_of_algorithms")? as usize;
        // Each entry is 4 bytes; bound the count by what remains before allocating.
        if n > r.remaining() / 4 {
            return Err(r.invalid(
                "spec_id.number_of_algorithms",
                r.pos() - 4,
                format!("{n} entries do not fit"),
            ));
        }
        let mut algorithms = Vec::with_capacity(n);
        for _ in 0..n {
            algorithms.push(AlgorithmSize {
                alg_id: r.u16("spec_id.alg_id")?,
                digest_size: r.u16("spec_id.digest_size")?,
            });
        }
        let vlen = r.u8("spec_id.vendor_info_size")? as usize;
        let vendor_info = r.bytes(vlen, "spec_id.vendor_info")?.to_vec();
        Ok(SpecIdEvent {
            platform_class,
            spec_version: (major, minor, errata),
            uintn_size,
            algorithms,
            vendor_info,
        })
    };
    inner(&mut r).map_err(|e| CcelError::Parse(e.rebase(base)))
}

/// Parse a CCEL log area.
pub fn parse_ccel(area: &[u8]) -> Result<CcelLog, CcelError> {
    let mut r = Reader::new(area);
    let _pcr = r.u32("first_event.pcr_index")?;
    let ty = r.u32("first_event.event_type")?;
    if ty != EV_NO_ACTION {
        return Err(invalid(
            "first_event.event_type",
            4,
            format!("{ty:#x}, expected EV_NO_ACTION (3)"),
        ));
    }
    r.bytes(20, "first_event.sha1_digest")?;
    let size = r.len_u32("first_event.event_size")?;
    let data_off = r.pos();
    let data = r.bytes(size, "first_event.event_data")?;
    let spec_id = parse_spec_id(data, data_off)?;
    if spec_id
        .algorithms
        .iter()
        .any(|a| a.digest_size == 0 || a.digest_size > 64)
    {
        return Err(invalid("spec_id.digest_size", data_off, "digest size must be 1..=64"));
    }

    let mut events = Vec::new();
    loop {
        let offset = r.pos();
        if r.remaining() < 8 {
            break;
        }
        let head = area.get(offset..offset + 8).unwrap_or(&[]);
        if head.iter().all(|&b| b == 0xff) || head.iter().all(|&b| b == 0) {
            break;
        }
        let mr_index = r.u32("event.mr_index")?;
        let event_type = r.u32("event.event_type")?;
        let count_off = r.pos();
        let count = r.u32("event.digest_count")? as usize;
        if count == 0 || count > spec_id.algorithms.len() {
            return Err(invalid(
                "event.digest_count",
                count_off,
                format!("{count} (spec ID announced {})", spec_id.algorithms.len()),
            ));
        }
        let mut digests = Vec::with_capacity(count);
        for _ in 0..count {
            let alg_off = r.pos();
            let alg = r.u16("event.digest_alg")?;
            let Some(size) = spec_id.algorithms.iter().find(|a| a.alg_id == alg) else {
                return Err(invalid(
                    "event.digest_alg",
                    alg_off,
                    format!("{alg:#06x} not announced in spec ID"),
                ));
            };
            digests.push((alg, r.bytes(size.digest_size as usize, "event.digest")?.to_vec()));
        }
        let size = r.len_u32("event.event_size")?;
        let data = r.bytes(size, "event.event_data")?.to_vec();
        events.push(TcgEvent {
            offset,
            mr_index,
            event_type,
            digests,
            data,
        });
    }
    Ok(CcelLog {
        spec_id,
        events,
        used: r.pos(),
    })
}

impl CcelLog {
    /// Convert to dstack's JSON event shape (RTMR index = MR index − 1). EV_NO_ACTION events
    /// are dropped (never extended); events without a SHA-384 digest or with an MR index
    /// outside 1..=4 are errors.
    pub fn to_tdx_events(&self) -> Result<Vec<TdxEvent>, CcelError> {
        let mut out = Vec::with_capacity(self.events.len());
        for e in &self.events {
            if e.event_type == EV_NO_ACTION {
                continue;
            }
            if !(1..=4).contains(&e.mr_index) {
                return Err(invalid(
                    "event.mr_index",
                    e.offset,
                    format!("{} is not an RTMR (1..=4)", e.mr_index),
                ));
            }
            let digest = e
                .sha384()
                .ok_or_else(|| invalid("event.digests", e.offset + 8, "no SHA-384 digest"))?;
            out.push(TdxEvent {
                imr: e.mr_index - 1,
                event_type: e.event_type,
                digest: digest.to_vec(),
                event: String::new(),
                event_payload: e.data.clone(),
                version: None,
            });
        }
        Ok(out)
    }
}

/// The CCEL ACPI table header fields (for callers holding the whole table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CcelTable {
    pub cc_type: u8,
    pub cc_subtype: u8,
    /// Log area minimum length.
    pub laml: u64,
    /// Log area start address.
    pub lasa: u64,
}

/// Parse the CCEL ACPI table (signature "CCEL", 36-byte standard header).
pub fn parse_ccel_table(table: &[u8]) -> Result<CcelTable, CcelError> {
    let mut r = Reader::new(table);
    let sig: [u8; 4] = r.array("ccel.signature")?;
    if &sig != b"CCEL" {
        return Err(invalid("ccel.signature", 0, "not \"CCEL\""));
    }
    r.bytes(32, "ccel.acpi_header")?;
    let cc_type = r.u8("ccel.cc_type")?;
    let cc_subtype = r.u8("ccel.cc_subtype")?;
    r.u16("ccel.reserved")?;
    Ok(CcelTable {
        cc_type,
        cc_subtype,
        laml: r.u64("ccel.laml")?,
        lasa: r.u64("ccel.lasa")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = include_bytes!("../../tests/data/dstack-ccel.bin");

    #[test]
    fn truncations_and_corruptions_fail_cleanly() {
        let full = parse_ccel(SAMPLE).unwrap();
        for cut in 0..full.used {
            // Either an error naming a field, or a clean stop at a record boundary.
            match parse_ccel(&SAMPLE[..cut]) {
                Ok(log) => assert!(log.events.len() < full.events.len()),
                Err(e) => assert!(e.to_string().contains("offset"), "{e}"),
            }
        }
        let mut bad = SAMPLE.to_vec();
        bad[0x20] = b'X'; // spec ID signature
        assert!(parse_ccel(&bad).unwrap_err().to_string().contains("spec_id.signature"));
        let mut bad = SAMPLE.to_vec();
        let first = full.events[0].offset;
        bad[first + 8..first + 12].copy_from_slice(&7u32.to_le_bytes()); // digest count
        assert!(parse_ccel(&bad).unwrap_err().to_string().contains("event.digest_count"));
        let mut bad = SAMPLE.to_vec();
        bad[first + 12..first + 14].copy_from_slice(&0x0bu16.to_le_bytes()); // SHA-256, not announced
        assert!(parse_ccel(&bad).unwrap_err().to_string().contains("event.digest_alg"));
    }

    #[test]
    fn ccel_table_header() {
        let mut t = vec![0u8; 56];
        t[..4].copy_from_slice(b"CCEL");
        t[36] = 2;
        t[40..48].copy_from_slice(&0x1_0000u64.to_le_bytes());
        t[48..56].copy_from_slice(&0x7f00_0000u64.to_le_bytes());
        let h = parse_ccel_table(&t).unwrap();
        assert_eq!((h.cc_type, h.laml, h.lasa), (2, 0x1_0000, 0x7f00_0000));
        assert!(parse_ccel_table(&t[..50]).is_err());
        assert!(parse_ccel_table(b"XXXX").is_err());
    }
}
