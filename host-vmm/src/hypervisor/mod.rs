//! The hypervisor abstraction: every raw KVM ioctl of this crate lives below this module.
//!
//! The rest of the VMM sees three traits — [`Hypervisor`] (the `/dev/kvm` handle), [`Vm`] (one VM fd) and
//! [`Vcpu`] (one vCPU fd) — and plain data types of our own (registers, CPUID entries, exit reasons). Two
//! implementations exist: [`kvm`] (the real thing, via `kvm-ioctls`) and [`fake`] (records every call with its
//! arguments and replays scripted exits, so VMM logic is unit-testable without `/dev/kvm`).
//!
//! [`tdx`] extends the traits with the Intel TDX operations (`TdxHypervisor` → `TdxVm` → `TdxVcpu`), implemented
//! by both.

pub mod fake;
pub mod kvm;
pub mod tdx;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Errors from a hypervisor backend. `op` names the operation (ioctl) that failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: only {set} of {requested} MSRs were accepted (first rejected: {first_rejected:#x})")]
    PartialMsrs {
        op: &'static str,
        set: usize,
        requested: usize,
        first_rejected: u32,
    },
    /// A TDX sub-command (`KVM_MEMORY_ENCRYPT_OP`) failed; `hw_error` is the TDX module's SEAMCALL status.
    #[error("{op} failed: {source} (TDX hw_error {hw_error:#x})")]
    Tdx {
        op: &'static str,
        #[source]
        source: std::io::Error,
        hw_error: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("fake hypervisor: {0}")]
    Fake(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// General purpose registers (the `kvm_regs` layout, as our own type).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register in its unpacked (hidden-part) form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentRegister {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// GDTR / IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Control, segment and descriptor-table registers (the `kvm_sregs` layout, as our own type).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: SegmentRegister,
    pub ds: SegmentRegister,
    pub es: SegmentRegister,
    pub fs: SegmentRegister,
    pub gs: SegmentRegister,
    pub ss: SegmentRegister,
    pub tr: SegmentRegister,
    pub ldt: SegmentRegister,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

/// The parts of the x87/SSE state a VMM sets at boot; everything else starts zeroed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FpuState {
    pub fcw: u16,
    pub mxcsr: u32,
}

/// One CPUID leaf/subleaf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuIdEntry {
    pub function: u32,
    pub index: u32,
    /// `KVM_CPUID_FLAG_*` (bit 0: the index is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry applies to one subleaf only.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// One model-specific register value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// The 1 KiB local APIC register page (`kvm_lapic_state`).
#[derive(Clone, PartialEq, Eq)]
pub struct LapicState {
    pub regs: [u8; 1024],
}

impl Default for LapicState {
    fn default() -> Self {
        Self { regs: [0; 1024] }
    }
}

impl std::fmt::Debug for LapicState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LapicState")
            .field("lint0", &self.read(0x350))
            .field("lint1", &self.read(0x360))
            .finish()
    }
}

impl LapicState {
    /// Reads a 32-bit APIC register at `offset` (0 if out of range).
    pub fn read(&self, offset: usize) -> u32 {
        self.regs
            .get(offset..offset + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0)
    }

    /// Writes a 32-bit APIC register at `offset` (ignored if out of range).
    pub fn write(&mut self, offset: usize, value: u32) {
        if let Some(b) = self.regs.get_mut(offset..offset + 4) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// `KVM_SYSTEM_EVENT_*` kinds we distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEventKind {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}

/// Why `KVM_RUN` returned — our own enum, independent of the backend.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// Port output; `data` holds `count * size` bytes.
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    /// Port input; the VMM fills `data`.
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// HLT with no in-kernel irqchip to park the vCPU.
    Hlt,
    /// Triple fault (or other shutdown condition).
    Shutdown,
    SystemEvent {
        kind: SystemEventKind,
        data: Vec<u64>,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` with its suberror and extra data words.
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// The run was interrupted by a signal (EINTR / `KVM_EXIT_INTR`); used to kick vCPUs.
    Interrupted,
    /// Anything else, with the raw exit-reason number and a name.
    Other {
        reason: u32,
        name: &'static str,
    },
}

/// Where a guest write signals an ioeventfd (no exit to userspace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u64),
    Mmio(u64),
}

/// One entry of the GSI routing table (`kvm_irq_routing_entry`, as our own type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqRoute {
    /// `gsi` drives `pin` of in-kernel irqchip `chip` (0 = PIC master, 1 = PIC slave, 2 = IOAPIC).
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    /// `gsi` sends a message-signalled interrupt.
    Msi {
        gsi: u32,
        address_lo: u32,
        address_hi: u32,
        data: u32,
    },
}

impl IrqRoute {
    pub fn gsi(&self) -> u32 {
        match self {
            IrqRoute::Irqchip { gsi, .. } | IrqRoute::Msi { gsi, .. } => *gsi,
        }
    }
}

/// GSIs the in-kernel IOAPIC has; MSI routes use GSIs from here up.
pub const IOAPIC_PINS: u32 = 24;

/// The routing table KVM installs with `KVM_CREATE_IRQCHIP` (ISA IRQs on both PIC and IOAPIC, 16..24 on the
/// IOAPIC only). `KVM_SET_GSI_ROUTING` replaces the whole table, so MSI routes are always added to these.
pub fn default_irqchip_routes() -> Vec<IrqRoute> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            routes.push(IrqRoute::Irqchip {
                gsi,
                chip: gsi / 8,
                pin: gsi % 8,
            });
        }
        routes.push(IrqRoute::Irqchip { gsi, chip: 2, pin: gsi });
    }
    routes
}

/// The host's virtualization interface (`/dev/kvm`).
pub trait Hypervisor: Send + Sync {
    /// A short name for diagnostics ("kvm", "fake").
    fn name(&self) -> &'static str;
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID leaves the hypervisor can expose (`KVM_GET_SUPPORTED_CPUID`).
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
}

/// One virtual machine.
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_phys_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must be a valid mapping owned by the caller that stays mapped for as long
    /// as the VM exists (the guest can read and write it at any time).
    unsafe fn set_user_memory_region(&self, slot: u32, guest_phys_addr: u64, size: u64, host_addr: u64) -> Result<()>;
    /// In-kernel PIC + IOAPIC (+ per-vCPU LAPIC).
    fn create_irq_chip(&self) -> Result<()>;
    /// In-kernel i8254 PIT.
    fn create_pit(&self) -> Result<()>;
    /// The three pages the (VMX) hypervisor needs for real-mode TSS emulation.
    fn set_tss_address(&self, addr: u64) -> Result<()>;
    /// Asserts `gsi` whenever `event` is written.
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()>;
    fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()>;
    /// Replaces the whole GSI routing table (include [`default_irqchip_routes`]).
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()>;
    /// Makes guest writes (any width, any value) to `addr` signal `event` inside the kernel instead of exiting.
    fn register_ioevent(&self, event: &EventFd, addr: IoEventAddress) -> Result<()>;
    fn unregister_ioevent(&self, event: &EventFd, addr: IoEventAddress) -> Result<()>;
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
}

/// One virtual CPU. Owned by its thread.
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    fn get_regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    fn get_sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    /// Sets all `msrs`; fails naming the first rejected index if the hypervisor accepts fewer.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    fn get_lapic(&self) -> Result<LapicState>;
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    /// Enters the guest until the next exit that needs the VMM.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
}
