//! Our own `#[repr(C)]` mirror of the KVM TDX userspace ABI (kvm-bindings 0.14 has none of it) and of the
//! guest_memfd / memory-attribute / `KVM_SET_USER_MEMORY_REGION2` structs the TDX launch uses.
//!
//! Source of truth: Linux uapi headers `linux/kvm.h` and `asm/kvm.h` (x86) as shipped in Debian's
//! `linux-libc-dev 7.3.4-1~bpo13+1` (trixie-backports); the TDX part is unchanged since its merge in Linux 6.16
//! except that 6.16 first had `reserved[254]` in `kvm_tdx_capabilities` where 7.3 has four `tdvmcallinfo`
//! words and `reserved[250]` (same size). The numbers in the tests below were printed by a C program compiled
//! against those headers (`sizeof`, `offsetof`, the ioctl macros); `header_check` re-runs that comparison when
//! `DSTACK_TEST_LINUX_UAPI` points at an include directory.

use std::os::raw::c_ulong;

/// `KVMIO`.
const KVMIO: u32 = 0xAE;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// The asm-generic `_IOC` encoding (x86): dir << 30 | size << 16 | type << 8 | nr.
const fn ioc(dir: u32, nr: u32, size: usize) -> c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr) as c_ulong
}

/// `_IOWR(KVMIO, 0xba, unsigned long)`.
pub const KVM_MEMORY_ENCRYPT_OP: c_ulong = ioc(IOC_READ | IOC_WRITE, 0xba, size_of::<c_ulong>());
/// `_IOW(KVMIO, 0xa3, struct kvm_enable_cap)`.
pub const KVM_ENABLE_CAP: c_ulong = ioc(IOC_WRITE, 0xa3, size_of::<KvmEnableCap>());
/// `_IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)`.
pub const KVM_SET_USER_MEMORY_REGION2: c_ulong = ioc(IOC_WRITE, 0x49, size_of::<KvmUserspaceMemoryRegion2>());
/// `_IOW(KVMIO, 0xd2, struct kvm_memory_attributes)`.
pub const KVM_SET_MEMORY_ATTRIBUTES: c_ulong = ioc(IOC_WRITE, 0xd2, size_of::<KvmMemoryAttributes>());
/// `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
pub const KVM_CREATE_GUEST_MEMFD: c_ulong = ioc(IOC_READ | IOC_WRITE, 0xd4, size_of::<KvmCreateGuestMemfd>());

/// `KVM_CAP_VM_TYPES`, `KVM_CAP_SPLIT_IRQCHIP`.
pub const KVM_CAP_VM_TYPES: u32 = 235;
pub const KVM_CAP_SPLIT_IRQCHIP: u32 = 121;
/// `KVM_MEM_GUEST_MEMFD` (memslot flag).
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// `KVM_EXIT_MEMORY_FAULT`, `KVM_EXIT_TDX` and `KVM_MEMORY_EXIT_FLAG_PRIVATE`.
pub const KVM_EXIT_MEMORY_FAULT: u32 = 39;
pub const KVM_EXIT_TDX: u32 = 40;
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;

/// `enum kvm_tdx_cmd_id`.
pub const KVM_TDX_CAPABILITIES: u32 = 0;
pub const KVM_TDX_INIT_VM: u32 = 1;
pub const KVM_TDX_INIT_VCPU: u32 = 2;
pub const KVM_TDX_INIT_MEM_REGION: u32 = 3;
pub const KVM_TDX_FINALIZE_VM: u32 = 4;
pub const KVM_TDX_GET_CPUID: u32 = 5;
/// `KVM_TDX_MEASURE_MEMORY_REGION` (flag of `KVM_TDX_INIT_MEM_REGION`).
pub const KVM_TDX_MEASURE_MEMORY_REGION: u32 = 1;

/// CPUID entries our buffers have room for (KVM's own limit, `KVM_MAX_CPUID_ENTRIES`, is 256).
pub const MAX_CPUID_ENTRIES: usize = 256;

/// `struct kvm_tdx_cmd`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmTdxCmd {
    pub id: u32,
    pub flags: u32,
    pub data: u64,
    pub hw_error: u64,
}

/// `struct kvm_cpuid_entry2`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmCpuidEntry2 {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub padding: [u32; 3],
}

/// `struct kvm_cpuid2` with room for [`MAX_CPUID_ENTRIES`] entries in its flexible array.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmCpuid2 {
    pub nent: u32,
    pub padding: u32,
    pub entries: [KvmCpuidEntry2; MAX_CPUID_ENTRIES],
}

impl Default for KvmCpuid2 {
    fn default() -> Self {
        Self {
            nent: 0,
            padding: 0,
            entries: [KvmCpuidEntry2::default(); MAX_CPUID_ENTRIES],
        }
    }
}

/// `struct kvm_tdx_capabilities` (7.3 field names), followed by its CPUID entries.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmTdxCapabilities {
    pub supported_attrs: u64,
    pub supported_xfam: u64,
    pub kernel_tdvmcallinfo_1_r11: u64,
    pub user_tdvmcallinfo_1_r11: u64,
    pub kernel_tdvmcallinfo_1_r12: u64,
    pub user_tdvmcallinfo_1_r12: u64,
    pub reserved: [u64; 250],
    pub cpuid: KvmCpuid2,
}

impl Default for KvmTdxCapabilities {
    fn default() -> Self {
        Self {
            supported_attrs: 0,
            supported_xfam: 0,
            kernel_tdvmcallinfo_1_r11: 0,
            user_tdvmcallinfo_1_r11: 0,
            kernel_tdvmcallinfo_1_r12: 0,
            user_tdvmcallinfo_1_r12: 0,
            reserved: [0; 250],
            cpuid: KvmCpuid2::default(),
        }
    }
}

/// `struct kvm_tdx_init_vm`, followed by its CPUID entries. The 256 bytes before `cpuid` are TD_PARAMS'
/// userspace part.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct KvmTdxInitVm {
    pub attributes: u64,
    pub xfam: u64,
    pub mrconfigid: [u64; 6],
    pub mrowner: [u64; 6],
    pub mrownerconfig: [u64; 6],
    pub reserved: [u64; 12],
    pub cpuid: KvmCpuid2,
}

/// `struct kvm_tdx_init_mem_region` (in/out: KVM advances it as pages are added).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmTdxInitMemRegion {
    pub source_addr: u64,
    pub gpa: u64,
    pub nr_pages: u64,
}

/// `struct kvm_enable_cap`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmEnableCap {
    pub cap: u32,
    pub flags: u32,
    pub args: [u64; 4],
    pub pad: [u8; 64],
}

impl Default for KvmEnableCap {
    fn default() -> Self {
        Self {
            cap: 0,
            flags: 0,
            args: [0; 4],
            pad: [0; 64],
        }
    }
}

/// `struct kvm_create_guest_memfd`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmCreateGuestMemfd {
    pub size: u64,
    pub flags: u64,
    pub reserved: [u64; 6],
}

/// `struct kvm_userspace_memory_region2`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmUserspaceMemoryRegion2 {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub guest_memfd_offset: u64,
    pub guest_memfd: u32,
    pub pad1: u32,
    pub pad2: [u64; 14],
}

/// `struct kvm_memory_attributes`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmMemoryAttributes {
    pub address: u64,
    pub size: u64,
    pub attributes: u64,
    pub flags: u64,
}

/// The `tdx` member of `kvm_run`'s exit union (at offset 32 of `struct kvm_run`) in its `unknown` view: `nr` is
/// the TDVMCALL leaf, `ret` what the guest sees in R10; for GetQuote `data[0]`/`data[1]` are `gpa`/`size`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmRunTdx {
    pub flags: u64,
    pub nr: u64,
    pub ret: u64,
    pub data: [u64; 5],
}

/// The `memory_fault` member of `kvm_run`'s exit union.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmRunMemoryFault {
    pub flags: u64,
    pub gpa: u64,
    pub size: u64,
}

/// `KVM_RUN`'s exit union starts here in `struct kvm_run`.
pub const KVM_RUN_EXIT_UNION_OFFSET: usize = 32;
/// TDVMCALL leaf of GetQuote (GHCI).
pub const TDVMCALL_GET_QUOTE: u64 = 0x10002;

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    /// Every value below was printed by `sizeof`/`offsetof`/the ioctl macros from the linux-libc-dev
    /// 7.3.4-1~bpo13+1 headers (see the module doc); `header_check` re-derives them when the headers exist.
    #[test]
    fn layouts_match_linux_7_3_uapi() {
        assert_eq!(size_of::<KvmTdxCmd>(), 24);
        assert_eq!(offset_of!(KvmTdxCmd, flags), 4);
        assert_eq!(offset_of!(KvmTdxCmd, data), 8);
        assert_eq!(offset_of!(KvmTdxCmd, hw_error), 16);

        assert_eq!(size_of::<KvmCpuidEntry2>(), 40);
        assert_eq!(offset_of!(KvmCpuidEntry2, edx), 24);
        assert_eq!(offset_of!(KvmCpuid2, entries), 8);

        // sizeof(struct kvm_tdx_capabilities) = 2056 = cpuid (2048) + the 8-byte kvm_cpuid2 header.
        assert_eq!(offset_of!(KvmTdxCapabilities, supported_xfam), 8);
        assert_eq!(offset_of!(KvmTdxCapabilities, user_tdvmcallinfo_1_r12), 40);
        assert_eq!(offset_of!(KvmTdxCapabilities, cpuid), 2048);
        assert_eq!(
            offset_of!(KvmTdxCapabilities, cpuid) + offset_of!(KvmCpuid2, entries),
            2056
        );

        // sizeof(struct kvm_tdx_init_vm) = 264.
        assert_eq!(offset_of!(KvmTdxInitVm, xfam), 8);
        assert_eq!(offset_of!(KvmTdxInitVm, mrconfigid), 16);
        assert_eq!(offset_of!(KvmTdxInitVm, mrowner), 64);
        assert_eq!(offset_of!(KvmTdxInitVm, mrownerconfig), 112);
        assert_eq!(offset_of!(KvmTdxInitVm, reserved), 160);
        assert_eq!(offset_of!(KvmTdxInitVm, cpuid), 256);
        assert_eq!(offset_of!(KvmTdxInitVm, cpuid) + offset_of!(KvmCpuid2, entries), 264);

        assert_eq!(size_of::<KvmTdxInitMemRegion>(), 24);
        assert_eq!(offset_of!(KvmTdxInitMemRegion, gpa), 8);
        assert_eq!(offset_of!(KvmTdxInitMemRegion, nr_pages), 16);

        assert_eq!(size_of::<KvmCreateGuestMemfd>(), 64);
        assert_eq!(offset_of!(KvmCreateGuestMemfd, flags), 8);
        assert_eq!(size_of::<KvmUserspaceMemoryRegion2>(), 160);
        assert_eq!(offset_of!(KvmUserspaceMemoryRegion2, guest_memfd_offset), 32);
        assert_eq!(offset_of!(KvmUserspaceMemoryRegion2, guest_memfd), 40);
        assert_eq!(offset_of!(KvmUserspaceMemoryRegion2, pad2), 48);
        assert_eq!(size_of::<KvmMemoryAttributes>(), 32);
        assert_eq!(offset_of!(KvmMemoryAttributes, attributes), 16);
        assert_eq!(size_of::<KvmEnableCap>(), 104);
        assert_eq!(offset_of!(KvmEnableCap, args), 8);

        // kvm_run: tdx at 32, nr at 40, get_quote.{ret,gpa,size} at 48/56/64.
        assert_eq!(KVM_RUN_EXIT_UNION_OFFSET, 32);
        assert_eq!(KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, nr), 40);
        assert_eq!(KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, ret), 48);
        assert_eq!(KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, data), 56);
        assert_eq!(KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, data) + 8, 64);
        assert_eq!(KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunMemoryFault, gpa), 40);
    }

    #[test]
    fn ioctl_numbers_match_linux_7_3_uapi() {
        assert_eq!(KVM_MEMORY_ENCRYPT_OP, 3221794490);
        assert_eq!(KVM_CREATE_GUEST_MEMFD, 3225464532);
        assert_eq!(KVM_SET_USER_MEMORY_REGION2, 1084272201);
        assert_eq!(KVM_SET_MEMORY_ATTRIBUTES, 1075883730);
        assert_eq!(KVM_ENABLE_CAP, 1080602275);
        // kvm-bindings (generated from older headers) agrees on the numbers it has.
        assert_eq!(KVM_CAP_SPLIT_IRQCHIP, kvm_bindings::KVM_CAP_SPLIT_IRQCHIP);
        assert_eq!(KVM_MEM_GUEST_MEMFD, kvm_bindings::KVM_MEM_GUEST_MEMFD);
        assert_eq!(
            u64::from(KVM_EXIT_MEMORY_FAULT),
            u64::from(kvm_bindings::KVM_EXIT_MEMORY_FAULT)
        );
    }

    /// Compiles a probe against the uapi headers in `DSTACK_TEST_LINUX_UAPI` (a `usr/include` directory of
    /// Debian's `linux-libc-dev` ≥ 6.16, e.g. trixie-backports) with the host C compiler and compares every
    /// constant and layout with ours. Skips loudly when the variable is unset.
    #[test]
    fn header_check() {
        let Ok(include) = std::env::var("DSTACK_TEST_LINUX_UAPI") else {
            eprintln!("SKIP header_check: set DSTACK_TEST_LINUX_UAPI to linux-libc-dev's usr/include");
            return;
        };
        let ours: Vec<(&str, u64)> = vec![
            ("KVM_X86_TDX_VM", u64::from(crate::hypervisor::tdx::VM_TYPE_TDX)),
            ("KVM_TDX_CAPABILITIES", KVM_TDX_CAPABILITIES.into()),
            ("KVM_TDX_INIT_VM", KVM_TDX_INIT_VM.into()),
            ("KVM_TDX_INIT_VCPU", KVM_TDX_INIT_VCPU.into()),
            ("KVM_TDX_INIT_MEM_REGION", KVM_TDX_INIT_MEM_REGION.into()),
            ("KVM_TDX_FINALIZE_VM", KVM_TDX_FINALIZE_VM.into()),
            ("KVM_TDX_GET_CPUID", KVM_TDX_GET_CPUID.into()),
            ("KVM_TDX_MEASURE_MEMORY_REGION", KVM_TDX_MEASURE_MEMORY_REGION.into()),
            ("KVM_MEMORY_ENCRYPT_OP", KVM_MEMORY_ENCRYPT_OP),
            ("KVM_CREATE_GUEST_MEMFD", KVM_CREATE_GUEST_MEMFD),
            ("KVM_SET_USER_MEMORY_REGION2", KVM_SET_USER_MEMORY_REGION2),
            ("KVM_SET_MEMORY_ATTRIBUTES", KVM_SET_MEMORY_ATTRIBUTES),
            ("KVM_ENABLE_CAP", KVM_ENABLE_CAP),
            ("KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES.into()),
            ("KVM_CAP_SPLIT_IRQCHIP", KVM_CAP_SPLIT_IRQCHIP.into()),
            ("KVM_CAP_MAX_VCPUS", crate::hypervisor::tdx::CAP_MAX_VCPUS.into()),
            ("KVM_CAP_USER_MEMORY2", crate::hypervisor::tdx::CAP_USER_MEMORY2.into()),
            (
                "KVM_CAP_MEMORY_ATTRIBUTES",
                crate::hypervisor::tdx::CAP_MEMORY_ATTRIBUTES.into(),
            ),
            ("KVM_CAP_GUEST_MEMFD", crate::hypervisor::tdx::CAP_GUEST_MEMFD.into()),
            ("KVM_MEM_GUEST_MEMFD", KVM_MEM_GUEST_MEMFD.into()),
            (
                "KVM_MEMORY_ATTRIBUTE_PRIVATE",
                crate::hypervisor::tdx::MEMORY_ATTRIBUTE_PRIVATE,
            ),
            ("KVM_EXIT_TDX", KVM_EXIT_TDX.into()),
            ("KVM_EXIT_MEMORY_FAULT", KVM_EXIT_MEMORY_FAULT.into()),
            ("KVM_MEMORY_EXIT_FLAG_PRIVATE", KVM_MEMORY_EXIT_FLAG_PRIVATE),
            ("sizeof(struct kvm_tdx_cmd)", size_of::<KvmTdxCmd>() as u64),
            (
                "offsetof(struct kvm_tdx_cmd, hw_error)",
                offset_of!(KvmTdxCmd, hw_error) as u64,
            ),
            (
                "sizeof(struct kvm_tdx_capabilities)",
                (offset_of!(KvmTdxCapabilities, cpuid) + offset_of!(KvmCpuid2, entries)) as u64,
            ),
            (
                "offsetof(struct kvm_tdx_capabilities, user_tdvmcallinfo_1_r12)",
                offset_of!(KvmTdxCapabilities, user_tdvmcallinfo_1_r12) as u64,
            ),
            (
                "offsetof(struct kvm_tdx_capabilities, cpuid)",
                offset_of!(KvmTdxCapabilities, cpuid) as u64,
            ),
            (
                "sizeof(struct kvm_tdx_init_vm)",
                (offset_of!(KvmTdxInitVm, cpuid) + offset_of!(KvmCpuid2, entries)) as u64,
            ),
            (
                "offsetof(struct kvm_tdx_init_vm, mrconfigid)",
                offset_of!(KvmTdxInitVm, mrconfigid) as u64,
            ),
            (
                "offsetof(struct kvm_tdx_init_vm, mrowner)",
                offset_of!(KvmTdxInitVm, mrowner) as u64,
            ),
            (
                "offsetof(struct kvm_tdx_init_vm, mrownerconfig)",
                offset_of!(KvmTdxInitVm, mrownerconfig) as u64,
            ),
            (
                "offsetof(struct kvm_tdx_init_vm, cpuid)",
                offset_of!(KvmTdxInitVm, cpuid) as u64,
            ),
            (
                "sizeof(struct kvm_tdx_init_mem_region)",
                size_of::<KvmTdxInitMemRegion>() as u64,
            ),
            (
                "offsetof(struct kvm_tdx_init_mem_region, nr_pages)",
                offset_of!(KvmTdxInitMemRegion, nr_pages) as u64,
            ),
            ("sizeof(struct kvm_cpuid_entry2)", size_of::<KvmCpuidEntry2>() as u64),
            (
                "sizeof(struct kvm_create_guest_memfd)",
                size_of::<KvmCreateGuestMemfd>() as u64,
            ),
            (
                "sizeof(struct kvm_userspace_memory_region2)",
                size_of::<KvmUserspaceMemoryRegion2>() as u64,
            ),
            (
                "offsetof(struct kvm_userspace_memory_region2, guest_memfd)",
                offset_of!(KvmUserspaceMemoryRegion2, guest_memfd) as u64,
            ),
            (
                "sizeof(struct kvm_memory_attributes)",
                size_of::<KvmMemoryAttributes>() as u64,
            ),
            ("sizeof(struct kvm_enable_cap)", size_of::<KvmEnableCap>() as u64),
            ("offsetof(struct kvm_run, tdx)", KVM_RUN_EXIT_UNION_OFFSET as u64),
            (
                "offsetof(struct kvm_run, tdx.nr)",
                (KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, nr)) as u64,
            ),
            (
                "offsetof(struct kvm_run, tdx.get_quote.ret)",
                (KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, ret)) as u64,
            ),
            (
                "offsetof(struct kvm_run, tdx.get_quote.gpa)",
                (KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, data)) as u64,
            ),
            (
                "offsetof(struct kvm_run, tdx.unknown.data)",
                (KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, data)) as u64,
            ),
            (
                "offsetof(struct kvm_run, memory_fault.size)",
                (KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunMemoryFault, size)) as u64,
            ),
            (
                "offsetof(struct kvm_run, tdx.get_quote.size)",
                (KVM_RUN_EXIT_UNION_OFFSET + offset_of!(KvmRunTdx, data) + 8) as u64,
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let mut src =
            String::from("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void){\n");
        for (expr, _) in &ours {
            src.push_str(&format!("printf(\"%llu\\n\", (unsigned long long)({expr}));\n"));
        }
        src.push_str("return 0;}\n");
        let c = dir.path().join("probe.c");
        let exe = dir.path().join("probe");
        std::fs::write(&c, src).unwrap();
        let include = std::path::Path::new(&include);
        let status = std::process::Command::new("cc")
            .arg("-I")
            .arg(include.join("x86_64-linux-gnu"))
            .arg("-I")
            .arg(include)
            .arg("-o")
            .arg(&exe)
            .arg(&c)
            .status()
            .expect("running cc");
        assert!(status.success(), "compiling the uapi probe failed");
        let out = std::process::Command::new(&exe).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let theirs: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(theirs.len(), ours.len());
        for ((name, mine), header) in ours.iter().zip(theirs) {
            assert_eq!(*mine, header, "{name}: ours {mine}, uapi header {header}");
        }
    }
}
