//! The platform a TD presents to OVMF, and the PCI windows OVMF derives from it — the one place the TD's
//! ACPI tables (measured in RTMR0) and host-vmm's PCI root take their layout from.
//!
//! **Design decision (edk2-stable202502 source, the base of the image's Debian `ovmf 2025.02-8+deb13u1`
//! `/usr/share/ovmf/OVMF.fd`, built from `OvmfPkg/OvmfPkgX64.dsc`, SMM_REQUIRE = FALSE):** the TD presents
//! QEMU's Q35 chipset — MCH host bridge `8086:29c0` at 00.0 and ICH9 LPC `8086:2918` at 1f.0 — not Cloud
//! Hypervisor's `8086:0d57`:
//! - `OvmfPkg/AcpiPlatformDxe/AcpiPlatform.c` `InstallAcpiTables`: with `0d57` in a TD OVMF takes its ACPI
//!   tables from TD HOB GUID HOBs (`CloudHvAcpi.c` `InstallCloudHvTablesTdx`); with any other bridge it runs
//!   QEMU's fw_cfg table loader (`AcpiPlatformLib/QemuFwCfgAcpi.c` `InstallQemuFwCfgTables`), which measures
//!   `etc/table-loader` and every ALLOCATEd blob as EV_PLATFORM_CONFIG_FLAGS "ACPI DATA" (the RTMR0 events a
//!   real dstack TD under QEMU logs, and the ones [`super::predict`] predicts);
//! - `OvmfPkg/Library/PlatformInitLib/MemDetect.c`: on `0d57`, `PlatformScanE820` reads the PVH memmap before
//!   it looks at the TD HOB, and `GetPvhMemmapEntries` fails in `OvmfPkgX64` (`PcdXenPvhStartOfDayStructPtr` is
//!   0; only `CloudHvX64.fdf` sets it), so `PlatformGetSystemMemorySizeBelow4gb` and
//!   `PlatformGetFirstNonAddress` fall back to CMOS registers our VMM does not have. On Q35 in a TD the same
//!   functions use `PlatformScanE820Tdx` (the TD HOB's resource descriptors);
//! - the Q35 path under TDX is the one QEMU TDs (dstack's) run every day.
//!
//! What OVMF then does on Q35 in a TD (each served by host-vmm `tdx::chipset`, or here):
//! - `PlatformInitLib/Platform.c` `PlatformMiscInitialization`: reads ICH9 ACPI_CNTL (1f.0 reg 0x44) and, if
//!   ACPI_EN is clear, programs PMBASE (0x40) to 0x600; writes RCBA (0xF0) and MCH PCIEXBAR (00.0 regs
//!   0x60/0x64, `PciExBarInitialization`) to `PcdPciExpressBaseAddress` = 0xE0000000 (`OvmfPkgX64.dsc`);
//! - `Library/AcpiTimerLib`: PM timer = (PMBASE & ~1) + 8 → port 0x608, our PM timer;
//! - `PlatformBootManagerLib/BdsPlatform.c` `PciAcpiInitialization`: PIRQ routing (1f.0 regs 0x60..0x6b) and
//!   SCI_EN in PM1_CNT (PMBASE + 4);
//! - `MemDetect.c` `PlatformQemuUc32BaseInitialization`: `Uc32Base = 4 GiB - 2^floor(log2(4 GiB - LowMemory))`
//!   with LowMemory = the end of RAM below 4 GiB from the TD HOB; `Platform.c` `PlatformMemMapInitialization`:
//!   32-bit PCI aperture `[Uc32Base, 0xE0000000)`, 256 MiB of MMCONFIG reserved at 0xE0000000;
//! - `MemDetect.c` `PlatformAddressWidthInitialization` / `PlatformAddressWidthFromCpuid` /
//!   `PlatformDynamicMmioWindow`: the 64-bit aperture depends on the TD's CPUID (physical-address bits), but
//!   with OVMF's 4-level paging it is capped at 46 bits, so it lies in `[first GiB above RAM, 2^46)`;
//! - DXE PCI configuration access goes through ECAM (`DxePciLibI440FxQ35`), as `MmioRead*` which in a TD are
//!   `TDVMCALL<MMIO>` with the shared bit set (`MdePkg/Library/BaseIoLibIntrinsic/IoLibInternalTdx.c`): KVM
//!   exits to us with the address, no memory conversion is involved;
//! - `PlatformMaxCpuCountInitialization`: vCPU counts from TDCALL TDINFO (no QEMU CPU-hotplug registers).

use dstack_acpi::layout::{MMIO_HOLE_END, PciLayout, ram_ranges};

/// PCI IDs of QEMU's Q35 chipset (`OvmfPkg/Include/IndustryStandard/Q35MchIch9.h`: `INTEL_Q35_MCH_DEVICE_ID`).
pub const Q35_MCH_DEVICE_ID: u16 = 0x29c0;
/// ICH9 LPC bridge (QEMU `ich9_lpc`), function 00:1f.0.
pub const ICH9_LPC_DEVICE_ID: u16 = 0x2918;
pub const ICH9_LPC_DEVICE: u8 = 0x1f;
/// ICH9 LPC registers OVMF uses (`Q35MchIch9.h`).
pub const ICH9_PMBASE: usize = 0x40;
pub const ICH9_ACPI_CNTL: usize = 0x44;
pub const ICH9_ACPI_CNTL_ACPI_EN: u8 = 0x80;
pub const ICH9_RCBA: usize = 0xf0;
/// Q35 MCH PCIEXBAR (low and high dwords).
pub const MCH_PCIEXBAR_LOW: usize = 0x60;
pub const MCH_PCIEXBAR_HIGH: usize = 0x64;
/// `PcdPciExpressBaseAddress` of `OvmfPkgX64.dsc` (and the ECAM base of every TD).
pub const PCI_EXPRESS_BASE: u64 = 0xe000_0000;
/// OVMF's 4-level identity map limits physical addresses to 46 bits (`PlatformAddressWidthFromCpuid`).
pub const OVMF_MAX_PHYS_BITS: u32 = 46;

/// OVMF's `Uc32Base` for a TD with `memory_bytes` of RAM (`PlatformQemuUc32BaseInitialization`).
pub fn ovmf_uc32_base(memory_bytes: u64) -> u64 {
    let low_memory = ram_ranges(memory_bytes)
        .iter()
        .filter(|&&(start, _)| start < MMIO_HOLE_END)
        .map(|&(start, len)| start + len)
        .max()
        .unwrap_or(0);
    let span = MMIO_HOLE_END - low_memory;
    // GetPowerOfTwo32: the highest power of two not above `span` (span >= 1 GiB: RAM below 4 GiB is <= 3 GiB).
    let size = 1u64 << (63 - span.leading_zeros());
    MMIO_HOLE_END - size
}

/// The TD's PCI layout: ECAM at OVMF's MMCONFIG base (bus 0), the 32-bit window = OVMF's 32-bit aperture
/// `[Uc32Base, 0xE0000000)`, the 64-bit window from the first GiB boundary above RAM (as `PciLayout::for_ram`)
/// up to 2^46, so every 64-bit aperture OVMF can choose lies inside it.
pub fn td_pci_layout(memory_bytes: u64) -> PciLayout {
    let uc32 = ovmf_uc32_base(memory_bytes);
    let mem64_base = PciLayout::for_ram(memory_bytes).mem64.0;
    PciLayout {
        mem32: (uc32, PCI_EXPRESS_BASE - uc32),
        mem64: (mem64_base, (1u64 << OVMF_MAX_PHYS_BITS) - mem64_base),
        ecam: PCI_EXPRESS_BASE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-evaluated OVMF formula: LowMemory = min(mem, 3 GiB); 4 GiB - LowMemory rounded down to a power of
    /// two (2 GiB for LowMemory <= 2 GiB, 1 GiB for 2 GiB < LowMemory <= 3 GiB).
    #[test]
    fn uc32_base_follows_ovmf() {
        const G: u64 = 1 << 30;
        for (mem, want) in [
            (64 << 20, 0x8000_0000),
            (G, 0x8000_0000),
            (2 * G, 0x8000_0000),
            (2 * G + (1 << 20), 0xc000_0000),
            (3 * G, 0xc000_0000),
            (6 * G, 0xc000_0000),
            (1 << 40, 0xc000_0000),
        ] {
            assert_eq!(ovmf_uc32_base(mem), want, "{mem:#x}");
        }
    }

    #[test]
    fn td_layout_windows_avoid_ram_and_each_other() {
        for mem in [64 << 20, 2 << 30, (2 << 30) + (1 << 20), 4 << 30, 1 << 40] {
            let l = td_pci_layout(mem);
            let ram_end_low = ram_ranges(mem)[0].1;
            assert!(ram_end_low <= l.mem32.0, "{mem:#x}");
            assert_eq!(l.mem32.0 + l.mem32.1, l.ecam);
            assert_eq!(l.ecam, 0xe000_0000);
            let ram_end = ram_ranges(mem).last().map(|(a, n)| a + n).unwrap();
            assert!(l.mem64.0 >= ram_end && l.mem64.0 >= 1 << 32);
            assert_eq!(l.mem64.0 + l.mem64.1, 1 << 46);
        }
        // >= 3 GiB of RAM: the same 32-bit window as the kvm layout.
        assert_eq!(td_pci_layout(4 << 30).mem32, PciLayout::for_ram(4 << 30).mem32);
    }
}
