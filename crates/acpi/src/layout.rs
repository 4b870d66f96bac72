//! Guest-physical layout shared by the VMM and the predictor: RAM ranges around the 32-bit MMIO hole, the
//! interrupt controllers and the PCI windows.

/// Start of the 32-bit MMIO hole (PCI MMIO, IOAPIC, LAPIC); RAM beyond this continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// IOAPIC and LAPIC MMIO bases (architectural defaults).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// ECAM covers bus 0 only.
pub const ECAM_SIZE: u64 = 1 << 20;
/// Configuration mechanism #1 ports.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
const MEM32_LEN: u64 = 0x2000_0000;
const MEM64_LEN: u64 = 16 << 30;
const GIB: u64 = 1 << 30;

/// The guest-physical RAM ranges `(start, len)` for `size` bytes: `[0, min(size, hole))` and, if needed, the
/// rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]
    }
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

impl PciLayout {
    /// The layout for a guest with `ram_bytes` of RAM: mem32 = [3 GiB, 3.5 GiB), ECAM at 3.5 GiB, mem64 from
    /// the first GiB boundary at or above both 4 GiB and the end of RAM, 16 GiB long.
    pub fn for_ram(ram_bytes: u64) -> Self {
        let ram_end = ram_ranges(ram_bytes).last().map(|(a, len)| a + len).unwrap_or(0);
        let mem64_base = ram_end.max(MMIO_HOLE_END).next_multiple_of(GIB);
        Self {
            mem32: (MMIO_HOLE_START, MEM32_LEN),
            mem64: (mem64_base, MEM64_LEN),
            ecam: MMIO_HOLE_START + MEM32_LEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_avoids_ram_and_lapic() {
        let small = PciLayout::for_ram(512 << 20);
        assert_eq!(small.mem32, (0xc000_0000, 0x2000_0000));
        assert_eq!(small.ecam, 0xe000_0000);
        assert!(small.ecam + ECAM_SIZE <= u64::from(IOAPIC_ADDR));
        assert_eq!(small.mem64.0, 4 << 30);
        // 3 GiB below the hole + 3 GiB from 4 GiB = RAM ends at 7 GiB.
        assert_eq!(PciLayout::for_ram(6 << 30).mem64.0, 7 << 30);
        assert_eq!(PciLayout::for_ram((6 << 30) + (1 << 20)).mem64.0, 8 << 30);
        assert_eq!(ram_ranges(2 << 30), vec![(0, 2 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
