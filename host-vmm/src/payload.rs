//! Image writers for small purpose-built guest payloads (tests, benchmarks): wrap raw 64-bit machine code
//! into an ELF64 executable or a minimal bzImage that our loader boots through the 64-bit protocol.

/// Where payload code is loaded and entered (the usual 1 MiB kernel address).
pub const PAYLOAD_LOAD_ADDR: u64 = 0x10_0000;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
/// File offset of the code (page aligned, like a linker would place it).
const CODE_OFFSET: usize = 0x1000;

/// An ELF64 x86-64 executable with one PT_LOAD segment holding `code`, loaded and entered at `load_addr`.
pub fn elf64(load_addr: u64, code: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(CODE_OFFSET + code.len());
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, little endian, EV_CURRENT, SysV ABI
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    debug_assert_eq!(f.len(), EHDR_LEN);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    f.extend_from_slice(&(CODE_OFFSET as u64).to_le_bytes()); // p_offset
    f.extend_from_slice(&load_addr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&load_addr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(code);
    f
}

/// Boot protocol version our minimal bzImage claims (2.15).
pub const BZIMAGE_VERSION: u16 = 0x020f;

/// A minimal bzImage: one setup sector with a setup header (protocol 2.15, loaded high, 64-bit entry
/// supported), then the protected-mode part loaded at 1 MiB whose offset 0x200 is the 64-bit entry where
/// `code64` is placed.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    let setup_sects: u8 = 1;
    let setup_len = (usize::from(setup_sects) + 1) * 512;
    let mut f = vec![0u8; setup_len];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&BZIMAGE_VERSION.to_le_bytes());
    f[0x211] = 0x01; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(PAYLOAD_LOAD_ADDR as u32).to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    // Protected-mode kernel: 32-bit entry at +0 (unused here), 64-bit entry at +0x200.
    let mut pm = vec![0xf4u8; 0x200]; // hlt filler
    pm.extend_from_slice(code64);
    f.extend_from_slice(&pm);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::{KernelFormat, detect_format};

    #[test]
    fn elf_header_fields() {
        let img = elf64(PAYLOAD_LOAD_ADDR, &[0x90, 0xf4]);
        assert_eq!(detect_format(&img), Some(KernelFormat::Elf));
        assert_eq!(u64::from_le_bytes(img[24..32].try_into().unwrap()), PAYLOAD_LOAD_ADDR);
        assert_eq!(&img[CODE_OFFSET..], &[0x90, 0xf4]);
    }

    #[test]
    fn bzimage_header_fields() {
        let img = bzimage(&[0xcc]);
        assert_eq!(detect_format(&img), Some(KernelFormat::BzImage));
        assert_eq!(img.len(), 1024 + 0x200 + 1);
        assert_eq!(img[1024 + 0x200], 0xcc);
    }
}
