//! ACPI tables as a pure function of the VM shape (no KVM, no guest memory), so the measurement predictor can
//! produce the exact same bytes. Hardware-reduced ACPI (like Cloud Hypervisor): RSDP → XSDT → FADT (+ DSDT)
//! and MADT; power-off and reset go through the sleep-control and reset registers of our `acpi_pm` device.
//!
//! With PCI, the DSDT describes the root bridge (`\_SB.PCI0`, PNP0A08) with its bus, I/O and MMIO windows,
//! the ECAM region is reserved by a motherboard-resources device (PNP0C02) and announced in an MCFG table.
//! Legacy INTx is not offered (devices use MSI-X), so there is no `_PRT`.
//!
//! Not yet covered: CCEL (boot event log), and verification against a real Linux boot (not possible on PVM
//! hosts; see DESIGN.md §10).

use crate::aml;
use crate::layout::{CONFIG_ADDRESS_PORT, ECAM_SIZE, IOAPIC_ADDR, LAPIC_ADDR, PciLayout};

/// Where the RSDP and the tables after it are placed (inside the BIOS area Linux scans for "RSD PTR ").
pub const ACPI_BASE: u64 = 0xe0000;
/// I/O port of the sleep control register (write `SLP_TYP << 2 | SLP_EN`) and, at +1, the reset register.
pub const ACPI_PM_PORT: u16 = 0x3c0;
/// `SLP_TYP` of S5 (soft off) announced in the DSDT's `\_S5` package.
pub const SLP_TYP_S5: u8 = 5;
/// Value the guest writes to the reset register.
pub const RESET_VALUE: u8 = 1;

/// Fixed-hardware model ([`PmModel::FixedHardware`]): PM1a event block (PM1_STS, PM1_EN; 2 bytes each).
pub const PM1_EVT_PORT: u16 = 0x600;
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block (SCI_EN, SLP_TYP, SLP_EN).
pub const PM1_CNT_PORT: u16 = 0x604;
pub const PM1_CNT_LEN: u8 = 2;
/// ACPI PM timer (32-bit, 3.579545 MHz).
pub const PM_TMR_PORT: u16 = 0x608;
pub const PM_TMR_LEN: u8 = 4;
/// The SCI's ISA IRQ (the MADT overrides it to GSI 9, active high, edge-triggered).
pub const SCI_IRQ: u8 = 9;

/// How power management is described.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PmModel {
    /// Hardware-reduced ACPI (sleep control/status and reset registers only). The measured default: the fw_cfg
    /// form and the measurement predictor use it.
    #[default]
    HardwareReduced,
    /// Full fixed hardware: FACS, PM1a event/control blocks, PM timer and an SCI, so the host can press the
    /// fixed-feature power button (PM1 `PWRBTN_STS` + SCI). The `kvm` backend's flat tables.
    FixedHardware,
}

const OEM_ID: &[u8; 6] = b"DSTACK";
const OEM_TABLE_ID: &[u8; 8] = b"HOSTVMM ";
const CREATOR_ID: &[u8; 4] = b"DSRS";
/// Length of a system description table header.
pub const HEADER_LEN: usize = 36;
/// Length of the ACPI 2.0 RSDP.
pub const RSDP_LEN: usize = 36;

/// The guest-visible shape the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiShape {
    pub vcpus: u32,
    /// The PCI root bridge's resources, if the VM has PCI devices.
    pub pci: Option<PciLayout>,
}

/// The table blob and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of `bytes[0]` (the RSDP).
    pub base: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI MADT supports 1..=255 vCPUs with xAPIC entries, got {0}")]
    BadVcpus(u32),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// A system description table: header with length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// Generic Address Structure for a byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// DSDT: `Name (\_S5, Package () { 5, 0 })` so the OS knows the S5 sleep type, and the PCI root bridge.
fn dsdt(pci: Option<&PciLayout>) -> Vec<u8> {
    let mut body = aml::name(
        "_S5",
        &aml::package(&[aml::integer(SLP_TYP_S5.into()), aml::integer(0)]),
    );
    if let Some(p) = pci {
        body.extend_from_slice(&aml::scope("\\_SB", &[pci_root_bridge(p), motherboard_resources(p)]));
    }
    sdt(b"DSDT", 2, &body)
}

/// `Device (PCI0)`: PCIe root bridge on segment 0, bus 0, with the config ports, the rest of the I/O space
/// and both MMIO windows as its resources.
fn pci_root_bridge(p: &PciLayout) -> Vec<u8> {
    let crs = aml::resource_template(&[
        aml::word_bus_number(0, 0),
        aml::io_port(CONFIG_ADDRESS_PORT, 8),
        aml::word_io(0, CONFIG_ADDRESS_PORT - 1),
        aml::word_io(CONFIG_ADDRESS_PORT + 8, 0xffff),
        aml::dword_memory(p.mem32.0 as u32, p.mem32.1 as u32),
        aml::qword_memory(p.mem64.0, p.mem64.1),
    ]);
    aml::device(
        "PCI0",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0A08")),
            aml::name("_CID", &aml::eisa_id("PNP0A03")),
            aml::name("_ADR", &aml::integer(0)),
            aml::name("_SEG", &aml::integer(0)),
            aml::name("_UID", &aml::integer(0)),
            aml::name("_BBN", &aml::integer(0)),
            aml::name("_CRS", &crs),
        ],
    )
}

/// `Device (MRES)`: reserves the ECAM window (Linux only trusts MCFG regions reserved this way or in e820).
fn motherboard_resources(p: &PciLayout) -> Vec<u8> {
    aml::device(
        "MRES",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0C02")),
            aml::name("_UID", &aml::integer(1)),
            aml::name(
                "_CRS",
                &aml::resource_template(&[aml::memory32_fixed(p.ecam as u32, ECAM_SIZE as u32)]),
            ),
        ],
    )
}

/// MCFG: one ECAM allocation for segment 0, buses 0..=0.
fn mcfg(p: &PciLayout) -> Vec<u8> {
    let mut body = vec![0u8; 8];
    body.extend_from_slice(&p.ecam.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes()); // segment group
    body.extend_from_slice(&[0, 0]); // start and end bus
    body.extend_from_slice(&[0; 4]);
    sdt(b"MCFG", 1, &body)
}

/// FADT revision 6.x pointing at the DSDT: hardware-reduced, or (with a FACS address) fixed hardware with the
/// PM1a blocks, PM timer and SCI. Legacy 32-bit block fields only: the X_ forms are left zero, which tells
/// the OS to use the 32-bit ones (ACPI 6.5 §5.2.9).
fn fadt(dsdt_addr: u64, facs_addr: Option<u64>) -> Vec<u8> {
    let mut body = vec![0u8; 276 - HEADER_LEN];
    let mut put =
        |off: usize, bytes: &[u8]| body[off - HEADER_LEN..off - HEADER_LEN + bytes.len()].copy_from_slice(bytes);
    put(40, &(dsdt_addr as u32).to_le_bytes()); // DSDT (32-bit)
    match facs_addr {
        None => {
            // Flags: WBINVD (0) | RESET_REG_SUP (10) | HW_REDUCED_ACPI (20).
            put(112, &((1u32 << 0) | (1 << 10) | (1 << 20)).to_le_bytes());
            put(244, &gas_io_byte(ACPI_PM_PORT)); // SLEEP_CONTROL_REG
            put(256, &gas_io_byte(ACPI_PM_PORT)); // SLEEP_STATUS_REG
        }
        Some(facs) => {
            put(36, &(facs as u32).to_le_bytes()); // FIRMWARE_CTRL
            put(46, &u16::from(SCI_IRQ).to_le_bytes()); // SCI_INT; SMI_CMD (48) = 0: always in ACPI mode
            put(56, &u32::from(PM1_EVT_PORT).to_le_bytes()); // PM1a_EVT_BLK
            put(64, &u32::from(PM1_CNT_PORT).to_le_bytes()); // PM1a_CNT_BLK
            put(76, &u32::from(PM_TMR_PORT).to_le_bytes()); // PM_TMR_BLK
            put(88, &[PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN]); // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
            // Flags: WBINVD (0) | SLP_BUTTON (5: no sleep button; PWR_BUTTON (4) clear = fixed power button)
            // | TMR_VAL_EXT (8: 32-bit timer) | RESET_REG_SUP (10).
            put(112, &((1u32 << 0) | (1 << 5) | (1 << 8) | (1 << 10)).to_le_bytes());
        }
    }
    put(116, &gas_io_byte(ACPI_PM_PORT + 1)); // RESET_REG
    put(128, &[RESET_VALUE]);
    put(131, &[5]); // FADT minor version: ACPI 6.5
    put(140, &dsdt_addr.to_le_bytes()); // X_DSDT
    put(268, b"DSTACKRS"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

/// Length of the FACS (ACPI 6.5 §5.2.10), which must be 64-byte aligned.
pub const FACS_LEN: usize = 64;

/// FACS version 2 with no waking vector and no global lock (no checksum: the FACS has none).
fn facs() -> [u8; FACS_LEN] {
    let mut f = [0u8; FACS_LEN];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f[32] = 2; // version
    f
}

/// MADT: one enabled local APIC per vCPU (UID = APIC ID = index), the IOAPIC at GSI 0, LINT1 = NMI, and
/// with an SCI its interrupt source override (ISA IRQ 9 → GSI 9, active high, edge: the VMM pulses it).
fn madt(vcpus: u32, sci: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259 present
    for id in 0..vcpus {
        body.extend_from_slice(&[0, 8, id as u8, id as u8]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    body.extend_from_slice(&[1, 12, vcpus as u8, 0]); // IOAPIC id follows the CPUs (as in the MP table)
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    if sci {
        // Interrupt source override: bus 0 (ISA), source IRQ, GSI, flags = polarity 01 (high) | trigger 01 (edge).
        body.extend_from_slice(&[2, 10, 0, SCI_IRQ]);
        body.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
        body.extend_from_slice(&0b0101u16.to_le_bytes());
    }
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]); // local APIC NMI: all processors, flags 0, LINT1
    sdt(b"APIC", 5, &body)
}

fn align16(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(16), 0);
}

/// Offsets of the tables inside a [`TableRegion`] (every table starts 16-byte aligned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRegion {
    /// DSDT, FADT, MADT, (MCFG,) XSDT back to back.
    pub bytes: Vec<u8>,
    /// `(offset, length)` of every table in `bytes`, in layout order (XSDT last).
    pub tables: Vec<(usize, usize)>,
    pub dsdt: usize,
    pub fadt: usize,
    pub xsdt: usize,
    /// Offset of the FACS ([`PmModel::FixedHardware`]; not in `tables`: it has no header or checksum).
    pub facs: Option<usize>,
}

/// Lays out the tables as if `bytes[0]` were at guest address `base` (pointers are `base + offset`). With
/// `base == 0` pointers are plain offsets, which is what a fw_cfg table-loader's ADD_POINTER expects.
pub fn table_region(shape: &AcpiShape, base: u64) -> Result<TableRegion, AcpiError> {
    table_region_for(shape, base, PmModel::HardwareReduced)
}

/// [`table_region`] for a power-management model; with [`PmModel::FixedHardware`] the region starts with
/// padding to a 64-byte boundary (of `base + offset`) and the FACS.
pub fn table_region_for(shape: &AcpiShape, base: u64, model: PmModel) -> Result<TableRegion, AcpiError> {
    if shape.vcpus == 0 || shape.vcpus > 255 {
        return Err(AcpiError::BadVcpus(shape.vcpus));
    }
    let mut blob = Vec::new();
    let mut facs_off = None;
    if model == PmModel::FixedHardware {
        blob.resize(((64 - base % 64) % 64) as usize, 0);
        facs_off = Some(blob.len());
        blob.extend_from_slice(&facs());
    }
    let mut tables = Vec::new();
    let mut push = |blob: &mut Vec<u8>, t: Vec<u8>| {
        let off = blob.len();
        tables.push((off, t.len()));
        blob.extend_from_slice(&t);
        align16(blob);
        off
    };
    let dsdt = push(&mut blob, dsdt(shape.pci.as_ref()));
    let dsdt_addr = base + dsdt as u64;
    let fadt_off = push(&mut blob, fadt(dsdt_addr, facs_off.map(|f| base + f as u64)));
    let madt_off = push(&mut blob, madt(shape.vcpus, facs_off.is_some()));
    let mut entries = vec![base + fadt_off as u64, base + madt_off as u64];
    if let Some(p) = &shape.pci {
        entries.push(base + push(&mut blob, mcfg(p)) as u64);
    }
    let xsdt_body: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    let xsdt = blob.len();
    tables.push((xsdt, HEADER_LEN + xsdt_body.len()));
    blob.extend_from_slice(&sdt(b"XSDT", 1, &xsdt_body));
    Ok(TableRegion {
        bytes: blob,
        tables,
        dsdt,
        fadt: fadt_off,
        xsdt,
        facs: facs_off,
    })
}

/// The 36-byte ACPI 2.0 RSDP pointing at the XSDT.
pub fn rsdp(xsdt_addr: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+; RSDT address (16..20) stays 0: XSDT only
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Builds RSDP + XSDT + FADT + DSDT + MADT (+ MCFG with PCI) for `shape`, laid out from [`ACPI_BASE`].
pub fn build(shape: &AcpiShape) -> Result<AcpiTables, AcpiError> {
    build_for(shape, PmModel::HardwareReduced)
}

/// [`build`] for a power-management model.
pub fn build_for(shape: &AcpiShape, model: PmModel) -> Result<AcpiTables, AcpiError> {
    let base = ACPI_BASE;
    let mut blob = vec![0u8; RSDP_LEN];
    align16(&mut blob);
    let region = table_region_for(shape, base + blob.len() as u64, model)?;
    let xsdt_addr = base + (blob.len() + region.xsdt) as u64;
    blob.extend_from_slice(&region.bytes);
    blob[..RSDP_LEN].copy_from_slice(&rsdp(xsdt_addr));
    Ok(AcpiTables { base, bytes: blob })
}

#[cfg(test)]
#[path = "tables_tests.rs"]
mod tests;
