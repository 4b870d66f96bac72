//! The i8042 keyboard controller, only for what guests use it for in a VM: probing and CPU reset
//! (command 0xFE on port 0x64), which stops the VM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::{I8042Device, Trigger};

use super::{BusDevice, DeviceAction};

/// Base port (data at +0, status/command at +4).
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u64 = 5;

struct FlagTrigger(Arc<AtomicBool>);

impl Trigger for FlagTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

pub struct I8042 {
    device: I8042Device<FlagTrigger>,
    reset: Arc<AtomicBool>,
}

impl Default for I8042 {
    fn default() -> Self {
        let reset = Arc::new(AtomicBool::new(false));
        Self {
            device: I8042Device::new(FlagTrigger(reset.clone())),
            reset,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.device.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The flag trigger cannot fail; other commands have no effect.
            let Ok(()) = self.device.write(off, value);
        }
        if self.reset.swap(false, Ordering::AcqRel) {
            DeviceAction::Reset
        } else {
            DeviceAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let mut d = I8042::default();
        assert_eq!(d.write(4, &[0x20]), DeviceAction::None); // read command byte
        assert_eq!(d.write(4, &[0xfe]), DeviceAction::Reset);
        assert_eq!(
            d.write(0, &[0xfe]),
            DeviceAction::None,
            "0xFE to the data port is not a reset"
        );
    }
}
