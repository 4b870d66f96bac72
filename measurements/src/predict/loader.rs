//! The Linux setup-header fields our VMM's loader patches before handing the bzImage to OVMF through fw_cfg
//! (ours; values chosen to equal QEMU's `x86_load_linux`, so OVMF sees what it sees under QEMU). OVMF
//! measures the Authenticode hash of the patched image into RTMR1, so the predictor applies the same patch.
//!
//! For boot protocol ≥ 2.02 with LOADED_HIGH (every kernel we ship; older kernels are rejected):
//!
//! | offset | field | value |
//! |---|---|---|
//! | 0x210 | `type_of_loader` | `0xb0` (QEMU) |
//! | 0x211 | `loadflags` | `|= 0x80` (CAN_USE_HEAP) |
//! | 0x224 | `heap_end_ptr` (u16) + `ext_loader_ver`, `ext_loader_type` | `0xfe00`, 0, 0 (u32 write: cmdline 0x20000 − real-mode base 0x10000 − 0x200) |
//! | 0x228 | `cmd_line_ptr` | `0x20000` |
//! | 0x218 | `ramdisk_image` | see below (only with an initrd) |
//! | 0x21c | `ramdisk_size` | initrd length |
//!
//! `ramdisk_image`: `initrd_max` = `u32::MAX` if `xloadflags` has XLF_CAN_BE_LOADED_ABOVE_4G (protocol
//! ≥ 2.12), else `initrd_addr_max` (0x22c; 0x37ffffff when 0 or protocol < 2.03); clamped to
//! `below_4g − ACPI_RESERVE − 1` where `below_4g = min(memory, 3 GiB)` (our RAM layout) and
//! `ACPI_RESERVE = 0x28000` (top of low RAM kept for firmware ACPI data, as QEMU does); then
//! `ramdisk_image = (initrd_max − initrd_len) & !0xfff`. Nothing else is written.

/// Value written to `type_of_loader`.
pub const TYPE_OF_LOADER: u8 = 0xb0;
/// Guest-physical address of the command line in the zero page's view.
pub const CMDLINE_ADDR: u32 = 0x2_0000;
/// Real-mode kernel base.
pub const REAL_MODE_BASE: u32 = 0x1_0000;
/// Low-memory bytes reserved below the top of low RAM.
pub const ACPI_RESERVE: u32 = 0x2_8000;
/// Bytes the setup header needs (up to `xloadflags`/`cmdline_size`).
const MIN_LEN: usize = 0x240;

const LOADFLAGS: usize = 0x211;
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 0x40;

/// Why a kernel cannot be loaded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LoaderError {
    #[error("kernel image is {0} bytes, shorter than a setup header")]
    TooShort(usize),
    #[error("kernel setup header: boot protocol {0:#x} without LOADED_HIGH is not supported (need ≥ 2.02, bzImage)")]
    OldProtocol(u16),
    #[error("initrd of {size} bytes does not fit below {max:#x}")]
    InitrdTooLarge { size: u64, max: u32 },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// Where the loader puts an initrd of `initrd_len` bytes (the `ramdisk_image` value).
pub fn initrd_addr(kernel: &[u8], initrd_len: u64, memory: u64) -> Result<u32, LoaderError> {
    let protocol = u16_at(kernel, 0x206);
    let mut max = if protocol >= 0x20c && u16_at(kernel, 0x236) & XLF_CAN_BE_LOADED_ABOVE_4G != 0 {
        u32::MAX
    } else if protocol >= 0x203 && u32_at(kernel, 0x22c) != 0 {
        u32_at(kernel, 0x22c)
    } else {
        0x37ff_ffff
    };
    let below_4g = memory.min(dstack_acpi::layout::MMIO_HOLE_START) as u32;
    let avail = below_4g.saturating_sub(ACPI_RESERVE);
    if max >= avail {
        max = avail.saturating_sub(1);
    }
    let size = u32::try_from(initrd_len)
        .ok()
        .filter(|&s| s < max)
        .ok_or(LoaderError::InitrdTooLarge { size: initrd_len, max })?;
    Ok((max - size) & !0xfff)
}

/// The kernel image with the setup-header fields above patched.
pub fn patch_kernel(kernel: &[u8], initrd_len: u64, memory: u64) -> Result<Vec<u8>, LoaderError> {
    if kernel.len() < MIN_LEN {
        return Err(LoaderError::TooShort(kernel.len()));
    }
    let protocol = u16_at(kernel, 0x206);
    let flags = kernel.get(LOADFLAGS).copied().unwrap_or(0);
    if protocol < 0x202 || flags & LOADED_HIGH == 0 {
        return Err(LoaderError::OldProtocol(protocol));
    }
    let mut k = kernel.to_vec();
    let mut put = |o: usize, v: &[u8]| {
        if let Some(d) = k.get_mut(o..o + v.len()) {
            d.copy_from_slice(v);
        }
    };
    put(0x210, &[TYPE_OF_LOADER]);
    put(LOADFLAGS, &[flags | CAN_USE_HEAP]);
    put(0x224, &(CMDLINE_ADDR - REAL_MODE_BASE - 0x200).to_le_bytes());
    put(0x228, &CMDLINE_ADDR.to_le_bytes());
    if initrd_len > 0 {
        put(0x218, &initrd_addr(kernel, initrd_len, memory)?.to_le_bytes());
        put(0x21c, &(initrd_len as u32).to_le_bytes());
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(protocol: u16, xlf: u16) -> Vec<u8> {
        let mut k = vec![0u8; 0x1000];
        k[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
        k[0x211] = LOADED_HIGH;
        k[0x236..0x238].copy_from_slice(&xlf.to_le_bytes());
        k
    }

    #[test]
    fn patches_exactly_the_documented_fields() {
        let k = header(0x20f, XLF_CAN_BE_LOADED_ABOVE_4G);
        let p = patch_kernel(&k, 0x10_0000, 2 << 30).unwrap();
        let changed: Vec<usize> = (0..k.len()).filter(|&i| k[i] != p[i]).collect();
        assert_eq!(changed, [0x210, 0x211, 0x219, 0x21a, 0x21b, 0x21e, 0x225, 0x22a]);
        assert_eq!(p[0x210], 0xb0);
        assert_eq!(p[0x211], 0x81);
        assert_eq!(u32_at(&p, 0x224), 0xfe00);
        assert_eq!(u32_at(&p, 0x228), 0x20000);
        // (2 GiB - 0x28000 - 1 - 1 MiB) rounded down to 4 KiB.
        assert_eq!(u32_at(&p, 0x218), 0x7fed_7000);
        assert_eq!(u32_at(&p, 0x21c), 0x10_0000);
    }

    #[test]
    fn initrd_placement_depends_on_low_memory_only() {
        let k = header(0x20f, XLF_CAN_BE_LOADED_ABOVE_4G);
        let at = |mem| initrd_addr(&k, 4096, mem).unwrap();
        assert_ne!(at(1 << 30), at(2 << 30));
        assert_eq!(at(3 << 30), at(8 << 30)); // above the 3 GiB hole start, low RAM is fixed
        // Without XLF, initrd_addr_max (0x22c) applies.
        let mut old = header(0x20a, 0);
        old[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        assert_eq!(initrd_addr(&old, 4096, 4 << 30).unwrap(), (0x37ff_ffff - 4096) & !0xfff);
    }

    #[test]
    fn rejects_bad_kernels_and_initrds() {
        assert_eq!(patch_kernel(&[0; 16], 0, 1 << 30), Err(LoaderError::TooShort(16)));
        assert_eq!(
            patch_kernel(&header(0x201, 0), 0, 1 << 30),
            Err(LoaderError::OldProtocol(0x201))
        );
        assert!(matches!(
            patch_kernel(&header(0x20f, 0x40), 1 << 31, 1 << 30),
            Err(LoaderError::InitrdTooLarge { .. })
        ));
    }
}
