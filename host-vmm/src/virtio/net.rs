//! virtio-net (§5.1) in userspace. Queues: 0 = RX (to the guest), 1 = TX (from the guest); no control queue,
//! one queue pair. Offered features: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_MRG_RXBUF`
//! (and `VIRTIO_NET_F_MTU` when an MTU is configured); no checksum or segmentation offloads, so every frame
//! is a plain Ethernet frame behind a 12-byte `virtio_net_hdr_v1` whose only used field is `num_buffers`.
//!
//! A [`NetBackend`] moves whole Ethernet frames between the device worker and the host network:
//! - **passt** ([`passt`]): user-mode networking through Debian's `passt`, over a unix stream socket carrying
//!   qemu's "stream" framing, each frame preceded by its length as a 4-byte big-endian integer
//!   ([`StreamFramer`]).
//! - **tap** ([`tap`]): an `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` device, optionally enslaved to a bridge.
//!
//! Buffers are bounded: at most one frame from the host waits for guest RX buffers (the backend fd is not
//! polled meanwhile), and the passt backend stops taking TX frames while its socket buffer is full (TX
//! descriptors then stay in the ring until the socket drains).

#[path = "net_passt.rs"]
pub mod passt;
#[path = "net_queue.rs"]
pub mod queue;
#[path = "net_tap.rs"]
pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, DeviceMemory, Interrupt, TYPE_NET, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError, Worker,
    notify_used, pass_memory,
};
use queue::{RxOutcome, Stats};

/// Largest Ethernet frame we move (64 KiB covers GSO-less jumbo frames; passt's default MTU is 65520).
pub const MAX_FRAME: usize = 65536 + 14;
/// `sizeof(struct virtio_net_hdr_v1)`: the header is this size whenever VERSION_1 is negotiated.
pub const HDR_LEN: usize = 12;
/// Smallest frame we pass on (an Ethernet header).
pub const MIN_FRAME: usize = 14;

/// Feature bits (§5.1.3).
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;

const QUEUE_SIZE: u16 = 256;
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("MAC address {0:?}: expected six hex bytes separated by ':'")]
    BadMac(String),
    #[error("MAC address {0}: a multicast address cannot be a NIC's address")]
    MulticastMac(String),
    #[error("MTU {0}: must be 68..=65535")]
    BadMtu(u16),
    #[error("connecting to the passt socket {path}: {source}")]
    PasstConnect {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting passt ({program}): {source}")]
    PasstSpawn {
        program: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("passt did not create its socket {0} in time")]
    PasstNotReady(std::path::PathBuf),
    #[error("port forward {spec:?}: {reason}")]
    BadForward { spec: String, reason: String },
    #[error("tap interface name {0:?}: 1..=15 bytes without '/', NUL or whitespace")]
    BadIfName(String),
    #[error("tap {ifname}: {op}: {source}")]
    Tap {
        ifname: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Moves frames between the guest's virtio-net queues and the host network.
pub trait NetBackend: Send {
    /// Fd the device worker polls (readable: frames from the host; writable: buffered output can drain).
    fn fd(&self) -> RawFd;
    /// Reads one frame into `buf` (at least [`MAX_FRAME`] long); `Ok(None)` when no complete frame is
    /// available now. An error means the backend is gone for good.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Whether [`NetBackend::send`] takes another frame now (false while the output buffer is full).
    fn can_send(&self) -> bool {
        true
    }
    /// Sends one frame or buffers it (bounded; see `can_send`). An error means the backend is gone.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Writes buffered output; called when the fd is writable.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Whether buffered output waits for the fd to become writable.
    fn wants_write(&self) -> bool {
        false
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("stream frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
}

/// Incremental decoder/encoder of the qemu stream framing used by passt. Holds at most
/// [`StreamFramer::CAPACITY`] bytes, which always fits one complete frame.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    /// Bytes before this offset were consumed (compacted lazily, so a frame costs no memmove).
    start: usize,
}

impl StreamFramer {
    /// Most bytes buffered: two maximal frames, so a read can always make progress.
    pub const CAPACITY: usize = 2 * (4 + MAX_FRAME);

    /// `len` as 4 bytes big endian, then the frame.
    pub fn encode(frame: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(4 + frame.len());
        Self::encode_into(frame, &mut out)?;
        Ok(out)
    }

    /// Appends the framed `frame` to `out`.
    pub fn encode_into(frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        if frame.len() > MAX_FRAME {
            return Err(FrameError::TooLong(frame.len()));
        }
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame);
        Ok(())
    }

    /// Buffered, not yet consumed bytes.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Room left before [`Self::CAPACITY`].
    pub fn room(&self) -> usize {
        Self::CAPACITY.saturating_sub(self.buffered())
    }

    /// Appends bytes read from the socket (the caller keeps within [`Self::room`]).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > Self::CAPACITY / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Copies the next complete frame into `out` (at least [`MAX_FRAME`] long) and returns its length. A
    /// length above [`MAX_FRAME`] is a protocol error (the stream cannot be resynchronized).
    pub fn next_frame_into(&mut self, out: &mut [u8]) -> Result<Option<usize>, FrameError> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let Some(&[a, b, c, d]) = pending.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        let (Some(frame), Some(dst)) = (pending.get(4..4 + len), out.get_mut(..len)) else {
            return Ok(None);
        };
        dst.copy_from_slice(frame);
        self.start += 4 + len;
        Ok(Some(len))
    }

    /// The next complete frame, if any (allocating variant of [`Self::next_frame_into`]).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let mut out = vec![0u8; MAX_FRAME];
        Ok(self.next_frame_into(&mut out)?.map(|n| {
            out.truncate(n);
            out
        }))
    }
}

/// Parses `52:54:00:12:34:56` (unicast only).
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| NetError::BadMac(s.into()))?;
        if p.len() != 2 {
            return Err(NetError::BadMac(s.into()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| NetError::BadMac(s.into()))?;
    }
    if parts.next().is_some() {
        return Err(NetError::BadMac(s.into()));
    }
    if mac[0] & 1 != 0 {
        return Err(NetError::MulticastMac(s.into()));
    }
    Ok(mac)
}

/// The virtio-net device model. The backend survives device resets (the driver may reset and re-initialize
/// the device; the host side of the network stays connected).
pub struct Net {
    mac: [u8; 6],
    mtu: Option<u16>,
    backend: Arc<Mutex<Option<Box<dyn NetBackend>>>>,
    worker: Option<Worker>,
}

impl Net {
    pub fn new(mac: [u8; 6], mtu: Option<u16>, backend: Box<dyn NetBackend>) -> Result<Self, NetError> {
        if let Some(m) = mtu
            && m < 68
        {
            return Err(NetError::BadMtu(m));
        }
        Ok(Self {
            mac,
            mtu,
            backend: Arc::new(Mutex::new(Some(backend))),
            worker: None,
        })
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        let mtu = if self.mtu.is_some() { F_MTU } else { 0 };
        VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF | mtu
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        if ctx.queues.len() != 2 {
            return Err(VirtioError::QueueCount {
                want: 2,
                got: ctx.queues.len(),
            });
        }
        let slot = self.backend.clone();
        let backend = slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| VirtioError::Backend("virtio-net: the network backend was lost".into()))?;
        self.worker = Some(Worker::spawn("virtio-net", move |kill| {
            let mut w = NetWorker::new(ctx, backend);
            w.run(&kill);
            tracing::info!("virtio-net: worker stopped; {:?}", w.stats);
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.backend);
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        // Joins the worker, which hands the backend back.
        self.worker = None;
    }
}

const KILL: u64 = u64::MAX;
const BACKEND: u64 = u64::MAX - 1;
/// Frames moved per direction before the worker looks at its other event sources again.
const BATCH: usize = 256;

/// The device worker's state: queues, backend and the one frame that may wait for RX buffers.
pub struct NetWorker {
    mem: Arc<dyn DeviceMemory>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    mrg_rxbuf: bool,
    backend: Box<dyn NetBackend>,
    /// A frame from the host (`rx_buf[..len]`) waiting for guest buffers.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    backend_dead: bool,
    pub stats: Stats,
}

impl NetWorker {
    pub fn new(ctx: ActivateContext, backend: Box<dyn NetBackend>) -> Self {
        Self {
            mrg_rxbuf: ctx.features & F_MRG_RXBUF != 0,
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            backend,
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            backend_dead: false,
            stats: Stats::default(),
        }
    }

    fn backend_failed(&mut self, what: &str, e: &io::Error) {
        if !self.backend_dead {
            tracing::error!("virtio-net: backend {what} failed, network disconnected: {e}");
        }
        self.backend_dead = true;
        self.pending = None;
    }

    /// Guest TX → backend. Returns true if more TX work may remain (batch limit reached).
    fn tx(&mut self) -> bool {
        if self.backend.wants_write()
            && let Err(e) = self.backend.flush()
        {
            self.backend_failed("write", &e);
        }
        let Some(mem) = pass_memory("virtio-net", self.mem.as_ref(), &self.queues, self.interrupt.as_ref()) else {
            return false;
        };
        let Some(q) = self.queues.get_mut(TXQ) else {
            return false;
        };
        let r = queue::process_tx(
            q,
            &mem,
            self.backend.as_mut(),
            &mut self.tx_buf,
            &mut self.stats,
            BATCH,
            self.backend_dead,
        );
        if r.completed > 0 {
            notify_used(q, &mem, self.interrupt.as_ref(), TXQ as u16);
        }
        if let Some(e) = r.error {
            self.backend_failed("send", &e);
        }
        r.more
    }

    /// Backend → guest RX. Returns true if more RX work may remain.
    fn rx(&mut self) -> bool {
        let Some(mem) = pass_memory("virtio-net", self.mem.as_ref(), &self.queues, self.interrupt.as_ref()) else {
            return false;
        };
        let Some(q) = self.queues.get_mut(RXQ) else {
            return false;
        };
        let mut used = false;
        let mut moved = 0;
        while moved < BATCH {
            let len = match self.pending {
                Some(n) => n,
                None if self.backend_dead => break,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        if !self.backend_dead {
                            tracing::error!("virtio-net: backend read failed, network disconnected: {e}");
                        }
                        self.backend_dead = true;
                        break;
                    }
                },
            };
            self.pending = None;
            let frame = self.rx_buf.get(..len).unwrap_or_default();
            match queue::deliver_rx(q, &mem, frame, self.mrg_rxbuf, &mut self.stats) {
                RxOutcome::Delivered { .. } => used = true,
                RxOutcome::Dropped { used_chains } => used |= used_chains > 0,
                RxOutcome::NoBuffers => {
                    self.pending = Some(len);
                    break;
                }
            }
            moved += 1;
        }
        if used {
            notify_used(q, &mem, self.interrupt.as_ref(), RXQ as u16);
        }
        // The batch ran out with frames possibly left in the backend.
        moved == BATCH
    }

    /// The event loop: queue notifications, backend readiness and the kill eventfd.
    pub fn run(&mut self, kill: &EventFd) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-net: epoll_create: {e}");
                return;
            }
        };
        let mut fds = vec![(kill.as_raw_fd(), KILL)];
        fds.extend(
            self.queue_events
                .iter()
                .enumerate()
                .map(|(i, e)| (e.as_raw_fd(), i as u64)),
        );
        for (fd, token) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
                tracing::error!("virtio-net: epoll_ctl: {e}");
                return;
            }
        }
        let backend_fd = self.backend.fd();
        let mut registered: Option<EventSet> = None;
        let mut ready = [EpollEvent::default(); 8];
        loop {
            let more_tx = self.tx();
            let more_rx = self.rx();
            // Poll the backend only for what we can act on: reads while no frame waits for RX buffers.
            let mut want = EventSet::empty();
            if !self.backend_dead {
                if self.pending.is_none() {
                    want |= EventSet::IN;
                }
                if self.backend.wants_write() {
                    want |= EventSet::OUT;
                }
            }
            let ev = EpollEvent::new(want, BACKEND);
            let r = match registered {
                None if want.is_empty() => Ok(()),
                None => epoll.ctl(ControlOperation::Add, backend_fd, ev),
                Some(_) if want.is_empty() => epoll.ctl(ControlOperation::Delete, backend_fd, ev),
                Some(old) if old == want => Ok(()),
                Some(_) => epoll.ctl(ControlOperation::Modify, backend_fd, ev),
            };
            if let Err(e) = r {
                tracing::error!("virtio-net: epoll_ctl on the backend: {e}");
                return;
            }
            registered = (!want.is_empty()).then_some(want);
            let timeout = if more_tx || more_rx { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll_wait: {e}");
                    return;
                }
            };
            for ev in ready.iter().take(n) {
                match ev.data() {
                    KILL => return,
                    BACKEND => {}
                    i => {
                        if let Some(e) = self.queue_events.get(i as usize) {
                            let _ = e.read();
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
