//! The hardware-reduced ACPI power-management registers our FADT announces: the sleep control register
//! (S5 = power off) at [`ACPI_PM_PORT`] and the reset register at +1.

use super::{BusDevice, DeviceAction};
pub use crate::arch::x86_64::acpi::ACPI_PM_PORT;
use crate::arch::x86_64::acpi::{RESET_VALUE, SLP_TYP_S5};

pub const ACPI_PM_LEN: u64 = 2;
const SLP_EN: u8 = 1 << 5;

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
            0 if v & SLP_EN != 0 && (v >> 2) & 7 == SLP_TYP_S5 => DeviceAction::PowerOff,
            1 if v == RESET_VALUE => DeviceAction::Reset,
            _ => DeviceAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
