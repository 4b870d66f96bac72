//! Virtio 1.x devices in userspace over the PCI transport ([`pci`]): each device runs its queues on a worker
//! thread woken by queue eventfds (KVM ioeventfds on the notify addresses, or signalled by the transport on an
//! MMIO exit) and raises interrupts through the transport's MSI-X vectors.

pub mod block;
pub mod memory;
pub mod models;
pub mod net;
pub mod pci;
pub mod rng;
pub mod vsock;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use memory::{DeviceMem, DeviceMemory, all_memory, pass_memory, rings_accessible};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the modern interface (the only one we offer).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device types (virtio 1.2 §5).
pub const TYPE_NET: u16 = 1;
pub const TYPE_BLOCK: u16 = 2;
pub const TYPE_RNG: u16 = 4;
pub const TYPE_VSOCK: u16 = 19;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("device expects {want} queues, got {got}")]
    QueueCount { want: usize, got: usize },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("spawning the {name} worker thread: {source}")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Backend(String),
}

/// How a device raises interrupts (implemented by the transport).
pub trait Interrupt: Send + Sync {
    /// The device put buffers in the used ring of queue `index`.
    fn queue(&self, index: u16);
    /// The device configuration changed.
    fn config(&self);
    /// The device hit an error it cannot recover from without a reset (e.g. its rings are no longer in memory
    /// it may access): the transport sets DEVICE_NEEDS_RESET and tells the driver (§2.1.2).
    fn needs_reset(&self) {}
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// The memory the device may touch; fetch a [`DeviceMem`] per processing pass.
    pub mem: Arc<dyn DeviceMemory>,
    /// One per queue the device declared, in order; a queue the driver did not enable is not ready.
    pub queues: Vec<Queue>,
    /// Signalled when the driver notifies the queue with the same index.
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<dyn Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration (out-of-range bytes read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError>;
    /// Stops processing and forgets the queues (the driver may set the device up again).
    fn reset(&mut self);
}

/// Reads `data.len()` bytes of a config struct at `offset`, zero beyond its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A device worker thread, stopped (kill eventfd) and joined on drop.
pub struct Worker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawns `body`, which must return once its kill eventfd (the argument) becomes readable.
    pub fn spawn(name: &str, body: impl FnOnce(EventFd) + Send + 'static) -> Result<Self, VirtioError> {
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let theirs = kill.try_clone().map_err(VirtioError::EventFd)?;
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(theirs))
            .map_err(|source| VirtioError::Thread {
                name: name.into(),
                source,
            })?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Err(e) = self.kill.write(1) {
            tracing::error!("stopping a device worker: {e}");
            return;
        }
        if let Some(h) = self.handle.take()
            && h.join().is_err()
        {
            tracing::error!("a device worker panicked");
        }
    }
}

/// Token of the kill eventfd in [`run_queue_loop`] epolls.
const KILL_TOKEN: u64 = u64::MAX;

/// The loop of simple devices: wait for queue notifications and call `on_queue(index)`; every queue is also
/// processed once at start (the driver may have queued buffers before DRIVER_OK).
pub fn run_queue_loop(name: &str, kill: &EventFd, events: &[EventFd], mut on_queue: impl FnMut(usize)) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{name}: epoll_create: {e}");
            return;
        }
    };
    let mut fds: Vec<(i32, u64)> = vec![(kill.as_raw_fd(), KILL_TOKEN)];
    fds.extend(events.iter().enumerate().map(|(i, e)| (e.as_raw_fd(), i as u64)));
    for (fd, token) in fds {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
            tracing::error!("{name}: epoll_ctl: {e}");
            return;
        }
    }
    for i in 0..events.len() {
        on_queue(i);
    }
    let mut ready = [EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("{name}: epoll_wait: {e}");
                return;
            }
        };
        for ev in ready.iter().take(n) {
            if ev.data() == KILL_TOKEN {
                return;
            }
            let i = ev.data() as usize;
            if let Some(evt) = events.get(i) {
                // Drain the counter; the queue itself says how much work there is.
                let _ = evt.read();
                on_queue(i);
            }
        }
    }
}

/// Signals the driver for queue `index` unless it asked not to be interrupted.
pub fn notify_used(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, index: u16) {
    match queue.needs_notification(mem) {
        Ok(true) => interrupt.queue(index),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!("queue {index}: reading the notification state: {e}");
            interrupt.queue(index);
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Driver-side helpers for device tests.
    use vm_memory::GuestAddress;

    use super::*;

    /// Descriptor flags (virtio 1.2 §2.7.5).
    pub const VRING_DESC_F_NEXT: u32 = 1;
    pub const VRING_DESC_F_WRITE: u32 = 2;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }
}
