//! TDX operations of the recording fake. Besides recording each call with its arguments (including the bytes
//! handed to `KVM_TDX_INIT_MEM_REGION`), the fake enforces the ordering and range rules KVM and the TDX module
//! enforce, so a launch sequence that passes here does not fail on them on a real host:
//! - `KVM_CAP_SPLIT_IRQCHIP` and `KVM_TDX_INIT_VM` before any vCPU (KVM: `-EINVAL` / `-EIO` otherwise);
//! - INIT_VM attributes/XFAM within the capabilities, each CPUID entry a configurable leaf (KVM rejects
//!   others) with no bits outside the configurable mask (what QEMU's filter guarantees);
//! - INIT_VM CPUID with leaf 0x80000008 carrying GPAW 48 or 52 in EAX[23:16] (KVM: `-EINVAL` otherwise);
//! - `KVM_TDX_INIT_VCPU` once per vCPU, after a `KVM_SET_CPUID2` that advertises x2APIC (KVM switches the LAPIC
//!   to x2APIC mode and fails otherwise), before `KVM_TDX_INIT_MEM_REGION`;
//! - INIT_MEM_REGION only on whole, page-aligned pages (source too), inside a guest_memfd slot, already
//!   `PRIVATE`, never twice for a page, and only before `KVM_TDX_FINALIZE_VM`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{Call, FakeHypervisor, FakeVcpu, FakeVm, ScriptedExit};
use crate::hypervisor::tdx::{
    CAP_MAX_VCPUS, GuestMemfd, MEMORY_ATTRIBUTE_PRIVATE, MapGpaRange, MemoryFault, PrivateMemoryRegion,
    TdxCapabilities, TdxHypervisor, TdxInitVm, TdxVcpu, TdxVm, TdxVmcall, VM_TYPE_TDX,
};
use crate::hypervisor::{CpuIdEntry, HypervisorError, Result};

const PAGE: u64 = 4096;

/// Bytes recorded from an INIT_MEM_REGION call; `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct PageData(pub Arc<Vec<u8>>);

impl std::fmt::Debug for PageData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageData({} bytes)", self.0.len())
    }
}

/// One recorded TDX operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TdxCall {
    SupportedVmTypes,
    CreateTdxVm,
    CheckExtension(u32),
    EnableSplitIrqchip {
        ioapic_pins: u32,
    },
    Capabilities,
    InitVm(Box<TdxInitVm>),
    CreateGuestMemfd {
        size: u64,
    },
    SetPrivateMemoryRegion {
        slot: u32,
        guest_phys_addr: u64,
        size: u64,
        guest_memfd_offset: u64,
    },
    SetMemoryAttributes {
        address: u64,
        size: u64,
        attributes: u64,
    },
    InitVcpu {
        vcpu: u32,
        rcx: u64,
    },
    GetCpuid(u32),
    InitMemRegion {
        vcpu: u32,
        gpa: u64,
        nr_pages: u64,
        measure: bool,
        source: PageData,
    },
    Finalize,
    /// The return code the VMM gave a forwarded TDVMCALL.
    VmcallRet {
        vcpu: u32,
        ret: u64,
    },
    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)`.
    EnableExitHypercall {
        mask: u64,
    },
    /// `KVM_SIGNAL_MSI`.
    SignalMsi {
        address: u64,
        data: u32,
    },
    /// The result the VMM gave a `KVM_EXIT_HYPERCALL`.
    HypercallRet {
        vcpu: u32,
        ret: u64,
    },
}

/// What the fake TDX host reports.
#[derive(Debug, Clone)]
pub struct FakeTdxHost {
    /// `KVM_CAP_VM_TYPES` bit mask.
    pub vm_types: u64,
    pub caps: TdxCapabilities,
    /// `KVM_CAP_MAX_VCPUS` on the TD.
    pub max_vcpus: u64,
    /// What `KVM_TDX_GET_CPUID` returns for every vCPU.
    pub vcpu_cpuid: Vec<CpuIdEntry>,
}

/// The TD's lifecycle state inside the fake.
#[derive(Debug, Default)]
pub(super) struct TdState {
    created: bool,
    split_irqchip: bool,
    initialized: bool,
    finalized: bool,
    /// vCPU id → INIT_VCPU done.
    vcpus: BTreeMap<u32, bool>,
    /// guest_memfd slots `[start, end)`.
    gmem_slots: Vec<(u64, u64)>,
    /// Private ranges `[start, end)`.
    private: Vec<(u64, u64)>,
    added_pages: BTreeSet<u64>,
    exit_hypercall_mask: u64,
}

impl TdState {
    /// `KVM_CAP_SPLIT_IRQCHIP` was enabled.
    pub(super) fn split_irqchip(&self) -> bool {
        self.split_irqchip
    }
}

fn reject(what: impl Into<String>) -> HypervisorError {
    HypervisorError::Fake(what.into())
}

fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    // Ranges recorded by the launch code never overlap partially; a simple per-page check is enough here.
    (start..end)
        .step_by(PAGE as usize)
        .all(|p| ranges.iter().any(|&(a, b)| a <= p && p + PAGE <= b))
}

impl FakeHypervisor {
    /// A fake host that offers TDX with the given capabilities.
    pub fn with_tdx(supported_cpuid: Vec<CpuIdEntry>, host: FakeTdxHost) -> Self {
        Self {
            tdx: Some(Arc::new(host)),
            ..Self::new(supported_cpuid)
        }
    }

    fn tdx_host(&self) -> Result<Arc<FakeTdxHost>> {
        self.tdx
            .clone()
            .ok_or_else(|| reject("this fake host has no TDX (construct it with FakeHypervisor::with_tdx)"))
    }
}

impl TdxHypervisor for FakeHypervisor {
    fn supported_vm_types(&self) -> Result<u64> {
        self.lock().calls.push(Call::Tdx(TdxCall::SupportedVmTypes));
        // Without TDX, a modern KVM reports the default VM type only.
        Ok(self.tdx.as_ref().map_or(1, |h| h.vm_types))
    }

    fn create_tdx_vm(&self) -> Result<Arc<dyn TdxVm>> {
        let host = self.tdx_host()?;
        let mut s = self.lock();
        s.calls.push(Call::Tdx(TdxCall::CreateTdxVm));
        if host.vm_types & (1 << VM_TYPE_TDX) == 0 {
            return Err(reject("KVM_CREATE_VM(KVM_X86_TDX_VM): type not supported"));
        }
        s.td = TdState {
            created: true,
            ..TdState::default()
        };
        drop(s);
        Ok(Arc::new(FakeVm { hv: self.clone() }))
    }
}

impl FakeVm {
    fn td_call(&self, call: TdxCall, check: impl FnOnce(&mut TdState, &FakeTdxHost) -> Result<()>) -> Result<()> {
        let host = self.hv.tdx_host()?;
        let mut s = self.hv.lock();
        s.calls.push(Call::Tdx(call));
        if !s.td.created {
            return Err(reject("not a TD (create it with create_tdx_vm)"));
        }
        check(&mut s.td, &host)
    }
}

impl TdxVm for FakeVm {
    fn check_extension(&self, cap: u32) -> Result<u64> {
        let host = self.hv.tdx_host()?;
        self.hv.lock().calls.push(Call::Tdx(TdxCall::CheckExtension(cap)));
        Ok(match cap {
            CAP_MAX_VCPUS => host.max_vcpus,
            crate::hypervisor::tdx::CAP_MEMORY_ATTRIBUTES => MEMORY_ATTRIBUTE_PRIVATE,
            crate::hypervisor::tdx::CAP_GUEST_MEMFD | crate::hypervisor::tdx::CAP_USER_MEMORY2 => 1,
            _ => 0,
        })
    }

    fn enable_split_irqchip(&self, ioapic_pins: u32) -> Result<()> {
        self.td_call(TdxCall::EnableSplitIrqchip { ioapic_pins }, |td, _| {
            if !td.vcpus.is_empty() {
                return Err(reject("KVM_CAP_SPLIT_IRQCHIP after vCPUs were created"));
            }
            td.split_irqchip = true;
            Ok(())
        })
    }

    fn tdx_capabilities(&self) -> Result<TdxCapabilities> {
        let host = self.hv.tdx_host()?;
        self.td_call(TdxCall::Capabilities, |_, _| Ok(()))?;
        Ok(host.caps.clone())
    }

    fn tdx_init_vm(&self, params: &TdxInitVm) -> Result<()> {
        self.td_call(TdxCall::InitVm(Box::new(params.clone())), |td, host| {
            if td.initialized || !td.vcpus.is_empty() {
                return Err(reject("KVM_TDX_INIT_VM twice or after vCPU creation"));
            }
            let gpaw = params
                .cpuid
                .iter()
                .find(|e| e.function == 0x8000_0008 && e.index == 0)
                .map(|e| (e.eax >> 16) & 0xff);
            if !matches!(gpaw, Some(48 | 52)) {
                return Err(reject(format!("CPUID 0x80000008 GPAW {gpaw:?}: KVM needs 48 or 52")));
            }
            let caps = &host.caps;
            if params.attributes & !caps.supported_attrs != 0 {
                return Err(reject(format!("TD attributes {:#x} not supported", params.attributes)));
            }
            if params.xfam & !caps.supported_xfam != 0 {
                return Err(reject(format!("XFAM {:#x} not supported", params.xfam)));
            }
            for e in &params.cpuid {
                let Some(conf) = caps
                    .cpuid
                    .iter()
                    .find(|c| c.function == e.function && c.index == e.index)
                else {
                    return Err(reject(format!(
                        "CPUID leaf {:#x}.{} is not configurable",
                        e.function, e.index
                    )));
                };
                let extra = [
                    e.eax & !conf.eax,
                    e.ebx & !conf.ebx,
                    e.ecx & !conf.ecx,
                    e.edx & !conf.edx,
                ];
                if extra.iter().any(|&x| x != 0) {
                    return Err(reject(format!(
                        "CPUID leaf {:#x}.{} sets non-configurable bits {extra:x?}",
                        e.function, e.index
                    )));
                }
            }
            td.initialized = true;
            Ok(())
        })
    }

    fn create_guest_memfd(&self, size: u64) -> Result<GuestMemfd> {
        self.td_call(TdxCall::CreateGuestMemfd { size }, |_, _| {
            if size == 0 || !size.is_multiple_of(PAGE) {
                return Err(reject(format!("guest_memfd size {size:#x}")));
            }
            Ok(())
        })?;
        // Any real fd stands in for the guest_memfd.
        let file = File::open("/dev/null").map_err(|e| reject(format!("opening /dev/null: {e}")))?;
        Ok(GuestMemfd {
            fd: OwnedFd::from(file),
            size,
        })
    }

    unsafe fn set_private_memory_region(&self, region: &PrivateMemoryRegion<'_>) -> Result<()> {
        let call = TdxCall::SetPrivateMemoryRegion {
            slot: region.slot,
            guest_phys_addr: region.guest_phys_addr,
            size: region.size,
            guest_memfd_offset: region.guest_memfd_offset,
        };
        let (start, size) = (region.guest_phys_addr, region.size);
        self.td_call(call, |td, _| {
            let end = start
                .checked_add(size)
                .filter(|_| start.is_multiple_of(PAGE) && size.is_multiple_of(PAGE) && size > 0)
                .ok_or_else(|| reject(format!("memslot {start:#x}+{size:#x}")))?;
            if td.gmem_slots.iter().any(|&(a, b)| start < b && a < end) {
                return Err(reject(format!("memslot {start:#x}+{size:#x} overlaps another")));
            }
            td.gmem_slots.push((start, end));
            Ok(())
        })
    }

    fn set_memory_attributes(&self, address: u64, size: u64, attributes: u64) -> Result<()> {
        let call = TdxCall::SetMemoryAttributes {
            address,
            size,
            attributes,
        };
        self.td_call(call, |td, _| {
            if attributes & !MEMORY_ATTRIBUTE_PRIVATE != 0 {
                return Err(reject(format!("memory attributes {attributes:#x}")));
            }
            let end = address.saturating_add(size);
            if attributes & MEMORY_ATTRIBUTE_PRIVATE != 0 {
                td.private.push((address, end));
            } else {
                td.private.retain(|&(a, b)| b <= address || end <= a);
            }
            Ok(())
        })
    }

    fn create_tdx_vcpu(&self, id: u32) -> Result<Box<dyn TdxVcpu>> {
        let host = self.hv.tdx_host()?;
        {
            let mut s = self.hv.lock();
            s.calls.push(Call::CreateVcpu(id));
            let td = &mut s.td;
            if !td.split_irqchip || !td.initialized {
                return Err(reject("TD vCPU before KVM_CAP_SPLIT_IRQCHIP and KVM_TDX_INIT_VM"));
            }
            if u64::from(id) >= host.max_vcpus || td.vcpus.insert(id, false).is_some() {
                return Err(reject(format!("vCPU id {id} out of range or duplicate")));
            }
        }
        Ok(Box::new(FakeVcpu {
            id,
            hv: self.hv.clone(),
            buf: Vec::new(),
            pending_in: None,
            mmio_buf: [0; 8],
            last_exit: None,
        }))
    }

    fn tdx_finalize(&self) -> Result<()> {
        self.td_call(TdxCall::Finalize, |td, _| {
            if !td.initialized || td.finalized || td.vcpus.values().any(|inited| !inited) {
                return Err(reject("KVM_TDX_FINALIZE_VM before INIT_VM/INIT_VCPU, or twice"));
            }
            td.finalized = true;
            Ok(())
        })
    }

    fn enable_exit_hypercall(&self, mask: u64) -> Result<()> {
        self.td_call(TdxCall::EnableExitHypercall { mask }, |td, _| {
            // KVM_CAP_EXIT_HYPERCALL accepts only hypercalls it knows how to forward (KVM_EXIT_HYPERCALL_VALID_MASK
            // is MAP_GPA_RANGE alone).
            if mask & !(1 << crate::hypervisor::tdx::HC_MAP_GPA_RANGE) != 0 {
                return Err(reject(format!("KVM_CAP_EXIT_HYPERCALL mask {mask:#x}")));
            }
            td.exit_hypercall_mask = mask;
            Ok(())
        })
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        self.td_call(TdxCall::SignalMsi { address, data }, |td, _| {
            // The LAPIC lives in the kernel only once the split irqchip is on; the MSI window is 0xFEExxxxx.
            if !td.split_irqchip || address >> 20 != 0xfee {
                return Err(reject(format!(
                    "KVM_SIGNAL_MSI to {address:#x} without a split irqchip/LAPIC"
                )));
            }
            Ok(())
        })
    }
}

impl FakeVcpu {
    fn td_call(&self, call: TdxCall, check: impl FnOnce(&mut TdState) -> Result<()>) -> Result<()> {
        let mut s = self.hv.lock();
        s.calls.push(Call::Tdx(call));
        check(&mut s.td)
    }
}

impl TdxVcpu for FakeVcpu {
    fn tdx_init_vcpu(&self, rcx: u64) -> Result<()> {
        let id = self.id;
        let x2apic = self.hv.lock().calls.iter().rev().find_map(|c| match c {
            Call::SetCpuid(v, entries) if *v == id => Some(
                entries
                    .iter()
                    .any(|e| e.function == 1 && e.ecx & crate::tdx::params::CPUID1_ECX_X2APIC != 0),
            ),
            _ => None,
        });
        self.td_call(TdxCall::InitVcpu { vcpu: id, rcx }, |td| {
            if x2apic != Some(true) {
                return Err(reject(format!(
                    "KVM_TDX_INIT_VCPU on vCPU {id} without x2APIC in its CPUID"
                )));
            }
            match td.vcpus.get_mut(&id) {
                Some(inited) if !*inited && !td.finalized => *inited = true,
                _ => {
                    return Err(reject(format!(
                        "KVM_TDX_INIT_VCPU on vCPU {id}: unknown, repeated or finalized"
                    )));
                }
            }
            Ok(())
        })
    }

    fn tdx_get_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let host = self.hv.tdx_host()?;
        let id = self.id;
        self.td_call(TdxCall::GetCpuid(id), |td| {
            // KVM reads the TD-scope CPUID values; it only needs INIT_VM (and a vCPU fd).
            if !td.initialized || !td.vcpus.contains_key(&id) {
                return Err(reject(format!("KVM_TDX_GET_CPUID on vCPU {id} before INIT_VM")));
            }
            Ok(())
        })?;
        Ok(host.vcpu_cpuid.clone())
    }

    fn tdx_init_mem_region(&self, source: &[u8], gpa: u64, measure: bool) -> Result<()> {
        let id = self.id;
        let len = source.len() as u64;
        let call = TdxCall::InitMemRegion {
            vcpu: id,
            gpa,
            nr_pages: len / PAGE,
            measure,
            source: PageData(Arc::new(source.to_vec())),
        };
        let aligned_source = (source.as_ptr() as u64).is_multiple_of(PAGE);
        self.td_call(call, |td| {
            if td.vcpus.get(&id) != Some(&true) || td.finalized {
                return Err(reject("KVM_TDX_INIT_MEM_REGION before INIT_VCPU or after FINALIZE"));
            }
            if len == 0 || !len.is_multiple_of(PAGE) || !gpa.is_multiple_of(PAGE) || !aligned_source {
                return Err(reject(format!(
                    "INIT_MEM_REGION {gpa:#x}+{len:#x}: not whole aligned pages"
                )));
            }
            let end = gpa
                .checked_add(len)
                .ok_or_else(|| reject("INIT_MEM_REGION range overflows"))?;
            if !covered(&td.gmem_slots, gpa, end) {
                return Err(reject(format!(
                    "INIT_MEM_REGION {gpa:#x}..{end:#x} not in a guest_memfd slot"
                )));
            }
            if !covered(&td.private, gpa, end) {
                return Err(reject(format!("INIT_MEM_REGION {gpa:#x}..{end:#x} not PRIVATE")));
            }
            for page in (gpa..end).step_by(PAGE as usize) {
                if !td.added_pages.insert(page) {
                    return Err(reject(format!("page {page:#x} added twice (TDH.MEM.PAGE.ADD fails)")));
                }
            }
            Ok(())
        })
    }

    fn tdx_vmcall(&mut self) -> Option<TdxVmcall> {
        match self.last_exit {
            Some(ScriptedExit::TdxVmcall(call)) => Some(call),
            _ => None,
        }
    }

    fn set_tdx_vmcall_ret(&mut self, ret: u64) -> Result<()> {
        let id = self.id;
        let pending = matches!(self.last_exit, Some(ScriptedExit::TdxVmcall(_)));
        self.td_call(TdxCall::VmcallRet { vcpu: id, ret }, |_| {
            if !pending {
                return Err(reject("TDVMCALL return value without a KVM_EXIT_TDX"));
            }
            Ok(())
        })
    }

    fn memory_fault(&mut self) -> Option<MemoryFault> {
        match self.last_exit {
            Some(ScriptedExit::MemoryFault(fault)) => Some(fault),
            _ => None,
        }
    }

    fn map_gpa_range(&mut self) -> Option<MapGpaRange> {
        let masked_in = self.hv.lock().td.exit_hypercall_mask & (1 << crate::hypervisor::tdx::HC_MAP_GPA_RANGE) != 0;
        match self.last_exit {
            // Like KVM: without the capability bit the guest's MapGPA never reaches userspace.
            Some(ScriptedExit::MapGpa(range)) if masked_in => Some(range),
            _ => None,
        }
    }

    fn set_hypercall_ret(&mut self, ret: u64) -> Result<()> {
        let id = self.id;
        let pending = matches!(self.last_exit, Some(ScriptedExit::MapGpa(_)));
        self.td_call(TdxCall::HypercallRet { vcpu: id, ret }, |_| {
            if !pending {
                return Err(reject("hypercall result without a KVM_EXIT_HYPERCALL"));
            }
            Ok(())
        })
    }

    fn ioapic_eoi(&mut self) -> Option<u8> {
        match self.last_exit {
            Some(ScriptedExit::IoapicEoi(vector)) => Some(vector),
            _ => None,
        }
    }
}
