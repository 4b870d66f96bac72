//! A PCI function's 256-byte configuration space: header type 0, BARs with size masks (so BAR sizing by
//! writing all ones works the way hardware does), and a capability list. Writes go through a per-dword mask:
//! read-only bits keep their value whatever the guest writes.

/// Offsets in the type-0 header.
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_PTR: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command register bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is valid.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// Size of conventional configuration space.
pub const CONFIG_SIZE: usize = 256;
const DWORDS: usize = CONFIG_SIZE / 4;
/// Capabilities start right after the type-0 header.
const FIRST_CAP: usize = 0x40;

/// How a memory BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    /// Occupies this BAR register and the next one.
    Mem64,
}

/// A BAR the device declared: its size (a power of two ≥ 16) and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// Identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code (base class << 16 | subclass << 8 | prog-if).
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is out of range, already used, or its size {1:#x} is not a power of two ≥ 16")]
    BadBar(usize, u64),
    #[error("capability of {0} bytes does not fit in configuration space")]
    NoRoomForCapability(usize),
}

/// Configuration space of one function.
#[derive(Clone)]
pub struct PciConfig {
    regs: [u32; DWORDS],
    wmask: [u32; DWORDS],
    bars: [Option<BarInfo>; 6],
    next_cap: usize,
    last_cap_next: Option<usize>,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(VENDOR_ID + 2)))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfig {
    /// A type-0 header with `id`, no BARs and no capabilities. Memory decoding and bus mastering are writable;
    /// the interrupt line is a scratch register for the OS.
    pub fn new(id: PciId) -> Self {
        let mut c = Self {
            regs: [0; DWORDS],
            wmask: [0; DWORDS],
            bars: [None; 6],
            next_cap: FIRST_CAP,
            last_cap_next: None,
        };
        c.regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        c.regs[REVISION / 4] = u32::from(id.revision) | (id.class << 8);
        c.regs[SUBSYSTEM_VENDOR_ID / 4] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        c.wmask[COMMAND / 4] = u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        c.wmask[INTERRUPT_LINE / 4] = 0xff;
        c
    }

    fn read_dword(&self, index: usize) -> u32 {
        self.regs.get(index).copied().unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `offset`; bytes beyond the 256-byte space read as zero (extended space of a
    /// device without extended capabilities).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i;
            *b = (self.read_dword(off / 4) >> ((off % 4) * 8)) as u8;
        }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A guest write: only bits set in the write mask change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i;
            let (idx, shift) = (off / 4, (off % 4) * 8);
            let (Some(reg), Some(&mask)) = (self.regs.get_mut(idx), self.wmask.get(idx)) else {
                continue;
            };
            let m = (mask >> shift) & 0xff;
            let old = (*reg >> shift) & 0xff;
            let new = (old & !m) | (u32::from(b) & m);
            *reg = (*reg & !(0xff << shift)) | (new << shift);
        }
    }

    /// Sets a register from the device side, bypassing the write mask.
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(offset / 4) {
            *r = value;
        }
    }

    /// Declares BAR `index` (a 64-bit BAR also uses `index + 1`).
    pub fn add_bar(&mut self, index: usize, bar: BarInfo) -> Result<(), ConfigError> {
        let regs_needed = if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        let ok = bar.size.is_power_of_two()
            && bar.size >= 16
            && index + regs_needed <= 6
            && (index..index + regs_needed).all(|i| self.bars[i].is_none() && !self.is_bar_upper_half(i))
            && (bar.kind == BarKind::Mem64 || bar.size <= 1 << 31);
        if !ok {
            return Err(ConfigError::BadBar(index, bar.size));
        }
        let type_bits = match bar.kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 => 0b100,
        } | if bar.prefetchable { 0b1000 } else { 0 };
        let mask = !(bar.size - 1);
        let reg = BAR0 / 4 + index;
        self.regs[reg] = type_bits;
        self.wmask[reg] = (mask as u32) & !0xf;
        if bar.kind == BarKind::Mem64 {
            self.wmask[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    fn is_bar_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some(b) if b.kind == BarKind::Mem64)
    }

    pub fn bar_info(&self, index: usize) -> Option<BarInfo> {
        self.bars.get(index).copied().flatten()
    }

    /// Programs BAR `index` with `addr` (the firmware's job; the guest may move it later).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bar_info(index) else { return };
        let reg = BAR0 / 4 + index;
        self.regs[reg] = (self.regs[reg] & 0xf) | (addr as u32 & !0xf);
        if bar.kind == BarKind::Mem64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
    }

    /// The address BAR `index` currently holds (whatever the guest wrote, e.g. all ones while sizing).
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bar_info(index)?;
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.regs[reg] & !0xf);
        let high = match bar.kind {
            BarKind::Mem64 => u64::from(self.regs[reg + 1]) << 32,
            BarKind::Mem32 => 0,
        };
        Some(high | low)
    }

    /// Where BAR `index` decodes right now: its address if memory decoding is enabled.
    pub fn decoded_bar(&self, index: usize) -> Option<(u64, u64)> {
        if self.read_u16(COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        let size = self.bar_info(index)?.size;
        let addr = self.bar_addr(index)?;
        // A BAR that wraps the address space (all ones during sizing with decoding on) decodes nothing.
        addr.checked_add(size).map(|_| (addr, size))
    }

    /// Appends a capability (`body` starts with the capability ID; the next-pointer byte is filled in) and
    /// returns its offset. `writable` lists (offset within the capability, mask) dwords the guest may change.
    pub fn add_capability(&mut self, body: &[u8], writable: &[(usize, u32)]) -> Result<usize, ConfigError> {
        let len = body.len().max(2).next_multiple_of(4);
        let off = self.next_cap;
        if off + len > CONFIG_SIZE {
            return Err(ConfigError::NoRoomForCapability(body.len()));
        }
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(off + i, b);
        }
        self.set_byte(off + 1, 0);
        match self.last_cap_next {
            Some(prev) => self.set_byte(prev, off as u8),
            None => {
                self.set_byte(CAPABILITIES_PTR, off as u8);
                let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
                self.set_byte(STATUS, status as u8);
            }
        }
        for &(o, mask) in writable {
            if let Some(w) = self.wmask.get_mut((off + o) / 4) {
                *w |= mask;
            }
        }
        self.last_cap_next = Some(off + 1);
        self.next_cap = off + len;
        Ok(off)
    }

    fn set_byte(&mut self, off: usize, b: u8) {
        if let Some(r) = self.regs.get_mut(off / 4) {
            let shift = (off % 4) * 8;
            *r = (*r & !(0xff << shift)) | (u32::from(b) << shift);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x010000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn header_and_readonly_bits() {
        let mut c = PciConfig::new(id());
        assert_eq!(c.read_u32(0), 0x1042_1af4);
        assert_eq!(c.read_u32(8), 0x0100_0001);
        c.write(0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_u32(0), 0x1042_1af4, "IDs are read-only");
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(
            c.read_u16(COMMAND),
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
    }

    /// The sizing protocol (PCI Local Bus 3.0 §6.2.5.1): write all ones, read back, size = ~(value & ~0xf) + 1.
    #[test]
    fn bar_sizing_64bit() {
        let mut c = PciConfig::new(id());
        c.add_bar(
            0,
            BarInfo {
                size: 0x8000,
                kind: BarKind::Mem64,
                prefetchable: false,
            },
        )
        .unwrap();
        c.set_bar_addr(0, 0xc000_8000);
        assert_eq!(c.read_u32(BAR0), 0xc000_8004);
        assert_eq!(c.read_u32(BAR0 + 4), 0);
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        let lo = c.read_u32(BAR0);
        let hi = c.read_u32(BAR0 + 4);
        assert_eq!(lo & 0xf, 0b0100, "64-bit, non-prefetchable");
        let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        assert_eq!((!mask).wrapping_add(1), 0x8000);
        c.write(COMMAND, &[COMMAND_MEMORY as u8, 0]);
        assert_eq!(c.decoded_bar(0), None, "all-ones address wraps: decodes nothing");
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.decoded_bar(0), Some((0x1_d000_0000, 0x8000)));
        assert!(
            c.add_bar(
                1,
                BarInfo {
                    size: 16,
                    kind: BarKind::Mem32,
                    prefetchable: false
                }
            )
            .is_err()
        );
        assert!(
            c.add_bar(
                2,
                BarInfo {
                    size: 24,
                    kind: BarKind::Mem32,
                    prefetchable: false
                }
            )
            .is_err()
        );
    }

    #[test]
    fn capability_chain() {
        let mut c = PciConfig::new(id());
        let a = c.add_capability(&[0x09, 0, 4, 1], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0], &[(0, 0xc000_0000)])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_u32(CAPABILITIES_PTR) & 0xff, 0x40);
        let mut b1 = [0u8; 2];
        c.read(0x40, &mut b1);
        assert_eq!(b1, [0x09, 0x44]);
        c.read(0x44, &mut b1);
        assert_eq!(b1, [0x11, 0x00]);
        c.write(0x44, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_u32(0x44), 0xc000_0011, "only the enable/mask bits are writable");
        let mut big = [0u8; 8];
        c.read(0x1000, &mut big);
        assert_eq!(big, [0; 8]);
    }
}
