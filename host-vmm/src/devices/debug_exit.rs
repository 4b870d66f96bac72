//! A debug-exit port (isa-debug-exit style): a write of value `v` ends the VM with status `v`.
//! Test payloads use it to report their result. Unlike QEMU's isa-debug-exit the status is not shifted.

use super::{BusDevice, DeviceAction};

/// The port our payloads write their status to.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

#[derive(Debug, Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceAction {
        let mut buf = [0u8; 4];
        for (d, s) in buf.iter_mut().zip(data) {
            *d = *s;
        }
        DeviceAction::DebugExit(u32::from_le_bytes(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_any_width() {
        let mut d = DebugExit;
        assert_eq!(d.write(0, &[7]), DeviceAction::DebugExit(7));
        assert_eq!(d.write(0, &[0x34, 0x12]), DeviceAction::DebugExit(0x1234));
        assert_eq!(d.write(0, &[1, 0, 0, 0x80]), DeviceAction::DebugExit(0x8000_0001));
    }
}
