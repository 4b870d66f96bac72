//! PE/COFF Authenticode image digest (SHA-384), as firmware measures EFI applications
//! (EV_EFI_BOOT_SERVICES_APPLICATION into RTMR1).
//!
//! Hashed: the headers except the CheckSum field and the Certificate Table data directory
//! entry; then each section's raw data in ascending PointerToRawData order; then any bytes
//! after the last section except the attribute certificate table.

use sha2::{Digest, Sha384};

use crate::quote::{ParseError, Reader};

const IMAGE_DIRECTORY_ENTRY_SECURITY: usize = 4;

/// Errors parsing a PE image.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PeError {
    #[error("malformed PE image: {0}")]
    Parse(#[from] ParseError),
}

fn invalid(field: &'static str, offset: usize, reason: impl Into<String>) -> PeError {
    PeError::Parse(ParseError::Invalid {
        field,
        offset,
        reason: reason.into(),
    })
}

fn range<'a>(img: &'a [u8], from: usize, to: usize, field: &'static str) -> Result<&'a [u8], PeError> {
    if from > to {
        return Err(invalid(field, from, format!("range end {to:#x} before start")));
    }
    img.get(from..to).ok_or_else(|| {
        PeError::Parse(ParseError::Truncated {
            field,
            offset: from,
            need: to - from,
            have: img.len().saturating_sub(from),
        })
    })
}

/// SHA-384 Authenticode digest of a PE/COFF image.
pub fn authenticode_sha384(img: &[u8]) -> Result<[u8; 48], PeError> {
    let mut r = Reader::at(img, 0);
    let mz: [u8; 2] = r.array("dos.e_magic")?;
    if &mz != b"MZ" {
        return Err(invalid("dos.e_magic", 0, "not \"MZ\""));
    }
    let pe_off = Reader::at(img, 0x3c).u32("dos.e_lfanew")? as usize;
    let mut r = Reader::at(img, pe_off);
    if r.pos() != pe_off {
        return Err(invalid("dos.e_lfanew", 0x3c, "points past the end"));
    }
    let sig: [u8; 4] = r.array("pe.signature")?;
    if &sig != b"PE\0\0" {
        return Err(invalid("pe.signature", pe_off, "not \"PE\\0\\0\""));
    }
    let _machine = r.u16("coff.machine")?;
    let nsections = r.u16("coff.number_of_sections")? as usize;
    r.bytes(12, "coff.timestamps")?;
    let opt_size = r.u16("coff.size_of_optional_header")? as usize;
    let _chars = r.u16("coff.characteristics")?;
    let opt = r.pos();
    let magic = r.u16("optional.magic")?;
    let (dirs_count_off, dirs_off) = match magic {
        0x10b => (opt + 92, opt + 96),
        0x20b => (opt + 108, opt + 112),
        m => {
            return Err(invalid(
                "optional.magic",
                opt,
                format!("{m:#x} is neither PE32 nor PE32+"),
            ));
        }
    };
    let checksum_off = opt + 64;
    let size_of_headers = Reader::at(img, opt + 60).u32("optional.size_of_headers")? as usize;
    let ndirs = Reader::at(img, dirs_count_off).u32("optional.number_of_rva_and_sizes")? as usize;
    let sections_off = opt + opt_size;

    let mut h = Sha384::new();
    h.update(range(img, 0, checksum_off, "headers")?);
    let cert_size = if ndirs > IMAGE_DIRECTORY_ENTRY_SECURITY {
        let dir = dirs_off + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY;
        if dir + 8 > sections_off {
            return Err(invalid(
                "optional.data_directory",
                dir,
                "security entry outside optional header",
            ));
        }
        h.update(range(img, checksum_off + 4, dir, "headers")?);
        h.update(range(img, dir + 8, size_of_headers, "headers")?);
        let mut d = Reader::at(img, dir);
        d.u32("security.virtual_address")?;
        d.u32("security.size")? as usize
    } else {
        h.update(range(img, checksum_off + 4, size_of_headers, "headers")?);
        0
    };

    let mut sections = Vec::with_capacity(nsections.min(96));
    let mut s = Reader::at(img, sections_off);
    for _ in 0..nsections {
        let off = s.pos();
        s.bytes(16, "section.name_and_virtual")?;
        let raw_size = s.u32("section.size_of_raw_data")? as usize;
        let raw_ptr = s.u32("section.pointer_to_raw_data")? as usize;
        s.bytes(16, "section.rest")?;
        if raw_size != 0 {
            sections.push((raw_ptr, raw_size, off));
        }
    }
    sections.sort_by_key(|&(ptr, _, _)| ptr);
    let mut hashed = size_of_headers;
    for (ptr, size, _) in sections {
        h.update(range(img, ptr, ptr.saturating_add(size), "section.raw_data")?);
        hashed = hashed.saturating_add(size);
    }
    if img.len() > hashed {
        let extra_end = img.len().saturating_sub(cert_size);
        if extra_end > hashed {
            h.update(range(img, hashed, extra_end, "trailing_data")?);
        }
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
pub(crate) mod tests;
