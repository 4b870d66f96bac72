//! virtio-blk requests built with virtio-queue's driver-side mock, against a real temporary image file.

use crate::virtio::test_util::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::super::test_util::memory;
use super::*;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    mem: GuestMemoryMmap,
}

fn fixture(sectors: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    // Sector i is filled with byte i, so reads are checkable without the device.
    let mut img = Vec::new();
    for i in 0..sectors {
        img.extend(std::iter::repeat_n(i as u8, SECTOR_SIZE as usize));
    }
    std::fs::write(&path, &img).unwrap();
    Fixture {
        _dir: dir,
        path,
        mem: memory(),
    }
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

impl Fixture {
    fn header(&self, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain (descriptors chained in order) and returns (used len, status byte).
    fn run(&self, disk: &Disk, descs: &[RawDescriptor]) -> (u32, u8) {
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0), 16);
        let chained: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags()
                } else {
                    d.flags() | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, i as u16 + 1))
            })
            .collect();
        mock.add_desc_chains(&chained, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(process_queue(disk, &mut q, &self.mem), 1);
        let used = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.id(), 0);
        (used.len(), self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }
}

#[test]
fn read_sectors_across_two_buffers() {
    let f = fixture(8);
    let disk = Disk::open(&f.path, false).unwrap();
    f.header(T_IN, 2);
    let r = f.run(
        &disk,
        &[
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(DATA + 0x1000, 512, true),
            desc(STATUS, 1, true),
        ],
    );
    assert_eq!(r, (1025, S_OK));
    let mut a = vec![0u8; 512];
    f.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    assert!(a.iter().all(|&b| b == 2));
    f.mem.read_slice(&mut a, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(a.iter().all(|&b| b == 3));
}

#[test]
fn write_then_flush_reaches_the_file() {
    let f = fixture(8);
    let disk = Disk::open(&f.path, false).unwrap();
    f.mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
    f.header(T_OUT, 6);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 1024, false), desc(STATUS, 1, true)]
        ),
        (1, S_OK)
    );
    f.header(T_FLUSH, 0);
    assert_eq!(f.run(&disk, &[desc(HDR, 16, false), desc(STATUS, 1, true)]), (1, S_OK));
    let img = std::fs::read(&f.path).unwrap();
    assert!(img[6 * 512..].iter().all(|&b| b == 0x5a));
    assert!(img[5 * 512..6 * 512].iter().all(|&b| b == 5), "neighbour untouched");
}

#[test]
fn out_of_range_and_partial_sectors_fail_with_ioerr() {
    let f = fixture(8);
    let disk = Disk::open(&f.path, false).unwrap();
    // Last sector + one more.
    f.header(T_IN, 7);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 1024, true), desc(STATUS, 1, true)]
        ),
        (1, S_IOERR)
    );
    // Sector number whose byte offset overflows u64.
    f.header(T_OUT, u64::MAX / 2);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]
        ),
        (1, S_IOERR)
    );
    // Not a whole sector.
    f.header(T_OUT, 0);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 100, false), desc(STATUS, 1, true)]
        ),
        (1, S_IOERR)
    );
    let img = std::fs::read(&f.path).unwrap();
    assert!(img[..512].iter().all(|&b| b == 0), "nothing written");
}

#[test]
fn read_only_disk_refuses_writes_but_reads_and_flushes() {
    let f = fixture(4);
    let disk = Disk::open(&f.path, true).unwrap();
    let dev = Block::new(Disk::open(&f.path, true).unwrap());
    assert_ne!(dev.features() & F_RO, 0);
    f.header(T_OUT, 0);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)]
        ),
        (1, S_IOERR)
    );
    f.header(T_IN, 3);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)]
        ),
        (513, S_OK)
    );
    f.header(T_FLUSH, 0);
    assert_eq!(f.run(&disk, &[desc(HDR, 16, false), desc(STATUS, 1, true)]), (1, S_OK));
}

#[test]
fn get_id_and_unsupported_type() {
    let f = fixture(1);
    let disk = Disk::open(&f.path, false).unwrap();
    f.header(T_GET_ID, 0);
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 20, true), desc(STATUS, 1, true)]
        ),
        (21, S_OK)
    );
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..8], b"disk.img");
    assert_eq!(&id[8..], &[0; 12]);
    f.header(99, 0);
    assert_eq!(
        f.run(&disk, &[desc(HDR, 16, false), desc(STATUS, 1, true)]),
        (1, S_UNSUPP)
    );
}

#[test]
fn malformed_chains_do_not_panic() {
    let f = fixture(2);
    let disk = Disk::open(&f.path, false).unwrap();
    f.header(T_IN, 0);
    // No device-writable descriptor: no status to report, nothing used.
    assert_eq!(f.run(&disk, &[desc(HDR, 16, false), desc(DATA, 512, false)]), (0, 0xee));
    // Header too short: IOERR.
    assert_eq!(
        f.run(&disk, &[desc(HDR, 8, false), desc(STATUS, 1, true)]),
        (1, S_IOERR)
    );
    // A data buffer outside guest memory: the chain is rejected as a whole, with IOERR in its status byte.
    assert_eq!(
        f.run(
            &disk,
            &[
                desc(HDR, 16, false),
                desc(0xffff_0000, 512, true),
                desc(STATUS, 1, true)
            ]
        ),
        (1, S_IOERR)
    );
    // …and without an accessible status byte, nothing is written and nothing reported.
    assert_eq!(
        f.run(
            &disk,
            &[desc(HDR, 16, false), desc(DATA, 512, true), desc(0xffff_0000, 1, true)]
        ),
        (0, 0xee)
    );
    // A readable descriptor after a writable one violates §2.7.4.2: rejected, nothing used.
    assert_eq!(
        f.run(
            &disk,
            &[desc(DATA, 512, true), desc(HDR, 16, false), desc(STATUS, 1, true)]
        ),
        (0, 0xee)
    );
    // A chain whose `next` points past the queue: truncated by the queue, not a panic.
    let mock = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
    let bad = RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 200));
    mock.add_desc_chains(&[bad], 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    process_queue(&disk, &mut q, &f.mem);
    let used = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(used.len(), 0);
}

#[test]
fn config_space_reports_capacity() {
    let f = fixture(8);
    let dev = Block::new(Disk::open(&f.path, false).unwrap());
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut past = [0xffu8; 4];
    dev.read_config(1000, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(dev.features() & F_RO, 0);
    assert_ne!(dev.features() & F_FLUSH, 0);
}

#[test]
fn unaligned_image_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.img");
    std::fs::write(&p, [0u8; 513]).unwrap();
    assert!(matches!(
        Disk::open(&p, true),
        Err(BlockError::Unaligned { len: 513, .. })
    ));
}
