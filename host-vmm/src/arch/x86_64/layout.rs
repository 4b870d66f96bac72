//! Fixed guest-physical addresses of the boot structures the VMM writes (ours; Firecracker-like low layout).

/// GDT used for the 64-bit entry (4 descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (limit 0): any exception before the guest loads its own IDT triple-faults.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`); `rsi` points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (grows down below the page tables).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// PML4 of the identity map; the PDPT and 4 page directories follow.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The identity map covers the first 4 GiB with 2 MiB pages (4 page directories).
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept (including the NUL).
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the extended BIOS data area; the MP table lives here. Conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The three pages KVM (VMX) needs for real-mode TSS emulation; inside the MMIO hole, never RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// IOAPIC and LAPIC MMIO bases (architectural defaults).
pub use dstack_acpi::layout::{IOAPIC_ADDR, LAPIC_ADDR};
