//! The TD's memory as the VMM may touch it. A TD's pages are private (in the guest_memfd, encrypted, invisible
//! to the host) until the guest converts a range to shared — bounce buffers for virtio (swiotlb), the
//! GetQuote buffer — with MapGPA or an implicit access that faults. Shared pages live in the anonymous
//! mapping registered as each memslot's `userspace_addr` ([`crate::tdx::launch::LaunchedTd::shared_memory`]).
//!
//! [`TdMemory`] tracks which ranges are shared and is the only door device models get: reads and writes of a
//! range that is not entirely shared fail with [`SharedMemError::Private`] instead of reading the stale or zero
//! bytes of the unused shared backing of a private page. Virtio devices get it as their
//! [`DeviceMemory`]: a `GuestMemoryMmap` view that maps exactly the shared ranges (rebuilt on every
//! conversion), so rings and buffers in private memory fail like addresses outside RAM. [`convert`] flips a range for a conversion exit: KVM's
//! memory attributes and this tracker, in the order that never lets a device see a page the guest still uses
//! privately; pages going private have their shared backing discarded (`MADV_DONTNEED`) so no stale shared
//! copy lingers.

use std::any::Any;
use std::sync::{Arc, RwLock};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::hypervisor::HypervisorError;
use crate::hypervisor::tdx::{MEMORY_ATTRIBUTE_PRIVATE, TdxVm};
use crate::virtio::{DeviceMem, DeviceMemory};

const PAGE: u64 = 4096;

/// Why a device access or a conversion was refused.
#[derive(Debug, thiserror::Error)]
pub enum SharedMemError {
    #[error("guest range {gpa:#x}+{len:#x} is private to the TD (not converted to shared)")]
    Private { gpa: u64, len: u64 },
    #[error("guest range {gpa:#x}+{len:#x} is not guest RAM")]
    Unmapped { gpa: u64, len: u64 },
    #[error("conversion of {gpa:#x}+{len:#x}: not whole 4 KiB pages")]
    Unaligned { gpa: u64, len: u64 },
    #[error("conversion of {gpa:#x}+{len:#x}: {source}")]
    Attributes {
        gpa: u64,
        len: u64,
        #[source]
        source: HypervisorError,
    },
}

/// The shared view of guest memory plus the set of ranges the guest made shared.
pub struct TdMemory {
    mem: GuestMemoryMmap,
    /// Sorted, disjoint, non-adjacent `[start, end)` ranges that are shared; everything else is private.
    shared: RwLock<Vec<(u64, u64)>>,
    /// The device view: non-owning regions over exactly the shared ranges (updated with `shared`).
    view: RwLock<GuestMemoryMmap>,
    /// A clone of `mem` that keeps the mappings the view points into alive for every [`DeviceMem`] handed out.
    backing: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for TdMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdMemory")
            .field("shared", &*self.ranges())
            .finish_non_exhaustive()
    }
}

impl TdMemory {
    /// Everything starts private (the launch marks every slot `PRIVATE`).
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self {
            backing: Arc::new(mem.clone()),
            mem,
            shared: RwLock::new(Vec::new()),
            view: RwLock::new(GuestMemoryMmap::default()),
        }
    }

    /// The raw shared mapping (for code that checks [`TdMemory::is_shared`] itself).
    pub fn raw(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn ranges(&self) -> std::sync::RwLockReadGuard<'_, Vec<(u64, u64)>> {
        self.shared.read().unwrap_or_else(|e| e.into_inner())
    }

    /// True if all of `[gpa, gpa + len)` is shared (an empty range is not).
    pub fn is_shared(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len).filter(|_| len > 0) else {
            return false;
        };
        covered(&self.ranges(), gpa, end)
    }

    fn check(&self, ranges: &[(u64, u64)], gpa: u64, len: usize) -> Result<(), SharedMemError> {
        let len64 = len as u64;
        let end = gpa
            .checked_add(len64)
            .filter(|_| len > 0)
            .ok_or(SharedMemError::Unmapped { gpa, len: len64 })?;
        if !covered(ranges, gpa, end) {
            return Err(SharedMemError::Private { gpa, len: len64 });
        }
        Ok(())
    }

    /// Reads shared guest memory; refuses private or unmapped ranges.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), SharedMemError> {
        let ranges = self.ranges();
        self.check(&ranges, gpa, buf.len())?;
        // The lock stays held, so the range cannot turn private (and be discarded) mid-copy.
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| SharedMemError::Unmapped {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Writes shared guest memory; refuses private or unmapped ranges.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), SharedMemError> {
        let ranges = self.ranges();
        self.check(&ranges, gpa, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| SharedMemError::Unmapped {
                gpa,
                len: data.len() as u64,
            })
    }

    /// The validated `[gpa, end)` of a conversion: whole pages, all inside guest memory.
    fn conversion_range(&self, gpa: u64, len: u64) -> Result<u64, SharedMemError> {
        if len == 0 || !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(SharedMemError::Unaligned { gpa, len });
        }
        let end = gpa.checked_add(len).ok_or(SharedMemError::Unmapped { gpa, len })?;
        let mut at = gpa;
        while at < end {
            let region = self
                .mem
                .find_region(GuestAddress(at))
                .ok_or(SharedMemError::Unmapped { gpa, len })?;
            at = region.start_addr().0.saturating_add(region.len());
        }
        Ok(end)
    }

    /// Marks `[gpa, gpa + len)` shared or private in the tracker only (KVM's attributes are [`convert`]'s job).
    fn mark(&self, gpa: u64, end: u64, shared: bool) {
        let mut ranges = self.shared.write().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len() + 2);
        for &(a, b) in ranges.iter() {
            // Keep the parts outside [gpa, end).
            if a < gpa {
                out.push((a, b.min(gpa)));
            }
            if b > end {
                out.push((a.max(end), b));
            }
        }
        if shared {
            out.push((gpa, end));
        }
        out.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (a, b) in out {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let view = self.build_view(&merged);
        *ranges = merged;
        // Still under the ranges lock: the view and the tracker change together.
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// Non-owning regions over `ranges` (split at memslot boundaries). A range that cannot be mapped is left
    /// out, i.e. treated as private (fail closed).
    fn build_view(&self, ranges: &[(u64, u64)]) -> GuestMemoryMmap {
        let mut regions = Vec::new();
        for &(start, end) in ranges {
            let mut at = start;
            while at < end {
                let Some(region) = self.mem.find_region(GuestAddress(at)) else {
                    break;
                };
                let region_start = region.start_addr().0;
                let stop = end.min(region_start.saturating_add(region.len()));
                let host = region.as_ptr().wrapping_add((at - region_start) as usize);
                // SAFETY: `[host, host + (stop - at))` lies inside this region's mapping (`at` and `stop` are within
                // the region), which `self.backing` keeps mapped for as long as any `DeviceMem` holding this view
                // exists; `build_raw` creates a non-owning region that never unmaps it.
                let raw = unsafe { MmapRegion::build_raw(host, (stop - at) as usize, region.prot(), region.flags()) };
                match raw.ok().and_then(|m| GuestRegionMmap::new(m, GuestAddress(at))) {
                    Some(r) => regions.push(r),
                    None => tracing::warn!("cannot map shared range {at:#x}..{stop:#x} for devices; left private"),
                }
                at = stop;
            }
        }
        if regions.is_empty() {
            return GuestMemoryMmap::default();
        }
        GuestMemoryMmap::from_regions(regions).unwrap_or_else(|e| {
            tracing::error!("building the shared-memory view for devices: {e}");
            GuestMemoryMmap::default()
        })
    }

    /// Drops the shared backing of `[gpa, end)` (the pages read as zeros afterwards).
    fn discard(&self, gpa: u64, end: u64) {
        let mut at = gpa;
        while at < end {
            let Some(region) = self.mem.find_region(GuestAddress(at)) else {
                return;
            };
            let region_end = region.start_addr().0.saturating_add(region.len());
            let stop = end.min(region_end);
            let offset = at - region.start_addr().0;
            let host = region.as_ptr().wrapping_add(offset as usize);
            // SAFETY: `[host, host + (stop - at))` lies inside this region's anonymous mapping, which `self.mem`
            // owns and keeps mapped; `MADV_DONTNEED` on private anonymous memory only replaces the pages with
            // zero-fill-on-demand ones. The range is private in the tracker, so no device access is in flight.
            let rc = unsafe { libc::madvise(host.cast(), (stop - at) as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                tracing::warn!(
                    "discarding shared backing of {at:#x}..{stop:#x}: {}",
                    std::io::Error::last_os_error()
                );
            }
            at = stop;
        }
    }
}

impl DeviceMemory for TdMemory {
    fn memory(&self) -> DeviceMem {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner()).clone();
        // SAFETY: every region of the view points into `self.mem`'s mappings (`build_view`), which the clone in
        // `self.backing` keeps mapped.
        unsafe { DeviceMem::borrowing(view, self.backing.clone()) }
    }
}

fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    // Ranges are merged, so one range must contain the whole request.
    ranges.iter().any(|&(a, b)| a <= start && end <= b)
}

/// Converts `[gpa, gpa + len)` to private (`true`) or shared for the guest: validates the range, then updates
/// KVM's `KVM_MEMORY_ATTRIBUTE_PRIVATE` and the tracker (to shared: KVM first, then devices may use it; to
/// private: devices lose it first, its shared backing is discarded, then KVM).
pub fn convert(vm: &dyn TdxVm, mem: &TdMemory, gpa: u64, len: u64, private: bool) -> Result<(), SharedMemError> {
    let end = mem.conversion_range(gpa, len)?;
    let attrs = |source| SharedMemError::Attributes { gpa, len, source };
    if private {
        mem.mark(gpa, end, false);
        mem.discard(gpa, end);
        vm.set_memory_attributes(gpa, len, MEMORY_ATTRIBUTE_PRIVATE)
            .map_err(attrs)?;
    } else {
        vm.set_memory_attributes(gpa, len, 0).map_err(attrs)?;
        mem.mark(gpa, end, true);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> TdMemory {
        TdMemory::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap())
    }

    #[test]
    fn tracker_merges_and_splits_ranges() {
        let m = mem();
        m.mark(0x1000, 0x3000, true);
        m.mark(0x3000, 0x5000, true);
        assert_eq!(*m.ranges(), vec![(0x1000, 0x5000)]);
        assert!(m.is_shared(0x1000, 0x4000));
        m.mark(0x2000, 0x3000, false);
        assert_eq!(*m.ranges(), vec![(0x1000, 0x2000), (0x3000, 0x5000)]);
        assert!(!m.is_shared(0x1000, 0x4000));
        assert!(m.is_shared(0x3800, 0x100));
        assert!(!m.is_shared(0x3800, 0));
        assert!(!m.is_shared(u64::MAX, 2));
        m.mark(0, 0x10_0000, false);
        assert!(m.ranges().is_empty());
    }

    #[test]
    fn conversions_must_be_whole_pages_of_guest_ram() {
        let m = mem();
        assert!(matches!(
            m.conversion_range(0x1001, 0x1000),
            Err(SharedMemError::Unaligned { .. })
        ));
        assert!(matches!(
            m.conversion_range(0x1000, 0),
            Err(SharedMemError::Unaligned { .. })
        ));
        assert!(matches!(
            m.conversion_range(0xff000, 0x2000),
            Err(SharedMemError::Unmapped { .. })
        ));
        assert!(matches!(
            m.conversion_range(u64::MAX - 0xfff, 0x1000),
            Err(SharedMemError::Unmapped { .. })
        ));
        assert_eq!(m.conversion_range(0xff000, 0x1000).unwrap(), 0x10_0000);
    }
}
