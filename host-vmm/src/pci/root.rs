//! The root bus: a host bridge at 00.0, devices at 01.0.., configuration access through CF8/CFC and ECAM, and
//! dispatch of BAR MMIO to whichever device currently decodes the address.

use std::sync::{Arc, Mutex};

use super::config::{COMMAND, COMMAND_MEMORY, PciConfig, PciId};
use super::{Bdf, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_SIZE, PciDevice, PciLayout};
use crate::devices::{Bus, BusDevice, BusError, DeviceAction};

/// Devices per bus.
const SLOTS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("no free PCI slot for {0}")]
    NoSlot(String),
    #[error("no room for BAR {bar} ({size:#x} bytes) of {name} in the PCI MMIO windows")]
    NoBarSpace { name: String, bar: usize, size: u64 },
}

/// The host bridge (00.0): a bare type-0 header with class "host bridge".
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn set_bar_addr(&mut self, _bar: usize, _addr: u64) {}
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Red Hat / QEMU's "PCIe host bridge" ID (a generic, driverless host bridge). The `kvm` path's root.
pub const HOST_BRIDGE_ID: PciId = PciId {
    vendor: 0x1b36,
    device: 0x0008,
    revision: 0,
    class: 0x06_00_00,
    subsystem_vendor: 0x1b36,
    subsystem: 0,
};

/// Per BAR: `(address, size)` while it decodes.
pub type BarDecode = [Option<(u64, u64)>; 6];

struct Slot {
    name: String,
    dev: Arc<Mutex<dyn PciDevice>>,
    decoded: [Option<(u64, u64)>; 6],
}

/// A bump allocator over one window.
#[derive(Debug, Clone, Copy)]
struct Window {
    next: u64,
    end: u64,
}

impl Window {
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let addr = self.next.checked_next_multiple_of(size)?;
        let end = addr.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            addr
        })
    }
}

pub struct PciRoot {
    layout: PciLayout,
    slots: Vec<Option<Slot>>,
    /// CONFIG_ADDRESS as last written through port 0xCF8.
    config_address: u32,
    mem32: Window,
    mem64: Window,
}

fn lock<'a>(dev: &'a Mutex<dyn PciDevice + 'static>) -> std::sync::MutexGuard<'a, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciRoot {
    /// A root whose host bridge is [`HOST_BRIDGE_ID`].
    pub fn new(layout: PciLayout) -> Self {
        Self::with_host_bridge(layout, HOST_BRIDGE_ID)
    }

    /// A root whose host bridge at 00.0 presents `host_bridge` (the TD uses Q35's MCH, `tdx::chipset`).
    pub fn with_host_bridge(layout: PciLayout, host_bridge: PciId) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            name: "host-bridge".into(),
            dev: Arc::new(Mutex::new(HostBridge(PciConfig::new(host_bridge)))),
            decoded: [None; 6],
        });
        Self {
            layout,
            slots,
            config_address: 0,
            mem32: Window {
                next: layout.mem32.0,
                end: layout.mem32.0 + layout.mem32.1,
            },
            mem64: Window {
                next: layout.mem64.0,
                end: layout.mem64.0 + layout.mem64.1,
            },
        }
    }

    pub fn layout(&self) -> PciLayout {
        self.layout
    }

    /// Plugs `dev` into the next free slot, assigns its BARs (32-bit window first; 64-bit BARs that do not fit
    /// go above RAM) and enables memory decoding, as firmware would. Returns the device number.
    pub fn add_device(&mut self, name: &str, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            return Err(PciError::NoSlot(name.into()));
        };
        {
            let mut d = lock(&dev);
            for bar in 0..6 {
                let Some(info) = d.config().bar_info(bar) else { continue };
                let addr = self.mem32.alloc(info.size).or_else(|| {
                    (info.kind == super::BarKind::Mem64)
                        .then(|| self.mem64.alloc(info.size))
                        .flatten()
                });
                let Some(addr) = addr else {
                    return Err(PciError::NoBarSpace {
                        name: name.into(),
                        bar,
                        size: info.size,
                    });
                };
                d.set_bar_addr(bar, addr);
            }
            let cmd = d.config().read_u16(COMMAND) | COMMAND_MEMORY;
            d.write_config(COMMAND, &cmd.to_le_bytes());
        }
        self.slots[slot] = Some(Slot {
            name: name.into(),
            dev,
            decoded: [None; 6],
        });
        self.refresh_decode(slot);
        Ok(slot as u8)
    }

    /// Name and BAR decode state of device `slot` (for diagnostics and tests).
    pub fn describe(&self, slot: u8) -> Option<(String, BarDecode)> {
        let s = self.slots.get(usize::from(slot))?.as_ref()?;
        Some((s.name.clone(), s.decoded))
    }

    fn refresh_decode(&mut self, slot: usize) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        let mut d = lock(&s.dev);
        for bar in 0..6 {
            let now = d.config().decoded_bar(bar);
            if now != s.decoded[bar] {
                d.bar_decode_changed(bar, s.decoded[bar], now);
                s.decoded[bar] = now;
            }
        }
    }

    fn device(&self, bdf: Bdf) -> Option<&Slot> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        self.slots.get(usize::from(bdf.device))?.as_ref()
    }

    /// Configuration read; absent functions read as all ones.
    pub fn config_read(&self, bdf: Bdf, offset: usize, data: &mut [u8]) {
        match self.device(bdf) {
            Some(s) => lock(&s.dev).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&mut self, bdf: Bdf, offset: usize, data: &[u8]) {
        let Some(s) = self.device(bdf) else { return };
        lock(&s.dev).write_config(offset, data);
        self.refresh_decode(usize::from(bdf.device));
    }

    fn bar_at(&self, addr: u64) -> Option<(&Slot, usize, u64)> {
        self.slots.iter().flatten().find_map(|s| {
            s.decoded.iter().enumerate().find_map(|(bar, d)| {
                let (base, size) = (*d)?;
                (addr >= base && addr - base < size).then_some((s, bar, addr - base))
            })
        })
    }

    /// BAR MMIO; false if no BAR decodes `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((s, bar, off)) = self.bar_at(addr) else {
            return false;
        };
        lock(&s.dev).read_bar(bar, off, data);
        true
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((s, bar, off)) = self.bar_at(addr) else {
            return false;
        };
        lock(&s.dev).write_bar(bar, off, data);
        true
    }

    fn cf8_target(&self) -> Option<(Bdf, usize)> {
        let a = self.config_address;
        (a & 0x8000_0000 != 0).then_some({
            (
                Bdf {
                    bus: (a >> 16) as u8,
                    device: ((a >> 11) & 0x1f) as u8,
                    function: ((a >> 8) & 7) as u8,
                },
                (a & 0xfc) as usize,
            )
        })
    }
}

/// Which view of the root bus a bus registration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciAccess {
    /// Ports 0xCF8..0xCFF.
    ConfigIo,
    /// The ECAM window (bus 0).
    Ecam,
    /// A BAR window starting at this guest-physical address.
    Window(u64),
}

/// Puts `root` on the buses: CF8/CFC configuration ports on `pio`; ECAM and the two BAR windows of `layout`
/// on `mmio`. Returns the shared root.
pub fn attach_to_buses(
    root: PciRoot,
    layout: PciLayout,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<Arc<Mutex<PciRoot>>, BusError> {
    let root = Arc::new(Mutex::new(root));
    let view = |access| {
        Arc::new(Mutex::new(PciBusDevice {
            root: root.clone(),
            access,
        }))
    };
    pio.insert(
        "pci-config-io",
        CONFIG_ADDRESS_PORT.into(),
        CONFIG_IO_LEN,
        view(PciAccess::ConfigIo),
    )?;
    mmio.insert("pci-ecam", layout.ecam, ECAM_SIZE, view(PciAccess::Ecam))?;
    mmio.insert(
        "pci-mem32",
        layout.mem32.0,
        layout.mem32.1,
        view(PciAccess::Window(layout.mem32.0)),
    )?;
    mmio.insert(
        "pci-mem64",
        layout.mem64.0,
        layout.mem64.1,
        view(PciAccess::Window(layout.mem64.0)),
    )?;
    Ok(root)
}

/// Adapts the root bus to the PIO/MMIO buses.
pub struct PciBusDevice {
    pub root: Arc<Mutex<PciRoot>>,
    pub access: PciAccess,
}

impl PciBusDevice {
    fn root(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ecam_target(offset: u64) -> Option<(Bdf, usize)> {
    (offset < ECAM_SIZE).then_some({
        (
            Bdf {
                bus: 0,
                device: ((offset >> 15) & 0x1f) as u8,
                function: ((offset >> 12) & 7) as u8,
            },
            (offset & 0xfff) as usize,
        )
    })
}

impl BusDevice for PciBusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let root = self.root();
        match self.access {
            PciAccess::ConfigIo => match offset {
                0 if data.len() == 4 => data.copy_from_slice(&root.config_address.to_le_bytes()),
                4..8 => match root.cf8_target() {
                    Some((bdf, reg)) => root.config_read(bdf, reg + (offset as usize - 4), data),
                    None => data.fill(0xff),
                },
                _ => data.fill(0xff),
            },
            PciAccess::Ecam => match ecam_target(offset) {
                Some((bdf, reg)) => root.config_read(bdf, reg, data),
                None => data.fill(0xff),
            },
            PciAccess::Window(base) => {
                if !root.mmio_read(base + offset, data) {
                    data.fill(0xff);
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        let mut root = self.root();
        match self.access {
            PciAccess::ConfigIo => match offset {
                // Only dword writes latch CONFIG_ADDRESS (byte writes to 0xCF9 are a chipset reset register
                // on real hardware; we ignore them).
                0 if data.len() == 4 => root.config_address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                4..8 => {
                    if let Some((bdf, reg)) = root.cf8_target() {
                        root.config_write(bdf, reg + (offset as usize - 4), data);
                    }
                }
                _ => {}
            },
            PciAccess::Ecam => {
                if let Some((bdf, reg)) = ecam_target(offset) {
                    root.config_write(bdf, reg, data);
                }
            }
            PciAccess::Window(base) => {
                root.mmio_write(base + offset, data);
            }
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{BAR0, BarInfo, BarKind};
    use super::*;

    struct Dummy {
        cfg: PciConfig,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.cfg
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.cfg.write(offset, data);
        }
        fn set_bar_addr(&mut self, bar: usize, addr: u64) {
            self.cfg.set_bar_addr(bar, addr);
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push(format!("w{bar}:{offset:#x}:{data:?}"));
        }
        fn bar_decode_changed(&mut self, bar: usize, old: Option<(u64, u64)>, new: Option<(u64, u64)>) {
            self.log.lock().unwrap().push(format!("bar{bar}:{old:x?}->{new:x?}"));
        }
    }

    fn dummy(log: &Arc<Mutex<Vec<String>>>, size: u64) -> Arc<Mutex<dyn PciDevice>> {
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff0000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        cfg.add_bar(
            0,
            BarInfo {
                size,
                kind: BarKind::Mem64,
                prefetchable: false,
            },
        )
        .unwrap();
        Arc::new(Mutex::new(Dummy { cfg, log: log.clone() }))
    }

    fn cf8(dev: &mut PciBusDevice, bdf_reg: u32) {
        dev.write(0, &(0x8000_0000 | bdf_reg).to_le_bytes());
    }

    #[test]
    fn enumeration_through_cf8_and_ecam() {
        let layout = PciLayout::for_ram(256 << 20);
        let root = Arc::new(Mutex::new(PciRoot::new(layout)));
        let log = Arc::default();
        let slot = root.lock().unwrap().add_device("d", dummy(&log, 0x4000)).unwrap();
        assert_eq!(slot, 1);
        let mut io = PciBusDevice {
            root: root.clone(),
            access: PciAccess::ConfigIo,
        };
        let mut ecam = PciBusDevice {
            root: root.clone(),
            access: PciAccess::Ecam,
        };
        let mut d = [0u8; 4];
        cf8(&mut io, 0);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36, "host bridge at 00.0");
        cf8(&mut io, 1 << 11);
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        // Byte read of the device ID's high byte through CFC+3.
        let mut b = [0u8; 1];
        io.read(7, &mut b);
        assert_eq!(b[0], 0x10);
        cf8(&mut io, 2 << 11);
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "empty slot");
        cf8(&mut io, (1 << 11) | (1 << 8));
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "function 1 absent");
        ecam.read((1 << 15) + BAR0 as u64, &mut d);
        assert_eq!(
            u32::from_le_bytes(d),
            0xc000_0004,
            "BAR0 from the 32-bit window, 64-bit type"
        );
        assert_eq!(log.lock().unwrap()[0], "bar0:None->Some((c0000000, 4000))");

        // MMIO dispatch by BAR, and relocation by the guest through ECAM.
        let mut win = PciBusDevice {
            root: root.clone(),
            access: PciAccess::Window(layout.mem32.0),
        };
        win.read(0x12, &mut b);
        assert_eq!(b[0], 0x12);
        ecam.write((1 << 15) + 4, &[0, 0]); // memory decoding off
        win.read(0x12, &mut b);
        assert_eq!(b[0], 0xff);
        ecam.write((1 << 15) + BAR0 as u64, &0xc010_0000u32.to_le_bytes());
        ecam.write((1 << 15) + 4, &[2, 0]);
        win.write(0x10_0008, &[7]);
        let log = log.lock().unwrap();
        assert_eq!(
            &log[1..],
            &[
                "bar0:Some((c0000000, 4000))->None",
                "bar0:None->Some((c0100000, 4000))",
                "w0:0x8:[7]"
            ]
        );
    }

    #[test]
    fn bar_allocation_falls_back_to_64bit_window() {
        let layout = PciLayout::for_ram(256 << 20);
        let mut root = PciRoot::new(layout);
        let log = Arc::default();
        root.add_device("a", dummy(&log, 0x1000_0000)).unwrap();
        root.add_device("b", dummy(&log, 0x1000_0000)).unwrap();
        root.add_device("c", dummy(&log, 0x1000_0000)).unwrap();
        let (_, bars) = root.describe(3).unwrap();
        assert_eq!(
            bars[0],
            Some((4 << 30, 0x1000_0000)),
            "third 256 MiB BAR goes above 4 GiB"
        );
        let err = root.add_device("d", dummy(&log, 32 << 30)).unwrap_err();
        assert!(matches!(err, PciError::NoBarSpace { .. }), "{err}");
    }
}
