//! ACPI power-management registers.
//!
//! - [`AcpiPm`]: the hardware-reduced registers — the sleep control register (S5 = power off) at
//!   [`ACPI_PM_PORT`] and the reset register at +1 (the reset register stays in both models).
//! - [`Pm1`]: the fixed-hardware registers of `PmModel::FixedHardware` (ACPI 6.5 §4.8): the PM1a event block
//!   (PM1_STS, PM1_EN) at [`PM1_EVT_PORT`], the PM1a control block right after it and the 32-bit PM timer at
//!   [`PM_TMR_PORT`]. The host presses the fixed-feature power button through a [`PowerButton`] handle:
//!   `PWRBTN_STS` is set, and while `PWRBTN_STS & PWRBTN_EN` the SCI is asserted; status bits are
//!   write-1-to-clear. The SCI is delivered as a pulse on GSI 9 at each rising edge of that condition (the
//!   MADT declares it edge-triggered).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, DeviceAction};
pub use crate::arch::x86_64::acpi::ACPI_PM_PORT;
pub use crate::arch::x86_64::acpi::{PM_TMR_PORT, PM1_EVT_PORT, SCI_IRQ};
use crate::arch::x86_64::acpi::{RESET_VALUE, SLP_TYP_S5};

pub const ACPI_PM_LEN: u64 = 2;
/// `SLP_EN` of the hardware-reduced sleep control register.
const SLEEP_CTL_SLP_EN: u8 = 1 << 5;

#[derive(Debug, Default)]
pub struct AcpiPm;

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; nothing to report.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        let Some(&v) = data.first() else {
            return DeviceAction::None;
        };
        match offset {
            0 if v & SLEEP_CTL_SLP_EN != 0 && (v >> 2) & 7 == SLP_TYP_S5 => DeviceAction::PowerOff,
            1 if v == RESET_VALUE => DeviceAction::Reset,
            _ => DeviceAction::None,
        }
    }
}

/// Ports `PM1_EVT_PORT..+12`: PM1_STS (0), PM1_EN (2), PM1_CNT (4), reserved (6), PM_TMR (8).
pub const PM1_LEN: u64 = 12;
/// `PWRBTN_STS` / `PWRBTN_EN` (bit 8 of PM1_STS / PM1_EN).
pub const PWRBTN: u16 = 1 << 8;
/// PM1_CNT `SCI_EN`: always set (no SMI_CMD, the platform is always in ACPI mode).
pub const SCI_EN: u16 = 1;
/// PM1_CNT `SLP_EN` (write-only: starts the sleep transition).
pub const SLP_EN: u16 = 1 << 13;
/// PM timer frequency (ACPI 6.5 §4.8.3.3).
pub const PM_TIMER_HZ: u128 = 3_579_545;

/// The fixed-hardware PM1 registers and PM timer.
pub struct Pm1 {
    sts: u16,
    en: u16,
    /// SLP_TYP as last written (SCI_EN reads as set, SLP_EN as clear).
    cnt: u16,
    start: Instant,
    sci: Option<EventFd>,
    sci_asserted: bool,
    sci_pulses: u64,
}

impl Pm1 {
    /// `sci`: an eventfd registered as irqfd for GSI [`SCI_IRQ`] (None in tests without a VM).
    pub fn new(sci: Option<EventFd>) -> Self {
        Pm1 {
            sts: 0,
            en: 0,
            cnt: 0,
            start: Instant::now(),
            sci,
            sci_asserted: false,
            sci_pulses: 0,
        }
    }

    /// The fixed-feature power button was pressed.
    pub fn press_power_button(&mut self) {
        self.sts |= PWRBTN;
        self.update_sci();
    }

    /// Whether the SCI condition (an enabled status bit) holds.
    pub fn sci_asserted(&self) -> bool {
        self.sci_asserted
    }

    /// SCI pulses delivered so far.
    pub fn sci_pulses(&self) -> u64 {
        self.sci_pulses
    }

    fn update_sci(&mut self) {
        let level = self.sts & self.en & PWRBTN != 0;
        if level && !self.sci_asserted {
            self.sci_pulses += 1;
            if let Some(fd) = &self.sci
                && let Err(e) = fd.write(1)
            {
                tracing::warn!("raising the ACPI SCI: {e}");
            }
        }
        self.sci_asserted = level;
    }

    fn timer(&self) -> u32 {
        // 32-bit counter (TMR_VAL_EXT): wraps every ~20 minutes like the hardware one.
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }

    fn byte(&self, offset: u64, timer: u32) -> u8 {
        let reg = |v: u16, hi: bool| if hi { (v >> 8) as u8 } else { v as u8 };
        match offset {
            0 | 1 => reg(self.sts, offset == 1),
            2 | 3 => reg(self.en, offset == 3),
            4 | 5 => reg((self.cnt & !SLP_EN) | SCI_EN, offset == 5),
            8..=11 => (timer >> (8 * (offset - 8))) as u8,
            _ => 0,
        }
    }
}

impl BusDevice for Pm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let timer = self.timer();
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.byte(offset + i as u64, timer);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        let mut cnt_written = false;
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            let shift = if off % 2 == 1 { 8 } else { 0 };
            let bits = u16::from(b) << shift;
            let mask = 0xffu16 << shift;
            match off {
                0 | 1 => self.sts &= !bits, // write 1 to clear
                2 | 3 => self.en = (self.en & !mask) | bits,
                4 | 5 => {
                    self.cnt = (self.cnt & !mask) | bits;
                    cnt_written = true;
                }
                _ => {} // reserved, PM timer (read-only)
            }
        }
        let mut action = DeviceAction::None;
        if cnt_written && self.cnt & SLP_EN != 0 {
            self.cnt &= !SLP_EN;
            if ((self.cnt >> 10) & 7) as u8 == SLP_TYP_S5 {
                action = DeviceAction::PowerOff;
            }
        }
        self.update_sci();
        action
    }
}

/// A handle the VMM's control thread uses to press the power button of a running VM.
#[derive(Clone)]
pub struct PowerButton(pub Arc<Mutex<Pm1>>);

impl PowerButton {
    pub fn press(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).press_power_button();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read16(d: &mut Pm1, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    /// ACPI 6.5 §4.8.3.1: PWRBTN_STS is set by a press, raises the SCI only while PWRBTN_EN is set, and is
    /// cleared by writing 1 (writing 0 leaves it).
    #[test]
    fn power_button_status_enable_and_sci() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = Pm1::new(Some(fd.try_clone().unwrap()));
        d.press_power_button();
        assert_eq!(read16(&mut d, 0) & PWRBTN, PWRBTN, "status latched");
        assert!(!d.sci_asserted(), "not enabled: no SCI");
        assert!(fd.read().is_err(), "no interrupt yet");
        // The OS enables the event: the pending status raises the SCI now.
        assert_eq!(d.write(2, &PWRBTN.to_le_bytes()), DeviceAction::None);
        assert!(d.sci_asserted());
        assert_eq!(fd.read().unwrap(), 1, "one SCI pulse");
        // Writing 0 does not clear; writing 1 does, and the SCI condition drops.
        d.write(0, &0u16.to_le_bytes());
        assert_eq!(read16(&mut d, 0) & PWRBTN, PWRBTN);
        d.write(0, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut d, 0), 0);
        assert!(!d.sci_asserted());
        // A second press while enabled raises a new SCI; a byte-wide W1C on the high byte clears it.
        d.press_power_button();
        assert_eq!(fd.read().unwrap(), 1);
        d.write(1, &[0x01]);
        assert_eq!(read16(&mut d, 0), 0);
        assert_eq!(d.sci_pulses(), 2);
        assert_eq!(read16(&mut d, 2), PWRBTN, "enable register reads back");
    }

    #[test]
    fn pm1_control_sci_en_and_s5() {
        let mut d = Pm1::new(None);
        assert_eq!(read16(&mut d, 4) & SCI_EN, SCI_EN, "always in ACPI mode");
        // SLP_TYP without SLP_EN: nothing happens; S3 with SLP_EN: not supported.
        assert_eq!(d.write(4, &(5u16 << 10).to_le_bytes()), DeviceAction::None);
        assert_eq!(d.write(4, &((3u16 << 10) | SLP_EN).to_le_bytes()), DeviceAction::None);
        assert_eq!(read16(&mut d, 4) & SLP_EN, 0, "SLP_EN reads as 0");
        assert_eq!(
            d.write(4, &((u16::from(SLP_TYP_S5) << 10) | SLP_EN).to_le_bytes()),
            DeviceAction::PowerOff
        );
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz() {
        let mut d = Pm1::new(None);
        let mut b = [0u8; 4];
        d.read(8, &mut b);
        let t0 = u32::from_le_bytes(b);
        std::thread::sleep(std::time::Duration::from_millis(50));
        d.read(8, &mut b);
        let ticks = u32::from_le_bytes(b).wrapping_sub(t0);
        // 50 ms ≈ 178977 ticks; allow scheduling delay.
        assert!((170_000..1_000_000).contains(&ticks), "{ticks} ticks in ≥50 ms");
        d.write(8, &[0xff; 4]);
        d.read(8, &mut b);
        assert!(u32::from_le_bytes(b).wrapping_sub(t0) >= ticks, "read-only");
    }

    #[test]
    fn s5_and_reset() {
        let mut d = AcpiPm;
        assert_eq!(d.write(0, &[(5 << 2) | 0x20]), DeviceAction::PowerOff);
        assert_eq!(d.write(0, &[5 << 2]), DeviceAction::None, "SLP_EN clear");
        assert_eq!(
            d.write(0, &[(3 << 2) | 0x20]),
            DeviceAction::None,
            "S3 is not supported"
        );
        assert_eq!(d.write(1, &[1]), DeviceAction::Reset);
        assert_eq!(d.write(1, &[2]), DeviceAction::None);
    }
}
