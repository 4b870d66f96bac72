//! TDX extensions of the hypervisor traits: the operations upstream KVM (Linux ≥ 6.16) offers for Intel TDX
//! guests (`KVM_X86_TDX_VM`, `KVM_MEMORY_ENCRYPT_OP` sub-commands, guest_memfd private memory, memory
//! attributes, split irqchip), as plain data types of our own. [`super::kvm`] implements them with ioctls;
//! [`super::fake`] records them and enforces the ordering rules KVM enforces, so the TD launch sequence is
//! testable on hosts without TDX.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::{CpuIdEntry, Hypervisor, Result, Vcpu, Vm};

/// `KVM_X86_TDX_VM`: the VM type for TDX guests (bit 5 of `KVM_CAP_VM_TYPES`).
pub const VM_TYPE_TDX: u32 = 5;
/// `KVM_CAP_MAX_VCPUS`, `KVM_CAP_MEMORY_ATTRIBUTES`, `KVM_CAP_GUEST_MEMFD`, `KVM_CAP_USER_MEMORY2`: the
/// capabilities the launch sequence checks on the VM fd.
pub const CAP_MAX_VCPUS: u32 = 66;
pub const CAP_USER_MEMORY2: u32 = 231;
pub const CAP_MEMORY_ATTRIBUTES: u32 = 233;
pub const CAP_GUEST_MEMFD: u32 = 234;
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
pub const MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;

/// `KVM_EXIT_MEMORY_FAULT` and `KVM_EXIT_TDX`: how these exits show up as [`super::VcpuExit::Other`] reasons.
pub const EXIT_MEMORY_FAULT: u32 = 39;
pub const EXIT_TDX: u32 = 40;
/// `KVM_EXIT_HYPERCALL`: a TD's MapGPA TDVMCALL arrives as hypercall `KVM_HC_MAP_GPA_RANGE`.
pub const EXIT_HYPERCALL: u32 = 3;
/// `KVM_EXIT_IOAPIC_EOI`: with a split irqchip, the guest EOId a level-triggered vector the userspace IOAPIC
/// routed (KVM learns which vectors from the MSI routes of GSIs below the reserved IOAPIC pin count).
pub const EXIT_IOAPIC_EOI: u32 = 26;
/// `KVM_CAP_EXIT_HYPERCALL`: its argument is the bit mask of hypercalls to forward to userspace.
pub const CAP_EXIT_HYPERCALL: u32 = 201;
/// `KVM_HC_MAP_GPA_RANGE` (linux/kvm_para.h): the hypercall number upstream KVM turns MapGPA into; KVM refuses
/// a TD's MapGPA ("sub-function unsupported") unless `KVM_CAP_EXIT_HYPERCALL` has this bit.
pub const HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED` (asm/kvm_para.h) in the hypercall's attribute argument: convert to private.
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// A TDVMCALL KVM left to userspace (`KVM_EXIT_TDX`): the leaf in `nr` and its register arguments (for
/// GetQuote, `data[0]` is the buffer GPA and `data[1]` its size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TdxVmcall {
    pub nr: u64,
    pub data: [u64; 5],
}

/// A private/shared conversion request (`KVM_EXIT_MEMORY_FAULT`): make `[gpa, gpa + size)` private or shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFault {
    pub gpa: u64,
    pub size: u64,
    pub private: bool,
}

/// An explicit conversion (MapGPA → `KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE)`): `pages` 4 KiB pages from `gpa`
/// (KVM already stripped the shared bit) become private (`true`) or shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapGpaRange {
    pub gpa: u64,
    pub pages: u64,
    pub private: bool,
}

/// What `KVM_TDX_CAPABILITIES` reports: the TD attributes and XFAM bits the TDX module allows, the TDVMCALL
/// sub-functions KVM handles or forwards, and the CPUID bits userspace may configure (per leaf/subleaf, a
/// register mask: 1 = configurable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TdxCapabilities {
    pub supported_attrs: u64,
    pub supported_xfam: u64,
    pub kernel_tdvmcallinfo_1_r11: u64,
    pub user_tdvmcallinfo_1_r11: u64,
    pub kernel_tdvmcallinfo_1_r12: u64,
    pub user_tdvmcallinfo_1_r12: u64,
    pub cpuid: Vec<CpuIdEntry>,
}

/// The parameters of `KVM_TDX_INIT_VM` (the TD_PARAMS fields userspace controls). `mrconfigid`, `mrowner`
/// and `mrownerconfig` appear verbatim in every TD report and quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxInitVm {
    pub attributes: u64,
    pub xfam: u64,
    pub mrconfigid: [u8; 48],
    pub mrowner: [u8; 48],
    pub mrownerconfig: [u8; 48],
    /// Only leaves the capabilities list as configurable, each register masked by it.
    pub cpuid: Vec<CpuIdEntry>,
}

/// A guest_memfd-backed memory slot (`KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`): private pages
/// come from `guest_memfd` at `guest_memfd_offset`, shared pages from `userspace_addr`.
#[derive(Debug, Clone, Copy)]
pub struct PrivateMemoryRegion<'a> {
    pub slot: u32,
    pub guest_phys_addr: u64,
    pub size: u64,
    pub userspace_addr: u64,
    pub guest_memfd: BorrowedFd<'a>,
    pub guest_memfd_offset: u64,
}

/// A guest_memfd (`KVM_CREATE_GUEST_MEMFD`): the file the TD's private memory lives in.
#[derive(Debug)]
pub struct GuestMemfd {
    pub fd: OwnedFd,
    pub size: u64,
}

impl AsFd for GuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A host that may run TDX guests.
pub trait TdxHypervisor: Hypervisor {
    /// The VM types KVM supports, as a bit mask (`KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)`; 0 on kernels that
    /// predate the capability).
    fn supported_vm_types(&self) -> Result<u64>;
    /// `KVM_CREATE_VM(KVM_X86_TDX_VM)`.
    fn create_tdx_vm(&self) -> Result<Arc<dyn TdxVm>>;
}

/// A TDX VM (TD) before and after finalization.
pub trait TdxVm: Vm {
    /// `KVM_CHECK_EXTENSION` on the VM fd (TD-specific answers, e.g. `KVM_CAP_MAX_VCPUS`).
    fn check_extension(&self, cap: u32) -> Result<u64>;
    /// `KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)`: LAPICs in the kernel, IOAPIC/PIC in userspace (TDX requires
    /// it; must precede vCPU creation).
    fn enable_split_irqchip(&self, ioapic_pins: u32) -> Result<()>;
    /// `KVM_TDX_CAPABILITIES`.
    fn tdx_capabilities(&self) -> Result<TdxCapabilities>;
    /// `KVM_TDX_INIT_VM` (before any vCPU exists).
    fn tdx_init_vm(&self, params: &TdxInitVm) -> Result<()>;
    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes.
    fn create_guest_memfd(&self, size: u64) -> Result<GuestMemfd>;
    /// `KVM_SET_USER_MEMORY_REGION2` with `KVM_MEM_GUEST_MEMFD`.
    ///
    /// # Safety
    /// `userspace_addr..+size` must be a live mapping owned by the caller that outlives the VM (the guest's
    /// shared pages live there).
    unsafe fn set_private_memory_region(&self, region: &PrivateMemoryRegion<'_>) -> Result<()>;
    /// `KVM_SET_MEMORY_ATTRIBUTES` on `[address, address + size)`.
    fn set_memory_attributes(&self, address: u64, size: u64, attributes: u64) -> Result<()>;
    /// `KVM_CREATE_VCPU` for a TD vCPU (which still needs [`TdxVcpu::tdx_init_vcpu`]).
    fn create_tdx_vcpu(&self, id: u32) -> Result<Box<dyn TdxVcpu>>;
    /// `KVM_TDX_FINALIZE_VM`: seals MRTD; the TD can run afterwards.
    fn tdx_finalize(&self) -> Result<()>;
    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)` with the bit mask of hypercall numbers to forward (we need
    /// `1 << HC_MAP_GPA_RANGE` so MapGPA reaches the VMM).
    fn enable_exit_hypercall(&self, mask: u64) -> Result<()>;
    /// `KVM_SIGNAL_MSI`: delivers one message-signalled interrupt (how the userspace IOAPIC injects).
    fn signal_msi(&self, address: u64, data: u32) -> Result<()>;
}

/// A TD vCPU. Its registers are protected: only the TDX module sets them (RCX = the TD HOB address).
pub trait TdxVcpu: Vcpu {
    /// `KVM_TDX_INIT_VCPU` with the initial RCX.
    fn tdx_init_vcpu(&self, rcx: u64) -> Result<()>;
    /// `KVM_TDX_GET_CPUID`: the CPUID the TDX module presents to this vCPU.
    fn tdx_get_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
    /// `KVM_TDX_INIT_MEM_REGION`: copies `source` (a whole number of 4 KiB pages, page-aligned in host memory)
    /// into the TD's private memory at `gpa` (TDH.MEM.PAGE.ADD per page) and, if `measure`, extends MRTD with
    /// the contents (TDH.MR.EXTEND per 256 bytes). The range must already be private.
    fn tdx_init_mem_region(&self, source: &[u8], gpa: u64, measure: bool) -> Result<()>;
    /// After `run` returned exit reason [`EXIT_TDX`]: the TDVMCALL to serve.
    fn tdx_vmcall(&mut self) -> Option<TdxVmcall>;
    /// The TDVMCALL's return code (R10), delivered on the next `run`.
    fn set_tdx_vmcall_ret(&mut self, ret: u64) -> Result<()>;
    /// After `run` returned exit reason [`EXIT_MEMORY_FAULT`]: the requested conversion.
    fn memory_fault(&mut self) -> Option<MemoryFault>;
    /// After `run` returned exit reason [`EXIT_HYPERCALL`] with `KVM_HC_MAP_GPA_RANGE`: the conversion asked for
    /// (`None` for other hypercalls).
    fn map_gpa_range(&mut self) -> Option<MapGpaRange>;
    /// The hypercall's result (`hypercall.ret`; 0 = done, else an errno KVM turns into a TDVMCALL error).
    fn set_hypercall_ret(&mut self, ret: u64) -> Result<()>;
    /// After `run` returned exit reason [`EXIT_IOAPIC_EOI`]: the vector the guest acknowledged.
    fn ioapic_eoi(&mut self) -> Option<u8>;
}
