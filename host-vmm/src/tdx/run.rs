//! Booting a TD end to end: [`launch`] it, give OVMF its fw_cfg (direct kernel boot), a serial port and the
//! ACPI power-management port, and run the vCPUs with the ordinary exit dispatch plus the TD exits
//! ([`exits::handle`]).
//!
//! Interrupts: KVM runs the LAPICs (split irqchip); the IOAPIC is ours ([`crate::devices::ioapic`]) at its
//! architectural MMIO address, delivering through `KVM_SIGNAL_MSI`. The UART's interrupt eventfd drives pin 4.
//! Virtio-pci devices ([`super::devices`]) raise MSI-X through irqfds; one [`crate::pci::msix::GsiRouter`]
//! merges their routes with the IOAPIC's into the VM's routing table.
//!
//! Devices only ever see the shared memory ([`TdMemory`] as their device memory).
//!
//! Power management: the TD's ACPI tables are fixed-hardware (`predict::TD_PM_MODEL`), so the PM1 block at
//! 0x600 (ICH9's PMBASE, [`super::chipset`]) is the OS's power button: PM1 I/O in a TD is a `TDVMCALL<IO>` that
//! KVM hands to us as an ordinary port exit, and the SCI is an edge on IOAPIC pin 9 (the MADT's SCI override).
//! The control socket (`--control-socket`) presses the button, as for a `kvm` VM.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_measurements::predict::VmShape;
use vmm_sys_util::eventfd::EventFd;

use super::devices::{TdDeviceError, TdIrqSink, attach_pci, td_router};
use super::exits::{self, TdExitContext};
use super::fw_cfg::{self, DirectBoot};
use super::launch::{TdxConfig, TdxError, launch};
use super::quote::QuoteService;
use super::shared_mem::TdMemory;
use crate::devices::acpi_pm::{ACPI_PM_LEN, AcpiPm, PM1_EVT_PORT, PM1_LEN, Pm1, PowerButton, SCI_IRQ};
use crate::devices::debug_exit::{DEBUG_EXIT_PORT, DebugExit};
use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE, Ioapic, spawn_line_forwarder};
use crate::devices::serial::{COM1_BASE, COM1_LEN, SerialDevice, SerialSink};
use crate::devices::{Bus, BusError};
use crate::hypervisor::tdx::{TdxHypervisor, TdxVcpu, TdxVm};
use crate::hypervisor::{Vcpu, VcpuExit};
use crate::vcpu::{RunShared, Step, VcpuDiagnostics, VmExit, handle_exit};
use crate::vmm::DeviceConfig;

/// Why a TD could not be booted (before any vCPU ran).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Launch(#[from] TdxError),
    #[error("fw_cfg: {0}")]
    FwCfg(#[from] fw_cfg::FwCfgError),
    #[error("devices: {0}")]
    Bus(#[from] BusError),
    #[error("virtio devices: {0}")]
    Devices(#[from] TdDeviceError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("spawning a thread: {0}")]
    Thread(std::io::Error),
    #[error("control socket {path}: {source}")]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// ISA IRQ of COM1 (identity-mapped to IOAPIC pin 4: our MADT has no override for it).
const COM1_PIN: usize = 4;

/// Everything a TD vCPU thread shares besides the ordinary run state.
pub struct TdRunContext {
    pub vm: Arc<dyn TdxVm>,
    pub mem: Arc<TdMemory>,
    pub qgs: Option<Arc<dyn QuoteService>>,
    pub ioapic: Arc<Mutex<Ioapic>>,
}

/// Puts the fixed-hardware PM1 block (PM1_STS/EN, PM1_CNT, PM timer at 0x600..0x60c) on `pio`. Returns the
/// power button and the SCI line (an eventfd Pm1 signals; the caller forwards it to IOAPIC pin [`SCI_IRQ`]).
pub fn attach_pm1(pio: &mut Bus) -> Result<(PowerButton, EventFd), BootError> {
    let sci = EventFd::new(libc::EFD_NONBLOCK).map_err(BootError::EventFd)?;
    let line = sci.try_clone().map_err(BootError::EventFd)?;
    let pm1 = Arc::new(Mutex::new(Pm1::new(Some(sci))));
    pio.insert("acpi-pm1", PM1_EVT_PORT.into(), PM1_LEN, pm1.clone())?;
    Ok((PowerButton(pm1), line))
}

/// Boots `boot` as a TD per `cfg`, with the virtio devices `devices` asks for, and runs it until it powers off,
/// resets, crashes or `timeout` passes. `control_socket`: serve the power button there (`crate::control`).
#[allow(clippy::too_many_arguments)]
pub fn boot_td(
    hv: &dyn TdxHypervisor,
    cfg: &TdxConfig<'_>,
    boot: &DirectBoot<'_>,
    devices: &DeviceConfig,
    sink: SerialSink,
    qgs: Option<Arc<dyn QuoteService>>,
    control_socket: Option<&Path>,
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
    let mem = Arc::new(TdMemory::new(td.shared_memory.clone()));
    let router = td_router(&td.vm);

    // The MADT gives the IOAPIC the APIC ID after the vCPUs'.
    let ioapic = Arc::new(Mutex::new(Ioapic::new(
        cfg.vcpus as u8,
        Arc::new(TdIrqSink {
            vm: td.vm.clone(),
            router: router.clone(),
        }),
    )));
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BootError::EventFd)?;
    let irq_line = irq.try_clone().map_err(BootError::EventFd)?;
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
    // OVMF times its delays with this block's PM timer (PMBASE + 8) and the OS finds it in the FADT.
    let (button, sci_line) = attach_pm1(&mut pio)?;
    if let Some(path) = control_socket {
        crate::control::serve(path, Some(button)).map_err(|source| BootError::Control {
            path: path.to_owned(),
            source,
        })?;
    }
    let mut mmio = Bus::new();
    mmio.insert("ioapic", IOAPIC_BASE, IOAPIC_SIZE, ioapic.clone())?;
    attach_pci(&td.vm, &router, &mem, cfg.memory_bytes, devices, &mut pio, &mut mmio)?;
    let shared = Arc::new(RunShared::new(pio, mmio, td.shared_memory.clone()));
    let lines_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lines = spawn_line_forwarder(
        ioapic.clone(),
        vec![(irq_line, COM1_PIN), (sci_line, usize::from(SCI_IRQ))],
        lines_stop.clone(),
    )
    .map_err(BootError::Thread)?;
    let ctx = Arc::new(TdRunContext {
        vm: td.vm.clone(),
        mem,
        qgs,
        ioapic,
    });

    let mut threads = Vec::new();
    for vcpu in td.vcpus {
        let shared = shared.clone();
        let ctx = ctx.clone();
        let t = std::thread::Builder::new()
            .name(format!("td-vcpu{}", vcpu.id()))
            .spawn(move || run_td_vcpu(vcpu, &shared, &ctx))
            .map_err(BootError::Thread)?;
        threads.push(t);
    }
    shared.wait(timeout);
    for t in threads {
        // A vCPU blocked in KVM_RUN is not kicked here; it returns at its next exit.
        let _ = t.join();
    }
    lines_stop.store(true, Ordering::Release);
    let _ = lines.join();
    // `td.guest_memfd` and the VM fd stay alive until here, after every vCPU thread ended.
    drop(td.guest_memfd);
    Ok(shared.take_outcome().unwrap_or(VmExit::Timeout))
}

/// Runs one TD vCPU until the VM stops: TD exits go to [`exits::handle`], everything else to the ordinary
/// dispatch (port I/O, MMIO, system events).
pub fn run_td_vcpu(mut vcpu: Box<dyn TdxVcpu>, shared: &RunShared, ctx: &TdRunContext) {
    let exit_ctx = TdExitContext {
        vm: ctx.vm.as_ref(),
        mem: &ctx.mem,
        qgs: ctx.qgs.as_deref(),
        ioapic: Some(&ctx.ioapic),
    };
    while !shared.stop.load(Ordering::Acquire) {
        // The exit borrows the vCPU; TD exits are served after that borrow ends.
        let step = match vcpu.run() {
            Ok(VcpuExit::Other { reason, .. }) if exits::is_td_exit(reason) => Err(reason),
            Ok(exit) => Ok(handle_exit(shared, exit)),
            Err(e) => Ok(Step::Die {
                reason: e.to_string(),
                triple: false,
            }),
        };
        let step = step.unwrap_or_else(|reason| match exits::handle(reason, vcpu.as_mut(), &exit_ctx) {
            Ok(done) => {
                tracing::debug!(vcpu = vcpu.id(), ?done, "TD exit");
                Step::Continue
            }
            Err(e) => Step::Die {
                reason: format!("TD exit {reason}: {e}"),
                triple: false,
            },
        });
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
