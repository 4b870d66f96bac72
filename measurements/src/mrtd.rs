//! MRTD prediction from a TDVF/OVMF firmware image.
//!
//! The TDVF metadata descriptor ("TDVF", version 1, n × 32-byte sections) is located either
//! through the OVMF GUIDed footer table (entry `e47a6535-…`, whose data ends in a `u32`
//! offset from the end of the image) or through the legacy `u32` pointer at `len − 0x20`
//! (same meaning; the descriptor may be preceded by the TDX metadata GUID `e9eaf9f3-…`).
//!
//! MRTD = SHA-384 over, in the order the VMM issued them, a 128-byte `MEM.PAGE.ADD` record
//! (GPA at bytes 16..24) per 4 KiB page not marked PAGE_AUG and, for MR_EXTEND sections,
//! a 128-byte `MR.EXTEND` record per 256-byte chunk followed by the chunk's 256 bytes.
//! Single pass (upstream KVM, our VMM, QEMU ≥ 9): per page, add then extend. Two pass
//! (QEMU 8.x): per section, all adds then all extends.

use sha2::{Digest, Sha384};

use crate::quote::{ParseError, Reader};

/// Parse an EFI GUID string into its on-disk byte order (first three fields little-endian).
pub const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
    ]
}

/// OVMF GUIDed table footer `96b582de-1fb2-45f7-baea-a366c55a082d`.
pub const OVMF_TABLE_FOOTER_GUID: [u8; 16] = guid_bytes(
    0x96b582de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
/// TDX metadata offset entry `e47a6535-984a-4798-865e-4685a7bf8ec2`.
pub const TDX_METADATA_OFFSET_GUID: [u8; 16] = guid_bytes(
    0xe47a6535,
    0x984a,
    0x4798,
    [0x86, 0x5e, 0x46, 0x85, 0xa7, 0xbf, 0x8e, 0xc2],
);
/// EFI_TDX_METADATA_GUID `e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae`.
pub const TDX_METADATA_GUID: [u8; 16] = guid_bytes(
    0xe9eaf9f3,
    0x168e,
    0x44d5,
    [0xa8, 0xeb, 0x7f, 0x4d, 0x87, 0x38, 0xf6, 0xae],
);

/// Section attribute: extend the section's content into MRTD.
pub const ATTR_MR_EXTEND: u32 = 0x1;
/// Section attribute: pages are added later (TDH.MEM.PAGE.AUG), not measured.
pub const ATTR_PAGE_AUG: u32 = 0x2;
const PAGE: u64 = 4096;
const CHUNK: usize = 256;
/// Bound on one section's memory size, so hostile metadata cannot make us hash forever.
const MAX_SECTION_SIZE: u64 = 1 << 32;
const DESCRIPTOR_SIGNATURE: u32 = u32::from_le_bytes(*b"TDVF");

/// One TDVF section entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TdvfSection {
    pub data_offset: u32,
    pub raw_data_size: u32,
    pub memory_address: u64,
    pub memory_data_size: u64,
    /// 0 BFV, 1 CFV, 2 TD_HOB, 3 TEMP_MEM, 4 PERM_MEM, 5 PAYLOAD, 6 PAYLOAD_PARAM, …
    pub section_type: u32,
    pub attributes: u32,
}

/// How the descriptor was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locator {
    GuidTable,
    LegacyPointer,
}

/// Parsed TDVF metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tdvf {
    pub descriptor_offset: usize,
    pub located_by: Locator,
    pub sections: Vec<TdvfSection>,
}

/// SEAMCALL order used when the TD's memory was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOrder {
    SinglePass,
    TwoPass,
}

/// Errors locating or parsing the TDVF metadata.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MrtdError {
    #[error("malformed TDVF firmware: {0}")]
    Parse(#[from] ParseError),
    #[error("no TDVF metadata found (neither OVMF GUID table entry nor legacy pointer at len-0x20)")]
    NotFound,
}

fn invalid(field: &'static str, offset: usize, reason: impl Into<String>) -> MrtdError {
    MrtdError::Parse(ParseError::Invalid {
        field,
        offset,
        reason: reason.into(),
    })
}

/// Find the descriptor offset via the OVMF GUIDed footer table.
pub fn find_via_guid_table(fw: &[u8]) -> Result<Option<usize>, MrtdError> {
    let len = fw.len();
    if len < 50 || fw.get(len - 48..len - 32) != Some(&OVMF_TABLE_FOOTER_GUID[..]) {
        return Ok(None);
    }
    let table_len = u16::from_le_bytes([fw[len - 50], fw[len - 49]]) as usize;
    // QEMU's convention: the length includes the footer's own 18 bytes.
    let start = (len - 32)
        .checked_sub(table_len)
        .ok_or_else(|| invalid("ovmf_table.length", len - 50, format!("{table_len} exceeds image")))?;
    let mut end = len - 50;
    while end >= start + 18 {
        let guid = &fw[end - 16..end];
        let entry_len = u16::from_le_bytes([fw[end - 18], fw[end - 17]]) as usize;
        if entry_len < 18 || end - start < entry_len {
            return Err(invalid(
                "ovmf_table.entry_length",
                end - 18,
                format!("{entry_len} out of bounds"),
            ));
        }
        if guid == TDX_METADATA_OFFSET_GUID {
            let data = &fw[end - entry_len..end - 18];
            let off_bytes: [u8; 4] = data
                .get(data.len().saturating_sub(4)..)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| {
                    invalid(
                        "ovmf_table.tdx_entry",
                        end - entry_len,
                        "entry data shorter than 4 bytes",
                    )
                })?;
            let off = u32::from_le_bytes(off_bytes) as usize;
            let pos = len.checked_sub(off).ok_or_else(|| {
                invalid(
                    "ovmf_table.tdx_offset",
                    end.saturating_sub(22),
                    format!("{off:#x} exceeds image"),
                )
            })?;
            return Ok(Some(pos));
        }
        end -= entry_len;
    }
    Ok(None)
}

/// Find the descriptor offset via the legacy pointer at `len − 0x20`.
pub fn find_via_legacy_pointer(fw: &[u8]) -> Result<Option<usize>, MrtdError> {
    let len = fw.len();
    let Some(bytes) = len.checked_sub(0x20).and_then(|p| fw.get(p..p + 4)) else {
        return Ok(None);
    };
    let off = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if off == 0 || off > len {
        return Ok(None);
    }
    let pos = len - off;
    if fw.get(pos..pos + 4) == Some(b"TDVF") {
        return Ok(Some(pos));
    }
    if fw.get(pos..pos + 16) == Some(&TDX_METADATA_GUID[..]) && fw.get(pos + 16..pos + 20) == Some(b"TDVF") {
        return Ok(Some(pos + 16));
    }
    Ok(None)
}

/// Parse the descriptor at `pos`.
pub fn parse_descriptor(fw: &[u8], pos: usize, located_by: Locator) -> Result<Tdvf, MrtdError> {
    let mut r = Reader::at(fw, pos);
    if r.pos() != pos {
        return Err(invalid("tdvf.descriptor", pos, "offset beyond image"));
    }
    let sig = r.u32("tdvf.signature")?;
    if sig != DESCRIPTOR_SIGNATURE {
        return Err(invalid("tdvf.signature", pos, "not \"TDVF\""));
    }
    let length = r.u32("tdvf.length")? as usize;
    let version = r.u32("tdvf.version")?;
    if version != 1 {
        return Err(invalid("tdvf.version", pos + 8, format!("{version}, expected 1")));
    }
    let n = r.u32("tdvf.number_of_section_entry")? as usize;
    if n.checked_mul(32).and_then(|x| x.checked_add(16)) != Some(length) {
        return Err(invalid("tdvf.length", pos + 4, format!("{length} != 16 + 32 × {n}")));
    }
    if n > r.remaining() / 32 {
        return Err(invalid(
            "tdvf.number_of_section_entry",
            pos + 12,
            format!("{n} sections do not fit"),
        ));
    }
    let mut sections = Vec::with_capacity(n);
    for _ in 0..n {
        let off = r.pos();
        let s = TdvfSection {
            data_offset: r.u32("tdvf.section.data_offset")?,
            raw_data_size: r.u32("tdvf.section.raw_data_size")?,
            memory_address: r.u64("tdvf.section.memory_address")?,
            memory_data_size: r.u64("tdvf.section.memory_data_size")?,
            section_type: r.u32("tdvf.section.type")?,
            attributes: r.u32("tdvf.section.attributes")?,
        };
        if (s.data_offset as usize).saturating_add(s.raw_data_size as usize) > fw.len() {
            return Err(invalid("tdvf.section.raw_data", off, "raw data extends past the image"));
        }
        if !s.memory_address.is_multiple_of(PAGE) || !s.memory_data_size.is_multiple_of(PAGE) {
            return Err(invalid(
                "tdvf.section.memory",
                off + 8,
                "address/size not 4 KiB aligned",
            ));
        }
        if s.memory_data_size < s.raw_data_size as u64 {
            return Err(invalid(
                "tdvf.section.memory_data_size",
                off + 16,
                "smaller than raw data",
            ));
        }
        if s.memory_data_size > MAX_SECTION_SIZE {
            return Err(invalid("tdvf.section.memory_data_size", off + 16, "larger than 4 GiB"));
        }
        if s.memory_address.checked_add(s.memory_data_size).is_none() {
            return Err(invalid("tdvf.section.memory", off + 8, "address range overflows"));
        }
        sections.push(s);
    }
    Ok(Tdvf {
        descriptor_offset: pos,
        located_by,
        sections,
    })
}

/// Locate and parse the TDVF metadata (GUID table first, then the legacy pointer).
pub fn parse_tdvf(fw: &[u8]) -> Result<Tdvf, MrtdError> {
    if let Some(pos) = find_via_guid_table(fw)? {
        return parse_descriptor(fw, pos, Locator::GuidTable);
    }
    if let Some(pos) = find_via_legacy_pointer(fw)? {
        return parse_descriptor(fw, pos, Locator::LegacyPointer);
    }
    Err(MrtdError::NotFound)
}

fn record(tag: &[u8], gpa: u64) -> [u8; 128] {
    let mut buf = [0u8; 128];
    buf[..tag.len()].copy_from_slice(tag);
    buf[16..24].copy_from_slice(&gpa.to_le_bytes());
    buf
}

fn page_add(h: &mut Sha384, gpa: u64) {
    h.update(record(b"MEM.PAGE.ADD", gpa));
}

fn page_extend(h: &mut Sha384, fw: &[u8], s: &TdvfSection, page: u64) {
    let raw_start = s.data_offset as usize;
    let raw_end = raw_start.saturating_add(s.raw_data_size as usize);
    let page_start = raw_start.saturating_add((page as usize).saturating_mul(PAGE as usize));
    for i in 0..(PAGE as usize / CHUNK) {
        let gpa = s
            .memory_address
            .wrapping_add(page.wrapping_mul(PAGE))
            .wrapping_add((i * CHUNK) as u64);
        h.update(record(b"MR.EXTEND", gpa));
        let from = page_start.saturating_add(i * CHUNK);
        // Memory beyond the raw data is zero-filled when the section is loaded.
        let mut chunk = [0u8; CHUNK];
        if from < raw_end {
            let to = from.saturating_add(CHUNK).min(raw_end);
            if let Some(src) = fw.get(from..to) {
                chunk[..src.len()].copy_from_slice(src);
            }
        }
        h.update(chunk);
    }
}

/// Compute MRTD for `fw` with already-parsed metadata.
pub fn compute_mrtd_with(fw: &[u8], tdvf: &Tdvf, order: PageOrder) -> [u8; 48] {
    let mut h = Sha384::new();
    for s in &tdvf.sections {
        let pages = s.memory_data_size / PAGE;
        let add = s.attributes & ATTR_PAGE_AUG == 0;
        let extend = s.attributes & ATTR_MR_EXTEND != 0;
        match order {
            PageOrder::SinglePass => {
                for p in 0..pages {
                    if add {
                        page_add(&mut h, s.memory_address.wrapping_add(p * PAGE));
                    }
                    if extend {
                        page_extend(&mut h, fw, s, p);
                    }
                }
            }
            PageOrder::TwoPass => {
                if add {
                    for p in 0..pages {
                        page_add(&mut h, s.memory_address.wrapping_add(p * PAGE));
                    }
                }
                if extend {
                    for p in 0..pages {
                        page_extend(&mut h, fw, s, p);
                    }
                }
            }
        }
    }
    h.finalize().into()
}

/// Locate the metadata and compute MRTD.
pub fn compute_mrtd(fw: &[u8], order: PageOrder) -> Result<[u8; 48], MrtdError> {
    let tdvf = parse_tdvf(fw)?;
    Ok(compute_mrtd_with(fw, &tdvf, order))
}

#[cfg(test)]
pub(crate) mod tests;
