//! The guest memory a device model may touch, as the device sees it.
//!
//! Devices never hold guest memory directly: they get a [`DeviceMemory`] at activation and ask it for a
//! [`DeviceMem`] at the start of every processing pass, then do all ring and buffer accesses of that pass
//! through it (with `virtio-queue` and `vm-memory` as usual).
//!
//! - An ordinary VM ([`all_memory`]) hands out all of guest RAM, always the same mapping.
//! - A TD hands out a view that contains only the ranges the guest converted to shared
//!   ([`crate::tdx::shared_mem::TdMemory`]): private GPAs are simply not mapped in it, so any ring, descriptor or
//!   buffer that touches private memory fails like an access outside RAM — an error the device reports, never a
//!   read of the shared backing of a private page. The view is rebuilt on every conversion; a pass keeps the
//!   view it started with (a page the guest makes private during a pass can still be written through it, which
//!   only touches the discarded shared backing — the guest's private data is never in the host mapping).

use std::any::Any;
use std::ops::Deref;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Where a device gets the memory of one processing pass.
pub trait DeviceMemory: Send + Sync {
    fn memory(&self) -> DeviceMem;
}

/// One pass's memory: a `GuestMemoryMmap` (use it through `Deref`) plus whatever keeps its mappings alive.
/// Do not clone the inner `GuestMemoryMmap` out of it: a TD view's regions borrow the TD's shared mapping,
/// which only the `DeviceMem` keeps alive.
#[derive(Clone)]
pub struct DeviceMem {
    view: GuestMemoryMmap,
    _backing: Option<Arc<dyn Any + Send + Sync>>,
}

impl DeviceMem {
    /// A view that owns its mappings (an ordinary VM's RAM).
    pub fn owned(mem: GuestMemoryMmap) -> Self {
        Self {
            view: mem,
            _backing: None,
        }
    }

    /// A view whose regions point into mappings `backing` owns.
    ///
    /// # Safety
    /// Every region of `view` must lie inside memory that stays mapped while `backing` is alive.
    pub unsafe fn borrowing(view: GuestMemoryMmap, backing: Arc<dyn Any + Send + Sync>) -> Self {
        Self {
            view,
            _backing: Some(backing),
        }
    }
}

impl Deref for DeviceMem {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.view
    }
}

/// All of an ordinary VM's RAM.
struct AllMemory(GuestMemoryMmap);

impl DeviceMemory for AllMemory {
    fn memory(&self) -> DeviceMem {
        DeviceMem::owned(self.0.clone())
    }
}

/// The [`DeviceMemory`] of an ordinary (non-confidential) VM: all of `mem`, always.
pub fn all_memory(mem: GuestMemoryMmap) -> Arc<dyn DeviceMemory> {
    Arc::new(AllMemory(mem))
}

/// Whether the rings of an enabled queue are inside `mem` (always true for an ordinary VM once activation
/// checked them; for a TD the guest may have converted them back to private). A queue the driver did not
/// enable counts as fine.
pub fn rings_accessible(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    !queue.ready() || queue.is_valid(mem)
}

/// The memory for one pass over `queues`: `None` — after reporting DEVICE_NEEDS_RESET through `interrupt`
/// (once per transition; the transport ignores repeats) — if an enabled queue's rings are no longer in it.
pub fn pass_memory(
    name: &str,
    mem: &dyn DeviceMemory,
    queues: &[Queue],
    interrupt: &dyn super::Interrupt,
) -> Option<DeviceMem> {
    let m = mem.memory();
    if let Some(i) = queues.iter().position(|q| !rings_accessible(q, &m)) {
        tracing::warn!("{name}: queue {i}'s rings are not in memory the device may access; device needs reset");
        interrupt.needs_reset();
        return None;
    }
    Some(m)
}
