//! The per-vCPU run loop: dispatch exits to the buses, stop the VM on reset/power-off/debug-exit/failure, and
//! collect full diagnostics (registers, special registers, instruction bytes at RIP) when the guest dies.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::regs::translate_gva;
use crate::devices::{Bus, DeviceAction};
use crate::hypervisor::{SpecialRegisters, StandardRegisters, SystemEventKind, Vcpu, VcpuExit};
use crate::timing::boottime_ns;

/// How the VM ended.
#[derive(Debug)]
pub enum VmExit {
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u32),
    /// The guest requested a reset (i8042 or KVM system event). We do not reboot: the VM stops.
    Reset,
    /// The guest powered off (ACPI S5 or KVM system event).
    PowerOff,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    TripleFault(Box<VcpuDiagnostics>),
    /// Internal error, failed entry, an exit we do not handle, or a failing ioctl.
    Crashed(Box<VcpuDiagnostics>),
    /// The configured run timeout elapsed.
    Timeout,
}

impl VmExit {
    /// The process exit status `dstack-vmm-run` uses: the guest's debug-exit status (low 8 bits), 0 for
    /// reset/power-off, 70 for a crash, 71 for a triple fault, 124 for a timeout.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::DebugExit(v) => (*v & 0xff) as i32,
            VmExit::Reset | VmExit::PowerOff => 0,
            VmExit::Crashed(_) => 70,
            VmExit::TripleFault(_) => 71,
            VmExit::Timeout => 124,
        }
    }
}

/// Everything we could learn about a vCPU when the guest died.
#[derive(Debug, Clone, Default)]
pub struct VcpuDiagnostics {
    pub vcpu: u32,
    pub reason: String,
    pub regs: Option<StandardRegisters>,
    pub sregs: Option<SpecialRegisters>,
    /// Guest-physical address of RIP (after segment base and paging).
    pub rip_gpa: Option<u64>,
    /// Up to 16 instruction bytes at RIP.
    pub code: Vec<u8>,
    /// Problems while collecting the above.
    pub notes: Vec<String>,
}

impl VcpuDiagnostics {
    pub fn collect(vcpu: &dyn Vcpu, mem: &GuestMemoryMmap, reason: String) -> Self {
        let mut d = VcpuDiagnostics {
            vcpu: vcpu.id(),
            reason,
            ..Default::default()
        };
        match vcpu.get_regs() {
            Ok(r) => d.regs = Some(r),
            Err(e) => d.notes.push(format!("get_regs: {e}")),
        }
        match vcpu.get_sregs() {
            Ok(s) => d.sregs = Some(s),
            Err(e) => d.notes.push(format!("get_sregs: {e}")),
        }
        if let (Some(r), Some(s)) = (d.regs, d.sregs) {
            let linear = s.cs.base.wrapping_add(r.rip);
            d.rip_gpa = translate_gva(mem, &s, linear);
            match d.rip_gpa {
                Some(gpa) => {
                    // Read byte by byte so a RIP near the end of RAM still yields what exists.
                    for i in 0..16 {
                        match mem.read_obj::<u8>(GuestAddress(gpa + i)) {
                            Ok(b) => d.code.push(b),
                            Err(_) => break,
                        }
                    }
                    if d.code.is_empty() {
                        d.notes.push(format!("RIP gpa {gpa:#x} is not guest RAM"));
                    }
                }
                None => d.notes.push(format!("cannot translate RIP linear address {linear:#x}")),
            }
        }
        d
    }
}

impl fmt::Display for VcpuDiagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "vCPU {}: {}", self.vcpu, self.reason)?;
        if let Some(r) = &self.regs {
            writeln!(
                f,
                "  rip={:#018x} rflags={:#010x} rsp={:#018x} rbp={:#018x}",
                r.rip, r.rflags, r.rsp, r.rbp
            )?;
            writeln!(
                f,
                "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
                r.rax, r.rbx, r.rcx, r.rdx
            )?;
            writeln!(
                f,
                "  rsi={:#018x} rdi={:#018x} r8 ={:#018x} r9 ={:#018x}",
                r.rsi, r.rdi, r.r8, r.r9
            )?;
            writeln!(
                f,
                "  r10={:#018x} r11={:#018x} r12={:#018x} r13={:#018x}",
                r.r10, r.r11, r.r12, r.r13
            )?;
            writeln!(f, "  r14={:#018x} r15={:#018x}", r.r14, r.r15)?;
        }
        if let Some(s) = &self.sregs {
            writeln!(
                f,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} cr8={:#x} efer={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer
            )?;
            writeln!(
                f,
                "  apic_base={:#x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                s.apic_base, s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
            )?;
            for (name, seg) in [
                ("cs", s.cs),
                ("ds", s.ds),
                ("es", s.es),
                ("fs", s.fs),
                ("gs", s.gs),
                ("ss", s.ss),
                ("tr", s.tr),
            ] {
                writeln!(
                    f,
                    "  {name}: sel={:#06x} base={:#x} limit={:#x} type={:#x} p={} dpl={} db={} s={} l={} g={}",
                    seg.selector, seg.base, seg.limit, seg.type_, seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g
                )?;
            }
        }
        match self.rip_gpa {
            Some(gpa) => {
                write!(f, "  code at RIP (gpa {gpa:#x}):")?;
                for b in &self.code {
                    write!(f, " {b:02x}")?;
                }
                writeln!(f)?;
            }
            None => writeln!(f, "  code at RIP: unavailable")?,
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

/// An access no device claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownAccess {
    pub mmio: bool,
    pub write: bool,
    pub addr: u64,
    pub size: usize,
    /// The written value (little-endian, first 8 bytes) for writes.
    pub value: Option<u64>,
}

/// How many unknown accesses we keep verbatim (the count continues beyond).
pub const MAX_RECORDED_UNKNOWN: usize = 64;

/// State shared by the vCPU threads and the thread waiting for the VM to end.
pub struct RunShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemoryMmap,
    pub stop: AtomicBool,
    outcome: Mutex<Option<VmExit>>,
    outcome_cv: Condvar,
    pub first_run_ns: AtomicU64,
    pub first_exit_ns: AtomicU64,
    pub userspace_exits: AtomicU64,
    unknown: Mutex<(u64, Vec<UnknownAccess>)>,
}

impl RunShared {
    pub fn new(pio: Bus, mmio: Bus, mem: GuestMemoryMmap) -> Self {
        Self {
            pio,
            mmio,
            mem,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            outcome_cv: Condvar::new(),
            first_run_ns: AtomicU64::new(0),
            first_exit_ns: AtomicU64::new(0),
            userspace_exits: AtomicU64::new(0),
            unknown: Mutex::new((0, Vec::new())),
        }
    }

    /// Records the VM's outcome (the first one wins) and tells every vCPU to stop.
    pub fn finish(&self, exit: VmExit) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if o.is_none() {
            *o = Some(exit);
        }
        self.stop.store(true, Ordering::Release);
        self.outcome_cv.notify_all();
    }

    /// Waits until some vCPU finished the VM or `timeout` elapsed (then records [`VmExit::Timeout`]).
    pub fn wait(&self, timeout: Option<std::time::Duration>) {
        let guard = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let guard = match timeout {
            Some(t) => {
                self.outcome_cv
                    .wait_timeout_while(guard, t, |o| o.is_none())
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self
                .outcome_cv
                .wait_while(guard, |o| o.is_none())
                .unwrap_or_else(|p| p.into_inner()),
        };
        let timed_out = guard.is_none();
        drop(guard);
        if timed_out {
            self.finish(VmExit::Timeout);
        }
    }

    pub fn take_outcome(&self) -> Option<VmExit> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn unknown_accesses(&self) -> (u64, Vec<UnknownAccess>) {
        self.unknown.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record_unknown(&self, access: UnknownAccess) {
        tracing::debug!(?access, "access to no device");
        let mut u = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        u.0 += 1;
        if u.1.len() < MAX_RECORDED_UNKNOWN {
            u.1.push(access);
        }
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

/// What the loop does after one exit.
pub(crate) enum Step {
    Continue,
    Stop(VmExit),
    /// Stop with diagnostics of this vCPU; `triple` selects [`VmExit::TripleFault`].
    Die {
        reason: String,
        triple: bool,
    },
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "exception while delivering an exception",
        3 => "exit during event delivery",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

pub(crate) fn handle_exit(shared: &RunShared, exit: VcpuExit<'_>) -> Step {
    let action = match exit {
        VcpuExit::IoOut { port, data } => match shared.pio.write(u64::from(port), data) {
            Some(a) => a,
            None => {
                let value = Some(le_value(data));
                shared.record_unknown(UnknownAccess {
                    mmio: false,
                    write: true,
                    addr: port.into(),
                    size: data.len(),
                    value,
                });
                DeviceAction::None
            }
        },
        VcpuExit::IoIn { port, data } => {
            if !shared.pio.read(u64::from(port), data) {
                // Floating bus: reads of absent ports return all ones.
                data.fill(0xff);
                let size = data.len();
                shared.record_unknown(UnknownAccess {
                    mmio: false,
                    write: false,
                    addr: port.into(),
                    size,
                    value: None,
                });
            }
            DeviceAction::None
        }
        VcpuExit::MmioWrite { addr, data } => match shared.mmio.write(addr, data) {
            Some(a) => a,
            None => {
                let value = Some(le_value(data));
                shared.record_unknown(UnknownAccess {
                    mmio: true,
                    write: true,
                    addr,
                    size: data.len(),
                    value,
                });
                DeviceAction::None
            }
        },
        VcpuExit::MmioRead { addr, data } => {
            if !shared.mmio.read(addr, data) {
                data.fill(0xff);
                let size = data.len();
                shared.record_unknown(UnknownAccess {
                    mmio: true,
                    write: false,
                    addr,
                    size,
                    value: None,
                });
            }
            DeviceAction::None
        }
        VcpuExit::Interrupted => DeviceAction::None,
        VcpuExit::Hlt => {
            // Only reached without an in-kernel irqchip; with interrupts never arriving this is a halt for good.
            return Step::Die {
                reason: "HLT with no way to wake up (no in-kernel irqchip)".into(),
                triple: false,
            };
        }
        VcpuExit::Shutdown => {
            return Step::Die {
                reason: "KVM_EXIT_SHUTDOWN (triple fault)".into(),
                triple: true,
            };
        }
        VcpuExit::SystemEvent { kind, data } => {
            return match kind {
                SystemEventKind::Shutdown => Step::Stop(VmExit::PowerOff),
                SystemEventKind::Reset => Step::Stop(VmExit::Reset),
                SystemEventKind::Crash => Step::Die {
                    reason: format!("KVM_EXIT_SYSTEM_EVENT crash, data {data:x?}"),
                    triple: false,
                },
                SystemEventKind::Other(k) => Step::Die {
                    reason: format!("KVM_EXIT_SYSTEM_EVENT type {k}, data {data:x?}"),
                    triple: false,
                },
            };
        }
        VcpuExit::InternalError { suberror, data } => {
            let name = internal_error_name(suberror);
            return Step::Die {
                reason: format!("KVM_EXIT_INTERNAL_ERROR suberror {suberror} ({name}), data {data:x?}"),
                triple: false,
            };
        }
        VcpuExit::FailEntry { reason, cpu } => {
            return Step::Die {
                reason: format!("KVM_EXIT_FAIL_ENTRY hardware_entry_failure_reason {reason:#x} on host cpu {cpu}"),
                triple: false,
            };
        }
        VcpuExit::Other { reason, name } => {
            return Step::Die {
                reason: format!("unhandled exit KVM_EXIT_{name} ({reason})"),
                triple: false,
            };
        }
    };
    match action {
        DeviceAction::None => Step::Continue,
        DeviceAction::DebugExit(v) => Step::Stop(VmExit::DebugExit(v)),
        DeviceAction::Reset => Step::Stop(VmExit::Reset),
        DeviceAction::PowerOff => Step::Stop(VmExit::PowerOff),
    }
}

/// Runs `vcpu` until the VM stops. Called on the vCPU's own thread.
pub fn run_vcpu(mut vcpu: Box<dyn Vcpu>, shared: &RunShared) {
    let is_bsp = vcpu.id() == 0;
    let mut first = true;
    while !shared.stop.load(Ordering::Acquire) {
        if is_bsp && first {
            shared.first_run_ns.store(boottime_ns(), Ordering::Release);
        }
        let step = match vcpu.run() {
            Ok(exit) => {
                if is_bsp && first {
                    shared.first_exit_ns.store(boottime_ns(), Ordering::Release);
                }
                if !matches!(exit, VcpuExit::Interrupted) {
                    shared.userspace_exits.fetch_add(1, Ordering::Relaxed);
                }
                handle_exit(shared, exit)
            }
            Err(e) => Step::Die {
                reason: format!("{e}"),
                triple: false,
            },
        };
        first = false;
        match step {
            Step::Continue => {}
            Step::Stop(exit) => {
                shared.finish(exit);
                break;
            }
            Step::Die { reason, triple } => {
                let d = Box::new(VcpuDiagnostics::collect(vcpu.as_ref(), &shared.mem, reason));
                tracing::error!("guest failure:\n{d}");
                shared.finish(if triple {
                    VmExit::TripleFault(d)
                } else {
                    VmExit::Crashed(d)
                });
                break;
            }
        }
    }
}
