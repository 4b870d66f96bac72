//! An address-range → device map used for both port I/O and MMIO.

use std::sync::{Arc, Mutex};

use super::DeviceAction;

/// A device on a bus. `offset` is relative to the base the device was registered at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device {name} at {base:#x}+{len:#x} overlaps {other} at {other_base:#x}+{other_len:#x}")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
        other_base: u64,
        other_len: u64,
    },
    #[error("device {name} has an empty or overflowing range {base:#x}+{len:#x}")]
    BadRange { name: String, base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    name: String,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices sorted by base address; ranges never overlap.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base+len)`.
    pub fn insert(
        &mut self,
        name: &str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::BadRange {
                name: name.into(),
                base,
                len,
            });
        };
        if let Some(o) = self.entries.iter().find(|e| base < e.base + e.len && e.base < end) {
            return Err(BusError::Overlap {
                name: name.into(),
                base,
                len,
                other: o.name.clone(),
                other_base: o.base,
                other_len: o.len,
            });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            pos,
            Entry {
                base,
                len,
                name: name.into(),
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        let idx = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        self.entries.get(idx).filter(|e| addr - e.base < e.len)
    }

    /// Name of the device covering `addr`, if any.
    pub fn device_name(&self, addr: u64) -> Option<&str> {
        self.find(addr).map(|e| e.name.as_str())
    }

    /// Dispatches a read; returns false if no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some(e) = self.find(addr) else { return false };
        // A device that panicked while holding its lock is still usable for the remaining accesses.
        e.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(addr - e.base, data);
        true
    }

    /// Dispatches a write; returns None if no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<DeviceAction> {
        let e = self.find(addr)?;
        Some(
            e.device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(addr - e.base, data),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
            self.writes.push((offset, data.to_vec()));
            DeviceAction::None
        }
    }

    #[test]
    fn dispatch_by_range() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert("b", 0x3f8, 8, b.clone()).unwrap();
        bus.insert("a", 0x60, 5, a.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.read(0x5f, &mut d));
        assert_eq!(bus.write(0x64, &[0xfe]), Some(DeviceAction::None));
        assert_eq!(bus.write(0x65, &[0xfe]), None);
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(b.lock().unwrap().writes.is_empty());
        assert_eq!(bus.device_name(0x3f8), Some("b"));
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert("x", 0x100, 0x10, d.clone()).unwrap();
        assert!(matches!(
            bus.insert("y", 0x10f, 1, d.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("y", 0xf8, 9, d.clone()),
            Err(BusError::Overlap { .. })
        ));
        bus.insert("z", 0x110, 1, d.clone()).unwrap();
        assert!(matches!(
            bus.insert("e", 0x200, 0, d.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert("o", u64::MAX, 2, d),
            Err(BusError::BadRange { .. })
        ));
    }
}
