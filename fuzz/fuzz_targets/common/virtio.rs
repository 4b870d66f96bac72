//! Shared harness of the virtio targets: guest memory with a hole, filled from the input, and split queues
//! placed where the input says. A queue the transport would refuse (bad size, misaligned or outside memory)
//! is skipped, as `VirtioPci::activate` does.
//!
//! Input: `[flags u8] [queue 0: size u16, desc u16, avail u16, used u16] [queue 1: …] … [memory image]`;
//! the image fills guest memory from address 0 (region 0: 0..32 KiB, hole, region 1: 36..68 KiB).

#![allow(dead_code)] // each target uses a different part

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const REGION1: u64 = 0x9000;
pub const REGION_LEN: usize = 0x8000;
/// Largest queue the fuzzed devices declare.
pub const MAX_QUEUE: u16 = 256;

pub struct Setup {
    pub flags: u8,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// Builds memory and `n` queues; `None` if the input is too short or a queue is invalid.
pub fn setup(data: &[u8], n: usize) -> Option<Setup> {
    let header = 1 + 8 * n;
    if data.len() < header {
        return None;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION_LEN), (GuestAddress(REGION1), REGION_LEN)])
        .expect("guest memory");
    let image = &data[header..];
    let (low, high) = image.split_at(image.len().min(REGION_LEN));
    mem.write_slice(low, GuestAddress(0)).expect("fits region 0");
    mem.write_slice(&high[..high.len().min(REGION_LEN)], GuestAddress(REGION1))
        .expect("fits region 1");
    let mut queues = Vec::with_capacity(n);
    for i in 0..n {
        let q = &data[1 + 8 * i..1 + 8 * (i + 1)];
        let mut queue = Queue::new(MAX_QUEUE).expect("queue");
        queue.set_size(u16_at(q, 0));
        queue.set_desc_table_address(Some(u32::from(u16_at(q, 2))), Some(0));
        queue.set_avail_ring_address(Some(u32::from(u16_at(q, 4))), Some(0));
        queue.set_used_ring_address(Some(u32::from(u16_at(q, 6))), Some(0));
        queue.set_event_idx(data[0] & 0x80 != 0);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return None;
        }
        queues.push(queue);
    }
    Some(Setup { flags: data[0], mem, queues })
}

/// Chains one pass over a queue may complete: at most what the driver made available (the ring index is
/// checked against the queue size), unless the device's own writes moved that index — still far below this.
pub fn work_bound(q: &Queue) -> usize {
    usize::from(q.size()) * 4 + 64
}
