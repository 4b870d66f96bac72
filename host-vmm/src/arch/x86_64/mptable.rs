//! Intel MultiProcessor Specification 1.4 table (floating pointer + configuration table), as a pure function
//! of the vCPU count. Linux finds it in the first KiB of the EBDA and uses it for CPU and IOAPIC discovery
//! when there is no ACPI MADT.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

/// vCPUs that fit the 1 KiB EBDA window this table lives in.
pub const MAX_MPTABLE_CPUS: u32 = 32;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("MP table supports 1..={MAX_MPTABLE_CPUS} vCPUs, got {0}")]
    TooManyCpus(u32),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer followed by the configuration table, to be written at guest address `addr`.
pub fn build(addr: u32, vcpus: u32) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_MPTABLE_CPUS {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus as u8;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        // Processor: type 0, APIC ID, version, flags (enabled | BSP), signature, feature flags, reserved.
        entries.extend_from_slice(&[0, id as u8, APIC_VERSION, 1 | if id == 0 { 2 } else { 0 }]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&((1u32 << 9) | 1).to_le_bytes()); // APIC | FPU
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC: type 2, id, version, enabled, address.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ i → IOAPIC pin i (INT, bus-default polarity/trigger).
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: LINT0 = ExtINT, LINT1 = NMI, to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"DSTACKRS"); // OEM ID
    table.extend_from_slice(b"HOST-VMM    "); // product ID
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_LEN + table_len);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(addr + FLOATING_LEN as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    Ok(fp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        let t = build(0x9fc00, 4).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "configuration table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // Walk the entries: processor entries are 20 bytes, the rest 8.
        let mut off = HEADER_LEN;
        let mut cpus = Vec::new();
        for _ in 0..count {
            match table[off] {
                0 => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += 20;
                }
                1..=4 => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(off, len);
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn fits_ebda_at_max() {
        let t = build(0x9fc00, MAX_MPTABLE_CPUS).unwrap();
        assert!(t.len() <= 1024);
        assert_eq!(build(0x9fc00, 0), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(build(0x9fc00, 33), Err(MpTableError::TooManyCpus(33)));
    }
}
