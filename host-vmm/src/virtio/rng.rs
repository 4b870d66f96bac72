//! virtio-rng (entropy device, §5.4): fills every device-writable buffer the driver offers with bytes from the
//! host's `getrandom`.

use std::io::Write;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{ActivateContext, TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice, VirtioError, Worker, notify_used};

const QUEUE_SIZE: u16 = 256;
/// Most bytes we hand out per request (Linux asks for at most a page or so).
const MAX_REQUEST: usize = 64 << 10;

#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
}

/// Serves every available request of `queue`; returns how many chains were completed.
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap) -> usize {
    let mut done = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => {
                let n = w.available_bytes().min(MAX_REQUEST);
                let mut buf = vec![0u8; n];
                match getrandom::fill(&mut buf) {
                    Ok(()) => w.write_all(&buf).map(|()| n as u32).unwrap_or_else(|e| {
                        tracing::warn!("virtio-rng: writing to the guest buffer: {e}");
                        0
                    }),
                    Err(e) => {
                        tracing::error!("virtio-rng: getrandom failed: {e}");
                        0
                    }
                }
            }
            Err(e) => {
                tracing::warn!("virtio-rng: malformed descriptor chain (head {head}): {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!("virtio-rng: add_used: {e}");
        }
        done += 1;
    }
    done
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        let ActivateContext {
            mem,
            mut queues,
            queue_events,
            interrupt,
            ..
        } = ctx;
        if queues.len() != 1 {
            return Err(VirtioError::QueueCount {
                want: 1,
                got: queues.len(),
            });
        }
        self.worker = Some(Worker::spawn("virtio-rng", move |kill| {
            super::run_queue_loop("virtio-rng", &kill, &queue_events, |_| {
                let Some(m) = super::pass_memory("virtio-rng", mem.as_ref(), &queues, interrupt.as_ref()) else {
                    return;
                };
                if let Some(q) = queues.first_mut()
                    && process_queue(q, &m) > 0
                {
                    notify_used(q, &m, interrupt.as_ref(), 0);
                }
            });
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
mod tests {
    use crate::virtio::test_util::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_util::memory;
    use super::*;

    #[test]
    fn fills_writable_buffers_and_skips_readable() {
        let mem = memory();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Chain 1: two writable buffers (16 + 8 bytes). Chain 2: one read-only buffer (nothing to fill).
        let descs = [
            RawDescriptor::from(Descriptor::new(
                0x10_0000,
                16,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                1,
            )),
            RawDescriptor::from(Descriptor::new(0x10_1000, 8, VRING_DESC_F_WRITE as u16, 0)),
            RawDescriptor::from(Descriptor::new(0x10_2000, 32, 0, 0)),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(process_queue(&mut q, &mem), 2);
        let used = mock.used();
        assert_eq!(used.idx().load(), 2);
        let e0 = used.ring().ref_at(0).unwrap().load();
        let e1 = used.ring().ref_at(1).unwrap().load();
        assert_eq!((e0.id(), e0.len()), (0, 24));
        assert_eq!((e1.id(), e1.len()), (2, 0));
        let mut a = [0u8; 16];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
        // 24 random bytes are all zero with probability 2^-192.
        assert!(a.iter().chain(b.iter()).any(|&x| x != 0));
        let mut c = [0u8; 32];
        mem.read_slice(&mut c, GuestAddress(0x10_2000)).unwrap();
        assert_eq!(c, [0; 32], "read-only buffer untouched");
    }

    #[test]
    fn buffer_outside_guest_memory_is_completed_empty() {
        let mem = memory();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let descs = [RawDescriptor::from(Descriptor::new(
            0xffff_f000,
            64,
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(process_queue(&mut q, &mem), 1);
        let e = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!((e.id(), e.len()), (0, 0));
    }
}
