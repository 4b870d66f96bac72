//! The TD HOB our VMM writes into the TDVF `TD_HOB` section before the TD starts (ours; the layout follows
//! the PI spec HOB formats and QEMU's `tdvf-hob.c`, which OVMF's TDX SEC consumes).
//!
//! Bytes (all little-endian):
//! 1. PHIT HOB (type 0x0001, length 56): version 9, boot mode 0, EfiMemoryTop/Bottom and
//!    EfiFreeMemoryTop/Bottom 0, EfiEndOfHobList = HOB base + (length of 1+2) + 8 (the address just past the
//!    8-byte END_OF_HOB_LIST HOB that follows).
//! 2. One resource descriptor HOB (type 0x0003, length 48, owner GUID zero, attributes 0x7 =
//!    PRESENT|INITIALIZED|TESTED) per maximal run of guest RAM of one type, in address order: RAM covered by a TDVF
//!    `TD_HOB` or `TEMP_MEM` section (the VMM PAGE.ADDs those, so they are accepted) have resource type 0
//!    (SYSTEM_MEMORY); all other RAM has type 7 (UNACCEPTED, OVMF accepts it lazily). RAM is
//!    `dstack_acpi::layout::ram_ranges(memory)`: `[0, min(mem, 3 GiB))` and the rest from 4 GiB.
//! 3. END_OF_HOB_LIST (type 0xffff, length 8) — written but **not** measured: OVMF measures the HOB list
//!    without its terminator (as dstack-mr reproduces from real TDs; not confirmed on our VMM here).
//!
//! OVMF measures these bytes into RTMR0 as an EV_EFI_HANDOFF_TABLES2 "TdxTable" event.

use dstack_acpi::layout::ram_ranges;

use crate::mrtd::Tdvf;

/// TDVF section types (tdx-facts §2.1).
pub const SECTION_CFV: u32 = 1;
pub const SECTION_TD_HOB: u32 = 2;
pub const SECTION_TEMP_MEM: u32 = 3;

const HOB_HANDOFF: u16 = 0x0001;
const HOB_RESOURCE: u16 = 0x0003;
const HOB_END: u16 = 0xffff;
const PHIT_LEN: u16 = 56;
const RESOURCE_LEN: u16 = 48;
const PHIT_VERSION: u32 = 9;
const RESOURCE_SYSTEM_MEMORY: u32 = 0;
const RESOURCE_UNACCEPTED: u32 = 7;
const RESOURCE_ATTRS: u32 = 0x7;
/// Offset of EfiEndOfHobList in the PHIT HOB.
const END_OF_HOB_LIST_AT: usize = 48;

/// Errors building the HOB.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HobError {
    #[error("firmware has no TDVF TD_HOB section")]
    NoHobSection,
    #[error("TD HOB ({need} bytes) does not fit the {have}-byte TD_HOB section")]
    TooLarge { need: usize, have: u64 },
    #[error("TDVF section at {addr:#x} (+{size:#x}) lies outside guest RAM")]
    SectionOutsideRam { addr: u64, size: u64 },
}

/// The TD HOB as written to guest memory (`bytes`) and the part OVMF measures (`measured()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdHob {
    /// Guest-physical address of the HOB (the TDVF TD_HOB section).
    pub base: u64,
    /// PHIT + resource descriptors + END_OF_HOB_LIST.
    pub bytes: Vec<u8>,
}

impl TdHob {
    /// The bytes OVMF hashes: everything before the END_OF_HOB_LIST HOB.
    pub fn measured(&self) -> &[u8] {
        self.bytes.get(..self.bytes.len().saturating_sub(8)).unwrap_or_default()
    }
}

fn header(t: u16, len: u16) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..2].copy_from_slice(&t.to_le_bytes());
    h[2..4].copy_from_slice(&len.to_le_bytes());
    h
}

fn resource(kind: u32, start: u64, len: u64) -> Vec<u8> {
    let mut r = header(HOB_RESOURCE, RESOURCE_LEN).to_vec();
    r.extend_from_slice(&[0u8; 16]); // owner GUID
    r.extend_from_slice(&kind.to_le_bytes());
    r.extend_from_slice(&RESOURCE_ATTRS.to_le_bytes());
    r.extend_from_slice(&start.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r
}

/// `(start, end, accepted)` pieces of RAM split at the accepted ranges.
fn pieces(memory: u64, accepted: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    for (start, len) in ram_ranges(memory) {
        let end = start + len;
        let mut cuts: Vec<u64> = vec![start, end];
        for &(a, b) in accepted {
            cuts.extend([a.clamp(start, end), b.clamp(start, end)]);
        }
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let acc = accepted.iter().any(|&(s, e)| s <= a && b <= e);
            match out.last_mut() {
                Some((_, last_end, last_acc)) if *last_end == a && *last_acc == acc => *last_end = b,
                _ => out.push((a, b, acc)),
            }
        }
    }
    out
}

/// Builds the TD HOB for a TD with `memory` bytes of RAM booting firmware described by `tdvf`.
pub fn build(tdvf: &Tdvf, memory: u64) -> Result<TdHob, HobError> {
    let hob_section = tdvf
        .sections
        .iter()
        .find(|s| s.section_type == SECTION_TD_HOB)
        .ok_or(HobError::NoHobSection)?;
    let ram_end = ram_ranges(memory).last().map_or(0, |(a, l)| a + l);
    let mut accepted = Vec::new();
    for s in tdvf
        .sections
        .iter()
        .filter(|s| matches!(s.section_type, SECTION_TD_HOB | SECTION_TEMP_MEM))
    {
        let end = s.memory_address.saturating_add(s.memory_data_size);
        let in_ram = ram_ranges(memory)
            .iter()
            .any(|&(a, l)| a <= s.memory_address && end <= a + l);
        if !in_ram || end > ram_end {
            return Err(HobError::SectionOutsideRam {
                addr: s.memory_address,
                size: s.memory_data_size,
            });
        }
        accepted.push((s.memory_address, end));
    }

    let mut bytes = header(HOB_HANDOFF, PHIT_LEN).to_vec();
    bytes.extend_from_slice(&PHIT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes()); // boot mode: BOOT_WITH_FULL_CONFIGURATION
    bytes.extend_from_slice(&[0u8; 40]); // memory top/bottom, free top/bottom, end of HOB list
    for (start, end, acc) in pieces(memory, &accepted) {
        let kind = if acc {
            RESOURCE_SYSTEM_MEMORY
        } else {
            RESOURCE_UNACCEPTED
        };
        bytes.extend_from_slice(&resource(kind, start, end - start));
    }
    let end_of_list = hob_section.memory_address + bytes.len() as u64 + 8;
    bytes[END_OF_HOB_LIST_AT..END_OF_HOB_LIST_AT + 8].copy_from_slice(&end_of_list.to_le_bytes());
    bytes.extend_from_slice(&header(HOB_END, 8));
    if bytes.len() as u64 > hob_section.memory_data_size {
        return Err(HobError::TooLarge {
            need: bytes.len(),
            have: hob_section.memory_data_size,
        });
    }
    Ok(TdHob {
        base: hob_section.memory_address,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mrtd::{Locator, TdvfSection};

    /// The sections of a typical OVMF (tdx-facts §2.1): TD_HOB at 0x809000, TEMP_MEM around it.
    pub(crate) fn typical_tdvf() -> Tdvf {
        let sec = |addr: u64, size: u64, t: u32| TdvfSection {
            data_offset: 0,
            raw_data_size: 0,
            memory_address: addr,
            memory_data_size: size,
            section_type: t,
            attributes: 0,
        };
        Tdvf {
            descriptor_offset: 0,
            located_by: Locator::GuidTable,
            sections: vec![
                sec(0x80_0000, 0x6000, SECTION_TEMP_MEM),
                sec(0x80_9000, 0x2000, SECTION_TD_HOB),
                sec(0x80_b000, 0x2000, SECTION_TEMP_MEM),
                sec(0x81_0000, 0x1_0000, SECTION_TEMP_MEM),
            ],
        }
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn hob_for_2_gib_and_6_gib() {
        let h = build(&typical_tdvf(), 2 << 30).unwrap();
        let resources: Vec<(u32, u64, u64)> = h.measured()[56..]
            .chunks(48)
            .map(|r| {
                (
                    u32::from_le_bytes(r[24..28].try_into().unwrap()),
                    u64_at(r, 32),
                    u64_at(r, 40),
                )
            })
            .collect();
        assert_eq!(
            resources,
            [
                (7, 0, 0x80_0000),
                (0, 0x80_0000, 0x6000),
                (7, 0x80_6000, 0x3000),
                (0, 0x80_9000, 0x4000), // TD_HOB and the adjacent TEMP_MEM merge
                (7, 0x80_d000, 0x3000),
                (0, 0x81_0000, 0x1_0000),
                (7, 0x82_0000, (2 << 30) - 0x82_0000),
            ]
        );
        assert_eq!(u64_at(&h.bytes, 48), 0x80_9000 + h.measured().len() as u64 + 8);
        assert_eq!(&h.bytes[h.bytes.len() - 8..], &[0xff, 0xff, 8, 0, 0, 0, 0, 0]);
        let big = build(&typical_tdvf(), 6 << 30).unwrap();
        let last = &big.measured()[big.measured().len() - 48..];
        assert_eq!((u64_at(last, 32), u64_at(last, 40)), (4 << 30, 3 << 30));
        let before = &big.measured()[big.measured().len() - 96..big.measured().len() - 48];
        assert_eq!(u64_at(before, 32) + u64_at(before, 40), 3 << 30);
    }

    #[test]
    fn rejects_missing_or_misplaced_sections() {
        let mut t = typical_tdvf();
        assert_eq!(
            build(&t, 1 << 20),
            Err(HobError::SectionOutsideRam {
                addr: 0x80_0000,
                size: 0x6000
            })
        );
        t.sections.retain(|s| s.section_type != SECTION_TD_HOB);
        assert_eq!(build(&t, 2 << 30), Err(HobError::NoHobSection));
    }
}
