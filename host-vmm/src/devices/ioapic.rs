//! A userspace I/O APIC for VMs with a split irqchip (`KVM_CAP_SPLIT_IRQCHIP`: LAPICs in the kernel, IOAPIC
//! and PIC in the VMM), which Intel TDX guests require. Modelled on the 82093AA register interface with the
//! version-0x20 EOI register, 24 pins:
//!
//! - MMIO at [`IOAPIC_BASE`]: `IOREGSEL` (offset 0x00) selects a register, `IOWIN` (0x10) reads/writes it, `EOI`
//!   (0x40) takes a vector. Registers: 0x00 ID (bits 27:24), 0x01 version (0x20, max redirection entry 23 in
//!   bits 23:16), 0x02 arbitration (= ID), 0x10 + 2n / 0x11 + 2n the low/high half of redirection entry n.
//! - Redirection entry: vector 7:0, delivery mode 10:8, destination mode 11, delivery status 12 (read-only),
//!   polarity 13, remote IRR 14 (read-only), trigger mode 15 (1 = level), mask 16, extended destination ID
//!   55:49, destination 63:56. Reset: every entry masked.
//! - Lines are logical levels (asserted = `true`) regardless of polarity, as the device models report them.
//!   Edge pins latch a rising edge and deliver it once unmasked; level pins deliver while asserted, set remote
//!   IRR and wait for the guest's EOI of that vector — through the EOI register or, broadcast by the LAPIC,
//!   as `KVM_EXIT_IOAPIC_EOI` ([`Ioapic::end_of_interrupt`]) — before delivering again.
//! - Delivery is an MSI built from the entry (address 0xFEE0_0000 | destination << 12 | extended destination
//!   ID << 5 | destination mode << 2; data vector | delivery mode << 8 | level assert << 14 | trigger << 15),
//!   sent through [`MsiSink::send_msi`] (`KVM_SIGNAL_MSI` for a TD).
//! - After every redirection-table change the sink gets the table as MSI routes for GSIs 0..24
//!   ([`Ioapic::msi_routes`]): KVM scans those routes for level-triggered vectors to know which EOIs to send
//!   to userspace (`kvm_scan_ioapic_routes`), exactly as QEMU keeps its routes in sync with a split irqchip.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, DeviceAction};
use crate::hypervisor::IrqRoute;

/// Architectural MMIO base of the first IOAPIC (the MADT names it).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The MMIO window the device claims.
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const NUM_PINS: usize = 24;
/// Version 0x20 (has the EOI register, like QEMU's default IOAPIC).
pub const IOAPIC_VERSION: u32 = 0x20;

const REG_SELECT: u64 = 0x00;
const REG_WINDOW: u64 = 0x10;
const REG_EOI: u64 = 0x40;

const IND_ID: u8 = 0x00;
const IND_VERSION: u8 = 0x01;
const IND_ARB: u8 = 0x02;
const IND_REDTBL: u8 = 0x10;

const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Bits the guest cannot write.
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;

const MSI_BASE: u64 = 0xfee0_0000;

/// One message-signalled interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where the IOAPIC's interrupts go.
pub trait MsiSink: Send + Sync {
    fn send_msi(&self, msg: MsiMessage) -> Result<(), String>;
    /// The redirection table changed: these are the GSI routes that mirror it (see the module doc).
    fn update_routes(&self, routes: &[IrqRoute]) -> Result<(), String>;
}

/// Decoded redirection entry (for tests and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedirectionEntry(pub u64);

impl RedirectionEntry {
    pub fn vector(self) -> u8 {
        (self.0 & RTE_VECTOR) as u8
    }
    pub fn masked(self) -> bool {
        self.0 & RTE_MASKED != 0
    }
    pub fn level(self) -> bool {
        self.0 & RTE_LEVEL != 0
    }
    pub fn remote_irr(self) -> bool {
        self.0 & RTE_REMOTE_IRR != 0
    }

    /// The MSI this entry sends.
    pub fn msi(self) -> MsiMessage {
        let e = self.0;
        let dest = (e >> 56) & 0xff;
        let ext_dest = (e >> 49) & 0x7f;
        let dest_mode = (e >> 11) & 1;
        let delivery = ((e >> 8) & 7) as u32;
        let level = u32::from(self.level());
        MsiMessage {
            address: MSI_BASE | dest << 12 | ext_dest << 5 | dest_mode << 2,
            data: u32::from(self.vector()) | delivery << 8 | level << 14 | level << 15,
        }
    }
}

/// The IOAPIC state. Share it as `Arc<Mutex<Ioapic>>` between the MMIO bus, the EOI exit handler and the
/// interrupt lines.
pub struct Ioapic {
    id: u32,
    select: u8,
    redtbl: [u64; NUM_PINS],
    /// Pending requests: latched edges, or asserted level lines.
    irr: u32,
    /// Current line levels (edge detection).
    lines: u32,
    sink: Arc<dyn MsiSink>,
    /// Delivery failures so far (the guest cannot be told; logged once each).
    pub delivery_errors: u64,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("id", &self.id)
            .field("irr", &format_args!("{:#x}", self.irr))
            .field("lines", &format_args!("{:#x}", self.lines))
            .finish_non_exhaustive()
    }
}

impl Ioapic {
    /// An IOAPIC with APIC ID `id` (the MADT's), all entries masked.
    pub fn new(id: u8, sink: Arc<dyn MsiSink>) -> Self {
        Self {
            id: u32::from(id & 0xf),
            select: 0,
            redtbl: [RTE_MASKED; NUM_PINS],
            irr: 0,
            lines: 0,
            sink,
            delivery_errors: 0,
        }
    }

    pub fn entry(&self, pin: usize) -> Option<RedirectionEntry> {
        self.redtbl.get(pin).copied().map(RedirectionEntry)
    }

    /// The redirection table as MSI routes, GSI = pin. Masked pins get no route (KVM then never treats their
    /// vector as an IOAPIC vector).
    pub fn msi_routes(&self) -> Vec<IrqRoute> {
        self.redtbl
            .iter()
            .enumerate()
            .filter(|(_, e)| **e & RTE_MASKED == 0)
            .map(|(pin, e)| {
                let m = RedirectionEntry(*e).msi();
                IrqRoute::Msi {
                    gsi: pin as u32,
                    address_lo: m.address as u32,
                    address_hi: (m.address >> 32) as u32,
                    data: m.data,
                }
            })
            .collect()
    }

    /// Sets the logical level of `pin` (out-of-range pins are ignored).
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        if pin >= NUM_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if self.redtbl[pin] & RTE_LEVEL != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && !was {
            self.irr |= bit;
        }
        self.service();
    }

    /// An edge on `pin`: assert then deassert (what an eventfd-signalled device interrupt means).
    pub fn pulse(&mut self, pin: usize) {
        self.set_irq(pin, true);
        self.set_irq(pin, false);
    }

    /// The guest acknowledged `vector` (LAPIC EOI broadcast or the EOI register): clear remote IRR of the
    /// level-triggered entries with that vector and redeliver those whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for e in self.redtbl.iter_mut() {
            if RedirectionEntry(*e).vector() == vector && *e & RTE_LEVEL != 0 {
                *e &= !RTE_REMOTE_IRR;
            }
        }
        self.service();
    }

    /// Delivers every pending, unmasked request (level ones only without remote IRR).
    fn service(&mut self) {
        for pin in 0..NUM_PINS {
            let bit = 1u32 << pin;
            let e = self.redtbl[pin];
            if self.irr & bit == 0 || e & RTE_MASKED != 0 {
                continue;
            }
            if e & RTE_LEVEL != 0 {
                if e & RTE_REMOTE_IRR != 0 {
                    continue;
                }
                self.redtbl[pin] |= RTE_REMOTE_IRR;
            } else {
                self.irr &= !bit;
            }
            if let Err(err) = self.sink.send_msi(RedirectionEntry(e).msi()) {
                self.delivery_errors += 1;
                tracing::warn!("IOAPIC pin {pin}: delivering vector {}: {err}", e & RTE_VECTOR);
            }
        }
    }

    fn read_indirect(&self) -> u32 {
        match self.select {
            IND_ID | IND_ARB => self.id << 24,
            IND_VERSION => IOAPIC_VERSION | ((NUM_PINS as u32 - 1) << 16),
            sel if sel >= IND_REDTBL => {
                let idx = usize::from(sel - IND_REDTBL);
                match self.redtbl.get(idx / 2) {
                    Some(e) if idx % 2 == 0 => *e as u32,
                    Some(e) => (*e >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_indirect(&mut self, value: u32) {
        match self.select {
            IND_ID => self.id = (value >> 24) & 0xf,
            sel if sel >= IND_REDTBL => {
                let idx = usize::from(sel - IND_REDTBL);
                let Some(e) = self.redtbl.get_mut(idx / 2) else {
                    return;
                };
                let old = *e;
                let new = if idx % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                *e = (new & !RTE_READ_ONLY) | (old & RTE_READ_ONLY);
                // An edge-triggered entry has no remote IRR.
                if *e & RTE_LEVEL == 0 {
                    *e &= !RTE_REMOTE_IRR;
                }
                let pin = idx / 2;
                // A pin switched to level trigger takes the line's current level as its request.
                if *e & RTE_LEVEL != 0 {
                    let bit = 1u32 << pin;
                    self.irr = (self.irr & !bit) | (self.lines & bit);
                }
                if let Err(err) = self.sink.update_routes(&self.msi_routes()) {
                    tracing::warn!("IOAPIC: updating the GSI routes: {err}");
                }
                self.service();
            }
            // Version and arbitration are read-only.
            _ => {}
        }
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    Some(match data.len() {
        4 => u32::from_le_bytes(data.try_into().ok()?),
        1 => u32::from(*data.first()?),
        _ => return None,
    })
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            REG_SELECT => u32::from(self.select),
            REG_WINDOW => self.read_indirect(),
            _ => 0,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        // 32-bit accesses (the architectural width); a byte write to IOREGSEL is accepted too.
        let Some(value) = read_u32(data) else {
            return DeviceAction::None;
        };
        match offset {
            REG_SELECT => self.select = value as u8,
            REG_WINDOW if data.len() == 4 => self.write_indirect(value),
            REG_EOI if data.len() == 4 => self.end_of_interrupt(value as u8),
            _ => {}
        }
        DeviceAction::None
    }
}

/// Forwards device interrupts signalled on eventfds (the way our device models raise them) to IOAPIC pins as
/// edges, on one thread polling all lines. Stops within 50 ms after `stop` is set, after a last pass over
/// the lines.
pub fn spawn_line_forwarder(
    ioapic: Arc<Mutex<Ioapic>>,
    lines: Vec<(EventFd, usize)>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    const POLL_MS: i32 = 50;
    std::thread::Builder::new().name("ioapic-lines".into()).spawn(move || {
        let mut fds: Vec<libc::pollfd> = lines
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut last_pass = false;
        while !last_pass {
            // One more non-blocking pass after `stop`, so an edge raised just before it is not lost.
            last_pass = stop.load(Ordering::Acquire);
            let timeout = if last_pass { 0 } else { POLL_MS };
            // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfds whose descriptors are
            // owned by `lines` for the whole loop.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n <= 0 {
                if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                }
                continue;
            }
            for (p, (fd, pin)) in fds.iter_mut().zip(&lines) {
                if p.revents & libc::POLLIN != 0 && fd.read().is_ok() {
                    ioapic.lock().unwrap_or_else(|e| e.into_inner()).pulse(*pin);
                }
                p.revents = 0;
            }
        }
    })
}

#[cfg(test)]
#[path = "ioapic_tests.rs"]
mod tests;
