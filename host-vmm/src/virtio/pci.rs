//! The virtio-pci modern transport (virtio 1.2 §4.1): vendor capabilities pointing into BAR 0 for the common
//! configuration, notifications, ISR status and device configuration, plus MSI-X in the same BAR and the
//! PCI-configuration access capability. Queue notifications are KVM ioeventfds on the notify addresses
//! (registered whenever BAR 0 decodes); a notify write that does exit (no ioeventfd) signals the same eventfd.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, DeviceMemory, Interrupt, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1, VirtioDevice, VirtioError, all_memory,
};
use crate::hypervisor::{IoEventAddress, Vm};
use crate::pci::PciDevice;
use crate::pci::config::{BAR0, BarInfo, BarKind, PciConfig, PciId};
use crate::pci::msix::{GsiRouter, MSG_CTRL_ENABLE, MSG_CTRL_FUNCTION_MASK, Msix, MsixError};

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// BAR 0 layout (ours).
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Queue `i` is notified at `NOTIFY_OFFSET + i * NOTIFY_MULTIPLIER`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
pub const BAR0_SIZE: u64 = 0x8000;
/// "No vector" in the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// `cfg_type` of the vendor capabilities.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_ID_VENDOR: u8 = 0x09;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("virtio-pci {name}: {source}")]
    Msix {
        name: String,
        #[source]
        source: MsixError,
    },
    #[error("virtio-pci {name}: creating a queue: {source}")]
    Queue {
        name: String,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("virtio-pci {name}: creating an eventfd: {source}")]
    EventFd {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("virtio-pci {name}: {source}")]
    Config {
        name: String,
        #[source]
        source: crate::pci::config::ConfigError,
    },
}

/// Interrupt state shared between the transport (vCPU threads) and the device worker.
struct Shared {
    isr: AtomicU8,
    /// The device reported an unrecoverable error since the last reset (DEVICE_NEEDS_RESET).
    needs_reset: AtomicBool,
    msix: Mutex<Msix>,
    vectors: Mutex<Vectors>,
}

struct Vectors {
    config: u16,
    queues: Vec<u16>,
}

impl Shared {
    fn raise(&self, isr_bit: u8, vector: u16) {
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        if vector != NO_VECTOR {
            self.msix.lock().unwrap_or_else(|p| p.into_inner()).trigger(vector);
        }
    }
}

struct PciInterrupt(Arc<Shared>);

impl Interrupt for PciInterrupt {
    fn queue(&self, index: u16) {
        let v = {
            let v = self.0.vectors.lock().unwrap_or_else(|p| p.into_inner());
            v.queues.get(usize::from(index)).copied().unwrap_or(NO_VECTOR)
        };
        self.0.raise(1, v);
    }
    fn config(&self) {
        let v = self.0.vectors.lock().unwrap_or_else(|p| p.into_inner()).config;
        self.0.raise(2, v);
    }
    fn needs_reset(&self) {
        // Only the first report interrupts the driver (a configuration change, §4.1.5.5 / §2.1.2).
        if !self.0.needs_reset.swap(true, Ordering::AcqRel) {
            self.config();
        }
    }
}

pub struct VirtioPci {
    name: String,
    cfg: PciConfig,
    device: Box<dyn VirtioDevice>,
    vm: Arc<dyn Vm>,
    mem: Arc<dyn DeviceMemory>,
    shared: Arc<Shared>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    max_sizes: Vec<u16>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    /// Base of BAR 0 while it decodes (the ioeventfds are registered there).
    bar0: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![CAP_ID_VENDOR, 0, (16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPci {
    /// A device of an ordinary VM: it may access all of `mem`.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        vm: Arc<dyn Vm>,
        router: Arc<GsiRouter>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        Self::with_memory(name, device, vm, router, all_memory(mem))
    }

    /// A device that may access only what `mem` hands out (a TD: its shared memory).
    pub fn with_memory(
        name: &str,
        device: Box<dyn VirtioDevice>,
        vm: Arc<dyn Vm>,
        router: Arc<GsiRouter>,
        mem: Arc<dyn DeviceMemory>,
    ) -> Result<Self, TransportError> {
        let cfg_err = |source| TransportError::Config {
            name: name.into(),
            source,
        };
        let ty = device.device_type();
        let class = match ty {
            super::TYPE_NET => 0x02_00_00,
            super::TYPE_BLOCK => 0x01_80_00,
            _ => 0xff_00_00,
        };
        let mut cfg = PciConfig::new(PciId {
            vendor: VIRTIO_PCI_VENDOR,
            device: DEVICE_ID_BASE + ty,
            revision: 1,
            class,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        });
        cfg.add_bar(
            0,
            BarInfo {
                size: BAR0_SIZE,
                kind: BarKind::Mem64,
                prefetchable: false,
            },
        )
        .map_err(cfg_err)?;
        let max_sizes = device.queue_max_sizes();
        let nq = max_sizes.len();
        let msix = Msix::new(nq as u16 + 1, router).map_err(|source| TransportError::Msix {
            name: name.into(),
            source,
        })?;
        cfg.add_capability(&vendor_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, &[]), &[])
            .map_err(cfg_err)?;
        cfg.add_capability(
            &vendor_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                (nq as u64) * u64::from(NOTIFY_MULTIPLIER),
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )
        .map_err(cfg_err)?;
        cfg.add_capability(&vendor_cap(CAP_ISR, ISR_OFFSET, 1, &[]), &[])
            .map_err(cfg_err)?;
        cfg.add_capability(&vendor_cap(CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, &[]), &[])
            .map_err(cfg_err)?;
        // PCI configuration access: bar (byte 4), offset, length and the data window are guest-writable.
        let pci_cfg_cap = cfg
            .add_capability(
                &vendor_cap(CAP_PCI_CFG, 0, 0, &[0; 4]),
                &[(4, 0xff), (8, u32::MAX), (12, u32::MAX), (16, u32::MAX)],
            )
            .map_err(cfg_err)?;
        let msix_cap = cfg
            .add_capability(
                &msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32),
                &[(0, u32::from(MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK) << 16)],
            )
            .map_err(cfg_err)?;
        let mut queues = Vec::with_capacity(nq);
        let mut queue_events = Vec::with_capacity(nq);
        for &size in &max_sizes {
            queues.push(Queue::new(size).map_err(|source| TransportError::Queue {
                name: name.into(),
                source,
            })?);
            queue_events.push(
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| TransportError::EventFd {
                    name: name.into(),
                    source,
                })?,
            );
        }
        Ok(Self {
            name: name.into(),
            cfg,
            device,
            vm,
            mem,
            shared: Arc::new(Shared {
                isr: AtomicU8::new(0),
                needs_reset: AtomicBool::new(false),
                msix: Mutex::new(msix),
                vectors: Mutex::new(Vectors {
                    config: NO_VECTOR,
                    queues: vec![NO_VECTOR; nq],
                }),
            }),
            msix_cap,
            pci_cfg_cap,
            max_sizes,
            queues,
            queue_events,
            bar0: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
        })
    }

    fn msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.shared.msix.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vectors(&self) -> std::sync::MutexGuard<'_, Vectors> {
        self.shared.vectors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device status the driver last wrote, with DEVICE_NEEDS_RESET if activation failed or the device
    /// reported an unrecoverable error since.
    pub fn status(&self) -> u8 {
        if self.shared.needs_reset.load(Ordering::Acquire) {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn notify_addr(base: u64, queue: usize) -> u64 {
        base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    fn set_ioevents(&mut self, base: Option<u64>, register: bool) {
        let Some(base) = base else { return };
        for (i, evt) in self.queue_events.iter().enumerate() {
            let addr = IoEventAddress::Mmio(Self::notify_addr(base, i));
            let r = if register {
                self.vm.register_ioevent(evt, addr)
            } else {
                self.vm.unregister_ioevent(evt, addr)
            };
            if let Err(e) = r {
                // Without the ioeventfd the notify write exits and write_bar signals the eventfd instead.
                tracing::warn!("{}: queue {i} ioeventfd: {e}", self.name);
            }
        }
    }

    /// `struct virtio_pci_common_cfg` as the guest currently sees it.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut c = [0u8; COMMON_LEN as usize];
        let features = self.device.features();
        let q = self.queues.get(usize::from(self.queue_select));
        let vectors = self.vectors();
        let put = |c: &mut [u8], off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(&mut c, 0x00, &self.device_feature_select.to_le_bytes());
        let sel = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        put(&mut c, 0x04, &sel.to_le_bytes());
        put(&mut c, 0x08, &self.driver_feature_select.to_le_bytes());
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut c, 0x0c, &drv.to_le_bytes());
        put(&mut c, 0x10, &vectors.config.to_le_bytes());
        put(&mut c, 0x12, &(self.queues.len() as u16).to_le_bytes());
        c[0x14] = self.status();
        c[0x15] = self.config_generation;
        put(&mut c, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = q {
            put(&mut c, 0x18, &q.size().to_le_bytes());
            let v = vectors
                .queues
                .get(usize::from(self.queue_select))
                .copied()
                .unwrap_or(NO_VECTOR);
            put(&mut c, 0x1a, &v.to_le_bytes());
            put(&mut c, 0x1c, &u16::from(q.ready()).to_le_bytes());
            put(&mut c, 0x1e, &self.queue_select.to_le_bytes()); // queue_notify_off = index
            put(&mut c, 0x20, &q.desc_table().to_le_bytes());
            put(&mut c, 0x28, &q.avail_ring().to_le_bytes());
            put(&mut c, 0x30, &q.used_ring().to_le_bytes());
        }
        c
    }

    /// Applies a write to the common configuration: the written bytes are merged into the current image and
    /// each field they touched is applied, which handles every access width the same way.
    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut img = self.common_image();
        let start = offset as usize;
        let Some(end) = start.checked_add(data.len()).filter(|&e| e <= img.len()) else {
            return;
        };
        img[start..end].copy_from_slice(data);
        let touched = |off: usize, len: usize| start < off + len && off < end;
        let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
        if touched(0x00, 4) {
            self.device_feature_select = u32_at(0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = u32_at(0x08);
        }
        if touched(0x0c, 4) && self.status & STATUS_FEATURES_OK == 0 {
            let v = u64::from(u32_at(0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touched(0x10, 2) {
            self.vectors().config = self.valid_vector(u16_at(0x10));
        }
        if touched(0x14, 1) {
            self.write_status(img[0x14]);
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(0x16);
        }
        let qi = usize::from(self.queue_select);
        // Queue registers are only writable before the driver is done (§4.1.4.3.2 / §2.6).
        if qi < self.queues.len() && self.status & STATUS_DRIVER_OK == 0 {
            if touched(0x1a, 2) {
                let v = self.valid_vector(u16_at(0x1a));
                if let Some(slot) = self.vectors().queues.get_mut(qi) {
                    *slot = v;
                }
            }
            let q = &mut self.queues[qi];
            if touched(0x18, 2) {
                q.set_size(u16_at(0x18));
            }
            if touched(0x1c, 2) {
                q.set_ready(u16_at(0x1c) == 1);
            }
            if touched(0x20, 8) {
                q.set_desc_table_address(Some(u32_at(0x20)), Some(u32_at(0x24)));
            }
            if touched(0x28, 8) {
                q.set_avail_ring_address(Some(u32_at(0x28)), Some(u32_at(0x2c)));
            }
            if touched(0x30, 8) {
                q.set_used_ring_address(Some(u32_at(0x30)), Some(u32_at(0x34)));
            }
        }
    }

    /// A vector register reads back NO_VECTOR if the vector does not exist (§4.1.5.1.2).
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix().vectors() { v } else { NO_VECTOR }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        let mut status = value;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                tracing::warn!(
                    "{}: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.name,
                    self.driver_features
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0
            && status & STATUS_FEATURES_OK != 0
            && let Err(e) = self.activate()
        {
            tracing::error!("{}: activation failed: {e}", self.name);
            status |= STATUS_DEVICE_NEEDS_RESET;
        }
        self.status = status;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let mem = self.mem.memory();
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&*mem) {
                return Err(VirtioError::Backend(format!(
                    "queue {i} is enabled but its rings are not in memory the device may access"
                )));
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (q, &max) in self.queues.iter().zip(&self.max_sizes) {
            queues.push(copy_queue(q, max)?);
        }
        let mut events = Vec::with_capacity(self.queue_events.len());
        for e in &self.queue_events {
            events.push(e.try_clone().map_err(VirtioError::EventFd)?);
        }
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events: events,
            interrupt: Arc::new(PciInterrupt(self.shared.clone())),
            features: self.driver_features,
        })
    }

    fn reset(&mut self) {
        self.device.reset();
        for (q, &max) in self.queues.iter_mut().zip(&self.max_sizes) {
            if let Ok(fresh) = Queue::new(max) {
                *q = fresh;
            }
        }
        for e in &self.queue_events {
            let _ = e.read();
        }
        {
            let mut v = self.vectors();
            v.config = NO_VECTOR;
            v.queues.iter_mut().for_each(|q| *q = NO_VECTOR);
        }
        self.shared.isr.store(0, Ordering::Release);
        self.shared.needs_reset.store(false, Ordering::Release);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    fn pci_cfg_window(&self) -> (usize, u64, usize) {
        let c = self.pci_cfg_cap;
        let bar = usize::from(self.cfg.read_u16(c + 4) as u8);
        let offset = u64::from(self.cfg.read_u32(c + 8));
        let len = (self.cfg.read_u32(c + 12) as usize).min(4);
        (bar, offset, len)
    }
}

/// The device's own copy of a queue the driver configured (the transport keeps its copy for register reads).
fn copy_queue(src: &Queue, max: u16) -> Result<Queue, VirtioError> {
    let mut q = Queue::new(max).map_err(|e| VirtioError::Backend(format!("creating a queue: {e}")))?;
    let halves = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    q.set_size(src.size());
    let (lo, hi) = halves(src.desc_table());
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = halves(src.avail_ring());
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = halves(src.used_ring());
    q.set_used_ring_address(lo, hi);
    q.set_ready(src.ready());
    Ok(q)
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_off = self.pci_cfg_cap + 16;
        if offset >= data_off && offset < data_off + 4 {
            let (bar, bar_off, len) = self.pci_cfg_window();
            let mut buf = [0u8; 4];
            if bar == 0
                && let Some(b) = buf.get_mut(..len)
            {
                self.read_bar(0, bar_off, b);
            }
            for (i, d) in data.iter_mut().enumerate() {
                *d = buf.get(offset - data_off + i).copied().unwrap_or(0);
            }
            return;
        }
        self.cfg.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.cfg.write(offset, data);
        let ctrl_off = self.msix_cap + 2;
        if offset < ctrl_off + 2 && ctrl_off < offset + data.len() {
            let ctrl = self.cfg.read_u16(ctrl_off);
            self.msix().set_control(ctrl);
        }
        let data_off = self.pci_cfg_cap + 16;
        if offset == data_off {
            let (bar, bar_off, len) = self.pci_cfg_window();
            if bar == 0
                && let Some(d) = data.get(..len)
            {
                self.write_bar(0, bar_off, d);
            }
        }
    }

    fn set_bar_addr(&mut self, bar: usize, addr: u64) {
        self.cfg.set_bar_addr(bar, addr);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_LEN => super::read_config_bytes(&self.common_image(), o, data),
            ISR_OFFSET => {
                // Reading the ISR acknowledges it (§4.1.4.5).
                if let Some(b) = data.first_mut() {
                    *b = self.shared.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix().table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => self.msix().pba_read(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_LEN => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_events.get(q)
                    && let Err(e) = evt.write(1)
                {
                    tracing::warn!("{}: signalling queue {q}: {e}", self.name);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix().table_write(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {}
        }
    }

    fn bar_decode_changed(&mut self, bar: usize, old: Option<(u64, u64)>, new: Option<(u64, u64)>) {
        if bar != 0 {
            return;
        }
        self.set_ioevents(old.map(|o| o.0), false);
        self.set_ioevents(new.map(|n| n.0), true);
        self.bar0 = new.map(|n| n.0);
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.device.reset();
    }
}

/// Offset of BAR 0 in configuration space (re-exported for tests and payload builders).
pub const BAR0_CONFIG_OFFSET: usize = BAR0;

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
