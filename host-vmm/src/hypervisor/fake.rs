//! A recording fake of the hypervisor traits: every call is appended to a shared log with its arguments, and
//! `run` replays a per-vCPU script of exits. Lets the boot sequence and run loop be tested without KVM.

mod tdx;

pub use tdx::{FakeTdxHost, PageData, TdxCall};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::{
    CpuIdEntry, FpuState, HypervisorError, IoEventAddress, IrqRoute, LapicState, MsrEntry, Result, SpecialRegisters,
    StandardRegisters, SystemEventKind, VcpuExit,
};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    CreateVm,
    SupportedCpuid,
    SetUserMemoryRegion {
        slot: u32,
        guest_phys_addr: u64,
        size: u64,
    },
    CreateIrqChip,
    CreatePit,
    SetTssAddress(u64),
    RegisterIrqfd {
        gsi: u32,
    },
    UnregisterIrqfd {
        gsi: u32,
    },
    SetGsiRouting(Vec<IrqRoute>),
    RegisterIoevent(IoEventAddress),
    UnregisterIoevent(IoEventAddress),
    CreateVcpu(u32),
    GetRegs(u32),
    SetRegs(u32, StandardRegisters),
    GetSregs(u32),
    SetSregs(u32, Box<SpecialRegisters>),
    SetFpu(u32, FpuState),
    SetCpuid(u32, Vec<CpuIdEntry>),
    SetMsrs(u32, Vec<MsrEntry>),
    GetLapic(u32),
    SetLapic(u32, Box<LapicState>),
    Run(u32),
    /// What the VMM wrote into the buffer of the previous `IoIn` exit (recorded at the next `run`).
    IoInResult {
        vcpu: u32,
        port: u16,
        data: Vec<u8>,
    },
    /// A TDX operation (see [`TdxCall`]).
    Tdx(TdxCall),
}

/// An exit the fake returns from `run`, with owned data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptedExit {
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    IoIn {
        port: u16,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        data: Vec<u8>,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    Hlt,
    Shutdown,
    SystemEvent(SystemEventKind),
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    FailEntry {
        reason: u64,
    },
    Interrupted,
    /// Behaves like a vCPU parked in the kernel (an AP waiting for SIPI): every `run` sleeps 1 ms and returns
    /// `Interrupted`, and this entry stays at the head of the script.
    Parked,
    /// `KVM_EXIT_TDX` (reported as `VcpuExit::Other { reason: 40 }`; details via `TdxVcpu::tdx_vmcall`).
    TdxVmcall(super::tdx::TdxVmcall),
    /// `KVM_EXIT_MEMORY_FAULT` (reported as `VcpuExit::Other { reason: 39 }`).
    MemoryFault(super::tdx::MemoryFault),
    /// A TD's MapGPA as `KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE)` (`VcpuExit::Other { reason: 3 }`).
    MapGpa(super::tdx::MapGpaRange),
    /// `KVM_EXIT_IOAPIC_EOI` with the vector (`VcpuExit::Other { reason: 26 }`).
    IoapicEoi(u8),
}

#[derive(Default)]
struct Shared {
    calls: Vec<Call>,
    scripts: HashMap<u32, VecDeque<ScriptedExit>>,
    regs: HashMap<u32, StandardRegisters>,
    sregs: HashMap<u32, SpecialRegisters>,
    lapic: HashMap<u32, LapicState>,
    td: tdx::TdState,
    /// Registered irqfds (clones of the VMM's eventfds) and the routing table KVM would hold.
    irqfds: Vec<(u32, EventFd)>,
    routes: Vec<IrqRoute>,
}

/// The fake `/dev/kvm`. Clone it to keep a handle for inspecting the log.
#[derive(Clone, Default)]
pub struct FakeHypervisor {
    shared: Arc<Mutex<Shared>>,
    supported_cpuid: Arc<Vec<CpuIdEntry>>,
    /// `Some` when the fake host offers TDX.
    tdx: Option<Arc<FakeTdxHost>>,
}

impl FakeHypervisor {
    pub fn new(supported_cpuid: Vec<CpuIdEntry>) -> Self {
        Self {
            supported_cpuid: Arc::new(supported_cpuid),
            ..Default::default()
        }
    }

    /// Queues exits for vCPU `id`.
    pub fn script(&self, id: u32, exits: impl IntoIterator<Item = ScriptedExit>) {
        self.lock().scripts.entry(id).or_default().extend(exits);
    }

    /// Sets what `get_regs`/`get_sregs` return before the VMM sets anything (e.g. a KVM-like reset state).
    pub fn set_initial_sregs(&self, id: u32, sregs: SpecialRegisters) {
        self.lock().sregs.insert(id, sregs);
    }

    /// A copy of the call log so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panicking test thread must not hide the log from the others.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What KVM would inject now: drains every registered irqfd that was signalled and returns, per signal,
    /// the route its GSI has in the current routing table (an irqfd whose GSI has no route delivers nothing,
    /// as in KVM).
    pub fn deliver_irqfds(&self) -> Vec<IrqRoute> {
        let s = self.lock();
        let mut out = Vec::new();
        for (gsi, fd) in &s.irqfds {
            if fd.read().is_ok()
                && let Some(r) = s.routes.iter().find(|r| r.gsi() == *gsi)
            {
                out.push(*r);
            }
        }
        out
    }

    /// The routing table as last set.
    pub fn gsi_routes(&self) -> Vec<IrqRoute> {
        self.lock().routes.clone()
    }
}

impl super::Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn create_vm(&self) -> Result<Arc<dyn super::Vm>> {
        self.lock().calls.push(Call::CreateVm);
        Ok(Arc::new(FakeVm { hv: self.clone() }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        self.lock().calls.push(Call::SupportedCpuid);
        Ok(self.supported_cpuid.as_ref().clone())
    }
}

struct FakeVm {
    hv: FakeHypervisor,
}

impl FakeVm {
    fn record(&self, call: Call) {
        self.hv.lock().calls.push(call);
    }
}

impl super::Vm for FakeVm {
    unsafe fn set_user_memory_region(&self, slot: u32, guest_phys_addr: u64, size: u64, _host: u64) -> Result<()> {
        self.record(Call::SetUserMemoryRegion {
            slot,
            guest_phys_addr,
            size,
        });
        Ok(())
    }

    fn create_irq_chip(&self) -> Result<()> {
        self.record(Call::CreateIrqChip);
        Ok(())
    }

    fn create_pit(&self) -> Result<()> {
        self.record(Call::CreatePit);
        Ok(())
    }

    fn set_tss_address(&self, addr: u64) -> Result<()> {
        self.record(Call::SetTssAddress(addr));
        Ok(())
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.record(Call::RegisterIrqfd { gsi });
        let fd = event
            .try_clone()
            .map_err(|e| HypervisorError::Fake(format!("cloning an irqfd: {e}")))?;
        self.hv.lock().irqfds.push((gsi, fd));
        Ok(())
    }

    fn unregister_irqfd(&self, _event: &EventFd, gsi: u32) -> Result<()> {
        self.record(Call::UnregisterIrqfd { gsi });
        Ok(())
    }

    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        self.record(Call::SetGsiRouting(routes.to_vec()));
        let mut s = self.hv.lock();
        // KVM (`kvm_set_routing_entry`): irqchip routes are invalid with a split irqchip.
        if s.td.split_irqchip() && routes.iter().any(|r| matches!(r, IrqRoute::Irqchip { .. })) {
            return Err(HypervisorError::Fake(
                "KVM_SET_GSI_ROUTING: irqchip route with a split irqchip (EINVAL)".into(),
            ));
        }
        s.routes = routes.to_vec();
        Ok(())
    }

    fn register_ioevent(&self, _event: &EventFd, addr: IoEventAddress) -> Result<()> {
        self.record(Call::RegisterIoevent(addr));
        Ok(())
    }

    fn unregister_ioevent(&self, _event: &EventFd, addr: IoEventAddress) -> Result<()> {
        self.record(Call::UnregisterIoevent(addr));
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn super::Vcpu>> {
        self.record(Call::CreateVcpu(id));
        Ok(Box::new(FakeVcpu {
            id,
            hv: self.hv.clone(),
            buf: Vec::new(),
            pending_in: None,
            mmio_buf: [0; 8],
            last_exit: None,
        }))
    }
}

struct FakeVcpu {
    id: u32,
    hv: FakeHypervisor,
    buf: Vec<u8>,
    pending_in: Option<u16>,
    mmio_buf: [u8; 8],
    /// The exit `run` returned last (the TDX accessors read it).
    last_exit: Option<ScriptedExit>,
}

impl FakeVcpu {
    fn record(&self, call: Call) {
        self.hv.lock().calls.push(call);
    }
}

impl super::Vcpu for FakeVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        let mut s = self.hv.lock();
        s.calls.push(Call::GetRegs(self.id));
        Ok(s.regs.get(&self.id).copied().unwrap_or_default())
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        let mut s = self.hv.lock();
        s.calls.push(Call::SetRegs(self.id, *regs));
        s.regs.insert(self.id, *regs);
        Ok(())
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        let mut s = self.hv.lock();
        s.calls.push(Call::GetSregs(self.id));
        Ok(s.sregs.get(&self.id).copied().unwrap_or_default())
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        let mut s = self.hv.lock();
        s.calls.push(Call::SetSregs(self.id, Box::new(*sregs)));
        s.sregs.insert(self.id, *sregs);
        Ok(())
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        self.record(Call::SetFpu(self.id, *fpu));
        Ok(())
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        self.record(Call::SetCpuid(self.id, entries.to_vec()));
        Ok(())
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        self.record(Call::SetMsrs(self.id, msrs.to_vec()));
        Ok(())
    }

    fn get_lapic(&self) -> Result<LapicState> {
        let mut s = self.hv.lock();
        s.calls.push(Call::GetLapic(self.id));
        Ok(s.lapic.get(&self.id).cloned().unwrap_or_default())
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        let mut s = self.hv.lock();
        s.calls.push(Call::SetLapic(self.id, Box::new(lapic.clone())));
        s.lapic.insert(self.id, lapic.clone());
        Ok(())
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if let Some(port) = self.pending_in.take() {
            self.record(Call::IoInResult {
                vcpu: self.id,
                port,
                data: self.buf.clone(),
            });
        }
        let next = {
            let mut s = self.hv.lock();
            s.calls.push(Call::Run(self.id));
            let queue = s.scripts.get_mut(&self.id);
            match queue {
                Some(q) if q.front() == Some(&ScriptedExit::Parked) => Some(ScriptedExit::Parked),
                Some(q) => q.pop_front(),
                None => None,
            }
        };
        let Some(next) = next else {
            return Err(HypervisorError::Fake(format!(
                "vCPU {} ran past the end of its script",
                self.id
            )));
        };
        self.last_exit = Some(next.clone());
        Ok(match next {
            ScriptedExit::TdxVmcall(_) => VcpuExit::Other {
                reason: super::tdx::EXIT_TDX,
                name: "TDX",
            },
            ScriptedExit::MemoryFault(_) => VcpuExit::Other {
                reason: super::tdx::EXIT_MEMORY_FAULT,
                name: "MEMORY_FAULT",
            },
            ScriptedExit::MapGpa(_) => VcpuExit::Other {
                reason: super::tdx::EXIT_HYPERCALL,
                name: "HYPERCALL",
            },
            ScriptedExit::IoapicEoi(_) => VcpuExit::Other {
                reason: super::tdx::EXIT_IOAPIC_EOI,
                name: "IOAPIC_EOI",
            },
            ScriptedExit::IoOut { port, data } => {
                self.buf = data;
                VcpuExit::IoOut { port, data: &self.buf }
            }
            ScriptedExit::IoIn { port, len } => {
                self.buf = vec![0; len];
                self.pending_in = Some(port);
                VcpuExit::IoIn {
                    port,
                    data: &mut self.buf,
                }
            }
            ScriptedExit::MmioWrite { addr, data } => {
                self.buf = data;
                VcpuExit::MmioWrite { addr, data: &self.buf }
            }
            ScriptedExit::MmioRead { addr, len } => {
                let len = len.min(self.mmio_buf.len());
                VcpuExit::MmioRead {
                    addr,
                    data: &mut self.mmio_buf[..len],
                }
            }
            ScriptedExit::Hlt => VcpuExit::Hlt,
            ScriptedExit::Shutdown => VcpuExit::Shutdown,
            ScriptedExit::SystemEvent(kind) => VcpuExit::SystemEvent { kind, data: Vec::new() },
            ScriptedExit::InternalError { suberror, data } => VcpuExit::InternalError { suberror, data },
            ScriptedExit::FailEntry { reason } => VcpuExit::FailEntry { reason, cpu: self.id },
            ScriptedExit::Interrupted => VcpuExit::Interrupted,
            ScriptedExit::Parked => {
                std::thread::sleep(std::time::Duration::from_millis(1));
                VcpuExit::Interrupted
            }
        })
    }
}
