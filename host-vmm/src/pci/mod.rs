//! PCI: one root bus behind a host bridge, configuration access through ports 0xCF8/0xCFC and PCIe ECAM,
//! BARs allocated from the 32-bit MMIO hole (and a 64-bit window above RAM), and MSI-X routed through KVM
//! GSI routing + irqfds. The address layout is a pure function of the RAM size ([`PciLayout::for_ram`]),
//! so the ACPI tables describing it can be predicted.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarInfo, BarKind, PciConfig, PciId};
pub use root::{PciBusDevice, PciRoot};

use crate::memory::MMIO_HOLE_START;

/// A PCI function as the root bus sees it.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    /// A guest write to configuration space (`offset` < 4096).
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// A guest read of configuration space; the default reads the register file.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// Sets BAR `bar`'s address (at setup, like firmware would).
    fn set_bar_addr(&mut self, bar: usize, addr: u64);
    /// MMIO to `offset` within BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` stopped or started decoding, or moved: `(address, size)` before and after.
    fn bar_decode_changed(&mut self, _bar: usize, _old: Option<(u64, u64)>, _new: Option<(u64, u64)>) {}
}

/// Guest-physical PCI resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciLayout {
    /// 32-bit non-prefetchable BAR window `[base, base + len)` inside the MMIO hole.
    pub mem32: (u64, u64),
    /// 64-bit BAR window above RAM.
    pub mem64: (u64, u64),
    /// ECAM base for bus 0 (1 MiB: 32 devices × 8 functions × 4 KiB).
    pub ecam: u64,
}

/// ECAM covers bus 0 only.
pub const ECAM_SIZE: u64 = 1 << 20;
/// Configuration mechanism #1 ports.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
const MEM32_LEN: u64 = 0x2000_0000;
const MEM64_LEN: u64 = 16 << 30;
const GIB: u64 = 1 << 30;

impl PciLayout {
    /// The layout for a guest with `ram_bytes` of RAM: mem32 = [3 GiB, 3.5 GiB), ECAM at 3.5 GiB, mem64 from
    /// the first GiB boundary at or above both 4 GiB and the end of RAM, 16 GiB long.
    pub fn for_ram(ram_bytes: u64) -> Self {
        let ram_end = crate::memory::ram_ranges(ram_bytes)
            .last()
            .map(|(a, len)| a.0 + len)
            .unwrap_or(0);
        let mem64_base = ram_end.max(crate::memory::MMIO_HOLE_END).next_multiple_of(GIB);
        Self {
            mem32: (MMIO_HOLE_START, MEM32_LEN),
            mem64: (mem64_base, MEM64_LEN),
            ecam: MMIO_HOLE_START + MEM32_LEN,
        }
    }
}

/// Bus/device/function of a configuration access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_avoids_ram_and_lapic() {
        let small = PciLayout::for_ram(512 << 20);
        assert_eq!(small.mem32, (0xc000_0000, 0x2000_0000));
        assert_eq!(small.ecam, 0xe000_0000);
        assert!(small.ecam + ECAM_SIZE <= u64::from(crate::arch::x86_64::layout::IOAPIC_ADDR));
        assert_eq!(small.mem64.0, 4 << 30);
        let big = PciLayout::for_ram(6 << 30);
        // 3 GiB below the hole + 3 GiB from 4 GiB = RAM ends at 7 GiB.
        assert_eq!(big.mem64.0, 7 << 30);
        let odd = PciLayout::for_ram((6 << 30) + (1 << 20));
        assert_eq!(odd.mem64.0, 8 << 30);
    }
}
