//! Walks the generated tables the way an OS does (ACPI 6.5 §5.2 offsets) and checks every link and checksum.

use super::*;
use crate::layout::PciLayout;

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
    let t = build(&AcpiShape { vcpus: 3, pci: None }).unwrap();
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
    let a = build(&AcpiShape { vcpus: 2, pci: None }).unwrap();
    assert_eq!(a, build(&AcpiShape { vcpus: 2, pci: None }).unwrap());
    assert_ne!(a, build(&AcpiShape { vcpus: 4, pci: None }).unwrap());
    assert_eq!(build(&AcpiShape { vcpus: 0, pci: None }), Err(AcpiError::BadVcpus(0)));
    // Everything fits the BIOS area below 1 MiB even at the largest shape.
    let big = build(&AcpiShape { vcpus: 255, pci: None }).unwrap();
    assert!(big.base + big.bytes.len() as u64 <= 0x10_0000);
}

fn pci_tables() -> AcpiTables {
    build(&AcpiShape {
        vcpus: 2,
        pci: Some(PciLayout::for_ram(512 << 20)),
    })
    .unwrap()
}

/// (DSDT, MCFG) of the PCI shape, found through RSDP → XSDT → FADT like an OS would.
fn dsdt_and_mcfg(t: &AcpiTables) -> (Vec<u8>, Vec<u8>) {
    let xsdt = table(t, u64_at(&t.bytes, 24), b"XSDT");
    let entries: Vec<u64> = xsdt[36..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(entries.len(), 3);
    let fadt = table(t, entries[0], b"FACP");
    let dsdt = table(t, u64_at(fadt, 140), b"DSDT").to_vec();
    let mcfg = table(t, entries[2], b"MCFG").to_vec();
    (dsdt, mcfg)
}

#[test]
fn pci_shape_adds_root_bridge_and_mcfg() {
    let t = pci_tables();
    let (dsdt, mcfg) = dsdt_and_mcfg(&t);
    // MCFG (PCI Firmware 3.2 §4.1.2): 8 reserved bytes, then base, segment, start bus, end bus.
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    assert_eq!(u64_at(&mcfg, 44), 0xe000_0000);
    assert_eq!(&mcfg[52..56], &[0, 0, 0, 0]);
    let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(find(b"PCI0") && find(b"MRES") && find(b"_SB_"));
    // EisaId("PNP0A08") / ("PNP0C02") as DWordConst.
    assert!(find(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(find(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
    // The 32-bit window descriptor: DWordMemory, min 0xC0000000, max 0xDFFFFFFF.
    assert!(find(&[0xc0, 0xff, 0xff, 0xff, 0xdf]));
    // Without PCI the tables are the plain ones.
    assert_ne!(t, build(&AcpiShape { vcpus: 2, pci: None }).unwrap());
    assert!(t.base + t.bytes.len() as u64 <= 0x10_0000);
}

/// Cross-check with ACPICA's disassembler when `DSTACK_IASL` names an `iasl` binary (Debian package
/// `acpica-tools`; e.g. `apt-get download acpica-tools && dpkg -x acpica-tools_*.deb root`).
#[test]
fn pci_tables_disassemble_with_iasl() {
    let Some(iasl) = std::env::var_os("DSTACK_IASL") else {
        eprintln!("SKIPPED pci_tables_disassemble_with_iasl: set DSTACK_IASL to an iasl binary");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (dsdt, mcfg) = dsdt_and_mcfg(&pci_tables());
    let mut outputs = String::new();
    for (name, bytes) in [("dsdt", &dsdt), ("mcfg", &mcfg)] {
        let path = dir.path().join(format!("{name}.dat"));
        std::fs::write(&path, bytes).unwrap();
        let out = std::process::Command::new(&iasl).arg("-d").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "iasl -d {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push_str(&std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap());
    }
    for want in [
        "Name (_S5, Package (0x02)",
        "Scope (\\_SB)",
        "Device (PCI0)",
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "IO (Decode16,",
        "0x0CF8,",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "0xC0000000,",
        "0xDFFFFFFF,",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "0x0000000100000000,",
        "Name (_HID, EisaId (\"PNP0C02\")",
        "Memory32Fixed (ReadWrite,",
        "0xE0000000,",
        "Base Address : 00000000E0000000",
        "End Bus Number : 00",
    ] {
        assert!(outputs.contains(want), "iasl output lacks {want:?}:\n{outputs}");
    }
    assert!(!outputs.contains("Error"), "{outputs}");
}

fn fixed_hardware_tables() -> AcpiTables {
    build_for(
        &AcpiShape {
            vcpus: 2,
            pci: Some(PciLayout::for_ram(2 << 30)),
        },
        PmModel::FixedHardware,
    )
    .unwrap()
}

/// The fixed-hardware FADT (ACPI 6.5 §5.2.9 offsets): FACS linked and 64-byte aligned, PM1a event/control
/// blocks, PM timer and SCI, fixed power button (PWR_BUTTON clear), not hardware-reduced; the MADT carries the
/// SCI's interrupt source override. The XSDT still lists only FADT, MADT and MCFG.
#[test]
fn fixed_hardware_fadt_facs_and_sci_override() {
    let t = fixed_hardware_tables();
    let xsdt = table(&t, u64_at(&t.bytes, 24), b"XSDT");
    let entries: Vec<u64> = xsdt[36..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(entries.len(), 3);
    let fadt = table(&t, entries[0], b"FACP");
    let flags = u32_at(fadt, 112);
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
    assert_eq!(flags & (1 << 4), 0, "PWR_BUTTON clear: fixed-feature power button");
    assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON set: no sleep button");
    assert_ne!(flags & (1 << 8), 0, "TMR_VAL_EXT: 32-bit PM timer");
    assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
    assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD: no mode switch, always ACPI mode");
    assert_eq!(
        (u32_at(fadt, 56), u32_at(fadt, 64), u32_at(fadt, 76)),
        (0x600, 0x604, 0x608)
    );
    assert_eq!(&fadt[88..92], &[4, 2, 0, 4]);
    assert_eq!(&fadt[244..268], &[0u8; 24][..], "no sleep control/status registers");
    let facs_addr = u64::from(u32_at(fadt, 36));
    assert_eq!(facs_addr % 64, 0, "FACS alignment");
    let off = (facs_addr - t.base) as usize;
    let facs = &t.bytes[off..off + 64];
    assert_eq!((&facs[..4], u32_at(facs, 4), facs[32]), (&b"FACS"[..], 64, 2));

    let madt = table(&t, entries[1], b"APIC");
    // Walk the MADT's interrupt controller structures for the override.
    let mut at = 44;
    let mut iso = None;
    while at < madt.len() {
        let (ty, len) = (madt[at], madt[at + 1] as usize);
        if ty == 2 {
            iso = Some(madt[at..at + len].to_vec());
        }
        at += len;
    }
    assert_eq!(iso.unwrap(), [2, 10, 0, 9, 9, 0, 0, 0, 5, 0]);
    // The measured default is unchanged by the option.
    assert_ne!(
        t,
        build(&AcpiShape {
            vcpus: 2,
            pci: Some(PciLayout::for_ram(2 << 30)),
        })
        .unwrap()
    );
}

/// Cross-check of FADT, FACS and MADT with ACPICA's disassembler (`DSTACK_IASL`, see below).
#[test]
fn fixed_hardware_tables_disassemble_with_iasl() {
    let Some(iasl) = std::env::var_os("DSTACK_IASL") else {
        eprintln!("SKIPPED fixed_hardware_tables_disassemble_with_iasl: set DSTACK_IASL to an iasl binary");
        return;
    };
    let t = fixed_hardware_tables();
    let xsdt = table(&t, u64_at(&t.bytes, 24), b"XSDT");
    let fadt_addr = u64_at(xsdt, 36);
    let fadt = table(&t, fadt_addr, b"FACP").to_vec();
    let madt = table(&t, u64_at(xsdt, 44), b"APIC").to_vec();
    let facs_off = (u64::from(u32_at(&fadt, 36)) - t.base) as usize;
    let facs = t.bytes[facs_off..facs_off + 64].to_vec();
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = String::new();
    for (name, bytes) in [("facp", &fadt), ("apic", &madt), ("facs", &facs)] {
        let path = dir.path().join(format!("{name}.dat"));
        std::fs::write(&path, bytes).unwrap();
        let out = std::process::Command::new(&iasl).arg("-d").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "iasl -d {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push_str(&std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap());
    }
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let text = squeeze(&outputs);
    for want in [
        "SCI Interrupt : 0009",
        "PM1A Event Block Address : 00000600",
        "PM1A Control Block Address : 00000604",
        "PM Timer Block Address : 00000608",
        "PM1 Event Block Length : 04",
        "PM1 Control Block Length : 02",
        "PM Timer Block Length : 04",
        "Control Method Power Button (V1) : 0",
        "Control Method Sleep Button (V1) : 1",
        "32-bit PM Timer (V1) : 1",
        "Hardware Reduced (V5) : 0",
        "Subtable Type : 02 [Interrupt Source Override]",
        "Source : 09",
        "Interrupt : 00000009",
        "Polarity : 1",
        "Trigger Mode : 1",
        "Signature : \"FACS\"",
        "Version : 02",
    ] {
        assert!(text.contains(want), "iasl output lacks {want:?}:\n{outputs}");
    }
    assert!(!outputs.contains("Error"), "{outputs}");
}
