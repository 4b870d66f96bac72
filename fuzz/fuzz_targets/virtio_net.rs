#![no_main]
//! virtio-net data path on guest-controlled descriptor tables (see `common/virtio.rs`): TX chains become
//! frames for a recording backend, a host frame is delivered into RX chains (with and without mergeable
//! buffers). Never panics, frames handed to the backend are within the size limits, bounded work per pass.
use std::io;
use std::os::fd::RawFd;

use dstack_host_vmm::virtio::net::queue::{Stats, deliver_rx, process_tx};
use dstack_host_vmm::virtio::net::{MAX_FRAME, MIN_FRAME, NetBackend};
use libfuzzer_sys::fuzz_target;

#[path = "common/virtio.rs"]
mod common;

struct Recorder {
    frames: usize,
    full_after: usize,
    fail: bool,
}

impl NetBackend for Recorder {
    fn fd(&self) -> RawFd {
        -1
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }
    fn can_send(&self) -> bool {
        self.frames < self.full_after
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!((MIN_FRAME..=MAX_FRAME).contains(&frame.len()), "frame of {} bytes", frame.len());
        self.frames += 1;
        if self.fail { Err(io::Error::other("backend gone")) } else { Ok(()) }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(mut s) = common::setup(data, 2) else {
        return;
    };
    let flags = s.flags;
    let mut stats = Stats::default();
    let [rx, tx] = &mut s.queues[..] else { unreachable!() };

    let mut backend = Recorder { frames: 0, full_after: usize::from(flags >> 2 & 7) + 1, fail: flags & 2 != 0 };
    let mut scratch = Vec::new();
    let r = process_tx(tx, &s.mem, &mut backend, &mut scratch, &mut stats, 64, flags & 1 != 0);
    assert!(r.completed <= 64);
    assert!(scratch.capacity() <= 2 * MAX_FRAME + 64, "scratch grew to {}", scratch.capacity());

    // A host frame whose length the input picks (from the same bytes), delivered twice.
    let len = (usize::from(data.len() as u16) * 7) % (MAX_FRAME + 64);
    let frame = vec![0x5a; len];
    for _ in 0..2 {
        let _ = deliver_rx(rx, &s.mem, &frame, flags & 0x40 != 0, &mut stats);
    }
    assert!(stats.rx_frames <= 2);
});
