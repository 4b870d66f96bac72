//! The TD launch sequence (upstream KVM TDX, Linux ≥ 6.16; `Documentation/virt/kvm/x86/intel-tdx.rst`):
//!
//! 1. `KVM_CAP_VM_TYPES` must include `KVM_X86_TDX_VM` — otherwise fail with [`TdxError::HostLacksTdx`] before
//!    creating anything.
//! 2. Parse the firmware's TDVF metadata and build the TD HOB with the `measurements` crate (the same code
//!    that predicts MRTD and RTMR0), so the bytes the firmware gets are the bytes the prediction hashes.
//! 3. `KVM_CREATE_VM(KVM_X86_TDX_VM)`; check guest_memfd / private memory attributes / vCPU limit; split
//!    irqchip (TDX requires the IOAPIC in userspace); `KVM_CAP_EXIT_HYPERCALL` so MapGPA reaches us;
//!    `KVM_TDX_CAPABILITIES`; `KVM_TDX_INIT_VM` with attributes, XFAM, CPUID filtered by the capabilities
//!    (with the GPAW in leaf 0x80000008) and MRCONFIGID/MROWNER/MROWNERCONFIG from the config.
//! 4. Memory: guest RAM (`[0, min(mem, 3 GiB))` and the rest from 4 GiB) plus the firmware just below 4 GiB,
//!    each a `KVM_SET_USER_MEMORY_REGION2` slot backed by one guest_memfd (private) and an anonymous mapping
//!    (shared), all marked `PRIVATE`.
//! 5. vCPUs: `KVM_CREATE_VCPU`, `KVM_TDX_GET_CPUID` → `KVM_SET_CPUID2` (x2APIC set: `KVM_TDX_INIT_VCPU`
//!    switches the LAPIC to x2APIC mode and fails if the vCPU's CPUID lacks it), `KVM_TDX_INIT_VCPU`
//!    (RCX = TD HOB address).
//! 6. Per TDVF section, in metadata order: `KVM_TDX_INIT_MEM_REGION` with the section's content (firmware
//!    bytes, the TD HOB, or zeros) and `KVM_TDX_MEASURE_MEMORY_REGION` iff the section has MR_EXTEND. KVM adds
//!    and extends page by page, which is the single-pass MRTD order the predictor uses. PAGE_AUG sections are
//!    left for the guest to accept.
//! 7. `KVM_TDX_FINALIZE_VM`.

use std::sync::Arc;

use dstack_measurements::mrtd::{ATTR_MR_EXTEND, ATTR_PAGE_AUG, MrtdError, Tdvf, TdvfSection, parse_tdvf};
use dstack_measurements::predict::hob::{self, HobError, SECTION_TD_HOB, TdHob};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::params::{self, ATTR_SEPT_VE_DISABLE, GPAW_48, ParamsError};
use crate::hypervisor::tdx::{
    CAP_GUEST_MEMFD, CAP_MAX_VCPUS, CAP_MEMORY_ATTRIBUTES, CAP_USER_MEMORY2, GuestMemfd, HC_MAP_GPA_RANGE,
    MEMORY_ATTRIBUTE_PRIVATE, PrivateMemoryRegion, TdxCapabilities, TdxHypervisor, TdxInitVm, TdxVcpu, TdxVm,
    VM_TYPE_TDX,
};
use crate::hypervisor::{HypervisorError, IOAPIC_PINS};

const PAGE: u64 = 4096;
/// Firmware images we map below 4 GiB: at most 16 MiB (OVMF is 2 or 4 MiB).
const MAX_FIRMWARE: usize = 16 << 20;

/// What to launch.
#[derive(Clone)]
pub struct TdxConfig<'a> {
    /// The TDVF firmware image (e.g. OVMF.fd), mapped so that it ends at 4 GiB.
    pub firmware: &'a [u8],
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// TD attributes; [`ATTR_SEPT_VE_DISABLE`] by default.
    pub attributes: u64,
    /// `None`: every XSAVE feature both KVM and the TDX module support.
    pub xfam: Option<u64>,
    /// Guest physical address width: [`GPAW_48`] (default) or 52 (needs 5-level EPT).
    pub gpaw: u8,
    /// Appear verbatim in the TD report; MRCONFIGID binds the app configuration.
    pub mrconfigid: [u8; 48],
    pub mrowner: [u8; 48],
    pub mrownerconfig: [u8; 48],
}

impl std::fmt::Debug for TdxConfig<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdxConfig")
            .field("firmware_len", &self.firmware.len())
            .field("memory_bytes", &self.memory_bytes)
            .field("vcpus", &self.vcpus)
            .field("attributes", &format_args!("{:#x}", self.attributes))
            .field("xfam", &self.xfam)
            .field("gpaw", &self.gpaw)
            .field("mrconfigid", &hex::encode(self.mrconfigid))
            .finish_non_exhaustive()
    }
}

impl<'a> TdxConfig<'a> {
    /// A production TD (no DEBUG) with all-zero owner fields.
    pub fn new(firmware: &'a [u8], memory_bytes: u64, vcpus: u32) -> Self {
        Self {
            firmware,
            memory_bytes,
            vcpus,
            attributes: ATTR_SEPT_VE_DISABLE,
            xfam: None,
            gpaw: GPAW_48,
            mrconfigid: [0; 48],
            mrowner: [0; 48],
            mrownerconfig: [0; 48],
        }
    }
}

/// Why a TD could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum TdxError {
    #[error(
        "this host cannot run TDX guests: KVM_CAP_VM_TYPES = {types:#x} lacks KVM_X86_TDX_VM (type 5). A TDX host \
         needs Linux >= 6.16 with CONFIG_KVM_INTEL_TDX, kvm_intel loaded with tdx=Y, and TDX enabled in the \
         firmware (see host-vmm/docs/tdx-host.md)"
    )]
    HostLacksTdx { types: u64 },
    #[error("the TDX VM lacks {0}")]
    MissingCapability(&'static str),
    #[error("{step}: {source}")]
    Hypervisor {
        step: &'static str,
        #[source]
        source: HypervisorError,
    },
    #[error("firmware: {0}")]
    Firmware(#[from] MrtdError),
    #[error("TD HOB: {0}")]
    Hob(#[from] HobError),
    #[error("TD parameters: {0}")]
    Params(#[from] ParamsError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("TDVF section at {addr:#x}: {reason}")]
    Section { addr: u64, reason: String },
}

type Result<T> = std::result::Result<T, TdxError>;

fn hv(step: &'static str) -> impl FnOnce(HypervisorError) -> TdxError {
    move |source| TdxError::Hypervisor { step, source }
}

/// A finalized TD, ready for its vCPUs to run.
pub struct LaunchedTd {
    pub vm: Arc<dyn TdxVm>,
    pub vcpus: Vec<Box<dyn TdxVcpu>>,
    /// The shared (host-visible) view of guest memory: RAM and the firmware range.
    pub shared_memory: GuestMemoryMmap,
    /// The private memory; must live as long as the VM.
    pub guest_memfd: GuestMemfd,
    pub tdvf: Tdvf,
    /// The TD HOB the firmware receives (RTMR0's first event hashes `hob.measured()`).
    pub hob: TdHob,
    pub caps: TdxCapabilities,
    pub init_vm: TdxInitVm,
}

impl std::fmt::Debug for LaunchedTd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchedTd")
            .field("vcpus", &self.vcpus.len())
            .field("hob_base", &self.hob.base)
            .field("init_vm", &self.init_vm)
            .finish_non_exhaustive()
    }
}

/// Fails with [`TdxError::HostLacksTdx`] unless KVM offers the TDX VM type.
pub fn check_host(hv_: &dyn TdxHypervisor) -> Result<()> {
    let types = hv_
        .supported_vm_types()
        .map_err(hv("KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)"))?;
    if types & (1 << VM_TYPE_TDX) == 0 {
        return Err(TdxError::HostLacksTdx { types });
    }
    Ok(())
}

/// Guest-physical memory of the TD: RAM ranges and the firmware range, each one memslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdLayout {
    /// `(gpa, size)`; the last entry is the firmware.
    pub slots: Vec<(u64, u64)>,
    pub firmware_base: u64,
}

impl TdLayout {
    pub fn new(memory_bytes: u64, firmware_len: usize) -> Result<Self> {
        if firmware_len == 0 || firmware_len > MAX_FIRMWARE || !(firmware_len as u64).is_multiple_of(PAGE) {
            return Err(TdxError::Config(format!(
                "firmware is {firmware_len} bytes; expected whole 4 KiB pages, at most {MAX_FIRMWARE}"
            )));
        }
        if !(dstack_measurements::predict::MIN_MEMORY..=dstack_measurements::predict::MAX_MEMORY)
            .contains(&memory_bytes)
            || !memory_bytes.is_multiple_of(1 << 20)
        {
            return Err(TdxError::Config(format!(
                "memory {memory_bytes} bytes: must be whole MiB in 64 MiB..=1 TiB"
            )));
        }
        let firmware_base = (1u64 << 32) - firmware_len as u64;
        let mut slots = dstack_acpi::layout::ram_ranges(memory_bytes);
        slots.push((firmware_base, firmware_len as u64));
        Ok(Self { slots, firmware_base })
    }

    fn contains(&self, start: u64, size: u64) -> bool {
        let Some(end) = start.checked_add(size) else {
            return false;
        };
        self.slots.iter().any(|&(a, len)| a <= start && end <= a + len)
    }
}

/// Page-aligned, zero-initialized host buffer (KVM requires a page-aligned INIT_MEM_REGION source).
struct PageBuffer(Vec<AlignedPage>);

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct AlignedPage([u8; PAGE as usize]);

impl PageBuffer {
    fn zeroed(bytes: u64) -> Self {
        Self(vec![AlignedPage([0; PAGE as usize]); (bytes / PAGE) as usize])
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `AlignedPage` is `repr(C)` around `[u8; 4096]` with size == alignment == 4096 (no padding), and
        // a Vec's elements are contiguous, so the storage is `len * 4096` initialized bytes borrowed from `self`.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * PAGE as usize) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        let len = self.0.len() * PAGE as usize;
        // SAFETY: as in `as_bytes`; the exclusive borrow of `self` makes the byte view unique.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// The content KVM copies into a section's private pages: the firmware's raw data (zero-padded) and, for the
/// TD_HOB section, the HOB.
fn section_content(fw: &[u8], s: &TdvfSection, hob: &TdHob) -> Result<PageBuffer> {
    let mut buf = PageBuffer::zeroed(s.memory_data_size);
    let bytes = buf.as_bytes_mut();
    let start = s.data_offset as usize;
    let raw = fw
        .get(start..start.saturating_add(s.raw_data_size as usize))
        .ok_or_else(|| section_err(s, "raw data outside the firmware file"))?;
    bytes
        .get_mut(..raw.len())
        .ok_or_else(|| section_err(s, "raw data larger than the section"))?
        .copy_from_slice(raw);
    if s.section_type == SECTION_TD_HOB && s.memory_address == hob.base {
        bytes
            .get_mut(..hob.bytes.len())
            .ok_or_else(|| section_err(s, "TD HOB larger than the section"))?
            .copy_from_slice(&hob.bytes);
    }
    Ok(buf)
}

fn section_err(s: &TdvfSection, reason: &str) -> TdxError {
    TdxError::Section {
        addr: s.memory_address,
        reason: reason.into(),
    }
}

/// Checks the sections the VMM will add: inside a memslot, no measured PAGE_AUG or TD_HOB sections (the
/// predictor hashes firmware bytes there, not what the VMM writes), no overlaps.
fn check_sections(tdvf: &Tdvf, layout: &TdLayout) -> Result<()> {
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for s in &tdvf.sections {
        let extend = s.attributes & ATTR_MR_EXTEND != 0;
        if s.attributes & ATTR_PAGE_AUG != 0 {
            if extend {
                return Err(section_err(s, "PAGE_AUG and MR_EXTEND together"));
            }
            continue;
        }
        if s.section_type == SECTION_TD_HOB && extend {
            return Err(section_err(s, "TD_HOB with MR_EXTEND"));
        }
        if s.memory_data_size == 0 || !layout.contains(s.memory_address, s.memory_data_size) {
            return Err(section_err(s, "not inside guest RAM or the firmware range"));
        }
        let end = s.memory_address + s.memory_data_size;
        if seen.iter().any(|&(a, b)| s.memory_address < b && a < end) {
            return Err(section_err(s, "overlaps another section"));
        }
        seen.push((s.memory_address, end));
    }
    Ok(())
}

/// Launches a TD up to and including `KVM_TDX_FINALIZE_VM` (see the module doc for the sequence).
pub fn launch(hv_: &dyn TdxHypervisor, cfg: &TdxConfig<'_>) -> Result<LaunchedTd> {
    check_host(hv_)?;
    if cfg.vcpus == 0 {
        return Err(TdxError::Config("a TD needs at least one vCPU".into()));
    }
    let layout = TdLayout::new(cfg.memory_bytes, cfg.firmware.len())?;
    let tdvf = parse_tdvf(cfg.firmware)?;
    check_sections(&tdvf, &layout)?;
    let hob = hob::build(&tdvf, cfg.memory_bytes)?;
    let host_cpuid = hv_.supported_cpuid().map_err(hv("KVM_GET_SUPPORTED_CPUID"))?;

    let vm = hv_.create_tdx_vm().map_err(hv("KVM_CREATE_VM(KVM_X86_TDX_VM)"))?;
    for (cap, name) in [
        (CAP_GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD"),
        (CAP_USER_MEMORY2, "KVM_CAP_USER_MEMORY2"),
    ] {
        if vm.check_extension(cap).map_err(hv("KVM_CHECK_EXTENSION"))? == 0 {
            return Err(TdxError::MissingCapability(name));
        }
    }
    let attrs = vm
        .check_extension(CAP_MEMORY_ATTRIBUTES)
        .map_err(hv("KVM_CHECK_EXTENSION"))?;
    if attrs & MEMORY_ATTRIBUTE_PRIVATE == 0 {
        return Err(TdxError::MissingCapability("KVM_MEMORY_ATTRIBUTE_PRIVATE"));
    }
    let max_vcpus = vm.check_extension(CAP_MAX_VCPUS).map_err(hv("KVM_CHECK_EXTENSION"))?;
    if u64::from(cfg.vcpus) > max_vcpus {
        return Err(TdxError::Config(format!(
            "{} vCPUs requested, the TD supports {max_vcpus}",
            cfg.vcpus
        )));
    }
    vm.enable_split_irqchip(IOAPIC_PINS)
        .map_err(hv("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
    // Without this, KVM answers the guest's MapGPA (private <-> shared conversion) with "unsupported".
    vm.enable_exit_hypercall(1 << HC_MAP_GPA_RANGE)
        .map_err(hv("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)"))?;

    let caps = vm.tdx_capabilities().map_err(hv("KVM_TDX_CAPABILITIES"))?;
    let init_vm = TdxInitVm {
        attributes: params::check_attributes(cfg.attributes, &caps)?,
        xfam: params::choose_xfam(cfg.xfam, &host_cpuid, &caps)?,
        mrconfigid: cfg.mrconfigid,
        mrowner: cfg.mrowner,
        mrownerconfig: cfg.mrownerconfig,
        cpuid: params::filter_cpuid(&host_cpuid, &caps, cfg.gpaw)?,
    };
    vm.tdx_init_vm(&init_vm).map_err(hv("KVM_TDX_INIT_VM"))?;

    let (shared_memory, guest_memfd) = setup_private_memory(vm.as_ref(), &layout)?;

    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for id in 0..cfg.vcpus {
        let vcpu = vm.create_tdx_vcpu(id).map_err(hv("KVM_CREATE_VCPU"))?;
        let td_cpuid = vcpu.tdx_get_cpuid().map_err(hv("KVM_TDX_GET_CPUID"))?;
        vcpu.set_cpuid(&params::vcpu_cpuid(&td_cpuid, &host_cpuid))
            .map_err(hv("KVM_SET_CPUID2"))?;
        vcpu.tdx_init_vcpu(hob.base).map_err(hv("KVM_TDX_INIT_VCPU"))?;
        vcpus.push(vcpu);
    }

    let first = vcpus.first().ok_or_else(|| TdxError::Config("no vCPU".into()))?;
    for s in tdvf.sections.iter().filter(|s| s.attributes & ATTR_PAGE_AUG == 0) {
        let content = section_content(cfg.firmware, s, &hob)?;
        first
            .tdx_init_mem_region(content.as_bytes(), s.memory_address, s.attributes & ATTR_MR_EXTEND != 0)
            .map_err(hv("KVM_TDX_INIT_MEM_REGION"))?;
    }
    vm.tdx_finalize().map_err(hv("KVM_TDX_FINALIZE_VM"))?;

    Ok(LaunchedTd {
        vm,
        vcpus,
        shared_memory,
        guest_memfd,
        tdvf,
        hob,
        caps,
        init_vm,
    })
}

/// One guest_memfd for all slots (RAM then firmware, consecutive offsets), an anonymous shared view, each slot
/// registered and marked private.
fn setup_private_memory(vm: &dyn TdxVm, layout: &TdLayout) -> Result<(GuestMemoryMmap, GuestMemfd)> {
    let mut ranges: Vec<(GuestAddress, usize)> = layout
        .slots
        .iter()
        .map(|&(a, len)| (GuestAddress(a), len as usize))
        .collect();
    // Above 3 GiB of RAM the firmware range sits between the two RAM ranges; vm-memory wants address order.
    ranges.sort_by_key(|&(a, _)| a);
    let shared = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| TdxError::Config(format!("mapping shared guest memory: {e}")))?;
    let total: u64 = layout.slots.iter().map(|&(_, len)| len).sum();
    let gmem = vm.create_guest_memfd(total).map_err(hv("KVM_CREATE_GUEST_MEMFD"))?;
    let mut offset = 0;
    for (slot, region) in shared.iter().enumerate() {
        let (gpa, size) = (region.start_addr().0, region.len());
        let private = PrivateMemoryRegion {
            slot: slot as u32,
            guest_phys_addr: gpa,
            size,
            userspace_addr: region.as_ptr() as u64,
            guest_memfd: std::os::fd::AsFd::as_fd(&gmem),
            guest_memfd_offset: offset,
        };
        // SAFETY: the shared view is an anonymous mapping owned by `shared`, which `LaunchedTd` keeps next to
        // the VM for the VM's lifetime.
        unsafe { vm.set_private_memory_region(&private) }.map_err(hv("KVM_SET_USER_MEMORY_REGION2"))?;
        vm.set_memory_attributes(gpa, size, MEMORY_ATTRIBUTE_PRIVATE)
            .map_err(hv("KVM_SET_MEMORY_ATTRIBUTES"))?;
        offset += size;
    }
    Ok((shared, gmem))
}
