//! 16550A UART at 0x3f8 (vm-superio), with output to a log file and optionally stdout or a memory buffer.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, DeviceAction};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u64 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART interrupt through an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest serial output goes. Every sink gets every byte.
#[derive(Default)]
pub struct SerialSink {
    pub log: Option<LineWriter<File>>,
    pub stdout: bool,
    pub capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = self.log.as_mut() {
            log.write_all(buf)?;
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(buf)?;
            out.flush()?;
        }
        if let Some(c) = &self.capture {
            c.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = self.log.as_mut() {
            log.flush()?;
        }
        Ok(())
    }
}

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialSink>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, sink: SerialSink) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), sink),
        }
    }

    /// Flushes buffered log output (called when the VM stops).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.uart.write(off, value)
        {
            tracing::warn!("serial write at offset {off}: {e}");
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thr_bytes_reach_all_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let capture = Arc::new(Mutex::new(Vec::new()));
        let sink = SerialSink {
            log: Some(LineWriter::new(File::create(&path).unwrap())),
            stdout: false,
            capture: Some(capture.clone()),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, sink);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        dev.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        assert_eq!(*capture.lock().unwrap(), b"hi\n");
        // LSR (offset 5): transmitter empty bits set, so polling drivers proceed.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }
}
