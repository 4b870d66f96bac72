//! virtio-net device tests on mock split queues (virtio-queue's test utilities) in mock guest memory.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::passt::PasstBackend;
use super::queue::{RxOutcome, Stats, deliver_rx, process_tx};
use super::*;
use crate::virtio::test_util::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, memory};

/// A backend that records what it is sent.
#[derive(Default)]
struct Recorder {
    sent: Vec<Vec<u8>>,
    full: bool,
    incoming: VecDeque<Vec<u8>>,
}

impl NetBackend for Recorder {
    fn fd(&self) -> RawFd {
        -1
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(self.incoming.pop_front().map(|f| {
            buf[..f.len()].copy_from_slice(&f);
            f.len()
        }))
    }
    fn can_send(&self) -> bool {
        !self.full
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

/// A recognisable Ethernet frame of `len` bytes: dst, src, ethertype 0x88b5 (local experimental), payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>, slot: u16) -> (u32, u32) {
    let e = mock.used().ring().ref_at(slot as usize).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn tx_frame_reaches_backend_with_header_stripped() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let f = frame(100, 1);
    // Header and the first 20 frame bytes in one descriptor, the rest in a second one (Linux's layout varies).
    let mut first = vec![0u8; HDR_LEN];
    first.extend_from_slice(&f[..20]);
    mem.write_slice(&first, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&f[20..], GuestAddress(0x20_0000)).unwrap();
    mock.add_desc_chains(
        &[
            desc(0x10_0000, first.len() as u32, VRING_DESC_F_NEXT, 1),
            desc(0x20_0000, 80, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut b = Recorder::default();
    let mut stats = Stats::default();
    let r = process_tx(&mut q, &mem, &mut b, &mut Vec::new(), &mut stats, 16, false);
    assert_eq!((r.completed, r.more, r.error.is_none()), (1, false, true));
    assert_eq!(b.sent, vec![f]);
    assert_eq!(used(&mock, 0), (0, 0));
    assert_eq!((stats.tx_frames, stats.tx_bytes), (1, 100));
}

#[test]
fn malformed_tx_chains_are_completed_not_sent() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut gso = vec![0u8; HDR_LEN + 60];
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    mem.write_slice(&gso, GuestAddress(0x30_0000)).unwrap();
    mock.add_desc_chains(
        &[
            desc(0xffff_0000, 64, 0, 0),                  // outside guest memory
            desc(0x10_0000, 8, 0, 0),                     // shorter than the header
            desc(0x10_1000, 64, VRING_DESC_F_WRITE, 0),   // device-writable only: no readable bytes
            desc(0x30_0000, gso.len() as u32, 0, 0),      // asks for segmentation we do not offer
            desc(0x10_2000, (HDR_LEN + 10) as u32, 0, 0), // runt frame
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut b = Recorder::default();
    let mut stats = Stats::default();
    let r = process_tx(&mut q, &mem, &mut b, &mut Vec::new(), &mut stats, 16, false);
    assert_eq!(r.completed, 5);
    assert!(b.sent.is_empty());
    assert_eq!((stats.tx_malformed, stats.tx_dropped), (3, 2));
    assert_eq!(mock.used().idx().load(), 5);
    for slot in 0..5 {
        assert_eq!(used(&mock, slot), (u32::from(slot), 0));
    }
}

#[test]
fn tx_waits_while_backend_is_full() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&frame(60, 2), GuestAddress(0x10_0000 + HDR_LEN as u64))
        .unwrap();
    mock.add_desc_chains(&[desc(0x10_0000, (HDR_LEN + 60) as u32, 0, 0)], 0)
        .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut b = Recorder {
        full: true,
        ..Default::default()
    };
    let mut stats = Stats::default();
    let r = process_tx(&mut q, &mem, &mut b, &mut Vec::new(), &mut stats, 16, false);
    assert_eq!(r.completed, 0);
    assert_eq!(mock.used().idx().load(), 0, "chain left in the ring");
    b.full = false;
    let r = process_tx(&mut q, &mem, &mut b, &mut Vec::new(), &mut stats, 16, false);
    assert_eq!(r.completed, 1);
    assert_eq!(b.sent, vec![frame(60, 2)]);
}

#[test]
fn rx_frame_delivered_with_header() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    // A 2-descriptor writable chain (header alone, then data), as a non-mergeable driver might post.
    mock.add_desc_chains(
        &[
            desc(0x10_0000, HDR_LEN as u32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x20_0000, 1514, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    mem.write_slice(&[0xaa; HDR_LEN], GuestAddress(0x10_0000)).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let f = frame(1000, 3);
    let mut stats = Stats::default();
    assert_eq!(
        deliver_rx(&mut q, &mem, &f, false, &mut stats),
        RxOutcome::Delivered { chains: 1 }
    );
    assert_eq!(used(&mock, 0), (0, (HDR_LEN + 1000) as u32));
    let mut hdr = [0xffu8; HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(0x10_0000)).unwrap();
    // All zero except num_buffers = 1 (little endian, bytes 10..12).
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    let mut got = vec![0u8; 1000];
    mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(got, f);
    assert_eq!((stats.rx_frames, stats.rx_bytes), (1, 1000));
}

#[test]
fn rx_spreads_over_mergeable_buffers() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let descs: Vec<_> = (0..4u64)
        .map(|i| desc(0x10_0000 + i * 0x1000, 1024, VRING_DESC_F_WRITE, 0))
        .collect();
    mock.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let f = frame(2500, 4);
    let mut stats = Stats::default();
    assert_eq!(
        deliver_rx(&mut q, &mem, &f, true, &mut stats),
        RxOutcome::Delivered { chains: 3 }
    );
    assert_eq!(mock.used().idx().load(), 3);
    assert_eq!(used(&mock, 0), (0, 1024));
    assert_eq!(used(&mock, 1), (1, 1024));
    assert_eq!(used(&mock, 2), (2, (HDR_LEN + 2500 - 2048) as u32));
    let mut all = vec![0u8; 3 * 1024];
    for i in 0..3u64 {
        mem.read_slice(
            &mut all[i as usize * 1024..(i as usize + 1) * 1024],
            GuestAddress(0x10_0000 + i * 0x1000),
        )
        .unwrap();
    }
    assert_eq!(u16::from_le_bytes([all[10], all[11]]), 3, "num_buffers");
    assert_eq!(&all[HDR_LEN..HDR_LEN + 2500], &f[..]);
    // The fourth buffer is still available for the next frame.
    assert_eq!(
        deliver_rx(&mut q, &mem, &frame(100, 5), true, &mut stats),
        RxOutcome::Delivered { chains: 1 }
    );
    assert_eq!(used(&mock, 3), (3, (HDR_LEN + 100) as u32));
}

#[test]
fn too_small_rx_buffer_drops_the_frame_and_keeps_the_buffer() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    mock.add_desc_chains(&[desc(0x10_0000, 200, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut stats = Stats::default();
    assert_eq!(
        deliver_rx(&mut q, &mem, &frame(1500, 6), false, &mut stats),
        RxOutcome::Dropped { used_chains: 0 }
    );
    assert_eq!(stats.rx_too_big, 1);
    assert_eq!(mock.used().idx().load(), 0, "buffer not consumed");
    let small = frame(150, 7);
    assert_eq!(
        deliver_rx(&mut q, &mem, &small, false, &mut stats),
        RxOutcome::Delivered { chains: 1 }
    );
    assert_eq!(used(&mock, 0), (0, (HDR_LEN + 150) as u32));
}

#[test]
fn rx_without_enough_buffers_consumes_nothing() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut q: Queue = mock.create_queue().unwrap();
    let mut stats = Stats::default();
    let f = frame(3000, 8);
    assert_eq!(deliver_rx(&mut q, &mem, &f, true, &mut stats), RxOutcome::NoBuffers);
    // One 1 KiB buffer is not enough for 3 KiB with mergeable buffers: still waiting, nothing used.
    mock.add_desc_chains(&[desc(0x10_0000, 1024, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    assert_eq!(deliver_rx(&mut q, &mem, &f, true, &mut stats), RxOutcome::NoBuffers);
    assert_eq!(mock.used().idx().load(), 0);
    mock.add_desc_chains(&[desc(0x10_1000, 4096, VRING_DESC_F_WRITE, 0)], 1)
        .unwrap();
    assert_eq!(
        deliver_rx(&mut q, &mem, &f, true, &mut stats),
        RxOutcome::Delivered { chains: 2 }
    );
}

#[test]
fn frame_larger_than_the_whole_ring_is_dropped() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 2);
    mock.add_desc_chains(
        &[
            desc(0x10_0000, 100, VRING_DESC_F_WRITE, 0),
            desc(0x10_1000, 100, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut stats = Stats::default();
    assert_eq!(
        deliver_rx(&mut q, &mem, &frame(1000, 9), true, &mut stats),
        RxOutcome::Dropped { used_chains: 0 }
    );
    assert_eq!(stats.rx_too_big, 1);
    assert_eq!(mock.used().idx().load(), 0);
}

#[test]
fn malformed_rx_chains_are_completed_empty() {
    let mem = memory();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    mock.add_desc_chains(
        &[
            desc(0x10_0000, 1024, VRING_DESC_F_WRITE, 0),
            desc(0x10_1000, 1024, 0, 0),                    // device-readable: no room at all
            desc(0xffff_0000, 4096, VRING_DESC_F_WRITE, 0), // outside guest memory
            desc(0x10_2000, 4, VRING_DESC_F_WRITE, 0),      // smaller than the header
            desc(0x10_3000, 2048, VRING_DESC_F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut stats = Stats::default();
    // 1.5 KiB needs two mergeable buffers; the second is malformed, so both are completed empty.
    assert_eq!(
        deliver_rx(&mut q, &mem, &frame(1500, 10), true, &mut stats),
        RxOutcome::Dropped { used_chains: 2 }
    );
    assert_eq!(used(&mock, 0), (0, 0));
    assert_eq!(used(&mock, 1), (1, 0));
    for (slot, id) in [(2, 2), (3, 3)] {
        assert_eq!(
            deliver_rx(&mut q, &mem, &frame(100, 11), true, &mut stats),
            RxOutcome::Dropped { used_chains: 1 }
        );
        assert_eq!(used(&mock, slot), (id, 0));
    }
    assert_eq!(stats.rx_malformed, 3);
    let f = frame(100, 12);
    assert_eq!(
        deliver_rx(&mut q, &mem, &f, true, &mut stats),
        RxOutcome::Delivered { chains: 1 }
    );
    assert_eq!(used(&mock, 4), (4, (HDR_LEN + 100) as u32));
}

#[test]
fn config_space_and_features() {
    let mac = parse_mac("52:54:00:ab:cd:ef").unwrap();
    let dev = Net::new(mac, None, Box::new(Recorder::default())).unwrap();
    let mut cfg = [0u8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    assert_eq!(dev.features(), VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF);
    assert_eq!(dev.queue_max_sizes(), vec![256, 256]);
    let dev = Net::new(mac, Some(1500), Box::new(Recorder::default())).unwrap();
    dev.read_config(10, &mut cfg[..2]);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 1500);
    assert_ne!(dev.features() & F_MTU, 0);
    assert!(Net::new(mac, Some(20), Box::new(Recorder::default())).is_err());
    for bad in [
        "52:54:00:ab:cd",
        "52:54:00:ab:cd:ef:00",
        "5254.00ab.cdef",
        "52:54:00:ab:cd:gg",
        "01:00:5e:00:00:01",
    ] {
        assert!(parse_mac(bad).is_err(), "{bad}");
    }
}

struct CountingInterrupt(AtomicUsize);

impl Interrupt for CountingInterrupt {
    fn queue(&self, _index: u16) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn config(&self) {}
}

/// The whole device with its worker thread: a host peer on a unix socket (speaking passt's framing) sends a
/// frame that lands in the RX ring, and a guest TX frame comes out at the peer.
#[test]
fn worker_moves_frames_between_socket_and_rings() {
    let mem = memory();
    let rxm = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let txm = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    rxm.add_desc_chains(&[desc(0x10_0000, 2048, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let mut dev = Net::new(
        [2, 0, 0, 0, 0, 1],
        None,
        Box::new(PasstBackend::from_stream(ours).unwrap()),
    )
    .unwrap();
    let events: Vec<EventFd> = (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
    let interrupt = std::sync::Arc::new(CountingInterrupt(AtomicUsize::new(0)));
    dev.activate(ActivateContext {
        mem: crate::virtio::all_memory(mem.clone()),
        queues: vec![rxm.create_queue().unwrap(), txm.create_queue().unwrap()],
        queue_events: events.iter().map(|e| e.try_clone().unwrap()).collect(),
        interrupt: interrupt.clone(),
        features: VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF,
    })
    .unwrap();
    let inbound = frame(600, 13);
    peer.write_all(&StreamFramer::encode(&inbound).unwrap()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rxm.used().idx().load() == 0 {
        assert!(Instant::now() < deadline, "RX frame never delivered");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(used(&rxm, 0), (0, (HDR_LEN + 600) as u32));
    let mut got = vec![0u8; 600];
    mem.read_slice(&mut got, GuestAddress(0x10_0000 + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, inbound);
    assert!(interrupt.0.load(Ordering::SeqCst) >= 1);

    let outbound = frame(300, 14);
    let mut buf = vec![0u8; HDR_LEN];
    buf.extend_from_slice(&outbound);
    mem.write_slice(&buf, GuestAddress(0x20_0000)).unwrap();
    txm.add_desc_chains(&[desc(0x20_0000, buf.len() as u32, 0, 0)], 0)
        .unwrap();
    events[TXQ].write(1).unwrap();
    let mut wire = vec![0u8; 4 + 300];
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer.read_exact(&mut wire).unwrap();
    assert_eq!(&wire[..4], &300u32.to_be_bytes());
    assert_eq!(&wire[4..], &outbound[..]);
    while txm.used().idx().load() == 0 {
        assert!(Instant::now() < deadline, "TX chain never completed");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Reset hands the backend back; a second activation works with the same connection.
    dev.reset();
    assert!(dev.backend.lock().unwrap().is_some());
}

#[test]
fn stream_framing_round_trip_and_split_reads() {
    let a = StreamFramer::encode(b"frame-one").unwrap();
    assert_eq!(&a[..4], &[0, 0, 0, 9], "big-endian length prefix");
    let b = StreamFramer::encode(&[0xab; 300]).unwrap();
    let mut wire = a.clone();
    wire.extend_from_slice(&b);
    let mut f = StreamFramer::default();
    // Feed in awkward pieces, as a socket might deliver them.
    for piece in wire.chunks(7) {
        f.push(piece);
    }
    assert_eq!(f.next_frame().unwrap().unwrap(), b"frame-one");
    assert_eq!(f.next_frame().unwrap().unwrap(), vec![0xab; 300]);
    assert_eq!(f.next_frame().unwrap(), None);
    assert_eq!(f.buffered(), 0);
    f.push(&[0, 0, 1]);
    assert_eq!(f.next_frame().unwrap(), None, "incomplete length");
    let mut bad = StreamFramer::default();
    bad.push(&[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(bad.next_frame(), Err(FrameError::TooLong(0xffff_ffff)));
    assert!(StreamFramer::encode(&vec![0; MAX_FRAME + 1]).is_err());
}
