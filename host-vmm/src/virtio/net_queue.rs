//! The virtio-net data path on the split rings: TX chains become frames for the backend (header stripped),
//! host frames are written into RX chains behind a `virtio_net_hdr_v1`. Malformed chains (addresses outside
//! guest memory, wrong direction, shorter than a header) are completed with length 0 and counted; nothing
//! here panics on guest-controlled data.

use std::io::{self, Read, Write};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{HDR_LEN, MAX_FRAME, MIN_FRAME, NetBackend};

/// Counters of one worker's life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Well-formed TX frames not sent (backend gone, GSO requested, bad size).
    pub tx_dropped: u64,
    pub tx_malformed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Host frames larger than the guest's RX buffers can hold.
    pub rx_too_big: u64,
    pub rx_malformed: u64,
}

/// Result of one TX pass.
#[derive(Debug)]
pub struct TxResult {
    /// Chains put in the used ring.
    pub completed: usize,
    /// The batch limit was reached with chains possibly left.
    pub more: bool,
    /// The backend failed (the frame was dropped; the caller marks the backend dead).
    pub error: Option<io::Error>,
}

/// `gso_type` value for "no segmentation" (the only one valid without offload features).
const GSO_NONE: u8 = 0;

/// Takes up to `batch` TX chains and hands their frames to `backend` (or drops them if `backend_dead`).
/// Stops early, leaving chains in the ring, while the backend cannot take more.
pub fn process_tx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    scratch: &mut Vec<u8>,
    stats: &mut Stats,
    batch: usize,
    mut backend_dead: bool,
) -> TxResult {
    let mut r = TxResult {
        completed: 0,
        more: false,
        error: None,
    };
    for _ in 0..batch {
        if !backend_dead && !backend.can_send() {
            return r;
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return r;
        };
        let head = chain.head_index();
        match read_tx_frame(chain.reader(mem), scratch) {
            Ok(()) if backend_dead => stats.tx_dropped += 1,
            Ok(()) => match backend.send(scratch) {
                Ok(()) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += scratch.len() as u64;
                }
                Err(e) => {
                    stats.tx_dropped += 1;
                    r.error = Some(e);
                    backend_dead = true;
                }
            },
            Err(TxReject::Malformed(why)) => {
                tracing::warn!("virtio-net: malformed TX chain (head {head}): {why}");
                stats.tx_malformed += 1;
            }
            Err(TxReject::Dropped(why)) => {
                tracing::debug!("virtio-net: dropping TX frame (head {head}): {why}");
                stats.tx_dropped += 1;
            }
        }
        if let Err(e) = q.add_used(mem, head, 0) {
            tracing::warn!("virtio-net: TX add_used: {e}");
        }
        r.completed += 1;
    }
    r.more = true;
    r
}

enum TxReject {
    Malformed(String),
    Dropped(String),
}

/// Reads header + frame of one TX chain; leaves the frame in `out`.
fn read_tx_frame(
    reader: Result<virtio_queue::Reader<'_>, virtio_queue::Error>,
    out: &mut Vec<u8>,
) -> Result<(), TxReject> {
    let mut reader = reader.map_err(|e| TxReject::Malformed(e.to_string()))?;
    let total = reader.available_bytes();
    if total < HDR_LEN {
        return Err(TxReject::Malformed(format!(
            "{total} readable bytes, less than the {HDR_LEN}-byte header"
        )));
    }
    let len = total - HDR_LEN;
    if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
        return Err(TxReject::Dropped(format!(
            "frame of {len} bytes outside {MIN_FRAME}..={MAX_FRAME}"
        )));
    }
    let mut hdr = [0u8; HDR_LEN];
    reader
        .read_exact(&mut hdr)
        .map_err(|e| TxReject::Malformed(format!("reading the header: {e}")))?;
    // flags (byte 0) may only carry NEEDS_CSUM/DATA_VALID with checksum features, which we do not offer;
    // a GSO request cannot be honoured without segmentation offload.
    if hdr[1] != GSO_NONE {
        return Err(TxReject::Dropped(format!("gso_type {} without GSO features", hdr[1])));
    }
    out.resize(len, 0);
    reader
        .read_exact(out)
        .map_err(|e| TxReject::Malformed(format!("reading {len} frame bytes: {e}")))
}

/// What happened to one host frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into `chains` RX chains.
    Delivered { chains: usize },
    /// Not enough RX buffers right now; nothing was consumed (retry after the driver adds buffers).
    NoBuffers,
    /// The frame can never fit, or a malformed chain was met; `used_chains` chains were completed with
    /// length 0 (malformed ones, which the driver then drops as runt packets).
    Dropped { used_chains: usize },
}

/// Writes `frame` behind a `virtio_net_hdr_v1` into the RX queue: one chain without mergeable buffers, as many
/// as needed (`num_buffers`) with them. A chain too small for the frame without mergeable buffers stays in
/// the ring for the next (smaller) frame; this frame is dropped.
pub fn deliver_rx(q: &mut Queue, mem: &GuestMemoryMmap, frame: &[u8], mrg_rxbuf: bool, stats: &mut Stats) -> RxOutcome {
    let need = HDR_LEN + frame.len();
    let start = q.next_avail();
    let mut chains = Vec::new();
    let mut capacity = 0usize;
    while capacity < need && (mrg_rxbuf || chains.is_empty()) {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            q.set_next_avail(start);
            if chains.len() >= usize::from(q.size()) {
                // Every buffer of the ring together is too small: waiting cannot help.
                stats.rx_too_big += 1;
                return RxOutcome::Dropped { used_chains: 0 };
            }
            return RxOutcome::NoBuffers;
        };
        let head = chain.head_index();
        let writer = chain.writer(mem);
        let usable = match &writer {
            Ok(w) if chains.is_empty() => w.available_bytes() >= HDR_LEN,
            Ok(w) => w.available_bytes() > 0,
            Err(_) => false,
        };
        match writer {
            Ok(w) if usable => {
                capacity = capacity.saturating_add(w.available_bytes());
                chains.push((head, w));
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(w) => format!("{} writable bytes", w.available_bytes()),
                };
                tracing::warn!("virtio-net: malformed RX chain (head {head}): {why}; frame dropped");
                stats.rx_malformed += 1;
                // Complete what was collected too: the driver sees runt packets and recycles the buffers.
                let mut used = 0;
                for h in chains.iter().map(|(h, _)| *h).chain([head]) {
                    if let Err(e) = q.add_used(mem, h, 0) {
                        tracing::warn!("virtio-net: RX add_used: {e}");
                    }
                    used += 1;
                }
                return RxOutcome::Dropped { used_chains: used };
            }
        }
    }
    if capacity < need {
        // Without mergeable buffers: keep the chain for a smaller frame.
        q.set_next_avail(start);
        stats.rx_too_big += 1;
        tracing::debug!(
            "virtio-net: {}-byte frame does not fit a {capacity}-byte RX buffer; dropped",
            frame.len()
        );
        return RxOutcome::Dropped { used_chains: 0 };
    }
    let mut hdr = [0u8; HDR_LEN];
    let num_buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    let mut src: &[u8] = &hdr;
    let mut rest: &[u8] = frame;
    let n = chains.len();
    for (head, mut w) in chains {
        let mut written = 0usize;
        while w.available_bytes() > 0 && !(src.is_empty() && rest.is_empty()) {
            if src.is_empty() {
                std::mem::swap(&mut src, &mut rest);
            }
            let k = w.available_bytes().min(src.len());
            let (now, later) = src.split_at(k);
            if let Err(e) = w.write_all(now) {
                tracing::warn!("virtio-net: writing an RX buffer (head {head}): {e}");
                break;
            }
            written += k;
            src = later;
        }
        if let Err(e) = q.add_used(mem, head, u32::try_from(written).unwrap_or(u32::MAX)) {
            tracing::warn!("virtio-net: RX add_used: {e}");
        }
    }
    stats.rx_frames += 1;
    stats.rx_bytes += frame.len() as u64;
    RxOutcome::Delivered { chains: n }
}
