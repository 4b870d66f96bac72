//! Register-interface tests of the userspace IOAPIC. Expected values come from the 82093AA datasheet (register
//! layout, reset state) and the Intel SDM vol. 3 §11.11 (MSI address/data format), written out by hand.

use std::sync::{Arc, Mutex};

use super::*;

#[derive(Default)]
struct Recorder {
    msis: Mutex<Vec<MsiMessage>>,
    routes: Mutex<Vec<Vec<IrqRoute>>>,
}

impl MsiSink for Recorder {
    fn send_msi(&self, msg: MsiMessage) -> Result<(), String> {
        self.msis.lock().unwrap().push(msg);
        Ok(())
    }
    fn update_routes(&self, routes: &[IrqRoute]) -> Result<(), String> {
        self.routes.lock().unwrap().push(routes.to_vec());
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.msis.lock().unwrap())
    }
}

fn ioapic() -> (Ioapic, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    (Ioapic::new(2, rec.clone()), rec)
}

fn write_reg(io: &mut Ioapic, reg: u8, value: u32) {
    io.write(REG_SELECT, &u32::from(reg).to_le_bytes());
    io.write(REG_WINDOW, &value.to_le_bytes());
}

fn read_reg(io: &mut Ioapic, reg: u8) -> u32 {
    io.write(REG_SELECT, &u32::from(reg).to_le_bytes());
    let mut b = [0u8; 4];
    io.read(REG_WINDOW, &mut b);
    u32::from_le_bytes(b)
}

/// Programs entry `pin` (low then high half, as Linux does it unmasked last).
fn program(io: &mut Ioapic, pin: u8, low: u32, high: u32) {
    write_reg(io, 0x11 + 2 * pin, high);
    write_reg(io, 0x10 + 2 * pin, low);
}

#[test]
fn id_version_and_reset_state() {
    let (mut io, _) = ioapic();
    assert_eq!(read_reg(&mut io, 0x00), 2 << 24);
    // Version 0x20, maximum redirection entry 23 (0x17) in bits 23:16.
    assert_eq!(read_reg(&mut io, 0x01), 0x0017_0020);
    assert_eq!(read_reg(&mut io, 0x02), 2 << 24);
    // Every entry comes out of reset masked, everything else zero.
    for pin in 0..24u8 {
        assert_eq!(read_reg(&mut io, 0x10 + 2 * pin), 0x0001_0000, "pin {pin}");
        assert_eq!(read_reg(&mut io, 0x11 + 2 * pin), 0, "pin {pin}");
    }
    // The ID is writable (bits 27:24 only), the version is not.
    write_reg(&mut io, 0x00, 0xff00_0000);
    assert_eq!(read_reg(&mut io, 0x00), 0x0f00_0000);
    write_reg(&mut io, 0x01, 0);
    assert_eq!(read_reg(&mut io, 0x01), 0x0017_0020);
    // IOREGSEL reads back; registers past the table read 0.
    io.write(REG_SELECT, &[0x40]);
    let mut b = [0u8; 4];
    io.read(REG_SELECT, &mut b);
    assert_eq!(b, [0x40, 0, 0, 0]);
    assert_eq!(read_reg(&mut io, 0x40), 0);
}

#[test]
fn redirection_entries_read_back_without_writing_read_only_bits() {
    let (mut io, rec) = ioapic();
    // Vector 0x31, fixed, physical, level, active low, unmasked; destination APIC 3. The guest also tries to set
    // delivery status (12) and remote IRR (14), which are read-only.
    program(&mut io, 9, 0x0000_f031, 0x0300_0000);
    assert_eq!(read_reg(&mut io, 0x10 + 18), 0x0000_a031);
    assert_eq!(read_reg(&mut io, 0x11 + 18), 0x0300_0000);
    // Each table write pushed the routes; the last one has pin 9 as an MSI route for GSI 9.
    let routes = rec.routes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        routes,
        vec![IrqRoute::Msi {
            gsi: 9,
            address_lo: 0xfee0_3000,
            address_hi: 0,
            data: 0xc031,
        }]
    );
}

#[test]
fn msi_encoding_follows_the_sdm() {
    // Vector 0x41, lowest priority (001), logical destination 0x0f, edge: address 0xFEE0F004, data 0x0141.
    let e = RedirectionEntry(0x0f00_0000_0000_0941);
    assert_eq!(
        e.msi(),
        MsiMessage {
            address: 0xfee0_f004,
            data: 0x0141
        }
    );
    // Level-triggered: trigger (15) and assert (14) set. Extended destination ID bits 55:49 → address 11:5.
    let e = RedirectionEntry(0x0102_0000_0000_8023);
    assert_eq!(
        e.msi(),
        MsiMessage {
            address: 0xfee0_1020,
            data: 0xc023
        }
    );
}

#[test]
fn edge_pins_deliver_once_per_edge_and_latch_while_masked() {
    let (mut io, rec) = ioapic();
    // Pin 4 (COM1): vector 0x24, edge, destination 0.
    program(&mut io, 4, 0x0000_0024, 0);
    io.pulse(4);
    assert_eq!(
        rec.take(),
        vec![MsiMessage {
            address: 0xfee0_0000,
            data: 0x24
        }]
    );
    // Holding the line high is not a new edge.
    io.set_irq(4, true);
    io.set_irq(4, true);
    io.set_irq(4, false);
    assert_eq!(rec.take().len(), 1);
    // Masked: the edge is latched and delivered on unmask.
    write_reg(&mut io, 0x18, 0x0001_0024);
    io.pulse(4);
    assert!(rec.take().is_empty());
    write_reg(&mut io, 0x18, 0x0000_0024);
    assert_eq!(rec.take().len(), 1);
    // Out-of-range pins are ignored.
    io.pulse(24);
    io.pulse(usize::MAX);
    assert!(rec.take().is_empty());
}

#[test]
fn level_pins_set_remote_irr_until_eoi() {
    let (mut io, rec) = ioapic();
    program(&mut io, 10, 0x0000_8050, 0x0100_0000);
    io.set_irq(10, true);
    assert_eq!(
        rec.take(),
        vec![MsiMessage {
            address: 0xfee0_1000,
            data: 0xc050
        }]
    );
    assert!(io.entry(10).unwrap().remote_irr());
    assert_eq!(read_reg(&mut io, 0x10 + 20) & (1 << 14), 1 << 14);
    // Still asserted, remote IRR set: nothing more until the EOI.
    io.set_irq(10, true);
    assert!(rec.take().is_empty());
    // EOI of another vector changes nothing.
    io.end_of_interrupt(0x51);
    assert!(rec.take().is_empty());
    // EOI (broadcast from the LAPIC) while the line is still high: redelivered, remote IRR set again.
    io.end_of_interrupt(0x50);
    assert_eq!(rec.take().len(), 1);
    assert!(io.entry(10).unwrap().remote_irr());
    // The device deasserts; the EOI register (offset 0x40) clears remote IRR and nothing is redelivered.
    io.set_irq(10, false);
    io.write(REG_EOI, &0x50u32.to_le_bytes());
    assert!(!io.entry(10).unwrap().remote_irr());
    assert!(rec.take().is_empty());
    // Switching the entry to edge drops any remote IRR.
    io.set_irq(10, true);
    assert!(io.entry(10).unwrap().remote_irr());
    write_reg(&mut io, 0x10 + 20, 0x0000_0050);
    assert!(!io.entry(10).unwrap().remote_irr());
}

#[test]
fn masked_level_pin_delivers_when_unmasked_while_asserted() {
    let (mut io, rec) = ioapic();
    program(&mut io, 11, 0x0001_8060, 0);
    io.set_irq(11, true);
    assert!(rec.take().is_empty());
    write_reg(&mut io, 0x10 + 22, 0x0000_8060);
    assert_eq!(rec.take().len(), 1);
    // Deasserted before unmasking: nothing is delivered.
    let (mut io, rec) = ioapic();
    program(&mut io, 11, 0x0001_8060, 0);
    io.set_irq(11, true);
    io.set_irq(11, false);
    write_reg(&mut io, 0x10 + 22, 0x0000_8060);
    assert!(rec.take().is_empty());
}

#[test]
fn odd_accesses_are_ignored() {
    let (mut io, rec) = ioapic();
    program(&mut io, 1, 0x0000_0021, 0);
    // 2-byte and 8-byte writes to the window are not 32-bit: ignored.
    io.write(REG_SELECT, &[0x12]);
    io.write(REG_WINDOW, &[0xff, 0xff]);
    io.write(REG_WINDOW, &[0xff; 8]);
    assert_eq!(read_reg(&mut io, 0x12), 0x0000_0021);
    // Unknown offsets read 0.
    let mut b = [0xaa; 4];
    io.read(0x20, &mut b);
    assert_eq!(b, [0; 4]);
    assert!(rec.take().is_empty());
}

#[test]
fn device_interrupts_reach_the_sink_through_eventfd_lines() {
    let (mut io, rec) = ioapic();
    program(&mut io, 4, 0x0000_0024, 0);
    let io = Arc::new(Mutex::new(io));
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device_side = line.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t = spawn_line_forwarder(io.clone(), vec![(line, 4)], stop.clone()).unwrap();
    // What the serial device's interrupt trigger does.
    device_side.write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rec.msis.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    t.join().unwrap();
    assert_eq!(
        rec.take(),
        vec![MsiMessage {
            address: 0xfee0_0000,
            data: 0x24
        }]
    );
}
