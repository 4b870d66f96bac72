//! The transport driven the way a driver does it (virtio 1.2 §3.1.1 / §4.1.5), with virtio-rng behind it.

use std::time::{Duration, Instant};

use crate::virtio::test_util::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::super::rng::Rng;
use super::super::test_util::memory;
use super::super::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};
use super::*;
use crate::hypervisor::Hypervisor;
use crate::hypervisor::fake::{Call, FakeHypervisor};

fn w16(d: &mut VirtioPci, off: u64, v: u16) {
    d.write_bar(0, off, &v.to_le_bytes());
}
fn w32(d: &mut VirtioPci, off: u64, v: u32) {
    d.write_bar(0, off, &v.to_le_bytes());
}
fn r8(d: &mut VirtioPci, off: u64) -> u8 {
    let mut b = [0u8];
    d.read_bar(0, off, &mut b);
    b[0]
}
fn r16(d: &mut VirtioPci, off: u64) -> u16 {
    let mut b = [0u8; 2];
    d.read_bar(0, off, &mut b);
    u16::from_le_bytes(b)
}
fn r32(d: &mut VirtioPci, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

/// Walks the capability list like a driver and returns (cfg_type, bar, offset, length) of each vendor cap.
fn vendor_caps(d: &mut VirtioPci) -> Vec<(u8, u8, u32, u32)> {
    let mut caps = Vec::new();
    let mut b = [0u8; 4];
    d.read_config(0x34, &mut b);
    let mut ptr = b[0] as usize;
    while ptr != 0 {
        let mut c = [0u8; 16];
        d.read_config(ptr, &mut c);
        if c[0] == 0x09 {
            caps.push((
                c[3],
                c[4],
                u32::from_le_bytes(c[8..12].try_into().unwrap()),
                u32::from_le_bytes(c[12..16].try_into().unwrap()),
            ));
        }
        ptr = c[1] as usize;
    }
    caps
}

#[test]
fn driver_handshake_activates_and_reset_stops() {
    let hv = FakeHypervisor::new(vec![]);
    let vm = hv.create_vm().unwrap();
    let mem = memory();
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let mut d = VirtioPci::new("rng", Box::new(Rng::default()), vm, router, mem.clone()).unwrap();
    assert_eq!(d.config().read_u32(0), 0x1044_1af4, "modern virtio-rng ID");

    let caps = vendor_caps(&mut d);
    assert_eq!(
        caps,
        vec![
            (1, 0, 0, 0x38),
            (2, 0, 0x3000, 4),
            (3, 0, 0x1000, 1),
            (4, 0, 0x2000, 0x1000),
            (5, 0, 0, 0)
        ]
    );

    // BAR 0 starts decoding at 0xc000_0000: one ioeventfd per queue at its notify address.
    d.set_bar_addr(0, 0xc000_0000);
    d.bar_decode_changed(0, None, Some((0xc000_0000, BAR0_SIZE)));
    assert!(
        hv.calls()
            .contains(&Call::RegisterIoevent(IoEventAddress::Mmio(0xc000_3000)))
    );

    w16(&mut d, 0x14, 0); // reset
    d.write_bar(0, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
    w32(&mut d, 0x00, 1);
    assert_eq!(r32(&mut d, 0x04), 1, "VERSION_1 in the high feature word");
    assert_eq!(r16(&mut d, 0x12), 1, "one queue");
    // Offering a feature the device lacks fails FEATURES_OK.
    w32(&mut d, 0x08, 0);
    w32(&mut d, 0x0c, 1 << 3);
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 1);
    d.write_bar(0, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK]);
    assert_eq!(r8(&mut d, 0x14) & STATUS_FEATURES_OK, 0);
    w16(&mut d, 0x14, 0);
    d.write_bar(0, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 1);
    d.write_bar(0, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK]);
    assert_ne!(r8(&mut d, 0x14) & STATUS_FEATURES_OK, 0);

    // Queue 0 of 16 entries at the mock's addresses, MSI-X vector 0.
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    w16(&mut d, 0x16, 0);
    assert_eq!(r16(&mut d, 0x18), 256, "max size");
    w16(&mut d, 0x18, 16);
    w16(&mut d, 0x1a, 0);
    assert_eq!(r16(&mut d, 0x1a), 0);
    w16(&mut d, 0x10, 7);
    assert_eq!(r16(&mut d, 0x10), NO_VECTOR, "vector 7 does not exist");
    for (off, addr) in [
        (0x20, mock.desc_table_addr()),
        (0x28, mock.avail_addr()),
        (0x30, mock.used_addr()),
    ] {
        w32(&mut d, off, addr.0 as u32);
        w32(&mut d, off + 4, (addr.0 >> 32) as u32);
    }
    w16(&mut d, 0x1c, 1);
    // MSI-X: enable, program + unmask vector 0.
    let ctrl = d.msix_cap + 2;
    d.write_config(ctrl, &MSG_CTRL_ENABLE.to_le_bytes());
    w32(&mut d, MSIX_TABLE_OFFSET, 0xfee0_0000);
    w32(&mut d, MSIX_TABLE_OFFSET + 8, 0x31);
    w32(&mut d, MSIX_TABLE_OFFSET + 12, 0);
    d.write_bar(
        0,
        0x14,
        &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
    );
    assert_eq!(r8(&mut d, 0x14) & STATUS_DEVICE_NEEDS_RESET, 0);

    // A 32-byte request; the notify write (as if no ioeventfd) wakes the worker.
    mock.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(
            0x20_0000,
            32,
            VRING_DESC_F_WRITE as u16,
            0,
        ))],
        0,
    )
    .unwrap();
    w16(&mut d, NOTIFY_OFFSET, 0);
    let start = Instant::now();
    while mock.used().idx().load() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "worker did not complete the request"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 32);
    // The interrupt went to vector 0's irqfd; the ISR shows a queue interrupt and clears on read.
    let start = Instant::now();
    while d.shared.isr.load(Ordering::Acquire) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.msix().irqfd(0).read().unwrap(), 1);
    assert_eq!(r8(&mut d, ISR_OFFSET), 1);
    assert_eq!(r8(&mut d, ISR_OFFSET), 0);

    // The PCI-configuration access capability reads common config through config space.
    let cfg_cap = d.pci_cfg_cap;
    d.write_config(cfg_cap + 4, &[0]);
    d.write_config(cfg_cap + 8, &0x12u32.to_le_bytes());
    d.write_config(cfg_cap + 12, &2u32.to_le_bytes());
    let mut nq = [0u8; 2];
    d.read_config(cfg_cap + 16, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);

    // Reset stops the worker and clears the queue state.
    w16(&mut d, 0x14, 0);
    assert_eq!(r8(&mut d, 0x14), 0);
    assert_eq!(r16(&mut d, 0x1c), 0);
    assert_eq!(r16(&mut d, 0x18), 256);
    // BAR moves: ioeventfds follow.
    d.bar_decode_changed(0, Some((0xc000_0000, BAR0_SIZE)), Some((0xd000_0000, BAR0_SIZE)));
    let calls = hv.calls();
    assert!(calls.contains(&Call::UnregisterIoevent(IoEventAddress::Mmio(0xc000_3000))));
    assert!(calls.contains(&Call::RegisterIoevent(IoEventAddress::Mmio(0xd000_3000))));
}

#[test]
fn invalid_queue_sets_needs_reset() {
    let hv = FakeHypervisor::new(vec![]);
    let vm = hv.create_vm().unwrap();
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let mut d = VirtioPci::new("rng", Box::new(Rng::default()), vm, router, memory()).unwrap();
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 1);
    d.write_bar(0, 0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK]);
    w16(&mut d, 0x18, 16);
    // Descriptor table outside guest memory.
    w32(&mut d, 0x20, 0xf000_0000);
    w16(&mut d, 0x1c, 1);
    d.write_bar(
        0,
        0x14,
        &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
    );
    assert_ne!(r8(&mut d, 0x14) & STATUS_DEVICE_NEEDS_RESET, 0);
}
