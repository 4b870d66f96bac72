//! `Attest`: dstack's versioned attestation in its legacy SCALE wire format (`VersionedAttestation::V0`).
//!
//! dstack 0.5.6–0.5.10 agents answer `Attest` with these bytes; 0.5.11+ agents answer with a MessagePack
//! `V1` document, but every dstack verifier since 0.5.6 (including 0.5.11+, which dispatches on the first
//! byte: `0x00` = SCALE V0) decodes V0. So V0 is the one format all dstack verifiers read. Layout
//! (SCALE: little-endian fixed-width integers, `Compact<u32>` length prefixes, enums as one index byte):
//!
//! ```text
//! VersionedAttestation::V0            0x00
//!   Attestation
//!     quote: AttestationQuote::DstackTdx   0x00
//!       TdxQuote { quote: Vec<u8>, event_log: Vec<TdxEvent> }
//!     runtime_events: Vec<RuntimeEvent { event: String, payload: Vec<u8> }>
//!     report_data: [u8; 64]
//!     config: String                        (the VmConfig JSON)
//! TdxEvent = { imr: u32, event_type: u32, digest: Vec<u8>, event: String, event_payload: Vec<u8> }
//! ```
//!
//! dstack verifiers replay `runtime_events` with the V1 digest (`SHA384(le32(type) ‖ ":" ‖ name ‖ ":" ‖
//! payload)`); the format has no field for event-log version 2, so an app with `event_log_version: 2` gets
//! an attestation only our verifier (which takes the version from [`Attestation::event_log`]) can replay.
//! Decoding is bounded (10 MiB, lengths checked against the remaining input before allocating) and rejects
//! non-canonical compact integers, unknown variants and trailing bytes, naming the field and offset.

use dstack_tee::{EventLogVersion, RuntimeEvent, TdxEvent};

/// Largest accepted encoded attestation (dstack's `MAX_ATTESTATION_BYTES`).
pub const MAX_ATTESTATION_BYTES: usize = 10 * 1024 * 1024;

/// `VersionedAttestation` variant index of `V0`.
const VERSION_V0: u8 = 0;
/// `AttestationQuote` variant index of `DstackTdx` (1 = GCP TDX, 2 = Nitro: not produced, refused).
const QUOTE_DSTACK_TDX: u8 = 0;

/// Decoding errors: what was being read and where.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestationError {
    #[error("attestation is {0} bytes, more than the {MAX_ATTESTATION_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("{field} at offset {offset}: input ends early (needs {needed} bytes, {left} left)")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        left: usize,
    },
    #[error("{field} at offset {offset}: {reason}")]
    Invalid {
        field: &'static str,
        offset: usize,
        reason: String,
    },
    #[error("{0} trailing bytes after the attestation")]
    Trailing(usize),
}

/// A decoded (or to-be-encoded) TDX attestation: the V0 `Attestation` with the `DstackTdx` quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The TDX quote (its report data is `report_data`).
    pub quote: Vec<u8>,
    /// The full event log (boot events and the RTMR3 events with digests).
    pub event_log: Vec<TdxEvent>,
    /// The RTMR3 runtime events (name and payload; dstack replays them with the V1 digest).
    pub runtime_events: Vec<RuntimeEvent>,
    pub report_data: [u8; 64],
    /// The VmConfig JSON string.
    pub config: String,
}

impl Attestation {
    /// The SCALE `VersionedAttestation::V0` bytes.
    pub fn to_scale(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(self.quote.len() + 4096);
        w.push(VERSION_V0);
        w.push(QUOTE_DSTACK_TDX);
        put_bytes(&mut w, &self.quote);
        put_compact(&mut w, self.event_log.len());
        for e in &self.event_log {
            w.extend_from_slice(&e.imr.to_le_bytes());
            w.extend_from_slice(&e.event_type.to_le_bytes());
            put_bytes(&mut w, &e.digest);
            put_bytes(&mut w, e.event.as_bytes());
            put_bytes(&mut w, &e.event_payload);
        }
        put_compact(&mut w, self.runtime_events.len());
        for e in &self.runtime_events {
            put_bytes(&mut w, e.name.as_bytes());
            put_bytes(&mut w, &e.payload);
        }
        w.extend_from_slice(&self.report_data);
        put_bytes(&mut w, self.config.as_bytes());
        w
    }

    /// Decodes SCALE `VersionedAttestation::V0` bytes with a `DstackTdx` quote. Runtime events come back as
    /// event-log version 1 (the format has no version field).
    pub fn from_scale(bytes: &[u8]) -> Result<Self, AttestationError> {
        if bytes.len() > MAX_ATTESTATION_BYTES {
            return Err(AttestationError::TooLarge(bytes.len()));
        }
        let mut r = Reader { buf: bytes, pos: 0 };
        let version = r.u8("VersionedAttestation variant")?;
        if version != VERSION_V0 {
            return Err(r.invalid(
                "VersionedAttestation variant",
                1,
                format!("{version:#04x} is not V0 (MessagePack V1 attestations are not decoded here)"),
            ));
        }
        let kind = r.u8("AttestationQuote variant")?;
        if kind != QUOTE_DSTACK_TDX {
            return Err(r.invalid(
                "AttestationQuote variant",
                1,
                format!("{kind} is not DstackTdx (0); only TDX attestations are supported"),
            ));
        }
        let quote = r.bytes("quote")?;
        let n = r.count("event_log length", 4 + 4 + 3)?;
        let mut event_log = Vec::with_capacity(n);
        for _ in 0..n {
            let imr = r.u32("event_log[].imr")?;
            let event_type = r.u32("event_log[].event_type")?;
            let digest = r.bytes("event_log[].digest")?;
            let event = r.string("event_log[].event")?;
            let event_payload = r.bytes("event_log[].event_payload")?;
            event_log.push(TdxEvent {
                imr,
                event_type,
                digest,
                event,
                event_payload,
                version: None,
            });
        }
        let n = r.count("runtime_events length", 2)?;
        let mut runtime_events = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.string("runtime_events[].event")?;
            let payload = r.bytes("runtime_events[].payload")?;
            runtime_events.push(RuntimeEvent::new(name, payload).with_version(EventLogVersion::V1));
        }
        let report_data: [u8; 64] = r
            .take("report_data", 64)?
            .try_into()
            .map_err(|_| r.invalid("report_data", 64, "not 64 bytes".into()))?;
        let config = r.string("config")?;
        if r.pos != bytes.len() {
            return Err(AttestationError::Trailing(bytes.len() - r.pos));
        }
        Ok(Self {
            quote,
            event_log,
            runtime_events,
            report_data,
            config,
        })
    }
}

/// SCALE `Compact<u32>` (all lengths here are far below 2^30; larger ones use the big-integer mode).
fn put_compact(w: &mut Vec<u8>, n: usize) {
    let n = n as u64;
    if n < 1 << 6 {
        w.push((n as u8) << 2);
    } else if n < 1 << 14 {
        w.extend_from_slice(&(((n as u16) << 2) | 0b01).to_le_bytes());
    } else if n < 1 << 30 {
        w.extend_from_slice(&(((n as u32) << 2) | 0b10).to_le_bytes());
    } else {
        let le = n.to_le_bytes();
        let len = 8 - n.leading_zeros() as usize / 8;
        w.push((((len - 4) as u8) << 2) | 0b11);
        w.extend_from_slice(&le[..len]);
    }
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_compact(w, b.len());
    w.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// An error about the `len` bytes just read, at their start offset.
    fn invalid(&self, field: &'static str, len: usize, reason: String) -> AttestationError {
        AttestationError::Invalid {
            field,
            offset: self.pos.saturating_sub(len),
            reason,
        }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], AttestationError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(AttestationError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                left,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, AttestationError> {
        Ok(self.take(field, 1)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, AttestationError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A canonical `Compact<u32>` (as parity-scale-codec, non-minimal encodings are refused).
    fn compact(&mut self, field: &'static str) -> Result<usize, AttestationError> {
        let start = self.pos;
        let first = self.u8(field)?;
        let (value, min) = match first & 0b11 {
            0b00 => (u64::from(first >> 2), 0),
            0b01 => {
                let b = self.take(field, 1)?;
                (u64::from(u16::from_le_bytes([first, b[0]]) >> 2), 1 << 6)
            }
            0b10 => {
                let b = self.take(field, 3)?;
                (u64::from(u32::from_le_bytes([first, b[0], b[1], b[2]]) >> 2), 1 << 14)
            }
            _ => {
                let len = usize::from(first >> 2) + 4;
                if len > 4 {
                    return Err(AttestationError::Invalid {
                        field,
                        offset: start,
                        reason: format!("compact length of {len} bytes exceeds u32"),
                    });
                }
                let b = self.take(field, 4)?;
                (u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])), 1 << 30)
            }
        };
        if value < min {
            return Err(AttestationError::Invalid {
                field,
                offset: start,
                reason: format!("non-canonical compact encoding of {value}"),
            });
        }
        usize::try_from(value).map_err(|_| AttestationError::Invalid {
            field,
            offset: start,
            reason: format!("{value} does not fit in usize"),
        })
    }

    /// An element count, refused when the remaining input cannot hold that many `min_size`-byte elements.
    fn count(&mut self, field: &'static str, min_size: usize) -> Result<usize, AttestationError> {
        let start = self.pos;
        let n = self.compact(field)?;
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(min_size) > left {
            return Err(AttestationError::Invalid {
                field,
                offset: start,
                reason: format!("{n} elements cannot fit in the {left} bytes left"),
            });
        }
        Ok(n)
    }

    fn bytes(&mut self, field: &'static str) -> Result<Vec<u8>, AttestationError> {
        let n = self.compact(field)?;
        Ok(self.take(field, n)?.to_vec())
    }

    fn string(&mut self, field: &'static str) -> Result<String, AttestationError> {
        let n = self.compact(field)?;
        let b = self.take(field, n)?;
        String::from_utf8(b.to_vec()).map_err(|e| self.invalid(field, n, format!("not UTF-8: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(n: usize) -> Vec<u8> {
        let mut w = Vec::new();
        put_compact(&mut w, n);
        w
    }

    /// SCALE compact vectors from the SCALE codec specification (docs.substrate.io "SCALE encoding").
    #[test]
    fn compact_spec_vectors() {
        assert_eq!(compact(0), [0x00]);
        assert_eq!(compact(1), [0x04]);
        assert_eq!(compact(42), [0xa8]);
        assert_eq!(compact(69), [0x15, 0x01]);
        assert_eq!(compact(65535), [0xfe, 0xff, 0x03, 0x00]);
        assert_eq!(compact(1 << 30), [0x03, 0x00, 0x00, 0x00, 0x40]);
        for n in [0, 1, 42, 63, 64, 69, 16383, 16384, 65535, (1 << 30) - 1, 1 << 30] {
            let enc = compact(n);
            let mut r = Reader { buf: &enc, pos: 0 };
            assert_eq!(r.compact("n").unwrap(), n);
            assert_eq!(r.pos, enc.len());
        }
    }

    #[test]
    fn non_canonical_compact_refused() {
        // 1 encoded in two-byte mode.
        let mut r = Reader {
            buf: &[0x05, 0x00],
            pos: 0,
        };
        assert!(matches!(r.compact("n"), Err(AttestationError::Invalid { .. })));
    }

    fn sample() -> Attestation {
        Attestation {
            quote: vec![7; 100],
            event_log: vec![TdxEvent {
                imr: 3,
                event_type: 0x0800_0001,
                digest: vec![1; 48],
                event: "app-id".into(),
                event_payload: vec![2; 20],
                version: None,
            }],
            runtime_events: vec![RuntimeEvent::new("app-id", vec![2; 20])],
            report_data: [9; 64],
            config: "{\"cpu_count\":1}".into(),
        }
    }

    #[test]
    fn roundtrip_and_layout() {
        let a = sample();
        let enc = a.to_scale();
        // V0, DstackTdx, Compact(100) = 0x91 0x01, then the quote.
        assert_eq!(&enc[..4], &[0x00, 0x00, 0x91, 0x01]);
        assert_eq!(Attestation::from_scale(&enc).unwrap(), a);
    }

    #[test]
    fn hostile_inputs_fail_closed() {
        let enc = sample().to_scale();
        for cut in 0..enc.len() {
            assert!(
                Attestation::from_scale(&enc[..cut]).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
        let mut trailing = enc.clone();
        trailing.push(0);
        assert_eq!(Attestation::from_scale(&trailing), Err(AttestationError::Trailing(1)));
        let mut v1 = enc.clone();
        v1[0] = 0x83; // a MessagePack map: dstack's V1
        assert!(matches!(
            Attestation::from_scale(&v1),
            Err(AttestationError::Invalid {
                field: "VersionedAttestation variant",
                offset: 0,
                ..
            })
        ));
        // A huge event count with little input left.
        let mut huge = vec![0x00, 0x00, 0x00];
        huge.extend_from_slice(&[0x02, 0x00, 0x00, 0x40]);
        assert!(matches!(
            Attestation::from_scale(&huge),
            Err(AttestationError::Invalid {
                field: "event_log length",
                ..
            })
        ));
        assert!(matches!(
            Attestation::from_scale(&vec![0u8; MAX_ATTESTATION_BYTES + 1]),
            Err(AttestationError::TooLarge(_))
        ));
    }
}
