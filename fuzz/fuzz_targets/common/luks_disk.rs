//! The data-disk decision guest-init makes on a host-supplied disk, driven end to end on a disk image
//! without cryptsetup: `probe_data_disk` (our own LUKS magic checks at every LUKS2 header offset, `blkid -p`, zeros) picks
//! format / unlock / refuse; on the unlock path the binary header (`validate_binary_header`) and the JSON
//! metadata (`validate_metadata`) are checked before anything would be opened. What cryptsetup does in
//! between is modelled here: `luksHeaderBackup` copies the header area and `luksDump --dump-json-metadata`
//! prints the JSON area (offset 4096 up to the header size, NUL-terminated) — the same bytes the validators
//! then see. Shared by the `luks_disk` cargo-fuzz target and guest-init's stable test
//! (`guest-init/tests/luks_decision.rs`, which includes this file by path).
//!
//! Input: `[ctl u8] [image bytes from offset 0 …]`. `ctl & 0x0f` = n in 1..=9 also places a secondary header
//! (the first ≤ 4096 image bytes with the secondary magic `SKUL\xba\xbe`) at the n-th LUKS2 secondary offset;
//! `ctl & 0x10` zeroes the primary magic afterwards (a wiped primary header).

#![allow(dead_code)] // the fuzz target and the test use different parts

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use guest_init::boot::luks::{Probe, probe_data_disk, validate_binary_header, validate_metadata};

pub const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
pub const SECONDARY_MAGIC: &[u8; 6] = b"SKUL\xba\xbe";
/// cryptsetup's LUKS2 secondary header offsets (`hdr2_offsets` in lib/luks2/luks2_disk_metadata.c).
pub const SECONDARY_OFFSETS: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
/// Every secondary offset plus one header fits.
pub const IMAGE_LEN: u64 = 5 << 20;
/// The binary header (LUKS2 `struct luks2_hdr_disk`, padded to 4 KiB).
pub const BIN_HDR_LEN: usize = 4096;

/// What guest-init would do with the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Blank: `luksFormat` it.
    Format,
    /// Existing LUKS2 volume whose header passed every check: `cryptsetup open --header <validated copy>`.
    Open,
    /// Refused, with the reason guest-init gives.
    Refuse(String),
}

/// Writes the image an input describes to `path` (sparse, [`IMAGE_LEN`] bytes).
pub fn write_image(path: &Path, input: &[u8]) -> std::io::Result<()> {
    let (ctl, body) = match input {
        [ctl, body @ ..] => (*ctl, body),
        [] => (0, &[][..]),
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.set_len(IMAGE_LEN)?;
    let body = &body[..body.len().min(IMAGE_LEN as usize)];
    f.write_all(body)?;
    let slot = usize::from(ctl & 0x0f);
    if let Some(off) = slot.checked_sub(1).and_then(|i| SECONDARY_OFFSETS.get(i)) {
        let mut hdr = body[..body.len().min(BIN_HDR_LEN)].to_vec();
        hdr.resize(hdr.len().max(6), 0);
        hdr[..6].copy_from_slice(SECONDARY_MAGIC);
        f.write_all_at(&hdr, *off)?;
    }
    if ctl & 0x10 != 0 {
        f.write_all_at(&[0; 6], 0)?;
    }
    Ok(())
}

fn read_at(path: &Path, off: u64, len: usize) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("reading the image: {e}"))?;
    let mut buf = vec![0u8; len];
    let n = f
        .read_at(&mut buf, off)
        .map_err(|e| format!("reading the image: {e}"))?;
    buf.truncate(n);
    Ok(buf)
}

/// guest-init's decision for the disk at `path`: `setup_data_disk`'s probe, then `unlock`'s checks, with
/// cryptsetup's header copy and JSON dump modelled (see the module comment).
pub fn decide(path: &Path) -> Verdict {
    match probe_data_disk(path) {
        Err(e) => Verdict::Refuse(e.to_string()),
        Ok(Probe::Blank) => Verdict::Format,
        Ok(Probe::Other(what)) => Verdict::Refuse(format!("has an existing {what}; refusing to format it")),
        Ok(Probe::Luks) => match check_header(path) {
            Ok(()) => Verdict::Open,
            Err(reason) => Verdict::Refuse(format!("LUKS header rejected: {reason}")),
        },
    }
}

fn check_header(path: &Path) -> Result<(), String> {
    let hdr = read_at(path, 0, BIN_HDR_LEN)?;
    validate_binary_header(&hdr)?;
    // Accepted above: 16 KiB ..= 4 MiB.
    let hdr_size = hdr
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or("header size: truncated")?;
    let area_len = usize::try_from(hdr_size).map_err(|_| "header size: too large")? - BIN_HDR_LEN;
    let area = read_at(path, BIN_HDR_LEN as u64, area_len)?;
    let text = area.split(|b| *b == 0).next().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(text).map_err(|e| format!("JSON area: {e}"))?;
    validate_metadata(&json)
}

/// Words one of which every refusal names (the field, offset or thing found on the disk).
pub const FIELD_WORDS: &[&str] = &[
    "magic",
    "version",
    "header size",
    "label",
    "checksum",
    "subsystem",
    "offset",
    "truncated",
    "JSON area",
    "metadata",
    "keyslots",
    "segments",
    "digests",
    "config",
    "tokens",
    "filesystem",
    "partition table",
    "signature",
    "unrecognized content",
    "reading the image",
    "data disk",
];

/// True when any byte of the image is nonzero.
pub fn any_nonzero(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return true;
    };
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0u64;
    while let Ok(n) = f.read_at(&mut buf, off) {
        if n == 0 {
            return false;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return true;
        }
        off += n as u64;
    }
    true
}

/// The invariants of the decision for the image at `path` (read back independently of `probe`), including:
/// a disk with any nonzero byte is never formatted.
pub fn check_invariants(path: &Path, verdict: &Verdict) {
    match verdict {
        Verdict::Format => {
            let primary = read_at(path, 0, 6).unwrap();
            assert_ne!(primary, LUKS_MAGIC, "formatting a disk with a primary LUKS header");
            for off in SECONDARY_OFFSETS {
                let m = read_at(path, off, 6).unwrap();
                assert_ne!(
                    m, SECONDARY_MAGIC,
                    "formatting a disk with a secondary LUKS header at {off:#x}"
                );
            }
            assert!(!any_nonzero(path), "formatting a disk that holds nonzero data");
        }
        Verdict::Open => {
            let hdr = read_at(path, 0, BIN_HDR_LEN).unwrap();
            assert_eq!(hdr.get(..6), Some(&LUKS_MAGIC[..]));
            assert_eq!(hdr.get(6..8), Some(&[0u8, 2][..]));
            assert_eq!(hdr.get(72..79), Some(&b"sha256\0"[..]));
            let size = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
            let area = read_at(path, 4096, (size - 4096) as usize).unwrap();
            let text = area.split(|b| *b == 0).next().unwrap();
            let json: serde_json::Value = serde_json::from_slice(text).unwrap();
            assert_eq!(json["segments"]["0"]["encryption"], "aes-xts-plain64");
            assert_eq!(json["segments"]["0"]["offset"], "16777216");
            assert_eq!(json["keyslots"]["0"]["area"]["encryption"], "aes-xts-plain64");
            assert_eq!(json["keyslots"]["0"]["kdf"]["type"], "pbkdf2");
            assert_eq!(json["tokens"].as_object().map(|t| t.len()), Some(0));
            assert!(json["segments"]["0"].get("integrity").is_none());
        }
        Verdict::Refuse(reason) => {
            assert!(
                FIELD_WORDS.iter().any(|w| reason.contains(w)),
                "refusal names no field: {reason:?}"
            );
        }
    }
}
