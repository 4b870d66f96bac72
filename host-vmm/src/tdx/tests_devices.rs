//! Virtio devices of a TD against the recording fake, driven the way the guest's driver would drive them: PCI
//! configuration through ECAM and BAR accesses on the TD's MMIO bus (what vCPU MMIO exits reach), rings and
//! buffers written straight into the TD's shared mapping (where the guest's shared pages live).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::devices::{TdIrqSink, attach_pci, td_router};
use super::shared_mem::{TdMemory, convert};
use super::tests::{fake_tdx_host, synthetic_tdvf};
use super::{LaunchedTd, TdxConfig, launch};
use crate::devices::ioapic::{IOAPIC_BASE, Ioapic};
use crate::devices::{Bus, BusDevice};
use crate::hypervisor::IrqRoute;
use crate::hypervisor::fake::FakeHypervisor;
use crate::pci::PciLayout;
use crate::pci::msix::GsiRouter;
use crate::virtio::block::{S_IOERR, S_OK, T_IN, T_OUT};
use crate::virtio::pci::{MSIX_TABLE_OFFSET, NOTIFY_OFFSET};
use crate::virtio::test_util::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::vmm::{DeviceConfig, DiskConfig};

const RAM: u64 = 256 << 20;
/// Shared window the "guest" converts: rings at RING, request header, data and status pages after it.
const SHARED: u64 = 0x10_0000;
const RING: u64 = SHARED;
const HDR: u64 = SHARED + 0x1_0000;
const DATA: u64 = SHARED + 0x2_0000;
const STATUS: u64 = SHARED + 0x3_0000;
/// A page the guest never converts (private).
const PRIVATE: u64 = 0x80_0000;
const QUEUE_VECTOR_MSI: (u32, u32) = (0xfee0_0000, 0x41);

struct Td {
    hv: FakeHypervisor,
    td: LaunchedTd,
    mem: Arc<TdMemory>,
    ioapic: Arc<Mutex<Ioapic>>,
    mmio: Bus,
    _dir: tempfile::TempDir,
    disk: PathBuf,
    /// Base of the disk's BAR 0.
    bar0: u64,
}

/// A launched TD with one virtio-blk disk (sector i filled with byte i) and `[SHARED, SHARED + 1 MiB)`
/// converted to shared, as a TD guest's swiotlb set-up does.
fn td_with_disk() -> Td {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    let td = launch(&hv, &TdxConfig::new(&fw, RAM, 1)).unwrap();
    let mem = Arc::new(TdMemory::new(td.shared_memory.clone()));
    let router = td_router(&td.vm);
    let ioapic = Arc::new(Mutex::new(Ioapic::new(
        1,
        Arc::new(TdIrqSink {
            vm: td.vm.clone(),
            router: router.clone(),
        }),
    )));
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let img: Vec<u8> = (0..16u8).flat_map(|i| std::iter::repeat_n(i, 512)).collect();
    std::fs::write(&disk, img).unwrap();
    let devices = DeviceConfig {
        disks: vec![DiskConfig {
            path: disk.clone(),
            read_only: false,
        }],
        ..Default::default()
    };
    let (mut pio, mut mmio) = (Bus::new(), Bus::new());
    mmio.insert("ioapic", IOAPIC_BASE, 0x1000, ioapic.clone()).unwrap();
    attach_pci(&td.vm, &router, &mem, RAM, &devices, &mut pio, &mut mmio).unwrap();
    convert(td.vm.as_ref(), &mem, SHARED, 0x10_0000, false).unwrap();

    // PCI enumeration through ECAM: the disk is 00:01.0; enable memory decoding and bus mastering.
    let ecam = PciLayout::for_ram(RAM).ecam + (1 << 15);
    let mut id = [0u8; 4];
    assert!(mmio.read(ecam, &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4, "virtio-blk (modern) at 00:01.0");
    let (mut lo, mut hi) = ([0u8; 4], [0u8; 4]);
    mmio.read(ecam + 0x10, &mut lo);
    mmio.read(ecam + 0x14, &mut hi);
    let bar0 = (u64::from(u32::from_le_bytes(hi)) << 32) | u64::from(u32::from_le_bytes(lo) & !0xf);
    mmio.write(ecam + 4, &6u16.to_le_bytes());
    // MSI-X enable: walk the capability list to ID 0x11.
    let mut ptr = [0u8; 1];
    mmio.read(ecam + 0x34, &mut ptr);
    let mut cap = u64::from(ptr[0]);
    loop {
        let mut c = [0u8; 2];
        mmio.read(ecam + cap, &mut c);
        if c[0] == 0x11 {
            break;
        }
        assert_ne!(c[1], 0, "no MSI-X capability");
        cap = u64::from(c[1]);
    }
    mmio.write(ecam + cap + 2, &0x8000u16.to_le_bytes());
    Td {
        hv,
        td,
        mem,
        ioapic,
        mmio,
        _dir: dir,
        disk,
        bar0,
    }
}

impl Td {
    fn w(&self, off: u64, data: &[u8]) {
        self.mmio.write(self.bar0 + off, data);
    }
    fn status(&self) -> u8 {
        let mut b = [0u8];
        assert!(self.mmio.read(self.bar0 + 0x14, &mut b));
        b[0]
    }
    fn guest(&self) -> &GuestMemoryMmap {
        &self.td.shared_memory
    }

    /// The driver's side of §3.1.1 for queue 0 at RING (16 entries, MSI-X vector 0), then DRIVER_OK.
    fn driver_ok(&self) -> MockSplitQueue<'_, GuestMemoryMmap> {
        self.w(0x14, &[0]);
        self.w(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        self.w(0x08, &1u32.to_le_bytes());
        self.w(0x0c, &1u32.to_le_bytes()); // VIRTIO_F_VERSION_1
        self.w(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK]);
        let mock = MockSplitQueue::create(self.guest(), GuestAddress(RING), 16);
        self.w(0x16, &0u16.to_le_bytes());
        self.w(0x18, &16u16.to_le_bytes());
        self.w(0x1a, &0u16.to_le_bytes());
        for (off, a) in [
            (0x20, mock.desc_table_addr()),
            (0x28, mock.avail_addr()),
            (0x30, mock.used_addr()),
        ] {
            self.w(off, &a.0.to_le_bytes());
        }
        self.w(0x1c, &1u16.to_le_bytes());
        let (addr, data) = QUEUE_VECTOR_MSI;
        self.w(MSIX_TABLE_OFFSET, &addr.to_le_bytes());
        self.w(MSIX_TABLE_OFFSET + 8, &data.to_le_bytes());
        self.w(MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
        self.w(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
        assert_eq!(self.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        mock
    }

    /// Queues one request (header at HDR, then `data` = (addr, len, device-writable), status at `status`),
    /// notifies, and waits for used entry `n`; returns its length.
    fn request(
        &self,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
        n: u16,
        ty: u32,
        sector: u64,
        data: (u64, u32, bool),
        status: u64,
    ) -> u32 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.guest().write_slice(&h, GuestAddress(HDR)).unwrap();
        let wflag = |w: bool| if w { VRING_DESC_F_WRITE as u16 } else { 0 };
        let first = n * 3;
        let descs = [
            Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, first + 1),
            Descriptor::new(data.0, data.1, wflag(data.2) | VRING_DESC_F_NEXT as u16, first + 2),
            Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
        mock.add_desc_chains(&raw, first).unwrap();
        self.w(NOTIFY_OFFSET, &0u16.to_le_bytes());
        let start = Instant::now();
        while mock.used().idx().load() <= n {
            assert!(start.elapsed() < Duration::from_secs(5), "request {n} never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        mock.used().ring().ref_at(usize::from(n)).unwrap().load().len()
    }
}

#[test]
fn td_virtio_blk_round_trips_data_in_shared_memory_with_merged_interrupt_routes() {
    let t = td_with_disk();
    // The guest programs IOAPIC pin 4 (COM1) before the driver probes the disk.
    {
        let mut io = t.ioapic.lock().unwrap();
        io.write(0x00, &0x18u32.to_le_bytes());
        io.write(0x10, &0x24u32.to_le_bytes());
    }
    let mock = t.driver_ok();

    // Read sector 3 into a shared buffer.
    t.guest().write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(t.request(&mock, 0, T_IN, 3, (DATA, 512, true), STATUS), 513);
    let mut got = [0u8; 512];
    t.guest().read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [3u8; 512]);
    assert_eq!(t.guest().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);

    // Write sector 5 from a shared buffer: the image changes.
    t.guest().write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(t.request(&mock, 1, T_OUT, 5, (DATA, 512, false), STATUS), 1);
    assert_eq!(t.guest().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    let img = std::fs::read(&t.disk).unwrap();
    assert_eq!(&img[5 * 512..6 * 512], &[0x5a; 512]);

    // The used-buffer interrupt went to the vector's irqfd, whose GSI KVM routes as the programmed MSI.
    let start = Instant::now();
    let delivered = loop {
        let d = t.hv.deliver_irqfds();
        if !d.is_empty() || start.elapsed() > Duration::from_secs(5) {
            break d;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let (addr, data) = QUEUE_VECTOR_MSI;
    let msix_route = IrqRoute::Msi {
        gsi: 24,
        address_lo: addr,
        address_hi: 0,
        data,
    };
    assert!(!delivered.is_empty(), "no interrupt delivered");
    assert!(delivered.iter().all(|r| *r == msix_route), "{delivered:?}");
    // One table holds both owners' routes: the IOAPIC's pin 4 and the MSI-X vector, and no irqchip route.
    let table = t.hv.gsi_routes();
    let ioapic_route = IrqRoute::Msi {
        gsi: 4,
        address_lo: 0xfee0_0000,
        address_hi: 0,
        data: 0x24,
    };
    assert!(
        table.contains(&ioapic_route) && table.contains(&msix_route),
        "{table:?}"
    );
    assert!(!table.iter().any(|r| matches!(r, IrqRoute::Irqchip { .. })));

    // The IOAPIC reprogramming pin 4 keeps the MSI-X route (and vice versa).
    {
        let mut io = t.ioapic.lock().unwrap();
        io.write(0x00, &0x18u32.to_le_bytes());
        io.write(0x10, &0x25u32.to_le_bytes());
    }
    let table = t.hv.gsi_routes();
    assert!(table.contains(&msix_route), "{table:?}");
    assert!(
        table
            .iter()
            .any(|r| matches!(r, IrqRoute::Msi { gsi: 4, data: 0x25, .. }))
    );
}

#[test]
fn td_virtio_blk_refuses_private_buffers_and_private_rings_need_reset() {
    let t = td_with_disk();
    let mock = t.driver_ok();
    // The host-side backing of a private page holds a sentinel: the device must neither write it (a read
    // request) nor copy it to the disk (a write request).
    t.guest().write_slice(&[0xc3; 512], GuestAddress(PRIVATE)).unwrap();

    t.guest().write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(t.request(&mock, 0, T_IN, 3, (PRIVATE, 512, true), STATUS), 1);
    assert_eq!(t.guest().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    let mut got = [0u8; 512];
    t.guest().read_slice(&mut got, GuestAddress(PRIVATE)).unwrap();
    assert_eq!(got, [0xc3; 512], "the device wrote into private memory");

    t.guest().write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(t.request(&mock, 1, T_OUT, 5, (PRIVATE, 512, false), STATUS), 1);
    assert_eq!(t.guest().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    let img = std::fs::read(&t.disk).unwrap();
    assert_eq!(&img[5 * 512..6 * 512], &[5u8; 512], "private bytes reached the disk");

    // A status byte in private memory: nothing to write, the chain is used with length 0.
    assert_eq!(t.request(&mock, 2, T_IN, 3, (DATA, 512, true), PRIVATE), 0);
    assert_eq!(t.guest().read_obj::<u8>(GuestAddress(PRIVATE)).unwrap(), 0xc3);
    assert_eq!(
        t.status() & STATUS_DEVICE_NEEDS_RESET,
        0,
        "bad requests alone do not break the device"
    );

    // The guest converts the ring pages back to private: the next notification finds no rings, and the
    // device asks for a reset instead of touching them.
    convert(t.td.vm.as_ref(), &t.mem, RING, 0x1000, true).unwrap();
    t.w(NOTIFY_OFFSET, &0u16.to_le_bytes());
    let start = Instant::now();
    while t.status() & STATUS_DEVICE_NEEDS_RESET == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "device did not ask for a reset"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // A reset clears it.
    t.w(0x14, &[0]);
    assert_eq!(t.status(), 0);
}

#[test]
fn td_router_refuses_irqchip_routes_and_foreign_pin_routes() {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    let td = launch(&hv, &TdxConfig::new(&fw, RAM, 1)).unwrap();
    // The kvm path's router would push KVM's default irqchip routes, which a split irqchip rejects.
    let plain: Arc<dyn crate::hypervisor::Vm> = td.vm.clone();
    assert!(
        GsiRouter::new(plain)
            .set_msi_route(24, Some((0xfee0_0000, 0x30)))
            .is_err()
    );
    let router = td_router(&td.vm);
    router.set_msi_route(24, Some((0xfee0_0000, 0x30))).unwrap();
    assert!(
        router
            .set_ioapic_routes(&[IrqRoute::Msi {
                gsi: 24,
                address_lo: 0xfee0_0000,
                address_hi: 0,
                data: 0x31
            }])
            .is_err(),
        "an IOAPIC route may not shadow an MSI-X GSI"
    );
    assert_eq!(
        hv.gsi_routes(),
        vec![IrqRoute::Msi {
            gsi: 24,
            address_lo: 0xfee0_0000,
            address_hi: 0,
            data: 0x30
        }]
    );
}

/// OVMF identifies the platform by the device ID at 00:00.0: a TD presents QEMU's Q35 MCH (8086:29c0, class
/// 06_00_00) and the ICH9 LPC at 1f.0 (8086:2918) through both configuration mechanisms OVMF and Linux use
/// (CF8/CFC and ECAM), while the `kvm` path keeps QEMU's generic 1b36:0008. The BAR windows on the MMIO bus
/// are the TD layout's (OVMF's apertures).
#[test]
fn td_presents_the_q35_chipset() {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    let td = launch(&hv, &TdxConfig::new(&fw, RAM, 1)).unwrap();
    let mem = Arc::new(TdMemory::new(td.shared_memory.clone()));
    let router = td_router(&td.vm);
    let (mut pio, mut mmio) = (Bus::new(), Bus::new());
    attach_pci(
        &td.vm,
        &router,
        &mem,
        RAM,
        &DeviceConfig::default(),
        &mut pio,
        &mut mmio,
    )
    .unwrap();
    // Type-1 access: enable bit, bus 0, device 0, function 0, register 0 (then class at register 8).
    let cf8 = u64::from(crate::pci::CONFIG_ADDRESS_PORT);
    let mut id = [0u8; 4];
    assert!(pio.write(cf8, &0x8000_0000u32.to_le_bytes()).is_some());
    assert!(pio.read(cf8 + 4, &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x29c0_8086, "CF8/CFC at 00:00.0");
    let layout = dstack_measurements::predict::platform::td_pci_layout(RAM);
    let ecam = layout.ecam;
    assert!(mmio.read(ecam, &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x29c0_8086, "ECAM at 00:00.0");
    assert!(mmio.read(ecam + 8, &mut id));
    assert_eq!(u32::from_le_bytes(id) >> 8, 0x06_00_00, "class: host bridge");
    assert!(mmio.read(ecam + (0x1f << 15), &mut id));
    assert_eq!(u32::from_le_bytes(id), 0x2918_8086, "ECAM at 00:1f.0");
    // Both windows (OVMF's 32-bit aperture and the 64-bit range up to 2^46) are decoded by the root: no BAR
    // decodes there yet, so reads float high instead of missing the bus.
    for addr in [layout.mem32.0, layout.ecam - 4, layout.mem64.0, (1u64 << 46) - 4] {
        assert!(mmio.read(addr, &mut id), "{addr:#x} is on the bus");
    }
    // The kvm path's root is unchanged.
    let mut kvm = crate::pci::PciBusDevice {
        root: Arc::new(Mutex::new(crate::pci::PciRoot::new(PciLayout::for_ram(RAM)))),
        access: crate::pci::root::PciAccess::Ecam,
    };
    kvm.read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
}
