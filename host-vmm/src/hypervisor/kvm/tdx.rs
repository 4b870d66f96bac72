//! The KVM implementation of the TDX traits: `KVM_MEMORY_ENCRYPT_OP` sub-commands and the guest_memfd /
//! memory-attribute ioctls, issued with our own uapi structs ([`super::tdx_uapi`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::c_ulong;
use std::sync::Arc;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::tdx_uapi::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_CAP_VM_TYPES, KVM_CREATE_GUEST_MEMFD, KVM_ENABLE_CAP, KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_TDX, KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ENCRYPT_OP, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_RUN_EXIT_UNION_OFFSET,
    KVM_SET_MEMORY_ATTRIBUTES, KVM_SET_USER_MEMORY_REGION2, KVM_TDX_CAPABILITIES, KVM_TDX_FINALIZE_VM,
    KVM_TDX_GET_CPUID, KVM_TDX_INIT_MEM_REGION, KVM_TDX_INIT_VCPU, KVM_TDX_INIT_VM, KVM_TDX_MEASURE_MEMORY_REGION,
    KvmCpuid2, KvmCpuidEntry2, KvmCreateGuestMemfd, KvmEnableCap, KvmMemoryAttributes, KvmRunMemoryFault, KvmRunTdx,
    KvmTdxCapabilities, KvmTdxCmd, KvmTdxInitMemRegion, KvmTdxInitVm, KvmUserspaceMemoryRegion2, MAX_CPUID_ENTRIES,
};
use super::{KvmHypervisor, KvmVcpu, KvmVm, ioctl_err};
use crate::hypervisor::tdx::{
    CAP_EXIT_HYPERCALL, EXIT_HYPERCALL, EXIT_IOAPIC_EOI, GuestMemfd, HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED,
    MapGpaRange, MemoryFault, PrivateMemoryRegion, TdxCapabilities, TdxHypervisor, TdxInitVm, TdxVcpu, TdxVm,
    TdxVmcall, VM_TYPE_TDX,
};
use crate::hypervisor::{CpuIdEntry, HypervisorError, Result};

const PAGE: u64 = 4096;
/// Consecutive `KVM_TDX_INIT_MEM_REGION` interruptions without progress before we give up.
const MAX_STALLED_RETRIES: u32 = 1000;

fn last_os_error(op: &'static str) -> HypervisorError {
    HypervisorError::Ioctl {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Issues one `KVM_MEMORY_ENCRYPT_OP` on `fd`; on failure the error carries KVM's `hw_error` (the TDX module's
/// SEAMCALL status, if any).
fn tdx_op(fd: &impl AsRawFd, op: &'static str, id: u32, flags: u32, data: u64) -> Result<()> {
    let mut cmd = KvmTdxCmd {
        id,
        flags,
        data,
        hw_error: 0,
    };
    // SAFETY: `fd` is a KVM VM or vCPU fd; `cmd` is a valid `struct kvm_tdx_cmd` that lives across the call, and
    // `data` (if a pointer) was derived by the caller from a live, correctly sized struct.
    let ret = unsafe { ioctl_with_mut_ref(fd, KVM_MEMORY_ENCRYPT_OP, &mut cmd) };
    if ret < 0 {
        return Err(HypervisorError::Tdx {
            op,
            source: std::io::Error::last_os_error(),
            hw_error: cmd.hw_error,
        });
    }
    Ok(())
}

/// `KVM_ENABLE_CAP` on a VM fd with one argument.
fn enable_cap(fd: &impl AsRawFd, op: &'static str, cap: u32, arg0: u64) -> Result<()> {
    let cap = KvmEnableCap {
        cap,
        args: [arg0, 0, 0, 0],
        ..Default::default()
    };
    // SAFETY: `fd` is a VM fd; `cap` is a valid `struct kvm_enable_cap` the kernel only reads.
    let ret = unsafe { ioctl_with_ref(fd, KVM_ENABLE_CAP, &cap) };
    if ret < 0 {
        return Err(last_os_error(op));
    }
    Ok(())
}

fn cpuid_to_uapi(e: &CpuIdEntry) -> KvmCpuidEntry2 {
    KvmCpuidEntry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        padding: [0; 3],
    }
}

fn cpuid_from_uapi(c: &KvmCpuid2) -> Result<Vec<CpuIdEntry>> {
    let n = c.nent as usize;
    let entries = c.entries.get(..n).ok_or_else(|| {
        HypervisorError::Invalid(format!(
            "KVM returned {n} CPUID entries, buffer holds {MAX_CPUID_ENTRIES}"
        ))
    })?;
    Ok(entries
        .iter()
        .map(|e| CpuIdEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect())
}

/// The 48-byte measurement registers as the header's `__u64[6]` (x86 is little-endian: same bytes in memory).
fn digest_words(bytes: &[u8; 48]) -> [u64; 6] {
    let mut words = [0u64; 6];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    words
}

impl TdxHypervisor for KvmHypervisor {
    fn supported_vm_types(&self) -> Result<u64> {
        // 0 when the kernel predates KVM_CAP_VM_TYPES (then only the default VM type exists).
        let types = self.kvm.check_extension_raw(c_ulong::from(KVM_CAP_VM_TYPES));
        Ok(u64::try_from(types).unwrap_or(0))
    }

    fn create_tdx_vm(&self) -> Result<Arc<dyn TdxVm>> {
        let fd = self
            .kvm
            .create_vm_with_type(u64::from(VM_TYPE_TDX))
            .map_err(ioctl_err("KVM_CREATE_VM(KVM_X86_TDX_VM)"))?;
        Ok(Arc::new(KvmVm { fd }))
    }
}

impl TdxVm for KvmVm {
    fn check_extension(&self, cap: u32) -> Result<u64> {
        let ret = self.fd.check_extension_raw(c_ulong::from(cap));
        u64::try_from(ret).map_err(|_| last_os_error("KVM_CHECK_EXTENSION (VM)"))
    }

    fn enable_split_irqchip(&self, ioapic_pins: u32) -> Result<()> {
        enable_cap(
            &self.fd,
            "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)",
            KVM_CAP_SPLIT_IRQCHIP,
            u64::from(ioapic_pins),
        )
    }

    fn enable_exit_hypercall(&self, mask: u64) -> Result<()> {
        enable_cap(
            &self.fd,
            "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)",
            CAP_EXIT_HYPERCALL,
            mask,
        )
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // 0: the interrupt was blocked (e.g. masked at the LAPIC), which is not an error for the sender.
        self.fd.signal_msi(msi).map_err(ioctl_err("KVM_SIGNAL_MSI"))?;
        Ok(())
    }

    fn tdx_capabilities(&self) -> Result<TdxCapabilities> {
        let mut caps = Box::<KvmTdxCapabilities>::default();
        caps.cpuid.nent = MAX_CPUID_ENTRIES as u32;
        let data = std::ptr::from_mut::<KvmTdxCapabilities>(&mut caps) as u64;
        tdx_op(&self.fd, "KVM_TDX_CAPABILITIES", KVM_TDX_CAPABILITIES, 0, data)?;
        Ok(TdxCapabilities {
            supported_attrs: caps.supported_attrs,
            supported_xfam: caps.supported_xfam,
            kernel_tdvmcallinfo_1_r11: caps.kernel_tdvmcallinfo_1_r11,
            user_tdvmcallinfo_1_r11: caps.user_tdvmcallinfo_1_r11,
            kernel_tdvmcallinfo_1_r12: caps.kernel_tdvmcallinfo_1_r12,
            user_tdvmcallinfo_1_r12: caps.user_tdvmcallinfo_1_r12,
            cpuid: cpuid_from_uapi(&caps.cpuid)?,
        })
    }

    fn tdx_init_vm(&self, params: &TdxInitVm) -> Result<()> {
        if params.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(HypervisorError::Invalid(format!(
                "KVM_TDX_INIT_VM: {} CPUID entries (at most {MAX_CPUID_ENTRIES})",
                params.cpuid.len()
            )));
        }
        let mut init = Box::<KvmTdxInitVm>::default();
        init.attributes = params.attributes;
        init.xfam = params.xfam;
        init.mrconfigid = digest_words(&params.mrconfigid);
        init.mrowner = digest_words(&params.mrowner);
        init.mrownerconfig = digest_words(&params.mrownerconfig);
        init.cpuid.nent = params.cpuid.len() as u32;
        for (dst, src) in init.cpuid.entries.iter_mut().zip(&params.cpuid) {
            *dst = cpuid_to_uapi(src);
        }
        let data = std::ptr::from_mut::<KvmTdxInitVm>(&mut init) as u64;
        tdx_op(&self.fd, "KVM_TDX_INIT_VM", KVM_TDX_INIT_VM, 0, data)
    }

    fn create_guest_memfd(&self, size: u64) -> Result<GuestMemfd> {
        let req = KvmCreateGuestMemfd {
            size,
            ..Default::default()
        };
        // SAFETY: VM fd; `req` is a valid `struct kvm_create_guest_memfd`.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CREATE_GUEST_MEMFD, &req) };
        if ret < 0 {
            return Err(last_os_error("KVM_CREATE_GUEST_MEMFD"));
        }
        // SAFETY: on success the ioctl returned a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret) };
        Ok(GuestMemfd { fd, size })
    }

    unsafe fn set_private_memory_region(&self, region: &PrivateMemoryRegion<'_>) -> Result<()> {
        let raw = KvmUserspaceMemoryRegion2 {
            slot: region.slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.size,
            userspace_addr: region.userspace_addr,
            guest_memfd_offset: region.guest_memfd_offset,
            guest_memfd: region.guest_memfd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: VM fd; `raw` is a valid `struct kvm_userspace_memory_region2`; the caller guarantees the shared
        // mapping outlives the VM (trait contract) and the guest_memfd is borrowed for the call (KVM takes its
        // own reference).
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_SET_USER_MEMORY_REGION2, &raw) };
        if ret < 0 {
            return Err(last_os_error("KVM_SET_USER_MEMORY_REGION2"));
        }
        Ok(())
    }

    fn set_memory_attributes(&self, address: u64, size: u64, attributes: u64) -> Result<()> {
        let attrs = KvmMemoryAttributes {
            address,
            size,
            attributes,
            flags: 0,
        };
        // SAFETY: VM fd; `attrs` is a valid `struct kvm_memory_attributes`.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_SET_MEMORY_ATTRIBUTES, &attrs) };
        if ret < 0 {
            return Err(last_os_error("KVM_SET_MEMORY_ATTRIBUTES"));
        }
        Ok(())
    }

    fn create_tdx_vcpu(&self, id: u32) -> Result<Box<dyn TdxVcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU (TD)"))?;
        Ok(Box::new(KvmVcpu { id, fd }))
    }

    fn tdx_finalize(&self) -> Result<()> {
        tdx_op(&self.fd, "KVM_TDX_FINALIZE_VM", KVM_TDX_FINALIZE_VM, 0, 0)
    }
}

impl KvmVcpu {
    /// The last exit reason and the start of the exit union in the vCPU's `kvm_run` page.
    fn exit_union(&mut self) -> (u32, *mut u8) {
        let run = self.fd.get_kvm_run();
        let reason = run.exit_reason;
        let base = std::ptr::from_mut(run).cast::<u8>();
        (reason, base.wrapping_add(KVM_RUN_EXIT_UNION_OFFSET))
    }
}

impl TdxVcpu for KvmVcpu {
    fn tdx_init_vcpu(&self, rcx: u64) -> Result<()> {
        tdx_op(&self.fd, "KVM_TDX_INIT_VCPU", KVM_TDX_INIT_VCPU, 0, rcx)
    }

    fn tdx_get_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let mut cpuid = Box::<KvmCpuid2>::default();
        cpuid.nent = MAX_CPUID_ENTRIES as u32;
        let data = std::ptr::from_mut::<KvmCpuid2>(&mut cpuid) as u64;
        tdx_op(&self.fd, "KVM_TDX_GET_CPUID", KVM_TDX_GET_CPUID, 0, data)?;
        cpuid_from_uapi(&cpuid)
    }

    fn tdx_init_mem_region(&self, source: &[u8], gpa: u64, measure: bool) -> Result<()> {
        let len = source.len() as u64;
        if len == 0 || !len.is_multiple_of(PAGE) || !gpa.is_multiple_of(PAGE) {
            return Err(HypervisorError::Invalid(format!(
                "KVM_TDX_INIT_MEM_REGION: gpa {gpa:#x} / length {len:#x} not whole 4 KiB pages"
            )));
        }
        if !(source.as_ptr() as u64).is_multiple_of(PAGE) {
            return Err(HypervisorError::Invalid(
                "KVM_TDX_INIT_MEM_REGION: source buffer is not page-aligned".into(),
            ));
        }
        let mut region = KvmTdxInitMemRegion {
            source_addr: source.as_ptr() as u64,
            gpa,
            nr_pages: len / PAGE,
        };
        let flags = if measure { KVM_TDX_MEASURE_MEMORY_REGION } else { 0 };
        let mut stalled = 0;
        loop {
            let before = region.nr_pages;
            let data = std::ptr::from_mut::<KvmTdxInitMemRegion>(&mut region) as u64;
            // `source` stays borrowed (alive, unmodified) for the whole loop; KVM only reads from it.
            match tdx_op(
                &self.fd,
                "KVM_TDX_INIT_MEM_REGION",
                KVM_TDX_INIT_MEM_REGION,
                flags,
                data,
            ) {
                Ok(()) => return Ok(()),
                // Interrupted (signal) or busy: KVM wrote back how far it got; continue from there.
                Err(HypervisorError::Tdx { source: e, .. })
                    if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN))
                        && region.nr_pages > 0
                        && stalled < MAX_STALLED_RETRIES =>
                {
                    stalled = if region.nr_pages < before { 0 } else { stalled + 1 };
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn tdx_vmcall(&mut self) -> Option<TdxVmcall> {
        let (reason, exit) = self.exit_union();
        if reason != KVM_EXIT_TDX {
            return None;
        }
        // SAFETY: `exit` points 32 bytes into the vCPU's kvm_run mapping (a whole page, page-aligned, owned by
        // `self.fd`), so it is 8-aligned and the 64 bytes read lie inside it; KVM_RUN has returned, so the kernel
        // is not writing it; the exit reason says the `tdx` member is the one filled in; all fields are plain
        // integers (any bit pattern is valid).
        let tdx = unsafe { exit.cast::<KvmRunTdx>().read() };
        Some(TdxVmcall {
            nr: tdx.nr,
            data: tdx.data,
        })
    }

    fn set_tdx_vmcall_ret(&mut self, ret: u64) -> Result<()> {
        let (reason, exit) = self.exit_union();
        if reason != KVM_EXIT_TDX {
            return Err(HypervisorError::Invalid(format!(
                "TDVMCALL return value without a KVM_EXIT_TDX (exit reason {reason})"
            )));
        }
        let ret_ptr = exit.wrapping_add(std::mem::offset_of!(KvmRunTdx, ret)).cast::<u64>();
        // SAFETY: as in `tdx_vmcall`: `ret` lies inside the kvm_run page at an 8-aligned offset (48), the vCPU is
        // not running, and KVM reads this field back into R10 on the next KVM_RUN.
        unsafe { ret_ptr.write(ret) };
        Ok(())
    }

    fn memory_fault(&mut self) -> Option<MemoryFault> {
        let (reason, exit) = self.exit_union();
        if reason != KVM_EXIT_MEMORY_FAULT {
            return None;
        }
        // SAFETY: as in `tdx_vmcall`, for the 24-byte `memory_fault` member.
        let fault = unsafe { exit.cast::<KvmRunMemoryFault>().read() };
        Some(MemoryFault {
            gpa: fault.gpa,
            size: fault.size,
            private: fault.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE != 0,
        })
    }

    fn map_gpa_range(&mut self) -> Option<MapGpaRange> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != EXIT_HYPERCALL {
            return None;
        }
        // SAFETY: KVM_RUN returned with KVM_EXIT_HYPERCALL, so `hypercall` is the union member KVM filled in; it
        // holds plain integers (any bit pattern is valid).
        let hc = unsafe { run.__bindgen_anon_1.hypercall };
        (hc.nr == HC_MAP_GPA_RANGE).then_some(MapGpaRange {
            gpa: hc.args[0],
            pages: hc.args[1],
            private: hc.args[2] & MAP_GPA_RANGE_ENCRYPTED != 0,
        })
    }

    fn set_hypercall_ret(&mut self, ret: u64) -> Result<()> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != EXIT_HYPERCALL {
            return Err(HypervisorError::Invalid(format!(
                "hypercall result without a KVM_EXIT_HYPERCALL (exit reason {})",
                run.exit_reason
            )));
        }
        // Writing a Copy field of a union is safe; KVM reads `hypercall.ret` back on the next KVM_RUN.
        run.__bindgen_anon_1.hypercall.ret = ret;
        Ok(())
    }

    fn ioapic_eoi(&mut self) -> Option<u8> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != EXIT_IOAPIC_EOI {
            return None;
        }
        // SAFETY: the exit reason says `eoi` is the member KVM filled in; a u8 has no invalid values.
        Some(unsafe { run.__bindgen_anon_1.eoi.vector })
    }
}

#[cfg(test)]
mod tests {
    use crate::hypervisor::tdx::{
        CAP_EXIT_HYPERCALL, EXIT_HYPERCALL, EXIT_IOAPIC_EOI, HC_MAP_GPA_RANGE, MAP_GPA_RANGE_ENCRYPTED,
    };

    /// The split-irqchip / MapGPA numbers against kvm-bindings (bindgen output of the uapi headers) and, for the
    /// two kvm_para.h values kvm-bindings lacks, against linux-libc-dev 6.1's `linux/kvm_para.h`
    /// (`KVM_HC_MAP_GPA_RANGE 12`) and `asm/kvm_para.h` (`KVM_MAP_GPA_RANGE_ENCRYPTED (1 << 4)`).
    #[test]
    fn exit_and_cap_numbers_match_uapi() {
        assert_eq!(EXIT_HYPERCALL, kvm_bindings::KVM_EXIT_HYPERCALL);
        assert_eq!(EXIT_IOAPIC_EOI, kvm_bindings::KVM_EXIT_IOAPIC_EOI);
        assert_eq!(CAP_EXIT_HYPERCALL, kvm_bindings::KVM_CAP_EXIT_HYPERCALL);
        assert_eq!(HC_MAP_GPA_RANGE, 12);
        assert_eq!(MAP_GPA_RANGE_ENCRYPTED, 0x10);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_msi>(), 32);
    }
}
