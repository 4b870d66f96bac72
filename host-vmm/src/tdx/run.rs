//! Booting a TD end to end: [`launch`] it, give OVMF its fw_cfg (direct kernel boot), a serial port and the
//! ACPI power-management port, and run the vCPUs with the ordinary exit dispatch plus the TD exits
//! ([`exits::handle`]).
//!
//! Limits (see `docs/tdx-host.md`): the split irqchip has no userspace IOAPIC yet, so only the serial
//! *output* works (no serial interrupts), and no virtio devices are attached — enough to watch OVMF and the
//! kernel boot on a TDX host, not to run the full dstack guest.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_measurements::predict::VmShape;
use vmm_sys_util::eventfd::EventFd;

use super::exits;
use super::fw_cfg::{self, DirectBoot};
use super::launch::{TdxConfig, TdxError, launch};
use super::quote::QuoteService;
use crate::devices::acpi_pm::{ACPI_PM_LEN, AcpiPm};
use crate::devices::debug_exit::{DEBUG_EXIT_PORT, DebugExit};
use crate::devices::serial::{COM1_BASE, COM1_LEN, SerialDevice, SerialSink};
use crate::devices::{Bus, BusError};
use crate::hypervisor::tdx::{EXIT_MEMORY_FAULT, EXIT_TDX, TdxHypervisor, TdxVcpu, TdxVm};
use crate::hypervisor::{Vcpu, VcpuExit};
use crate::vcpu::{RunShared, Step, VcpuDiagnostics, VmExit, handle_exit};

/// Why a TD could not be booted (before any vCPU ran).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Launch(#[from] TdxError),
    #[error("fw_cfg: {0}")]
    FwCfg(#[from] fw_cfg::FwCfgError),
    #[error("devices: {0}")]
    Bus(#[from] BusError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("spawning a vCPU thread: {0}")]
    Thread(std::io::Error),
}

/// Boots `boot` as a TD per `cfg` and runs it until it powers off, resets, crashes or `timeout` passes.
pub fn boot_td(
    hv: &dyn TdxHypervisor,
    cfg: &TdxConfig<'_>,
    boot: &DirectBoot<'_>,
    sink: SerialSink,
    qgs: Option<Arc<dyn QuoteService>>,
    timeout: Option<Duration>,
) -> Result<VmExit, BootError> {
    let fw_cfg = fw_cfg::for_direct_boot(
        boot,
        &VmShape {
            vcpus: cfg.vcpus,
            memory_bytes: cfg.memory_bytes,
        },
    )?;
    let td = launch(hv, cfg)?;

    // No IOAPIC in the kernel (split irqchip) and none in userspace yet: the UART's interrupt goes nowhere.
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BootError::EventFd)?;
    let mut pio = Bus::new();
    pio.insert(
        "serial0",
        COM1_BASE.into(),
        COM1_LEN,
        Arc::new(Mutex::new(SerialDevice::new(irq, sink))),
    )?;
    pio.insert(
        "fw_cfg",
        fw_cfg::PORT_BASE.into(),
        fw_cfg::PORT_LEN,
        Arc::new(Mutex::new(fw_cfg)),
    )?;
    pio.insert("debug-exit", DEBUG_EXIT_PORT.into(), 4, Arc::new(Mutex::new(DebugExit)))?;
    pio.insert(
        "acpi-pm",
        dstack_acpi::tables::ACPI_PM_PORT.into(),
        ACPI_PM_LEN,
        Arc::new(Mutex::new(AcpiPm)),
    )?;
    let shared = Arc::new(RunShared::new(pio, Bus::new(), td.shared_memory.clone()));

    let mut threads = Vec::new();
    for vcpu in td.vcpus {
        let shared = shared.clone();
        let vm = td.vm.clone();
        let qgs = qgs.clone();
        let t = std::thread::Builder::new()
            .name(format!("td-vcpu{}", vcpu.id()))
            .spawn(move || run_td_vcpu(vcpu, &shared, vm.as_ref(), qgs.as_deref()))
            .map_err(BootError::Thread)?;
        threads.push(t);
    }
    shared.wait(timeout);
    for t in threads {
        // A vCPU blocked in KVM_RUN is not kicked here; it returns at its next exit.
        let _ = t.join();
    }
    // `td.guest_memfd` and the VM fd stay alive until here, after every vCPU thread ended.
    drop(td.guest_memfd);
    Ok(shared.take_outcome().unwrap_or(VmExit::Timeout))
}

/// Runs one TD vCPU until the VM stops: TD exits go to [`exits::handle`], everything else to the ordinary
/// dispatch (port I/O, MMIO, system events).
pub fn run_td_vcpu(mut vcpu: Box<dyn TdxVcpu>, shared: &RunShared, vm: &dyn TdxVm, qgs: Option<&dyn QuoteService>) {
    while !shared.stop.load(Ordering::Acquire) {
        // The exit borrows the vCPU; TD exits are served after that borrow ends.
        let step = match vcpu.run() {
            Ok(VcpuExit::Other { reason, .. }) if reason == EXIT_TDX || reason == EXIT_MEMORY_FAULT => Err(reason),
            Ok(exit) => Ok(handle_exit(shared, exit)),
            Err(e) => Ok(Step::Die {
                reason: e.to_string(),
                triple: false,
            }),
        };
        let step = step.unwrap_or_else(
            |reason| match exits::handle(reason, vm, vcpu.as_mut(), &shared.mem, qgs) {
                Ok(done) => {
                    tracing::debug!(vcpu = vcpu.id(), ?done, "TD exit");
                    Step::Continue
                }
                Err(e) => Step::Die {
                    reason: format!("TD exit {reason}: {e}"),
                    triple: false,
                },
            },
        );
        match step {
            Step::Continue => {}
            Step::Stop(exit) => {
                shared.finish(exit);
                break;
            }
            Step::Die { reason, triple } => {
                // A TD's registers are protected: the diagnostics will mostly note that they are unreadable.
                let vcpu_ref: &dyn Vcpu = vcpu.as_ref();
                let d = Box::new(VcpuDiagnostics::collect(vcpu_ref, &shared.mem, reason));
                tracing::error!("TD failure:\n{d}");
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
