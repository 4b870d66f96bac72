//! Linux direct boot: load a bzImage or ELF vmlinux (linux-loader), the initrd and the command line, and build
//! the zero page (`struct boot_params`) with the e820 map for the 64-bit boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::layout::*;
use crate::memory::MMIO_HOLE_START;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    UnknownFormat(String),
    #[error("loading kernel {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("bzImage does not support the 64-bit boot protocol (xloadflags bit 0 clear)")]
    No64BitEntry,
    #[error("command line is {0} bytes; the limit is {1}")]
    CmdlineTooLong(usize, usize),
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("initrd of {size} bytes does not fit below {limit:#x} above the kernel end {kernel_end:#x}")]
    InitrdTooLarge { size: u64, limit: u64, kernel_end: u64 },
    #[error("writing {what} to guest memory at {addr:#x}: {source}")]
    Memory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// 64-bit entry point (guest-physical; identity-mapped).
    pub entry: u64,
    /// First byte after the loaded image.
    pub kernel_end: u64,
    /// The bzImage setup header (with `code32_start` updated), to copy into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Detects the format from the first bytes of the image.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.get(..4) == Some(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut file = open(path)?;
    let mut head = vec![0u8; 0x400];
    let n = read_up_to(&mut file, &mut head).map_err(|source| BootError::Read {
        path: name.clone(),
        source,
    })?;
    head.truncate(n);
    let format = detect_format(&head).ok_or_else(|| BootError::UnknownFormat(name.clone()))?;
    let load_err = |source| BootError::Load {
        path: name.clone(),
        source,
    };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.raw_value(),
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let hdr = r.setup_header.ok_or(BootError::No64BitEntry)?;
            if hdr.xloadflags & 1 == 0 {
                return Err(BootError::No64BitEntry);
            }
            // The 64-bit entry (startup_64) sits 0x200 bytes into the protected-mode kernel.
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.raw_value() + 0x200,
                kernel_end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    let mut total = 0;
    while total < buf.len() {
        let n = file.read(&mut buf[total..])?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(total)
}

/// Highest RAM address (exclusive) in the low region, i.e. below the MMIO hole.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1
}

/// Loads the initrd as high as possible in low RAM (page aligned, below `max_addr` inclusive, above the kernel).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    max_addr: u64,
) -> Result<LoadedInitrd, BootError> {
    let name = path.display().to_string();
    let mut file = open(path)?;
    let size = file.seek(SeekFrom::End(0)).map_err(|source| BootError::Read {
        path: name.clone(),
        source,
    })?;
    file.seek(SeekFrom::Start(0)).map_err(|source| BootError::Read {
        path: name.clone(),
        source,
    })?;
    let limit = low_ram_end(mem).min(max_addr.saturating_add(1));
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START));
    let addr = addr.ok_or(BootError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::Memory {
            what: "initrd",
            addr,
            source,
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong(cmdline.len() + 1, max));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::Memory {
            what: "command line",
            addr: CMDLINE_ADDR,
            source,
        })
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map for `ram` (the guest RAM ranges as `(start, len)`).
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for &(start, len) in ram {
        let end = start + len;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Inputs of the zero page.
#[derive(Debug, Clone)]
pub struct ZeroPageConfig<'a> {
    pub setup_header: Option<&'a setup_header>,
    pub cmdline_len: usize,
    pub initrd: Option<LoadedInitrd>,
    pub e820: &'a [(u64, u64, u32)],
}

/// Builds `struct boot_params` (4 KiB).
pub fn build_zero_page(cfg: &ZeroPageConfig<'_>) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.setup_header {
        params.hdr = *hdr;
    } else {
        // No setup header (ELF vmlinux): fill the fields the kernel checks itself.
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448; // "HdrS"
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff; // undefined loader
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cfg.cmdline_len as u32;
    if let Some(initrd) = cfg.initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let n = cfg.e820.len().min(params.e820_table.len());
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(cfg.e820.iter()) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = n as u8;
    params
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_slice(params.as_slice(), GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::Memory {
            what: "zero page",
            addr: ZERO_PAGE_ADDR,
            source,
        })
}

/// The initrd limit from the setup header (`initrd_addr_max`, protocol ≥ 2.03), or the protocol default.
pub fn initrd_addr_max(hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => 0x37ff_ffff,
    }
}

/// The command-line limit: `cmdline_size` from protocol 2.06, else 256 for bzImages; 64 KiB for ELF kernels.
pub fn cmdline_max(hdr: Option<&setup_header>) -> usize {
    match hdr {
        Some(h) if h.version >= 0x0206 => (h.cmdline_size as usize + 1).min(CMDLINE_MAX),
        Some(_) => 256,
        None => CMDLINE_MAX,
    }
}

const _: () = assert!(std::mem::size_of::<boot_params>() == 4096);

/// Guest memory limit for e820: RAM ranges as `(start, len)` from the memory object.
pub fn ram_layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_detection() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"MZ"), None);
    }

    #[test]
    fn e820_low_and_high() {
        let map = e820_map(&[(0, MMIO_HOLE_START), (crate::memory::MMIO_HOLE_END, 1 << 30)]);
        assert_eq!(
            map,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (0x10_0000, MMIO_HOLE_START - 0x10_0000, E820_RAM),
                (1 << 32, 1 << 30, E820_RAM),
            ]
        );
    }

    #[test]
    fn zero_page_fields_at_boot_protocol_offsets() {
        let e820 = e820_map(&[(0, 256 << 20)]);
        let zp = build_zero_page(&ZeroPageConfig {
            setup_header: None,
            cmdline_len: 12,
            initrd: Some(LoadedInitrd {
                addr: 0x0f00_0000,
                size: 0x1234,
            }),
            e820: &e820,
        });
        let b = zp.as_slice();
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(b[0x1e8], 3, "e820_entries");
        assert_eq!(&b[0x1fe..0x200], &[0x55, 0xaa], "boot_flag");
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(0x218), 0x0f00_0000, "ramdisk_image");
        assert_eq!(u32_at(0x21c), 0x1234, "ramdisk_size");
        assert_eq!(u32_at(0x228), CMDLINE_ADDR as u32, "cmd_line_ptr");
        assert_eq!(u32_at(0x238), 12, "cmdline_size");
        // e820_table at 0x2d0, 20-byte packed entries.
        assert_eq!(u64_at(0x2d0 + 20 * 2), 0x10_0000);
        assert_eq!(u64_at(0x2d0 + 20 * 2 + 8), (256 << 20) - 0x10_0000);
        assert_eq!(u32_at(0x2d0 + 20 * 2 + 16), E820_RAM);
    }

    #[test]
    fn cmdline_limits() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0", 256).unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(256), 256),
            Err(BootError::CmdlineTooLong(257, 256))
        ));
        assert!(matches!(write_cmdline(&mem, "a\0b", 256), Err(BootError::CmdlineNul)));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![0xabu8; 5000]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let r = load_initrd(&mem, &p, 0x20_0000, 0x37ff_ffff).unwrap();
        assert_eq!(
            r,
            LoadedInitrd {
                addr: (16 << 20) - 0x2000,
                size: 5000
            }
        );
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(r.addr + 4999)).unwrap();
        assert_eq!(b, [0xab]);
        let err = load_initrd(&mem, &p, (16 << 20) - 0x1000, 0x37ff_ffff).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
    }
}
