//! Walks the generated tables the way an OS does (ACPI 6.5 §5.2 offsets) and checks every link and checksum.

use super::*;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The table at guest address `addr`, checked for length and checksum.
fn table<'a>(t: &'a AcpiTables, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
    let off = (addr - t.base) as usize;
    let len = u32_at(&t.bytes, off + 4) as usize;
    let tbl = &t.bytes[off..off + len];
    assert_eq!(&tbl[..4], sig);
    assert_eq!(sum(tbl), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&tbl[10..16], b"DSTACK");
    tbl
}

#[test]
fn rsdp_xsdt_fadt_dsdt_madt_chain() {
    let t = build(&AcpiShape { vcpus: 3 }).unwrap();
    assert_eq!(t.base, 0xe0000);
    let rsdp = &t.bytes[..36];
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    assert_eq!((rsdp[15], u32_at(rsdp, 16), u32_at(rsdp, 20)), (2, 0, 36));

    let xsdt = table(&t, u64_at(rsdp, 24), b"XSDT");
    let entries: Vec<u64> = xsdt[36..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(entries.len(), 2);

    let fadt = table(&t, entries[0], b"FACP");
    assert_eq!((fadt.len(), fadt[8], fadt[131]), (276, 6, 5));
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // RESET_REG and SLEEP_CONTROL_REG: system I/O, 8 bit, byte access, our ports.
    assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 120), u64::from(ACPI_PM_PORT) + 1);
    assert_eq!(fadt[128], RESET_VALUE);
    assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 248), u64::from(ACPI_PM_PORT));
    let dsdt_addr = u64_at(fadt, 140);
    assert_eq!(u64::from(u32_at(fadt, 40)), dsdt_addr);

    let dsdt = table(&t, dsdt_addr, b"DSDT");
    // AML: Name(_S5_, Package(2) { 5, 0 })
    assert_eq!(
        &dsdt[36..],
        &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 5, 0x00]
    );

    let madt = table(&t, entries[1], b"APIC");
    assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    let mut off = 44;
    let (mut lapics, mut ioapics, mut nmis) = (Vec::new(), Vec::new(), 0);
    while off < madt.len() {
        let (ty, len) = (madt[off], madt[off + 1] as usize);
        match ty {
            0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
            1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
            4 => nmis += 1,
            other => panic!("unexpected MADT entry type {other}"),
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapics, vec![(3, 0xfec0_0000, 0)]);
    assert_eq!(nmis, 1);
}

#[test]
fn deterministic_and_shape_dependent() {
    let a = build(&AcpiShape { vcpus: 2 }).unwrap();
    assert_eq!(a, build(&AcpiShape { vcpus: 2 }).unwrap());
    assert_ne!(a, build(&AcpiShape { vcpus: 4 }).unwrap());
    assert_eq!(build(&AcpiShape { vcpus: 0 }), Err(AcpiError::BadVcpus(0)));
    // Everything fits the BIOS area below 1 MiB even at the largest shape.
    let big = build(&AcpiShape { vcpus: 255 }).unwrap();
    assert!(big.base + big.bytes.len() as u64 <= 0x10_0000);
}
