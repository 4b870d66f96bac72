//! 64-bit long-mode entry state: GDT, identity page tables, registers, FPU, boot MSRs and LAPIC LINT setup.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::hypervisor::{
    DescriptorTable, FpuState, HypervisorError, MsrEntry, SegmentRegister, SpecialRegisters, StandardRegisters, Vcpu,
};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing {what} to guest memory at {addr:#x}: {source}")]
    Memory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("guest RAM ({0} bytes) too small for the boot structures")]
    TooSmall(u64),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_NE: u64 = 1 << 5;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
pub const GDT_ENTRIES: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // G, L, P, DPL0, code exec/read accessed
    gdt_entry(0xc093, 0, 0xfffff), // G, D/B, P, DPL0, data read/write accessed
    gdt_entry(0x808b, 0, 0xfffff), // G, P, 32-bit busy TSS
];
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Encodes a segment descriptor from the access/flags word (`flags` = byte 5 | (byte 6 high nibble) << 8),
/// base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The hidden (cached) part a CPU loads from descriptor `entry` with `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> SegmentRegister {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    SegmentRegister {
        base,
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::Memory { what, addr, source })
}

/// Writes the GDT, an empty IDT and the identity-mapping page tables (first 4 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in GDT_ENTRIES.iter().enumerate() {
        write(mem, "GDT", GDT_ADDR + 8 * i as u64, *e)?;
    }
    write(mem, "IDT", IDT_ADDR, 0u64)?;
    write(mem, "PML4", PML4_ADDR, PDPT_ADDR | 0x3)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        write(mem, "PDPT", PDPT_ADDR + gib * 8, pd | 0x3)?;
        for i in 0..512u64 {
            // Present | writable | page size (2 MiB).
            let phys = ((gib << 30) | (i << 21)) | 0x83;
            write(mem, "PD", pd + i * 8, phys)?;
        }
    }
    Ok(())
}

/// Long-mode special registers: flat segments from our GDT, paging on with CR3 = our PML4.
pub fn long_mode_sregs(mut sregs: SpecialRegisters) -> SpecialRegisters {
    let code = segment_from_gdt(GDT_ENTRIES[1], CODE_SELECTOR);
    let data = segment_from_gdt(GDT_ENTRIES[2], DATA_SELECTOR);
    let tss = segment_from_gdt(GDT_ENTRIES[3], TSS_SELECTOR);
    sregs.gdt = DescriptorTable {
        base: GDT_ADDR,
        limit: (GDT_ENTRIES.len() * 8 - 1) as u16,
    };
    sregs.idt = DescriptorTable {
        base: IDT_ADDR,
        limit: 7,
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG) & !((1 << 29) | (1 << 30));
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Entry registers for the Linux 64-bit boot protocol: `rip` = entry, `rsi` = zero page, interrupts off.
pub fn boot_regs(entry: u64) -> StandardRegisters {
    StandardRegisters {
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSR values at boot: syscall MSRs cleared, fast strings on, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1), // fast-string enable
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect()
}

/// x87 control word and MXCSR reset values (all exceptions masked).
pub const BOOT_FPU: FpuState = FpuState {
    fcw: 0x37f,
    mxcsr: 0x1f80,
};

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Virtual-wire mode: LINT0 = ExtINT (PIC), LINT1 = NMI.
pub fn setup_lint(vcpu: &dyn Vcpu) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic()?;
    lapic.write(APIC_LVT0, set_delivery_mode(lapic.read(APIC_LVT0), APIC_MODE_EXTINT));
    lapic.write(APIC_LVT1, set_delivery_mode(lapic.read(APIC_LVT1), APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

/// Full register setup of the boot vCPU for a 64-bit entry at `entry`.
pub fn setup_boot_vcpu(vcpu: &dyn Vcpu, entry: u64) -> Result<(), RegsError> {
    vcpu.set_msrs(&boot_msrs())?;
    vcpu.set_regs(&boot_regs(entry))?;
    let sregs = vcpu.get_sregs()?;
    vcpu.set_sregs(&long_mode_sregs(sregs))?;
    vcpu.set_fpu(&BOOT_FPU)?;
    setup_lint(vcpu)?;
    Ok(())
}

/// Application processors stay in wait-for-SIPI; they only get MSRs, FPU and LINT setup.
pub fn setup_ap_vcpu(vcpu: &dyn Vcpu) -> Result<(), RegsError> {
    vcpu.set_msrs(&boot_msrs())?;
    vcpu.set_fpu(&BOOT_FPU)?;
    setup_lint(vcpu)?;
    Ok(())
}

/// Translates a guest virtual address with the vCPU's paging state (long mode or paging off), for diagnostics.
pub fn translate_gva(mem: &GuestMemoryMmap, sregs: &SpecialRegisters, gva: u64) -> Option<u64> {
    if sregs.cr0 & X86_CR0_PG == 0 {
        return Some(gva);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cr4 & (1 << 12) != 0 {
        return None; // legacy/PAE-32 paging or LA57: not needed for our payloads
    }
    let mut table = sregs.cr3 & 0x000f_ffff_ffff_f000;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let idx = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + idx * 8)).ok()?;
        if entry & 1 == 0 {
            return None;
        }
        let addr = entry & 0x000f_ffff_ffff_f000;
        if level == 0 || (level <= 2 && entry & 0x80 != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Some((addr & !page_mask) | (gva & page_mask));
        }
        table = addr;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_architectural_encoding() {
        // Intel SDM vol. 3 §3.4.5: flat 4 GiB 64-bit code segment = 0x00af9b000000ffff, data = 0x00cf93000000ffff.
        assert_eq!(GDT_ENTRIES[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_ENTRIES[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_ENTRIES[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segment_decoding() {
        let cs = segment_from_gdt(GDT_ENTRIES[1], CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.s, cs.present, cs.g),
            (0, !0, 0xb, 1, 0, 1, 1, 1)
        );
        let ds = segment_from_gdt(GDT_ENTRIES[2], DATA_SELECTOR);
        assert_eq!((ds.type_, ds.l, ds.db, ds.unusable), (3, 0, 1, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        let based = segment_from_gdt(gdt_entry(0x4093, 0x1234_5678, 0xabcde), 0x10);
        assert_eq!((based.base, based.limit, based.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn identity_map_translates() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let sregs = long_mode_sregs(SpecialRegisters::default());
        for va in [0u64, 0x1234, 0x20_0000, 0x3fff_ffff, 0xfee0_0000, 0xffff_f000] {
            assert_eq!(translate_gva(&mem, &sregs, va), Some(va));
        }
        assert_eq!(translate_gva(&mem, &sregs, 1 << 32), None);
    }

    #[test]
    fn long_mode_bits() {
        let s = long_mode_sregs(SpecialRegisters {
            cr0: 0x6000_0010,
            ..Default::default()
        });
        assert_eq!(s.cr0, 0x8000_0031);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.ss.selector, s.tr.selector), (0x08, 0x10, 0x18));
    }
}
