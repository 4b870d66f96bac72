//! Guest RAM: anonymous mmap-backed regions below and above the 32-bit MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::hypervisor::{HypervisorError, Vm};

/// The 32-bit MMIO hole (PCI MMIO, IOAPIC, LAPIC); RAM beyond its start continues at 4 GiB.
pub use dstack_acpi::layout::{MMIO_HOLE_END, MMIO_HOLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be between 1 MiB and 1 TiB, got {0} MiB")]
    BadSize(u64),
    #[error("mmap of guest memory failed: {0}")]
    Mmap(String),
    #[error("registering guest memory with the hypervisor: {0}")]
    Register(#[from] HypervisorError),
}

/// The guest-physical RAM ranges for `size` bytes: `[0, min(size, hole))` and, if needed, the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

/// Allocates guest RAM of `mib` MiB.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(1..=1 << 20).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mib << 20)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Mmap(e.to_string()))
}

/// Registers every region of `mem` as a KVM memory slot (slot = region index).
pub fn register_guest_memory(vm: &dyn Vm, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        // SAFETY: the region is a live anonymous mapping owned by `mem`; the VMM keeps `mem` alive for as long as
        // the VM (it is stored next to the VM handle and dropped after the vCPU threads are joined).
        unsafe { vm.set_user_memory_region(slot as u32, region.start_addr().0, region.len(), host) }?;
    }
    Ok(())
}

/// Host address ranges of guest RAM, to exclude it when measuring the VMM's own RSS.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_guest_splits_around_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 0xC000_0000), (GuestAddress(1 << 32), 1 << 30)]
        );
    }

    #[test]
    fn rejects_zero() {
        assert!(matches!(create_guest_memory(0), Err(MemoryError::BadSize(0))));
    }
}
