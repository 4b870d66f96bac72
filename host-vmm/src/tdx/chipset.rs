//! The Q35 chipset registers OVMF touches in a TD (why Q35 and which edk2 functions touch what:
//! `dstack_measurements::predict::platform`):
//!
//! - **MCH** (00.0, `8086:29c0`, the [`PciRoot`]'s host bridge): the device-specific registers 0x40..0x100 are
//!   plain storage, so OVMF's PCIEXBAR write (0x60/0x64) reads back. Our ECAM is fixed at
//!   `PcdPciExpressBaseAddress` (0xE0000000), which is what OVMF programs; other values are stored, not acted on.
//! - **ICH9 LPC** (1f.0, `8086:2918`): PMBASE (0x40) reads `0x601` (our PM1 block at 0x600, bit 0 = I/O space)
//!   and ACPI_CNTL (0x44) reads ACPI_EN with SCI on IRQ 9, both read-only: OVMF finds ACPI already enabled and
//!   its PM timer at `(PMBASE & ~1) + 8` = 0x608. PIRQ routing (0x60..0x6c), RCBA (0xF0) and the command
//!   register are stored for the firmware's and OS's writes; nothing decodes them (no INTx, no RCRB).
//!
//! [`ChipsetView`] serves both configuration mechanisms (CF8/CFC and ECAM): 00.0 above 0x40 and 1f.0 here,
//! everything else forwarded to the [`PciRoot`].

use std::sync::{Arc, Mutex};

use dstack_measurements::predict::platform::{
    ICH9_ACPI_CNTL, ICH9_ACPI_CNTL_ACPI_EN, ICH9_LPC_DEVICE, ICH9_LPC_DEVICE_ID, ICH9_PMBASE, ICH9_RCBA,
    Q35_MCH_DEVICE_ID,
};

use crate::devices::acpi_pm::PM1_EVT_PORT;
use crate::devices::{BusDevice, DeviceAction};
use crate::pci::root::PciAccess;
use crate::pci::{Bdf, ECAM_SIZE, PciId, PciRoot};

/// The MCH as the root's host bridge (QEMU's IDs: Intel vendor, Red Hat/QEMU subsystem).
pub const Q35_MCH_ID: PciId = PciId {
    vendor: 0x8086,
    device: Q35_MCH_DEVICE_ID,
    revision: 0,
    class: 0x06_00_00,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
};

/// First MCH register past the standard type-0 header.
const DEVICE_SPECIFIC: usize = 0x40;
const CONFIG_SPACE: usize = 256;
const COMMAND: usize = 0x04;
const PIRQ_A_D: usize = 0x60;
const PIRQ_E_H: usize = 0x68;

/// `(offset, len)` of the LPC registers a guest may write.
const LPC_WRITABLE: [(usize, usize); 4] = [(COMMAND, 2), (PIRQ_A_D, 4), (PIRQ_E_H, 4), (ICH9_RCBA, 4)];

/// The chipset state beside the root bus.
pub struct Q35Chipset {
    root: Arc<Mutex<PciRoot>>,
    mch: [u8; CONFIG_SPACE],
    lpc: [u8; CONFIG_SPACE],
    /// CONFIG_ADDRESS as last written through port 0xCF8.
    config_address: u32,
}

fn put(regs: &mut [u8; CONFIG_SPACE], off: usize, bytes: &[u8]) {
    regs[off..off + bytes.len()].copy_from_slice(bytes);
}

impl Q35Chipset {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        let mut lpc = [0u8; CONFIG_SPACE];
        put(&mut lpc, 0, &0x8086u16.to_le_bytes());
        put(&mut lpc, 2, &ICH9_LPC_DEVICE_ID.to_le_bytes());
        put(&mut lpc, 0x08, &[2, 0x00, 0x01, 0x06]); // revision 2, class 06_01_00 (ISA bridge)
        put(&mut lpc, 0x2c, &[0xf4, 0x1a, 0x00, 0x11]); // subsystem 1af4:1100
        put(&mut lpc, ICH9_PMBASE, &(u32::from(PM1_EVT_PORT) | 1).to_le_bytes());
        put(&mut lpc, ICH9_ACPI_CNTL, &[ICH9_ACPI_CNTL_ACPI_EN]); // SCI_IRQ_SEL 000b = IRQ 9
        Self {
            root,
            mch: [0; CONFIG_SPACE],
            lpc,
            config_address: 0,
        }
    }

    fn root(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Configuration read of `bdf` at `reg`.
    pub fn config_read(&self, bdf: Bdf, reg: usize, data: &mut [u8]) {
        let own = |regs: &[u8; CONFIG_SPACE], data: &mut [u8]| {
            for (i, b) in data.iter_mut().enumerate() {
                *b = regs.get(reg + i).copied().unwrap_or(0);
            }
        };
        match (bdf.bus, bdf.device, bdf.function) {
            (0, 0, 0) if reg >= DEVICE_SPECIFIC => own(&self.mch, data),
            (0, ICH9_LPC_DEVICE, 0) => own(&self.lpc, data),
            _ => self.root().config_read(bdf, reg, data),
        }
    }

    pub fn config_write(&mut self, bdf: Bdf, reg: usize, data: &[u8]) {
        match (bdf.bus, bdf.device, bdf.function) {
            (0, 0, 0) if reg >= DEVICE_SPECIFIC => {
                for (i, &b) in data.iter().enumerate() {
                    if let Some(r) = self.mch.get_mut(reg + i) {
                        *r = b;
                    }
                }
            }
            (0, ICH9_LPC_DEVICE, 0) => {
                for (i, &b) in data.iter().enumerate() {
                    let at = reg + i;
                    if LPC_WRITABLE.iter().any(|&(o, n)| (o..o + n).contains(&at)) {
                        self.lpc[at] = b;
                    }
                }
            }
            _ => self.root().config_write(bdf, reg, data),
        }
    }

    fn cf8_target(&self) -> Option<(Bdf, usize)> {
        let a = self.config_address;
        (a & 0x8000_0000 != 0).then(|| {
            let bdf = Bdf {
                bus: (a >> 16) as u8,
                device: ((a >> 11) & 0x1f) as u8,
                function: ((a >> 8) & 7) as u8,
            };
            (bdf, (a & 0xfc) as usize)
        })
    }
}

fn ecam_target(offset: u64) -> Option<(Bdf, usize)> {
    (offset < ECAM_SIZE).then(|| {
        let bdf = Bdf {
            bus: 0,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 7) as u8,
        };
        (bdf, (offset & 0xfff) as usize)
    })
}

/// The chipset on a bus: [`PciAccess::ConfigIo`] (ports 0xCF8..0xCFF) or [`PciAccess::Ecam`].
pub struct ChipsetView {
    pub chipset: Arc<Mutex<Q35Chipset>>,
    pub access: PciAccess,
}

impl ChipsetView {
    fn chipset(&self) -> std::sync::MutexGuard<'_, Q35Chipset> {
        self.chipset.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target(&self, c: &Q35Chipset, offset: u64) -> Option<(Bdf, usize)> {
        match self.access {
            PciAccess::ConfigIo => (4..8)
                .contains(&offset)
                .then(|| c.cf8_target().map(|(bdf, reg)| (bdf, reg + offset as usize - 4)))
                .flatten(),
            PciAccess::Ecam => ecam_target(offset),
            PciAccess::Window(_) => None,
        }
    }
}

impl BusDevice for ChipsetView {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let c = self.chipset();
        if self.access == PciAccess::ConfigIo && offset == 0 && data.len() == 4 {
            data.copy_from_slice(&c.config_address.to_le_bytes());
            return;
        }
        match self.target(&c, offset) {
            Some((bdf, reg)) => c.config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        let mut c = self.chipset();
        if self.access == PciAccess::ConfigIo && offset == 0 {
            // Only dword writes latch CONFIG_ADDRESS (a byte write to 0xCF9 is the chipset reset register on
            // real hardware; ignored).
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                c.config_address = u32::from_le_bytes(v);
            }
            return DeviceAction::None;
        }
        if let Some((bdf, reg)) = self.target(&c, offset) {
            c.config_write(bdf, reg, data);
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use dstack_measurements::predict::platform::{MCH_PCIEXBAR_HIGH, MCH_PCIEXBAR_LOW, PCI_EXPRESS_BASE};

    use super::*;
    use crate::devices::acpi_pm::PM_TMR_PORT;
    use crate::pci::PciLayout;

    fn views() -> (ChipsetView, ChipsetView) {
        let root = PciRoot::with_host_bridge(PciLayout::for_ram(2 << 30), Q35_MCH_ID);
        let chipset = Arc::new(Mutex::new(Q35Chipset::new(Arc::new(Mutex::new(root)))));
        let view = |access| ChipsetView {
            chipset: chipset.clone(),
            access,
        };
        (view(PciAccess::ConfigIo), view(PciAccess::Ecam))
    }

    /// OVMF's `PciRead32`/`PciWrite32` through mechanism #1 (`BasePciLibCf8`): CONFIG_ADDRESS then CFC.
    fn cf8_read32(io: &mut ChipsetView, dev: u8, reg: u32) -> u32 {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | reg;
        io.write(0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    fn cf8_write32(io: &mut ChipsetView, dev: u8, reg: u32, v: u32) {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | reg;
        io.write(0, &addr.to_le_bytes());
        io.write(4, &v.to_le_bytes());
    }

    fn ecam_read32(ecam: &mut ChipsetView, dev: u8, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        ecam.read((u64::from(dev) << 15) | reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// The IDs OVMF (`PlatformPei` `InitializePlatform`: `PciRead16 (OVMF_HOSTBRIDGE_DID)`) and Linux see.
    #[test]
    fn presents_q35_mch_and_ich9_lpc() {
        let (mut io, mut ecam) = views();
        assert_eq!(cf8_read32(&mut io, 0, 0), 0x29c0_8086);
        assert_eq!(cf8_read32(&mut io, 0x1f, 0), 0x2918_8086);
        assert_eq!(cf8_read32(&mut io, 0x1f, 8) >> 8, 0x06_01_00, "ISA bridge class");
        assert_eq!(ecam_read32(&mut ecam, 0, 0), 0x29c0_8086);
        assert_eq!(ecam_read32(&mut ecam, 0x1f, 0), 0x2918_8086);
        assert_eq!(cf8_read32(&mut io, 0x1e, 0), 0xffff_ffff, "absent slots read all ones");
    }

    /// `PlatformMiscInitialization` + `AcpiTimerLib` on Q35: ACPI_EN already set, so OVMF leaves PMBASE alone;
    /// the timer it then reads is ours; PMBASE cannot be moved.
    #[test]
    fn ovmf_finds_the_pm_timer_at_our_port() {
        let (mut io, _) = views();
        let acpi_cntl = cf8_read32(&mut io, 0x1f, ICH9_ACPI_CNTL as u32) as u8;
        assert_ne!(acpi_cntl & 0x80, 0, "ACPI_EN");
        assert_eq!(acpi_cntl & 7, 0, "SCI on IRQ 9");
        let pmba = cf8_read32(&mut io, 0x1f, ICH9_PMBASE as u32);
        assert_eq!((pmba & !1) + 8, u32::from(PM_TMR_PORT));
        cf8_write32(&mut io, 0x1f, ICH9_PMBASE as u32, 0xb001);
        assert_eq!(cf8_read32(&mut io, 0x1f, ICH9_PMBASE as u32), pmba, "read-only");
        // The OS's PM1_CNT is at PMBASE + 4 (BdsPlatform sets SCI_EN there).
        assert_eq!((pmba & !1) + 4, 0x604);
    }

    /// `PciExBarInitialization` and `PciAcpiInitialization` writes are kept (and seen through ECAM too).
    #[test]
    fn firmware_writes_read_back() {
        let (mut io, mut ecam) = views();
        cf8_write32(&mut io, 0, MCH_PCIEXBAR_LOW as u32, 0);
        cf8_write32(&mut io, 0, MCH_PCIEXBAR_HIGH as u32, 0);
        cf8_write32(&mut io, 0, MCH_PCIEXBAR_LOW as u32, PCI_EXPRESS_BASE as u32 | 1);
        assert_eq!(ecam_read32(&mut ecam, 0, MCH_PCIEXBAR_LOW as u64), 0xe000_0001);
        cf8_write32(&mut io, 0x1f, 0x60, 0x0b0b_0a0a);
        cf8_write32(&mut io, 0x1f, ICH9_RCBA as u32, 0xfed1_c001);
        assert_eq!(ecam_read32(&mut ecam, 0x1f, 0x60), 0x0b0b_0a0a);
        assert_eq!(ecam_read32(&mut ecam, 0x1f, ICH9_RCBA as u64), 0xfed1_c001);
        // The IDs are not writable.
        cf8_write32(&mut io, 0x1f, 0, 0);
        assert_eq!(cf8_read32(&mut io, 0x1f, 0), 0x2918_8086);
        // Standard header of the MCH still comes from the root (read-only ID).
        cf8_write32(&mut io, 0, 0, 0);
        assert_eq!(cf8_read32(&mut io, 0, 0), 0x29c0_8086);
    }
}
