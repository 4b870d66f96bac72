//! The TD's ACPI power button: PM1 port I/O (in a TD a `TDVMCALL<IO>` that KVM turns into an ordinary port exit)
//! and the SCI through the userspace IOAPIC, then the control socket the manager's ShutdownVm uses.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::run::attach_pm1;
use crate::devices::acpi_pm::{PWRBTN, SCI_IRQ};
use crate::devices::ioapic::{Ioapic, MsiMessage, MsiSink, spawn_line_forwarder};
use crate::devices::{Bus, BusDevice, DeviceAction};
use crate::hypervisor::IrqRoute;

#[derive(Default)]
struct Sent(Mutex<Vec<MsiMessage>>);

impl MsiSink for Sent {
    fn send_msi(&self, msg: MsiMessage) -> Result<(), String> {
        self.0.lock().unwrap().push(msg);
        Ok(())
    }
    fn update_routes(&self, _: &[IrqRoute]) -> Result<(), String> {
        Ok(())
    }
}

fn read16(pio: &Bus, port: u64) -> u16 {
    let mut b = [0u8; 2];
    assert!(pio.read(port, &mut b), "port {port:#x} is served");
    u16::from_le_bytes(b)
}

/// ACPI 6.5 §4.8.3.1 on the TD's port bus: the OS enables PWRBTN, the host presses, the SCI arrives as the
/// MSI Linux programmed into IOAPIC pin 9; the status is write-1-to-clear; S5 in PM1_CNT powers off.
#[test]
fn td_power_button_raises_the_sci_on_ioapic_pin_9() {
    let mut pio = Bus::new();
    let (button, sci_line) = attach_pm1(&mut pio).unwrap();
    let sent = Arc::new(Sent::default());
    let ioapic = Arc::new(Mutex::new(Ioapic::new(1, sent.clone())));
    {
        // Linux programs pin 9 from the MADT's SCI override: edge, active high, vector 0x29, unmasked.
        let mut io = ioapic.lock().unwrap();
        io.write(0x00, &(0x10u32 + 2 * u32::from(SCI_IRQ)).to_le_bytes());
        io.write(0x10, &0x29u32.to_le_bytes());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let fwd = spawn_line_forwarder(ioapic, vec![(sci_line, usize::from(SCI_IRQ))], stop.clone()).unwrap();

    // Pressed before the OS enabled the event: latched, no interrupt.
    button.press();
    assert_eq!(read16(&pio, 0x600) & PWRBTN, PWRBTN);
    std::thread::sleep(Duration::from_millis(150));
    assert!(sent.0.lock().unwrap().is_empty(), "no SCI while PWRBTN_EN is clear");
    // The OS enables PWRBTN_EN: the pending status raises the SCI.
    assert_eq!(pio.write(0x602, &PWRBTN.to_le_bytes()), Some(DeviceAction::None));
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent.0.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    fwd.join().unwrap();
    assert_eq!(
        sent.0.lock().unwrap().first().copied(),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x29
        })
    );
    // The OS acknowledges (write 1 to clear) and powers off through PM1_CNT (SLP_TYP 5 of our \_S5, SLP_EN).
    pio.write(0x600, &PWRBTN.to_le_bytes());
    assert_eq!(read16(&pio, 0x600) & PWRBTN, 0);
    assert_eq!(read16(&pio, 0x604) & 1, 1, "SCI_EN: always in ACPI mode");
    let s5: u16 = (5 << 10) | (1 << 13);
    assert_eq!(pio.write(0x604, &s5.to_le_bytes()), Some(DeviceAction::PowerOff));
}

/// `boot_td` serves the power button on `--control-socket` (what `manager::shutdown::press_power_button`
/// talks to), and the firmware's and OS's PM1 accesses arrive as port exits in the vCPU loop.
#[test]
fn boot_td_serves_the_power_button_on_the_control_socket() {
    use super::TdxConfig;
    use super::fw_cfg::DirectBoot;
    use super::run::boot_td;
    use super::tests::{fake_tdx_host, synthetic_tdvf};
    use crate::devices::serial::SerialSink;
    use crate::hypervisor::fake::{Call, ScriptedExit};
    use crate::vcpu::VmExit;

    let fw = synthetic_tdvf();
    let mut kernel = vec![0u8; 0x3000];
    kernel[0x1f1] = 3;
    kernel[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    kernel[0x211] = 0x01;
    let hv = fake_tdx_host();
    let s5: u16 = (5 << 10) | (1 << 13);
    hv.script(
        0,
        [
            // ICH9 LPC PMBASE through CF8/CFC (OVMF's AcpiTimerLib), then the OS powers off through PM1_CNT.
            ScriptedExit::IoOut {
                port: 0xcf8,
                data: (0x8000_0000u32 | (0x1f << 11) | 0x40).to_le_bytes().to_vec(),
            },
            ScriptedExit::IoIn { port: 0xcfc, len: 4 },
            ScriptedExit::IoOut {
                port: 0x604,
                data: s5.to_le_bytes().to_vec(),
            },
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("vmm-control.sock");
    let boot = DirectBoot {
        kernel: &kernel,
        initrd: b"",
        cmdline: "console=ttyS0",
    };
    let cfg = TdxConfig::new(&fw, 256 << 20, 1);
    let outcome = boot_td(
        &hv,
        &cfg,
        &boot,
        &Default::default(),
        SerialSink::default(),
        None,
        Some(&control),
        Some(Duration::from_secs(20)),
    )
    .unwrap();
    assert!(matches!(outcome, VmExit::PowerOff), "{outcome:?}");
    assert!(hv.calls().contains(&Call::IoInResult {
        vcpu: 0,
        port: 0xcfc,
        data: 0x601u32.to_le_bytes().to_vec()
    }));
    let reply = crate::control::send(&control, crate::control::POWER_BUTTON, Duration::from_secs(5)).unwrap();
    assert_eq!(reply, "OK");
}
