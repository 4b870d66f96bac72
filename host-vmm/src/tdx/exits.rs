//! The TD-specific vCPU exits a TD run loop hands here after `run` returned `VcpuExit::Other` with one of the
//! reasons [`is_td_exit`] accepts; port I/O, MMIO, CPUID and MSR TDVMCALLs arrive as ordinary exits.
//!
//! - `KVM_EXIT_TDX` with leaf GetQuote (0x10002): served synchronously through [`quote::handle_get_quote`], on
//!   a buffer the guest must have converted to shared. Other leaves KVM forwards (GetTdVmCallInfo,
//!   SetupEventNotifyInterrupt) keep the return code KVM preset before exiting.
//! - MapGPA, as `KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE)` (the launch enables `KVM_CAP_EXIT_HYPERCALL` for it):
//!   the guest converts a range explicitly (swiotlb bounce buffers, the GetQuote buffer). A malformed range is
//!   refused to the guest (`EINVAL` → TDVMCALL error), not fatal to the VM.
//! - `KVM_EXIT_MEMORY_FAULT`: an implicit conversion (the guest touched a page with the other attribute).
//!   Both go through [`shared_mem::convert`]: KVM's memory attributes and the tracker device models check.
//! - `KVM_EXIT_IOAPIC_EOI`: the guest EOId a level-triggered vector of the userspace IOAPIC.
//!
//! QEMU additionally punches the guest_memfd hole of pages that became shared, to save memory; not done here.

use std::sync::Mutex;

use super::quote::{self, QuoteService, TDVMCALL_INVALID_OPERAND};
use super::shared_mem::{self, SharedMemError, TdMemory};
use crate::devices::ioapic::Ioapic;
use crate::hypervisor::HypervisorError;
use crate::hypervisor::tdx::{EXIT_HYPERCALL, EXIT_IOAPIC_EOI, EXIT_MEMORY_FAULT, EXIT_TDX, TdxVcpu, TdxVm};

/// GHCI TDVMCALL leaf of GetQuote.
pub const TDVMCALL_GET_QUOTE: u64 = 0x10002;
/// What a refused MapGPA returns in `hypercall.ret` (KVM reports it to the guest as INVALID_OPERAND).
const MAP_GPA_REFUSED: u64 = libc::EINVAL as u64;

/// The exit reasons [`handle`] serves.
pub fn is_td_exit(reason: u32) -> bool {
    matches!(reason, EXIT_TDX | EXIT_MEMORY_FAULT | EXIT_HYPERCALL | EXIT_IOAPIC_EOI)
}

/// What the TD exits need besides the vCPU.
#[derive(Clone, Copy)]
pub struct TdExitContext<'a> {
    pub vm: &'a dyn TdxVm,
    pub mem: &'a TdMemory,
    pub qgs: Option<&'a dyn QuoteService>,
    /// The userspace IOAPIC (split irqchip), if the VM has one.
    pub ioapic: Option<&'a Mutex<Ioapic>>,
}

/// Why a TD exit could not be served (the VM stops).
#[derive(Debug, thiserror::Error)]
pub enum TdExitError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("memory conversion: {0}")]
    Conversion(#[from] SharedMemError),
    #[error("exit {0} without its data")]
    MissingData(&'static str),
}

/// What happened to a TD exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdExit {
    /// A GetQuote request was served; the TDVMCALL returns `ret`.
    GetQuote { ret: u64 },
    /// A TDVMCALL leaf this VMM does not serve (KVM's preset return code stands).
    UnservedVmcall { nr: u64 },
    /// `[gpa, gpa + size)` is now private (`true`) or shared.
    Converted { gpa: u64, size: u64, private: bool },
    /// A MapGPA the VMM refused (bad range); the guest gets an error.
    RefusedMapGpa { gpa: u64, pages: u64 },
    /// A hypercall other than MapGPA (KVM forwards none today); answered with an error.
    UnservedHypercall,
    /// The guest EOId this vector; the IOAPIC cleared remote IRR.
    Eoi { vector: u8 },
    /// Not a TD exit.
    NotTdx,
}

/// Serves one TD exit of `vcpu` (exit `reason` from `VcpuExit::Other`).
pub fn handle(reason: u32, vcpu: &mut dyn TdxVcpu, ctx: &TdExitContext<'_>) -> Result<TdExit, TdExitError> {
    match reason {
        EXIT_TDX => {
            let call = vcpu.tdx_vmcall().ok_or(TdExitError::MissingData("KVM_EXIT_TDX"))?;
            if call.nr != TDVMCALL_GET_QUOTE {
                return Ok(TdExit::UnservedVmcall { nr: call.nr });
            }
            let (gpa, size) = (call.data[0], call.data[1]);
            // GHCI: the buffer is shared memory; never read or write a range the guest keeps private.
            let ret = if size != 0 && !ctx.mem.is_shared(gpa, size) {
                tracing::warn!("GetQuote buffer {gpa:#x}+{size:#x} is not shared memory");
                TDVMCALL_INVALID_OPERAND
            } else {
                quote::handle_get_quote(ctx.mem.raw(), gpa, size, ctx.qgs)
            };
            vcpu.set_tdx_vmcall_ret(ret)?;
            Ok(TdExit::GetQuote { ret })
        }
        EXIT_MEMORY_FAULT => {
            let fault = vcpu
                .memory_fault()
                .ok_or(TdExitError::MissingData("KVM_EXIT_MEMORY_FAULT"))?;
            // KVM would refault forever on a range we cannot convert: stop the VM with the reason.
            shared_mem::convert(ctx.vm, ctx.mem, fault.gpa, fault.size, fault.private)?;
            Ok(TdExit::Converted {
                gpa: fault.gpa,
                size: fault.size,
                private: fault.private,
            })
        }
        EXIT_HYPERCALL => {
            let Some(req) = vcpu.map_gpa_range() else {
                vcpu.set_hypercall_ret(libc::ENOSYS as u64)?;
                return Ok(TdExit::UnservedHypercall);
            };
            let converted = req
                .pages
                .checked_mul(4096)
                .ok_or(SharedMemError::Unmapped {
                    gpa: req.gpa,
                    len: u64::MAX,
                })
                .and_then(|size| shared_mem::convert(ctx.vm, ctx.mem, req.gpa, size, req.private).map(|()| size));
            match converted {
                Ok(size) => {
                    vcpu.set_hypercall_ret(0)?;
                    Ok(TdExit::Converted {
                        gpa: req.gpa,
                        size,
                        private: req.private,
                    })
                }
                // KVM refusing the attribute change is a host problem: stop.
                Err(e @ SharedMemError::Attributes { .. }) => Err(e.into()),
                Err(e) => {
                    tracing::warn!("MapGPA refused: {e}");
                    vcpu.set_hypercall_ret(MAP_GPA_REFUSED)?;
                    Ok(TdExit::RefusedMapGpa {
                        gpa: req.gpa,
                        pages: req.pages,
                    })
                }
            }
        }
        EXIT_IOAPIC_EOI => {
            let vector = vcpu
                .ioapic_eoi()
                .ok_or(TdExitError::MissingData("KVM_EXIT_IOAPIC_EOI"))?;
            if let Some(ioapic) = ctx.ioapic {
                ioapic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .end_of_interrupt(vector);
            }
            Ok(TdExit::Eoi { vector })
        }
        _ => Ok(TdExit::NotTdx),
    }
}
