//! A QEMU-compatible fw_cfg device (traditional port-I/O interface: selector at 0x510, data at 0x511), which
//! OVMF uses for direct kernel boot: kernel setup + body, initrd, command line and the ACPI table-loader files.
//!
//! Key numbers and the file-directory layout follow QEMU's `qemu_fw_cfg.h` (signature "QEMU" at key 0, feature
//! bitmap at 1, directory at 0x19 as a big-endian count of `{u32 size BE, u16 select BE, u16 reserved,
//! char name[56]}` sorted by name, files from key 0x20). The DMA interface is not offered (feature bit 1
//! clear), so OVMF falls back to byte-wise port reads.
//!
//! What goes in is built by the same code the measurement predictor runs: the kernel is patched by
//! `dstack_measurements::predict::loader::patch_kernel` (RTMR1 hashes that image) and the ACPI files come
//! from `VmShape::acpi_fw_cfg()` (the predictor's function; RTMR0 hashes those files).

use std::collections::BTreeMap;

use dstack_measurements::predict::VmShape;
use dstack_measurements::predict::loader::{LoaderError, patch_kernel};

use crate::devices::{BusDevice, DeviceAction};

/// Port of the 16-bit selector register; the 8-bit data register is the next port.
pub const PORT_BASE: u16 = 0x510;
/// Ports the device occupies (selector 0x510-0x511 overlaps data at 0x511, as on QEMU's i440fx/q35).
pub const PORT_LEN: u64 = 2;

pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_RAM_SIZE: u16 = 0x03;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_KERNEL_SIZE: u16 = 0x08;
pub const KEY_INITRD_SIZE: u16 = 0x0b;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_KERNEL_DATA: u16 = 0x11;
pub const KEY_INITRD_DATA: u16 = 0x12;
pub const KEY_CMDLINE_SIZE: u16 = 0x14;
pub const KEY_CMDLINE_DATA: u16 = 0x15;
pub const KEY_SETUP_SIZE: u16 = 0x17;
pub const KEY_SETUP_DATA: u16 = 0x18;
pub const KEY_FILE_DIR: u16 = 0x19;
pub const KEY_FILE_FIRST: u16 = 0x20;
/// Longest file name, including its NUL.
pub const MAX_FILE_PATH: usize = 56;

/// Errors building the fw_cfg content.
#[derive(Debug, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file name {0:?} is longer than 55 bytes")]
    NameTooLong(String),
    #[error("fw_cfg file {0:?} added twice")]
    Duplicate(String),
    #[error("fw_cfg item of {0} bytes does not fit the u32 size field")]
    TooLarge(usize),
    #[error("kernel: {0}")]
    Kernel(#[from] LoaderError),
    #[error("ACPI: {0}")]
    Acpi(#[from] dstack_acpi::tables::AcpiError),
}

/// The device: items by key, the selected item and the read position in it.
#[derive(Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: BTreeMap<String, u16>,
    selected: u16,
    position: usize,
}

impl std::fmt::Debug for FwCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: BTreeMap<u16, usize> = self.items.iter().map(|(k, v)| (*k, v.len())).collect();
        f.debug_struct("FwCfg")
            .field("item_sizes", &sizes)
            .field("files", &self.files)
            .field("selected", &self.selected)
            .finish()
    }
}

impl FwCfg {
    /// A device with the signature and the feature bitmap (traditional interface only).
    pub fn new() -> Self {
        let mut cfg = Self::default();
        cfg.items.insert(KEY_SIGNATURE, b"QEMU".to_vec());
        cfg.items.insert(KEY_ID, 1u32.to_le_bytes().to_vec());
        cfg.items.insert(KEY_FILE_DIR, 0u32.to_be_bytes().to_vec());
        cfg
    }

    pub fn add_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        u32::try_from(data.len()).map_err(|_| FwCfgError::TooLarge(data.len()))?;
        self.items.insert(key, data);
        Ok(())
    }

    /// Adds a named file; keys are assigned in insertion order from 0x20, the directory is sorted by name.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.len() >= MAX_FILE_PATH {
            return Err(FwCfgError::NameTooLong(name.into()));
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        let key = KEY_FILE_FIRST + self.files.len() as u16;
        self.add_item(key, data)?;
        self.files.insert(name.to_owned(), key);
        let dir = self.directory();
        self.items.insert(KEY_FILE_DIR, dir);
        Ok(key)
    }

    fn directory(&self) -> Vec<u8> {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &self.files {
            let size = self.items.get(key).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; MAX_FILE_PATH];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        dir
    }

    /// The content of `key` (for tests and diagnostics).
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&key).map(Vec::as_slice)
    }

    /// The key of a named file.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        self.files.get(name).copied()
    }
}

/// What OVMF boots directly.
#[derive(Clone, Copy)]
pub struct DirectBoot<'a> {
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub cmdline: &'a str,
}

impl std::fmt::Debug for DirectBoot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBoot")
            .field("kernel_len", &self.kernel.len())
            .field("initrd_len", &self.initrd.len())
            .field("cmdline", &self.cmdline)
            .finish()
    }
}

/// The fw_cfg content for an OVMF direct boot of `boot` on a VM of `shape`.
pub fn for_direct_boot(boot: &DirectBoot<'_>, shape: &VmShape) -> Result<FwCfg, FwCfgError> {
    let mut cfg = FwCfg::new();
    let patched = patch_kernel(boot.kernel, boot.initrd.len() as u64, shape.memory_bytes)?;
    // Like QEMU: the real-mode part (setup_sects + 1 sectors, 4 when the field is 0) goes to SETUP_DATA, the
    // rest to KERNEL_DATA; OVMF concatenates them again into the image it measures and starts.
    let setup_sects = match patched.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = ((setup_sects + 1) * 512).min(patched.len());
    let (setup, body) = patched.split_at(setup_len);
    let size = |b: &[u8]| (b.len() as u32).to_le_bytes().to_vec();
    cfg.add_item(KEY_SETUP_SIZE, size(setup))?;
    cfg.add_item(KEY_SETUP_DATA, setup.to_vec())?;
    cfg.add_item(KEY_KERNEL_SIZE, size(body))?;
    cfg.add_item(KEY_KERNEL_DATA, body.to_vec())?;
    cfg.add_item(KEY_INITRD_SIZE, size(boot.initrd))?;
    cfg.add_item(KEY_INITRD_DATA, boot.initrd.to_vec())?;
    let mut cmdline = boot.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    cfg.add_item(KEY_CMDLINE_SIZE, size(&cmdline))?;
    cfg.add_item(KEY_CMDLINE_DATA, cmdline)?;
    cfg.add_item(KEY_RAM_SIZE, shape.memory_bytes.to_le_bytes().to_vec())?;
    let cpus = (shape.vcpus as u16).to_le_bytes().to_vec();
    cfg.add_item(KEY_NB_CPUS, cpus.clone())?;
    cfg.add_item(KEY_MAX_CPUS, cpus)?;
    let acpi = shape.acpi_fw_cfg()?;
    cfg.add_file(dstack_acpi::fw_cfg::RSDP_FILE, acpi.rsdp)?;
    cfg.add_file(dstack_acpi::fw_cfg::TABLES_FILE, acpi.tables)?;
    cfg.add_file(dstack_acpi::fw_cfg::LOADER_FILE, acpi.table_loader)?;
    Ok(cfg)
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 1 {
            data.fill(0);
            return;
        }
        let item = self.items.get(&self.selected).map(Vec::as_slice).unwrap_or_default();
        for b in data.iter_mut() {
            *b = item.get(self.position).copied().unwrap_or(0);
            self.position = self.position.saturating_add(1);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceAction {
        // A 16-bit write to the selector picks an item and rewinds; writes to items are not supported.
        if offset == 0 && data.len() == 2 {
            self.selected = u16::from_le_bytes([data[0], data[1]]);
            self.position = 0;
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the device the way OVMF's QemuFwCfgLib does: select, then read the data port byte by byte.
    fn read_item(dev: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        dev.write(0, &key.to_le_bytes());
        let mut out = vec![0u8; len];
        for b in out.iter_mut() {
            let mut one = [0u8];
            dev.read(1, &mut one);
            *b = one[0];
        }
        out
    }

    fn u32_item(dev: &mut FwCfg, key: u16) -> usize {
        u32::from_le_bytes(read_item(dev, key, 4).try_into().unwrap()) as usize
    }

    fn synthetic_kernel() -> Vec<u8> {
        let mut k: Vec<u8> = (0..0x3000).map(|i| (i % 253) as u8).collect();
        k[0x1f1] = 3; // setup_sects: real-mode part = 4 × 512 bytes
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x211] = 0x01; // LOADED_HIGH
        k[0x236..0x238].copy_from_slice(&0x40u16.to_le_bytes());
        k
    }

    #[test]
    fn serves_what_ovmf_reads_for_a_direct_boot() {
        let kernel = synthetic_kernel();
        let initrd = vec![0x5a; 5000];
        let shape = VmShape {
            vcpus: 2,
            memory_bytes: 2 << 30,
        };
        let boot = DirectBoot {
            kernel: &kernel,
            initrd: &initrd,
            cmdline: "console=ttyS0",
        };
        let mut dev = for_direct_boot(&boot, &shape).unwrap();

        assert_eq!(read_item(&mut dev, KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(u32_item(&mut dev, KEY_ID), 1, "traditional interface, no DMA");

        // Setup + kernel, concatenated, are exactly the image the RTMR1 predictor hashes.
        let setup_len = u32_item(&mut dev, KEY_SETUP_SIZE);
        let kernel_len = u32_item(&mut dev, KEY_KERNEL_SIZE);
        assert_eq!(setup_len, 4 * 512);
        let mut image = read_item(&mut dev, KEY_SETUP_DATA, setup_len);
        image.extend(read_item(&mut dev, KEY_KERNEL_DATA, kernel_len));
        assert_eq!(image, patch_kernel(&kernel, initrd.len() as u64, 2 << 30).unwrap());
        assert_eq!(image[0x210], 0xb0, "type_of_loader patched");

        assert_eq!(u32_item(&mut dev, KEY_INITRD_SIZE), 5000);
        assert_eq!(read_item(&mut dev, KEY_INITRD_DATA, 5000), initrd);
        assert_eq!(u32_item(&mut dev, KEY_CMDLINE_SIZE), 14);
        assert_eq!(read_item(&mut dev, KEY_CMDLINE_DATA, 14), b"console=ttyS0\0");

        // The directory (parsed here by hand) lists the three ACPI files, sorted, with the RTMR0 inputs.
        let count = u32::from_be_bytes(read_item(&mut dev, KEY_FILE_DIR, 4).try_into().unwrap()) as usize;
        let dir = read_item(&mut dev, KEY_FILE_DIR, 4 + count * 64);
        let acpi = shape.acpi_fw_cfg().unwrap();
        let mut names = Vec::new();
        for entry in dir[4..].chunks(64) {
            let size = u32::from_be_bytes(entry[0..4].try_into().unwrap()) as usize;
            let key = u16::from_be_bytes([entry[4], entry[5]]);
            let name = String::from_utf8(entry[8..].iter().take_while(|&&b| b != 0).copied().collect()).unwrap();
            let want = match name.as_str() {
                "etc/table-loader" => &acpi.table_loader,
                "etc/acpi/rsdp" => &acpi.rsdp,
                "etc/acpi/tables" => &acpi.tables,
                other => panic!("unexpected file {other}"),
            };
            assert_eq!(&read_item(&mut dev, key, size), want, "{name}");
            names.push(name);
        }
        assert_eq!(names, ["etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader"]);
    }

    #[test]
    fn unknown_keys_read_zero_and_names_are_bounded() {
        let mut dev = FwCfg::new();
        assert_eq!(read_item(&mut dev, 0x7777, 3), [0, 0, 0]);
        assert!(matches!(
            dev.add_file(&"x".repeat(56), vec![]),
            Err(FwCfgError::NameTooLong(_))
        ));
        dev.add_file("a", vec![1]).unwrap();
        assert!(matches!(dev.add_file("a", vec![2]), Err(FwCfgError::Duplicate(_))));
        // Reading past the end of an item yields zeros; reselecting rewinds.
        assert_eq!(read_item(&mut dev, KEY_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut dev, KEY_SIGNATURE, 2), b"QE");
    }
}
