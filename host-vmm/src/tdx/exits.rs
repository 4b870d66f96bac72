//! The TD-specific vCPU exits a TD run loop hands here after `run` returned `VcpuExit::Other` with reason
//! [`EXIT_TDX`] or [`EXIT_MEMORY_FAULT`]; port I/O, MMIO, CPUID and MSR TDVMCALLs arrive as ordinary exits.
//!
//! - `KVM_EXIT_TDX` with leaf GetQuote (0x10002): served synchronously through [`quote::handle_get_quote`].
//!   Other leaves KVM forwards (GetTdVmCallInfo, SetupEventNotifyInterrupt) keep the return code KVM preset
//!   before exiting ("sub-function unsupported" for unknown ones).
//! - `KVM_EXIT_MEMORY_FAULT`: the guest converted a range between private and shared (MapGPA); flip the
//!   range's `KVM_MEMORY_ATTRIBUTE_PRIVATE`. (QEMU additionally discards the now-unused backing — punching the
//!   guest_memfd hole or `MADV_DONTNEED` on the shared mapping — to save memory; not done here.)

use vm_memory::GuestMemoryMmap;

use super::quote::{self, QuoteService};
use crate::hypervisor::tdx::{EXIT_MEMORY_FAULT, EXIT_TDX, MEMORY_ATTRIBUTE_PRIVATE, TdxVcpu, TdxVm};
use crate::hypervisor::{HypervisorError, Result};

/// GHCI TDVMCALL leaf of GetQuote.
pub const TDVMCALL_GET_QUOTE: u64 = 0x10002;

/// What happened to a TD exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdExit {
    /// A GetQuote request was served; the TDVMCALL returns `ret`.
    GetQuote { ret: u64 },
    /// A TDVMCALL leaf this VMM does not serve (KVM's preset return code stands).
    UnservedVmcall { nr: u64 },
    /// `[gpa, gpa + size)` is now private (`true`) or shared.
    Converted { gpa: u64, size: u64, private: bool },
    /// Not a TD exit.
    NotTdx,
}

/// Serves one TD exit of `vcpu` (exit `reason` from `VcpuExit::Other`).
pub fn handle(
    reason: u32,
    vm: &dyn TdxVm,
    vcpu: &mut dyn TdxVcpu,
    shared: &GuestMemoryMmap,
    qgs: Option<&dyn QuoteService>,
) -> Result<TdExit> {
    match reason {
        EXIT_TDX => {
            let call = vcpu
                .tdx_vmcall()
                .ok_or_else(|| HypervisorError::Invalid("KVM_EXIT_TDX without TDVMCALL data".into()))?;
            if call.nr != TDVMCALL_GET_QUOTE {
                return Ok(TdExit::UnservedVmcall { nr: call.nr });
            }
            let ret = quote::handle_get_quote(shared, call.data[0], call.data[1], qgs);
            vcpu.set_tdx_vmcall_ret(ret)?;
            Ok(TdExit::GetQuote { ret })
        }
        EXIT_MEMORY_FAULT => {
            let fault = vcpu
                .memory_fault()
                .ok_or_else(|| HypervisorError::Invalid("KVM_EXIT_MEMORY_FAULT without fault data".into()))?;
            let attrs = if fault.private { MEMORY_ATTRIBUTE_PRIVATE } else { 0 };
            vm.set_memory_attributes(fault.gpa, fault.size, attrs)?;
            Ok(TdExit::Converted {
                gpa: fault.gpa,
                size: fault.size,
                private: fault.private,
            })
        }
        _ => Ok(TdExit::NotTdx),
    }
}
