//! The KVM implementation of the hypervisor traits (the only module that calls `kvm-ioctls`).

mod tdx;
pub mod tdx_uapi;

use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KvmIrqRouting, Msrs, kvm_cpuid_entry2,
    kvm_dtable, kvm_fpu, kvm_irq_routing_entry, kvm_lapic_state, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_run,
    kvm_segment, kvm_sregs, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress as KvmIoEventAddress, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{
    CpuIdEntry, DescriptorTable, FpuState, HypervisorError, IoEventAddress, IrqRoute, LapicState, MsrEntry, Result,
    SegmentRegister, SpecialRegisters, StandardRegisters, SystemEventKind, VcpuExit,
};

fn ioctl_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::Ioctl {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(ioctl_err("open /dev/kvm"))?;
        Ok(Self { kvm })
    }

    /// Whether `/dev/kvm` exists at all (tests use this to decide whether to skip).
    pub fn is_available() -> bool {
        std::path::Path::new("/dev/kvm").exists()
    }
}

impl super::Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vm(&self) -> Result<Arc<dyn super::Vm>> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        Ok(Arc::new(KvmVm { fd }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid.as_slice().iter().map(cpuid_from_kvm).collect())
    }
}

struct KvmVm {
    fd: VmFd,
}

impl super::Vm for KvmVm {
    unsafe fn set_user_memory_region(&self, slot: u32, guest_phys_addr: u64, size: u64, host_addr: u64) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees (trait contract) that the host range is a live mapping that outlives
        // the VM.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn create_irq_chip(&self) -> Result<()> {
        self.fd.create_irq_chip().map_err(ioctl_err("KVM_CREATE_IRQCHIP"))
    }

    fn create_pit(&self) -> Result<()> {
        let config = kvm_pit_config::default();
        self.fd.create_pit2(config).map_err(ioctl_err("KVM_CREATE_PIT2"))
    }

    fn set_tss_address(&self, addr: u64) -> Result<()> {
        let addr = usize::try_from(addr).map_err(|_| HypervisorError::Invalid(format!("TSS address {addr:#x}")))?;
        self.fd.set_tss_address(addr).map_err(ioctl_err("KVM_SET_TSS_ADDR"))
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(event, gsi).map_err(ioctl_err("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(event, gsi)
            .map_err(ioctl_err("KVM_IRQFD (deassign)"))
    }

    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(route_to_kvm).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| HypervisorError::Invalid(format!("too many GSI routes ({}): {e:?}", routes.len())))?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }

    fn register_ioevent(&self, event: &EventFd, addr: IoEventAddress) -> Result<()> {
        self.fd
            .register_ioevent(event, &ioevent_addr(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    fn unregister_ioevent(&self, event: &EventFd, addr: IoEventAddress) -> Result<()> {
        self.fd
            .unregister_ioevent(event, &ioevent_addr(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD (deassign)"))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn super::Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        Ok(Box::new(KvmVcpu { id, fd }))
    }
}

struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
}

impl super::Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        self.fd
            .get_regs()
            .map(|r| regs_from_kvm(&r))
            .map_err(ioctl_err("KVM_GET_REGS"))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd.set_regs(&regs_to_kvm(regs)).map_err(ioctl_err("KVM_SET_REGS"))
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        self.fd
            .get_sregs()
            .map(|s| sregs_from_kvm(&s))
            .map_err(ioctl_err("KVM_GET_SREGS"))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd
            .set_sregs(&sregs_to_kvm(sregs))
            .map_err(ioctl_err("KVM_SET_SREGS"))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let kfpu = kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&kfpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let kentries: Vec<kvm_cpuid_entry2> = entries.iter().map(cpuid_to_kvm).collect();
        let cpuid = CpuId::from_entries(&kentries)
            .map_err(|e| HypervisorError::Invalid(format!("too many CPUID entries ({}): {e:?}", entries.len())))?;
        self.fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let kentries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kmsrs = Msrs::from_entries(&kentries)
            .map_err(|e| HypervisorError::Invalid(format!("too many MSRs ({}): {e:?}", msrs.len())))?;
        let set = self.fd.set_msrs(&kmsrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if set < msrs.len() {
            return Err(HypervisorError::PartialMsrs {
                op: "KVM_SET_MSRS",
                set,
                requested: msrs.len(),
                first_rejected: msrs.get(set).map(|m| m.index).unwrap_or(0),
            });
        }
        Ok(())
    }

    fn get_lapic(&self) -> Result<LapicState> {
        let k = self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        let mut state = LapicState::default();
        for (dst, src) in state.regs.iter_mut().zip(k.regs.iter()) {
            *dst = *src as u8;
        }
        Ok(state)
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        let mut k = kvm_lapic_state::default();
        for (dst, src) in k.regs.iter_mut().zip(lapic.regs.iter()) {
            *dst = *src as _;
        }
        self.fd.set_lapic(&k).map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // Exits whose details kvm-ioctls does not decode are read from the shared kvm_run page afterwards; the
        // raw pointer sidesteps the borrow that the decoded exit holds on `self.fd`.
        let run_ptr: *const kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
                KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
                KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
                KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
                KvmExit::Hlt => VcpuExit::Hlt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::Intr => VcpuExit::Interrupted,
                KvmExit::FailEntry(reason, cpu) => VcpuExit::FailEntry { reason, cpu },
                KvmExit::SystemEvent(kind, data) => VcpuExit::SystemEvent {
                    kind: match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => SystemEventKind::Shutdown,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => SystemEventKind::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_CRASH => SystemEventKind::Crash,
                        other => SystemEventKind::Other(other),
                    },
                    data: data.to_vec(),
                },
                KvmExit::InternalError => {
                    // SAFETY: `run_ptr` points into the kvm_run mmap owned by `self.fd`, which is alive; the
                    // kernel finished writing it (KVM_RUN returned).
                    let run = unsafe { &*run_ptr };
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active union member.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    VcpuExit::InternalError {
                        suberror: internal.suberror,
                        data: internal.data[..n].to_vec(),
                    }
                }
                other => {
                    let (reason, name) = exit_name(&other);
                    VcpuExit::Other { reason, name }
                }
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(VcpuExit::Interrupted),
            Err(e) => Err(ioctl_err("KVM_RUN")(e)),
        }
    }
}

fn ioevent_addr(addr: IoEventAddress) -> KvmIoEventAddress {
    match addr {
        IoEventAddress::Pio(p) => KvmIoEventAddress::Pio(p),
        IoEventAddress::Mmio(m) => KvmIoEventAddress::Mmio(m),
    }
}

fn route_to_kvm(route: &IrqRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi: route.gsi(),
        ..Default::default()
    };
    match *route {
        IrqRoute::Irqchip { chip, pin, .. } => {
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
        }
        IrqRoute::Msi {
            address_lo,
            address_hi,
            data,
            ..
        } => {
            e.type_ = KVM_IRQ_ROUTING_MSI;
            e.u.msi.address_lo = address_lo;
            e.u.msi.address_hi = address_hi;
            e.u.msi.data = data;
        }
    }
    e
}

fn exit_name(exit: &KvmExit<'_>) -> (u32, &'static str) {
    use kvm_bindings as kb;
    match exit {
        KvmExit::Unknown => (kb::KVM_EXIT_UNKNOWN, "UNKNOWN"),
        KvmExit::Exception => (kb::KVM_EXIT_EXCEPTION, "EXCEPTION"),
        KvmExit::Hypercall(_) => (kb::KVM_EXIT_HYPERCALL, "HYPERCALL"),
        KvmExit::Debug(_) => (kb::KVM_EXIT_DEBUG, "DEBUG"),
        KvmExit::IrqWindowOpen => (kb::KVM_EXIT_IRQ_WINDOW_OPEN, "IRQ_WINDOW_OPEN"),
        KvmExit::SetTpr => (kb::KVM_EXIT_SET_TPR, "SET_TPR"),
        KvmExit::TprAccess => (kb::KVM_EXIT_TPR_ACCESS, "TPR_ACCESS"),
        KvmExit::Nmi => (kb::KVM_EXIT_NMI, "NMI"),
        KvmExit::IoapicEoi(_) => (kb::KVM_EXIT_IOAPIC_EOI, "IOAPIC_EOI"),
        KvmExit::Hyperv => (kb::KVM_EXIT_HYPERV, "HYPERV"),
        KvmExit::X86Rdmsr(_) => (kb::KVM_EXIT_X86_RDMSR, "X86_RDMSR"),
        KvmExit::X86Wrmsr(_) => (kb::KVM_EXIT_X86_WRMSR, "X86_WRMSR"),
        KvmExit::MemoryFault { .. } => (kb::KVM_EXIT_MEMORY_FAULT, "MEMORY_FAULT"),
        KvmExit::Unsupported(r) => (*r, "UNSUPPORTED"),
        _ => (u32::MAX, "OTHER"),
    }
}

fn cpuid_from_kvm(e: &kvm_cpuid_entry2) -> CpuIdEntry {
    CpuIdEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn cpuid_to_kvm(e: &CpuIdEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

fn regs_from_kvm(r: &kvm_regs) -> StandardRegisters {
    StandardRegisters {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn regs_to_kvm(r: &StandardRegisters) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> SegmentRegister {
    SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
    }
}

fn seg_to_kvm(s: &SegmentRegister) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
    }
}

fn sregs_to_kvm(s: &SpecialRegisters) -> kvm_sregs {
    kvm_sregs {
        cs: seg_to_kvm(&s.cs),
        ds: seg_to_kvm(&s.ds),
        es: seg_to_kvm(&s.es),
        fs: seg_to_kvm(&s.fs),
        gs: seg_to_kvm(&s.gs),
        ss: seg_to_kvm(&s.ss),
        tr: seg_to_kvm(&s.tr),
        ldt: seg_to_kvm(&s.ldt),
        gdt: kvm_dtable {
            base: s.gdt.base,
            limit: s.gdt.limit,
            ..Default::default()
        },
        idt: kvm_dtable {
            base: s.idt.base,
            limit: s.idt.limit,
            ..Default::default()
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
    }
}
