//! MSI-X (PCI Local Bus 3.0 §6.8.2): the table and pending-bit array live in a BAR; each vector is backed by
//! a GSI whose KVM route is an MSI with the table entry's address/data, fired through an irqfd. A masked
//! vector records its interrupt in the PBA and fires when unmasked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::hypervisor::{HypervisorError, IOAPIC_PINS, IrqRoute, Vm, default_irqchip_routes};

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
/// Message control bits (in the high half of the capability's first dword).
pub const MSG_CTRL_ENABLE: u16 = 1 << 15;
pub const MSG_CTRL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("out of GSIs for MSI-X vectors")]
    NoGsi,
    #[error("GSI {0} is not an IOAPIC pin (0..24)")]
    NotAPin(u32),
    #[error("creating an irqfd eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

/// Owns the VM's GSI routing table (`KVM_SET_GSI_ROUTING` replaces all of it, so exactly one owner may set
/// it): the routes of GSIs below [`IOAPIC_PINS`] plus one MSI route per active MSI-X vector above them.
///
/// - In-kernel irqchip ([`GsiRouter::new`]): GSIs 0..24 are KVM's default PIC/IOAPIC pin routes.
/// - Split irqchip ([`GsiRouter::for_split_irqchip`], TDs): KVM rejects irqchip routes; GSIs 0..24 carry the
///   userspace IOAPIC's redirection table as MSI routes, which it hands over with
///   [`GsiRouter::set_ioapic_routes`] whenever the table changes.
pub struct GsiRouter {
    vm: Arc<dyn Vm>,
    inner: Mutex<RouterState>,
}

struct RouterState {
    next_gsi: u32,
    /// The routes of GSIs below [`IOAPIC_PINS`].
    pins: Vec<IrqRoute>,
    msi: BTreeMap<u32, IrqRoute>,
}

/// KVM's default maximum number of routes on x86 (`KVM_MAX_IRQ_ROUTES` is 4096).
const MAX_GSI: u32 = 4096;

impl GsiRouter {
    /// For a VM with KVM's in-kernel irqchip.
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        Self::with_pin_routes(vm, default_irqchip_routes())
    }

    /// For a VM with a split irqchip: no pin routes until the IOAPIC sets them.
    pub fn for_split_irqchip(vm: Arc<dyn Vm>) -> Self {
        Self::with_pin_routes(vm, Vec::new())
    }

    fn with_pin_routes(vm: Arc<dyn Vm>, pins: Vec<IrqRoute>) -> Self {
        Self {
            vm,
            inner: Mutex::new(RouterState {
                next_gsi: IOAPIC_PINS,
                pins,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// Replaces the routes of the IOAPIC pins (split irqchip); pushes the merged table to KVM on change.
    /// Routes outside GSIs 0..24 are refused, so they cannot shadow an MSI-X vector.
    pub fn set_ioapic_routes(&self, routes: &[IrqRoute]) -> Result<(), MsixError> {
        if let Some(r) = routes.iter().find(|r| r.gsi() >= IOAPIC_PINS) {
            return Err(MsixError::NotAPin(r.gsi()));
        }
        let mut s = self.lock();
        if s.pins == routes {
            return Ok(());
        }
        s.pins = routes.to_vec();
        self.push(&s)
    }

    /// The table KVM gets: pin routes, then the MSI-X routes in GSI order.
    fn push(&self, s: &RouterState) -> Result<(), MsixError> {
        let mut table = s.pins.clone();
        table.extend(s.msi.values().copied());
        self.vm.set_gsi_routing(&table)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    /// A fresh GSI above the IOAPIC pins.
    pub fn allocate_gsi(&self) -> Result<u32, MsixError> {
        let mut s = self.lock();
        if s.next_gsi >= MAX_GSI {
            return Err(MsixError::NoGsi);
        }
        s.next_gsi += 1;
        Ok(s.next_gsi - 1)
    }

    /// Sets (`Some`) or removes (`None`) the MSI route of `gsi`; pushes the table to KVM only on change.
    pub fn set_msi_route(&self, gsi: u32, route: Option<(u64, u32)>) -> Result<(), MsixError> {
        let mut s = self.lock();
        let new = route.map(|(addr, data)| IrqRoute::Msi {
            gsi,
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
        });
        if s.msi.get(&gsi) == new.as_ref() {
            return Ok(());
        }
        match new {
            Some(r) => s.msi.insert(gsi, r),
            None => s.msi.remove(&gsi),
        };
        self.push(&s)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.ctrl & CTRL_MASKED != 0
    }
}

/// The MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    router: Arc<GsiRouter>,
}

impl Msix {
    /// `vectors` vectors, each with a GSI and an irqfd registered with the VM. All start masked (as the
    /// specification requires after reset).
    pub fn new(vectors: u16, router: Arc<GsiRouter>) -> Result<Self, MsixError> {
        let n = usize::from(vectors);
        let mut gsis = Vec::with_capacity(n);
        let mut irqfds = Vec::with_capacity(n);
        for _ in 0..n {
            let gsi = router.allocate_gsi()?;
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(MsixError::EventFd)?;
            router.vm().register_irqfd(&fd, gsi)?;
            gsis.push(gsi);
            irqfds.push(fd);
        }
        Ok(Self {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            gsis,
            irqfds,
            router,
        })
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability body: ID, next (filled by the config space), message control (table size − 1), table
    /// offset/BIR and PBA offset/BIR.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = CAP_ID_MSIX;
        c[2..4].copy_from_slice(&(self.vectors().saturating_sub(1) & 0x7ff).to_le_bytes());
        c[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        c[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        c
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote message control: apply enable / function mask.
    pub fn set_control(&mut self, control: u16) {
        let (was_enabled, was_masked) = (self.enabled, self.function_masked);
        self.enabled = control & MSG_CTRL_ENABLE != 0;
        self.function_masked = control & MSG_CTRL_FUNCTION_MASK != 0;
        if (was_enabled, was_masked) != (self.enabled, self.function_masked) {
            for v in 0..self.entries.len() {
                self.update(v);
            }
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries.get(v).is_some_and(|e| !e.masked())
    }

    /// Re-derives the route of vector `v` and fires a pending interrupt that became deliverable.
    fn update(&mut self, v: usize) {
        let (Some(e), Some(&gsi)) = (self.entries.get(v).copied(), self.gsis.get(v)) else {
            return;
        };
        let route = self
            .deliverable(v)
            .then(|| ((u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo), e.data));
        if let Err(err) = self.router.set_msi_route(gsi, route) {
            tracing::warn!("MSI-X vector {v}: updating its route: {err}");
        }
        if self.deliverable(v) && self.pending.get(v).copied().unwrap_or(false) {
            self.pending[v] = false;
            self.fire(v);
        }
    }

    fn fire(&self, v: usize) {
        if let Some(fd) = self.irqfds.get(v)
            && let Err(e) = fd.write(1)
        {
            tracing::warn!("MSI-X vector {v}: irqfd write: {e}");
        }
    }

    /// Raises vector `v`. Returns false if MSI-X is disabled or `v` does not exist (the caller may fall back
    /// to polling-visible state such as the ISR).
    pub fn trigger(&mut self, v: u16) -> bool {
        let v = usize::from(v);
        if !self.enabled || v >= self.entries.len() {
            return false;
        }
        if self.deliverable(v) {
            self.fire(v);
        } else {
            self.pending[v] = true;
        }
        true
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(value) = self.table_dword(offset & !3) {
            let shift = (offset & 3) * 8;
            for (i, b) in data
                .iter_mut()
                .enumerate()
                .take(4usize.saturating_sub((offset & 3) as usize))
            {
                *b = (value >> (shift + 8 * i as u64)) as u8;
            }
            // 8-byte reads of an entry's address (or data + control) get the next dword too.
            if data.len() == 8 && offset & 7 == 0 {
                let hi = self.table_dword(offset + 4).unwrap_or(0);
                data[4..8].copy_from_slice(&hi.to_le_bytes());
            }
        }
    }

    fn table_dword(&self, offset: u64) -> Option<u32> {
        let e = self.entries.get((offset / ENTRY_SIZE) as usize)?;
        Some(match offset % ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            _ => e.ctrl,
        })
    }

    /// A guest write to the table: dword or qword accesses (§6.8.2: other sizes are undefined; ignored).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        match data.len() {
            4 => self.write_dword(offset, u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            8 => {
                self.write_dword(offset, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                self.write_dword(offset + 4, u32::from_le_bytes([data[4], data[5], data[6], data[7]]));
            }
            n => tracing::debug!("MSI-X table write of {n} bytes at {offset:#x} ignored"),
        }
    }

    fn write_dword(&mut self, offset: u64, value: u32) {
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get_mut(v) else { return };
        match offset % ENTRY_SIZE {
            0 => e.addr_lo = value,
            4 => e.addr_hi = value,
            8 => e.data = value,
            _ => e.ctrl = value & CTRL_MASKED,
        }
        // Address/data of an unmasked vector may change under us (allowed); keep the route current.
        self.update(v);
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first_bit = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first_bit + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    /// Back to the post-reset state: disabled, every vector masked, nothing pending, no routes.
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        for v in 0..self.entries.len() {
            self.entries[v] = Entry {
                ctrl: CTRL_MASKED,
                ..Default::default()
            };
            self.pending[v] = false;
            self.update(v);
        }
    }

    /// The GSIs backing the vectors (for tests and diagnostics).
    pub fn gsis(&self) -> &[u32] {
        &self.gsis
    }

    #[cfg(test)]
    pub(crate) fn irqfd(&self, v: usize) -> &EventFd {
        &self.irqfds[v]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Hypervisor;
    use crate::hypervisor::fake::{Call, FakeHypervisor};

    fn msix(vectors: u16) -> (FakeHypervisor, Msix) {
        let hv = FakeHypervisor::new(vec![]);
        let vm = hv.create_vm().unwrap();
        let m = Msix::new(vectors, Arc::new(GsiRouter::new(vm))).unwrap();
        (hv, m)
    }

    fn msi_routes(hv: &FakeHypervisor) -> Vec<Vec<IrqRoute>> {
        hv.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::SetGsiRouting(r) => Some(r.into_iter().filter(|r| r.gsi() >= 24).collect()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn vectors_get_gsis_and_irqfds() {
        let (hv, m) = msix(3);
        assert_eq!(m.gsis(), &[24, 25, 26]);
        let irqfds: Vec<Call> = hv
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::RegisterIrqfd { .. }))
            .collect();
        assert_eq!(
            irqfds,
            vec![
                Call::RegisterIrqfd { gsi: 24 },
                Call::RegisterIrqfd { gsi: 25 },
                Call::RegisterIrqfd { gsi: 26 }
            ]
        );
        let cap = m.capability(0, 0x4000, 0x5000);
        assert_eq!(cap[0], 0x11);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2, "table size is N-1");
        assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 0x4000);
    }

    #[test]
    fn route_follows_enable_and_mask_and_pending_fires_on_unmask() {
        let (hv, mut m) = msix(2);
        // Program vector 1 while masked: no route yet.
        m.table_write(16, &0xfee0_0000u32.to_le_bytes());
        m.table_write(20, &0u32.to_le_bytes());
        m.table_write(24, &0x4041u32.to_le_bytes());
        assert!(msi_routes(&hv).is_empty());
        assert!(!m.trigger(1), "disabled MSI-X does not take interrupts");
        m.set_control(MSG_CTRL_ENABLE);
        assert!(msi_routes(&hv).is_empty(), "still masked");
        // Masked vector: the interrupt becomes pending (PBA bit 1) and fires on unmask.
        assert!(m.trigger(1));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert_eq!(m.irqfd(1).read().ok(), None, "nothing fired while masked");
        m.table_write(28, &0u32.to_le_bytes());
        let routes = msi_routes(&hv);
        let last = routes.last().unwrap();
        assert_eq!(
            last,
            &vec![IrqRoute::Msi {
                gsi: 25,
                address_lo: 0xfee0_0000,
                address_hi: 0,
                data: 0x4041
            }]
        );
        assert_eq!(m.irqfd(1).read().unwrap(), 1, "pending interrupt delivered on unmask");
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        // The full table always carries the irqchip defaults (KVM_SET_GSI_ROUTING replaces everything).
        let full = hv.calls().into_iter().rev().find_map(|c| match c {
            Call::SetGsiRouting(r) => Some(r),
            _ => None,
        });
        assert_eq!(full.unwrap().len(), 16 + 24 + 1);
        // Delivered directly now.
        assert!(m.trigger(1));
        assert_eq!(m.irqfd(1).read().unwrap(), 1);
        // Function mask removes the route; reading the table back gives what was written.
        m.set_control(MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK);
        assert_eq!(msi_routes(&hv).last().unwrap(), &Vec::<IrqRoute>::new());
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        let mut d = [0u8; 4];
        m.table_read(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
        m.table_read(4096, &mut d);
        assert_eq!(d, [0; 4], "beyond the table");
        m.reset();
        m.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked after reset");
        assert!(!m.enabled());
    }
}
