#![no_main]
//! virtio-blk request processing on guest-controlled descriptor tables (see `common/virtio.rs` for the input
//! layout) against a small real image file: never panics, never touches the file outside the image, and
//! completes a bounded number of chains per pass.
use std::sync::OnceLock;

use dstack_host_vmm::virtio::block::{Disk, process_queue};
use libfuzzer_sys::fuzz_target;

#[path = "common/virtio.rs"]
mod common;

const SECTORS: u64 = 64;

fn disk(read_only: bool) -> &'static Disk {
    static DISKS: OnceLock<(Disk, Disk, std::path::PathBuf)> = OnceLock::new();
    let (rw, ro, _) = DISKS.get_or_init(|| {
        // tmpfs when available: flush requests call fdatasync.
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = base.join(format!("dstack-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![0xa5; (SECTORS * 512) as usize]).expect("image");
        let rw = Disk::open(&path, false).expect("open rw");
        let ro = Disk::open(&path, true).expect("open ro");
        (rw, ro, path)
    });
    if read_only { ro } else { rw }
}

fuzz_target!(|data: &[u8]| {
    let Some(mut s) = common::setup(data, 1) else {
        return;
    };
    let disk = disk(s.flags & 1 != 0);
    let q = &mut s.queues[0];
    let done = process_queue(disk, q, &s.mem);
    assert!(done <= common::work_bound(q), "{done} chains in one pass");
    assert_eq!(disk.sectors(), SECTORS);
});
