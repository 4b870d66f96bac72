//! The ACPI tables in QEMU's fw_cfg form, for OVMF: three files a firmware reads through fw_cfg and links
//! itself (ours: the file contents and command order are our definition; the command encoding is QEMU's
//! `BiosLinkerLoaderEntry`, which OVMF's `AcpiPlatformDxe` executes).
//!
//! - `etc/acpi/rsdp` ([`RSDP_FILE`]): the 36-byte RSDP, XSDT pointer = offset of the XSDT in the tables file.
//! - `etc/acpi/tables` ([`TABLES_FILE`]): DSDT, FADT, MADT, (MCFG,) XSDT laid out from offset 0, so every
//!   pointer holds the pointee's offset in this file.
//! - `etc/table-loader` ([`LOADER_FILE`]): 128-byte commands, in this order:
//!   1. ALLOCATE `etc/acpi/rsdp`, align 16, FSEG zone; 2. ALLOCATE `etc/acpi/tables`, align 64, HIGH zone;
//!   3. ADD_POINTER for FADT.DSDT (4 bytes @36+4), FADT.X_DSDT (8 bytes @140), each XSDT entry (8 bytes),
//!      then RSDP.XsdtAddress (8 bytes @24); 4. ADD_CHECKSUM for each table in layout order (checksum byte 9
//!      over the whole table), then the RSDP's v1 checksum (byte 8 over 20 bytes) and extended checksum
//!      (byte 32 over 36 bytes).
//!
//! With [`PmModel::FixedHardware`] ([`build_for`]) the tables file starts with the FACS (offset 0, 64-byte
//! aligned because the file is allocated with align 64) and one more ADD_POINTER, for FADT.FIRMWARE_CTRL
//! (4 bytes @36), comes right after the two DSDT pointers; OVMF's `Process2ndPassCmdAddPointer`
//! (`OvmfPkg/Library/AcpiPlatformLib/QemuFwCfgAcpi.c`) recognizes the pointee by its FACS signature and length
//! and installs it. [`build`] (hardware-reduced) is unchanged.
//!
//! Every checksum byte is **zero** in the files: OVMF's ADD_CHECKSUM sums the range including the result byte.
//!
//! OVMF with TDX measures these three files into RTMR0 as EV_PLATFORM_CONFIG_FLAGS "ACPI DATA" events,
//! SHA-384 of each file's bytes as read, in the order loader, rsdp, tables (seen in real dstack TDs; the
//! order of the two blobs follows our ALLOCATE order either way OVMF iterates them — by command order or by
//! file name — which is why the RSDP is allocated first).

use crate::tables::{AcpiError, AcpiShape, HEADER_LEN, PmModel, RSDP_LEN, rsdp, table_region_for};

/// fw_cfg file names (as QEMU names them, which OVMF looks for).
pub const LOADER_FILE: &str = "etc/table-loader";
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
pub const TABLES_FILE: &str = "etc/acpi/tables";

/// Size of one loader command and of a file-name field in it.
pub const COMMAND_LEN: usize = 128;
const FNAME_LEN: usize = 56;

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
/// ALLOCATE zones.
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;

/// FADT field offsets (ACPI 6.5 §5.2.9).
const FADT_FIRMWARE_CTRL: u32 = 36;
const FADT_DSDT: u32 = 40;
const FADT_X_DSDT: u32 = 140;
/// RSDP field offsets.
const RSDP_XSDT: u32 = 24;

/// The three fw_cfg files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiFwCfg {
    pub table_loader: Vec<u8>,
    pub rsdp: Vec<u8>,
    pub tables: Vec<u8>,
}

fn fname(name: &str) -> [u8; FNAME_LEN] {
    let mut f = [0u8; FNAME_LEN];
    for (d, s) in f.iter_mut().zip(name.bytes().take(FNAME_LEN - 1)) {
        *d = s;
    }
    f
}

fn command(cmd: u32, body: &[&[u8]]) -> [u8; COMMAND_LEN] {
    let mut c = [0u8; COMMAND_LEN];
    c[..4].copy_from_slice(&cmd.to_le_bytes());
    let mut at = 4;
    for part in body {
        c[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    c
}

fn allocate(file: &str, align: u32, zone: u8) -> [u8; COMMAND_LEN] {
    command(CMD_ALLOCATE, &[&fname(file), &align.to_le_bytes(), &[zone]])
}

fn add_pointer(dest: &str, src: &str, offset: u32, size: u8) -> [u8; COMMAND_LEN] {
    command(
        CMD_ADD_POINTER,
        &[&fname(dest), &fname(src), &offset.to_le_bytes(), &[size]],
    )
}

fn add_checksum(file: &str, result: u32, start: u32, len: u32) -> [u8; COMMAND_LEN] {
    command(
        CMD_ADD_CHECKSUM,
        &[
            &fname(file),
            &result.to_le_bytes(),
            &start.to_le_bytes(),
            &len.to_le_bytes(),
        ],
    )
}

/// Builds the three fw_cfg files for `shape` (hardware-reduced ACPI).
pub fn build(shape: &AcpiShape) -> Result<AcpiFwCfg, AcpiError> {
    build_for(shape, PmModel::HardwareReduced)
}

/// [`build`] for a power-management model.
pub fn build_for(shape: &AcpiShape, model: PmModel) -> Result<AcpiFwCfg, AcpiError> {
    let region = table_region_for(shape, 0, model)?;
    let mut tables = region.bytes;
    for &(off, _) in &region.tables {
        tables[off + 9] = 0;
    }
    let mut rsdp = rsdp(region.xsdt as u64).to_vec();
    rsdp[8] = 0;
    rsdp[32] = 0;

    let mut cmds: Vec<[u8; COMMAND_LEN]> =
        vec![allocate(RSDP_FILE, 16, ZONE_FSEG), allocate(TABLES_FILE, 64, ZONE_HIGH)];
    let fadt = region.fadt as u32;
    cmds.push(add_pointer(TABLES_FILE, TABLES_FILE, fadt + FADT_DSDT, 4));
    cmds.push(add_pointer(TABLES_FILE, TABLES_FILE, fadt + FADT_X_DSDT, 8));
    if region.facs.is_some() {
        cmds.push(add_pointer(TABLES_FILE, TABLES_FILE, fadt + FADT_FIRMWARE_CTRL, 4));
    }
    let xsdt_entries = region.tables.len().saturating_sub(2); // all but DSDT and the XSDT itself
    for i in 0..xsdt_entries {
        let at = (region.xsdt + HEADER_LEN + 8 * i) as u32;
        cmds.push(add_pointer(TABLES_FILE, TABLES_FILE, at, 8));
    }
    cmds.push(add_pointer(RSDP_FILE, TABLES_FILE, RSDP_XSDT, 8));
    for &(off, len) in &region.tables {
        cmds.push(add_checksum(TABLES_FILE, off as u32 + 9, off as u32, len as u32));
    }
    cmds.push(add_checksum(RSDP_FILE, 8, 0, 20));
    cmds.push(add_checksum(RSDP_FILE, 32, 0, RSDP_LEN as u32));
    Ok(AcpiFwCfg {
        table_loader: cmds.concat(),
        rsdp,
        tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PciLayout;
    use crate::tables::{ACPI_BASE, AcpiTables};

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    /// Executes the loader like a firmware would (placing rsdp at `ACPI_BASE` and the tables right after it,
    /// 16-aligned) and requires the result to equal the flat blob host-vmm writes: an independent check that
    /// pointers, offsets and checksums in the loader are right.
    fn link(f: &AcpiFwCfg) -> AcpiTables {
        link_for(f, PmModel::HardwareReduced)
    }

    fn link_for(f: &AcpiFwCfg, model: PmModel) -> AcpiTables {
        let rsdp_at = ACPI_BASE;
        // The flat layout pads the tables to a 64-byte FACS boundary after the RSDP; a firmware honouring the
        // ALLOCATE alignment (64) places the tables file on such a boundary too.
        let flat_tables = crate::tables::table_region_for(
            &AcpiShape { vcpus: 1, pci: None },
            ACPI_BASE + RSDP_LEN.next_multiple_of(16) as u64,
            model,
        )
        .unwrap();
        let pad = flat_tables.facs.unwrap_or(0);
        let tables_at = ACPI_BASE + (RSDP_LEN.next_multiple_of(16) + pad) as u64;
        let mut rsdp = f.rsdp.clone();
        let mut tables = f.tables.clone();
        let mut allocated = Vec::new();
        for c in f.table_loader.chunks(COMMAND_LEN) {
            let file = |o: usize| {
                let n = &c[o..o + FNAME_LEN];
                String::from_utf8(n[..n.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
            };
            match u32_at(c, 0) {
                CMD_ALLOCATE => allocated.push(file(4)),
                CMD_ADD_POINTER => {
                    let (dest, src) = (file(4), file(60));
                    let (off, size) = (u32_at(c, 116) as usize, c[120] as usize);
                    let src_base = if src == RSDP_FILE { rsdp_at } else { tables_at };
                    let buf = if dest == RSDP_FILE { &mut rsdp } else { &mut tables };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&buf[off..off + size]);
                    let patched = (u64::from_le_bytes(v) + src_base).to_le_bytes();
                    buf[off..off + size].copy_from_slice(&patched[..size]);
                }
                CMD_ADD_CHECKSUM => {
                    let buf = if file(4) == RSDP_FILE { &mut rsdp } else { &mut tables };
                    let (res, start, len) = (u32_at(c, 60) as usize, u32_at(c, 64) as usize, u32_at(c, 68) as usize);
                    assert_eq!(buf[res], 0, "checksum byte must start at zero");
                    buf[res] = buf[start..start + len].iter().fold(0u8, |a, b| a.wrapping_sub(*b));
                }
                other => panic!("unknown command {other}"),
            }
        }
        assert_eq!(allocated, [RSDP_FILE, TABLES_FILE]);
        let mut bytes = rsdp;
        bytes.resize(RSDP_LEN.next_multiple_of(16) + pad, 0);
        bytes.extend_from_slice(&tables);
        AcpiTables { base: ACPI_BASE, bytes }
    }

    #[test]
    fn linked_fw_cfg_files_equal_the_flat_tables() {
        for shape in [
            AcpiShape { vcpus: 1, pci: None },
            AcpiShape {
                vcpus: 2,
                pci: Some(PciLayout::for_ram(2 << 30)),
            },
            AcpiShape {
                vcpus: 8,
                pci: Some(PciLayout::for_ram(16 << 30)),
            },
        ] {
            let f = build(&shape).unwrap();
            assert_eq!(f.table_loader.len() % COMMAND_LEN, 0);
            assert_eq!(link(&f), crate::tables::build(&shape).unwrap(), "{shape:?}");
        }
    }

    /// The fixed-hardware form links to the flat fixed-hardware tables the `kvm` backend writes (FACS first,
    /// FADT.FIRMWARE_CTRL pointing at it), and differs from the hardware-reduced form only by that.
    #[test]
    fn fixed_hardware_fw_cfg_links_to_the_flat_tables() {
        for shape in [
            AcpiShape { vcpus: 1, pci: None },
            AcpiShape {
                vcpus: 4,
                pci: Some(PciLayout::for_ram(6 << 30)),
            },
        ] {
            let f = build_for(&shape, PmModel::FixedHardware).unwrap();
            assert_eq!(&f.tables[..4], b"FACS");
            let linked = link_for(&f, PmModel::FixedHardware);
            assert_eq!(
                linked,
                crate::tables::build_for(&shape, PmModel::FixedHardware).unwrap()
            );
            let reduced = build(&shape).unwrap();
            assert_eq!(
                f.table_loader.len(),
                reduced.table_loader.len() + COMMAND_LEN,
                "one more ADD_POINTER"
            );
        }
    }

    #[test]
    fn rejects_bad_vcpus() {
        assert!(build(&AcpiShape { vcpus: 0, pci: None }).is_err());
    }
}
