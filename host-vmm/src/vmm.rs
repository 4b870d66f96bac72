//! One VM: build it (memory, irqchip, kernel, boot structures, devices, vCPUs), run it on one thread per vCPU
//! and report how it ended. This is the single owner of the VM's state.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::x86_64::{acpi, boot, cpuid, layout, mptable, regs};
use crate::devices::acpi_pm::{ACPI_PM_LEN, ACPI_PM_PORT, AcpiPm, PM1_EVT_PORT, PM1_LEN, Pm1, PowerButton, SCI_IRQ};
use crate::devices::debug_exit::{DEBUG_EXIT_PORT, DebugExit};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, SerialDevice, SerialSink};
use crate::devices::{Bus, BusError};
use crate::hypervisor::{Hypervisor, HypervisorError, Vcpu, Vm};
use crate::memory::{self, MemoryError};
use crate::pci::msix::GsiRouter;
use crate::pci::root::attach_to_buses;
use crate::pci::{ECAM_SIZE, PciLayout, PciRoot};
use crate::timing::{self, RssReport, boottime_ns};
use crate::vcpu::{RunShared, UnknownAccess, VmExit, run_vcpu};
use crate::virtio::models;
use crate::virtio::pci::VirtioPci;

/// What to boot and how big.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Stop the VM after this long (`VmExit::Timeout`).
    pub timeout: Option<Duration>,
    /// Write ACPI tables (RSDP at 0xe0000, announced in the zero page) in the fixed-hardware model, with the
    /// PM1 registers, PM timer and SCI behind them (so the host can press the power button). Not yet verified
    /// with a real Linux boot, hence opt-in; the MP table is always present.
    pub acpi: bool,
    /// Virtio-pci devices; with none, the VM has no PCI bus at all.
    pub devices: DeviceConfig,
}

/// The virtio devices of a VM.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    pub disks: Vec<DiskConfig>,
    pub net: Option<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub rng: bool,
}

impl DeviceConfig {
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty() && self.net.is_none() && self.vsock.is_none() && !self.rng
    }
}

/// A virtio-net device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub mac: [u8; 6],
    /// Offered to the driver as the maximum MTU (`VIRTIO_NET_F_MTU`); None leaves the MTU to the guest.
    pub mtu: Option<u16>,
    pub backend: NetBackendConfig,
}

#[derive(Debug, Clone)]
pub enum NetBackendConfig {
    /// passt's unix socket (qemu stream framing); passt itself runs beside the VMM.
    Passt { socket: PathBuf },
    /// A tap interface (created if absent), optionally attached to an existing bridge.
    Tap { ifname: String, bridge: Option<String> },
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub cid: u64,
    /// Host-side unix socket (Firecracker hybrid vsock): `CONNECT <port>` here, guest connections to port P
    /// go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("vcpus must be 1..={max}, got {got}")]
    BadVcpus { got: u32, max: u32 },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("boot register/table setup: {0}")]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("writing the ACPI tables: {0}")]
    AcpiWrite(vm_memory::GuestMemoryError),
    #[error("writing the MP table: {0}")]
    MpTableWrite(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Pci(#[from] crate::pci::root::PciError),
    #[error(transparent)]
    Transport(#[from] crate::virtio::pci::TransportError),
    #[error(transparent)]
    Block(#[from] crate::virtio::block::BlockError),
    #[error(transparent)]
    Vsock(#[from] crate::virtio::vsock::VsockError),
    #[error(transparent)]
    Net(#[from] crate::virtio::net::NetError),
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("spawning vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
}

/// Timestamps (`CLOCK_BOOTTIME` ns) of the setup phases.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub setup_start_ns: u64,
    pub setup_done_ns: u64,
    /// The BSP's first `KVM_RUN` call.
    pub first_run_ns: u64,
    /// The BSP's first return from `KVM_RUN` (the guest has executed instructions by then).
    pub first_exit_ns: u64,
    pub end_ns: u64,
}

/// How a run went.
#[derive(Debug)]
pub struct RunReport {
    pub exit: VmExit,
    pub timing: Timing,
    /// Accesses to ports/addresses no device claimed: total count and the first few.
    pub unknown_count: u64,
    pub unknown: Vec<UnknownAccess>,
    /// Exits handled in userspace (I/O, MMIO, events).
    pub userspace_exits: u64,
    /// RSS at the end of the run (VMM part vs guest RAM), if /proc was readable.
    pub rss: Option<RssReport>,
}

/// A fully set-up VM, ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs before the VM fd, guest memory last.
    vcpus: Vec<Box<dyn Vcpu>>,
    _vm: Arc<dyn Vm>,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    power_button: Option<PowerButton>,
    timeout: Option<Duration>,
    timing: Timing,
    entry: u64,
    mem: GuestMemoryMmap,
}

/// Upper bound on vCPUs (MP table limit until ACPI exists).
pub const MAX_VCPUS: u32 = mptable::MAX_MPTABLE_CPUS;

impl Vmm {
    /// Builds the VM described by `config` on `hv`, with guest serial output going to `sink`.
    pub fn new(hv: &dyn Hypervisor, config: &VmConfig, sink: SerialSink) -> Result<Self, VmmError> {
        let setup_start_ns = boottime_ns();
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmmError::BadVcpus {
                got: config.vcpus,
                max: MAX_VCPUS,
            });
        }
        let vm = hv.create_vm()?;
        let mem = memory::create_guest_memory(config.memory_mib)?;
        memory::register_guest_memory(vm.as_ref(), &mem)?;
        vm.set_tss_address(layout::KVM_TSS_ADDR)?;
        vm.create_irq_chip()?;
        vm.create_pit()?;

        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let hdr = kernel.setup_header.as_ref();
        boot::write_cmdline(&mem, &config.cmdline, boot::cmdline_max(hdr))?;
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(
                &mem,
                p,
                kernel.kernel_end,
                boot::initrd_addr_max(hdr),
            )?),
            None => None,
        };
        let pci_layout = (!config.devices.is_empty()).then(|| PciLayout::for_ram(config.memory_mib << 20));
        let mut e820 = boot::e820_map(&boot::ram_layout(&mem));
        if let Some(p) = &pci_layout {
            e820.push((p.ecam, ECAM_SIZE, boot::E820_RESERVED));
        }
        let mut zp = boot::build_zero_page(&boot::ZeroPageConfig {
            setup_header: hdr,
            cmdline_len: config.cmdline.len(),
            initrd,
            e820: &e820,
        });
        if config.acpi {
            let tables = acpi::build_for(
                &acpi::AcpiShape {
                    vcpus: config.vcpus,
                    pci: pci_layout,
                },
                acpi::PmModel::FixedHardware,
            )?;
            mem.write_slice(&tables.bytes, GuestAddress(tables.base))
                .map_err(VmmError::AcpiWrite)?;
            zp.acpi_rsdp_addr = tables.base;
        }
        boot::write_zero_page(&mem, &zp)?;
        regs::write_boot_tables(&mem)?;
        let mpt = mptable::build(layout::EBDA_START as u32, config.vcpus)?;
        mem.write_slice(&mpt, GuestAddress(layout::EBDA_START))
            .map_err(VmmError::MpTableWrite)?;

        let (mut pio, serial) = Self::legacy_devices(vm.as_ref(), sink)?;
        let power_button = if config.acpi {
            Some(Self::pm1_device(vm.as_ref(), &mut pio)?)
        } else {
            None
        };
        let mut mmio = Bus::new();
        if let Some(layout) = pci_layout {
            Self::pci_devices(&vm, &mem, layout, &config.devices, &mut pio, &mut mmio)?;
        }

        let supported = hv.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let vcpu = vm.create_vcpu(id)?;
            vcpu.set_cpuid(&cpuid::filter_cpuid(&supported, id, config.vcpus))?;
            if id == 0 {
                regs::setup_boot_vcpu(vcpu.as_ref(), kernel.entry)?;
            } else {
                regs::setup_ap_vcpu(vcpu.as_ref())?;
            }
            vcpus.push(vcpu);
        }
        let timing = Timing {
            setup_start_ns,
            setup_done_ns: boottime_ns(),
            ..Default::default()
        };
        Ok(Self {
            vcpus,
            _vm: vm,
            pio,
            mmio,
            serial,
            power_button,
            timeout: config.timeout,
            timing,
            entry: kernel.entry,
            mem,
        })
    }

    fn legacy_devices(vm: &dyn Vm, sink: SerialSink) -> Result<(Bus, Arc<Mutex<SerialDevice>>), VmmError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq, sink)));
        let mut pio = Bus::new();
        pio.insert("serial0", COM1_BASE.into(), COM1_LEN, serial.clone())?;
        pio.insert(
            "i8042",
            I8042_BASE.into(),
            I8042_LEN,
            Arc::new(Mutex::new(I8042::default())),
        )?;
        pio.insert("debug-exit", DEBUG_EXIT_PORT.into(), 4, Arc::new(Mutex::new(DebugExit)))?;
        pio.insert(
            "acpi-pm",
            ACPI_PM_PORT.into(),
            ACPI_PM_LEN,
            Arc::new(Mutex::new(AcpiPm)),
        )?;
        Ok((pio, serial))
    }

    /// The fixed-hardware ACPI registers (PM1 blocks, PM timer) with the SCI on GSI 9.
    fn pm1_device(vm: &dyn Vm, pio: &mut Bus) -> Result<PowerButton, VmmError> {
        let sci = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&sci, SCI_IRQ.into())?;
        let pm1 = Arc::new(Mutex::new(Pm1::new(Some(sci))));
        pio.insert("acpi-pm1", PM1_EVT_PORT.into(), PM1_LEN, pm1.clone())?;
        Ok(PowerButton(pm1))
    }

    /// A handle that presses the VM's ACPI power button (fixed-hardware ACPI, i.e. `acpi: true`); usable from
    /// any thread while the VM runs.
    pub fn power_button(&self) -> Option<PowerButton> {
        self.power_button.clone()
    }

    /// The PCI root bus with the configured virtio devices, wired to the PIO (CF8/CFC) and MMIO (ECAM, BAR
    /// windows) buses.
    fn pci_devices(
        vm: &Arc<dyn Vm>,
        mem: &GuestMemoryMmap,
        layout: PciLayout,
        devices: &DeviceConfig,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<(), VmmError> {
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let mut root = PciRoot::new(layout);
        for (name, model) in models::from_config::<VmmError>(devices)? {
            let dev = VirtioPci::new(&name, model, vm.clone(), router.clone(), mem.clone())?;
            root.add_device(&name, Arc::new(Mutex::new(dev)))?;
        }
        attach_to_buses(root, layout, pio, mmio)?;
        Ok(())
    }

    /// The kernel's 64-bit entry point.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// Guest memory (for tests and diagnostics).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the VM until it stops; returns how it ended.
    pub fn run(mut self) -> Result<RunReport, VmmError> {
        install_kick_handler()?;
        let guest_ranges = memory::host_ranges(&self.mem);
        let pio = std::mem::take(&mut self.pio);
        let mmio = std::mem::take(&mut self.mmio);
        let shared = Arc::new(RunShared::new(pio, mmio, self.mem.clone()));
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            let thread_shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .spawn(move || run_vcpu(vcpu, &thread_shared))
                .map_err(VmmError::Thread);
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.finish(VmExit::Reset);
                    stop_threads(handles);
                    return Err(e);
                }
            }
        }
        shared.wait(self.timeout);
        stop_threads(handles);

        if let Err(e) = self.serial.lock().unwrap_or_else(|p| p.into_inner()).flush() {
            tracing::warn!("flushing serial log: {e}");
        }
        let mut timing = self.timing;
        timing.first_run_ns = shared.first_run_ns.load(Ordering::Acquire);
        timing.first_exit_ns = shared.first_exit_ns.load(Ordering::Acquire);
        timing.end_ns = boottime_ns();
        let (unknown_count, unknown) = shared.unknown_accesses();
        let exit = shared.take_outcome().unwrap_or(VmExit::Timeout);
        Ok(RunReport {
            exit,
            timing,
            unknown_count,
            unknown,
            userspace_exits: shared.userspace_exits.load(Ordering::Relaxed),
            rss: timing::rss_report(&guest_ranges).ok(),
        })
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads out of `KVM_RUN` (the handler does nothing; the EINTR is the point).
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VmmError::Signal(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// Kicks every vCPU thread until it has left its run loop, then joins it. A kick can race with a thread that
/// is just about to enter `KVM_RUN`, so it is repeated until the thread is gone.
fn stop_threads(handles: Vec<std::thread::JoinHandle<()>>) {
    for h in handles {
        while !h.is_finished() {
            if let Err(e) = h.kill(kick_signal()) {
                tracing::warn!("kicking vCPU thread: {e}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if h.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

#[cfg(test)]
#[path = "vmm_tests.rs"]
mod tests;
