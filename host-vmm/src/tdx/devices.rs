//! Virtio-pci devices for a TD: the same PCI root, transport and device models as an ordinary VM
//! ([`crate::vmm`]), with two differences that confidential memory and the split irqchip force:
//!
//! - **Memory**: each device gets the TD's [`TdMemory`] as its [`crate::virtio::DeviceMemory`], a view holding
//!   only the ranges the guest converted to shared (its swiotlb bounce buffers and DMA-coherent rings). A
//!   ring, descriptor or buffer in private memory fails like an address outside RAM: the request completes
//!   with an error status, or the device sets DEVICE_NEEDS_RESET when its rings are gone.
//! - **Interrupts**: one [`GsiRouter`] in split-irqchip mode owns `KVM_SET_GSI_ROUTING` for the whole VM: the
//!   IOAPIC's mirrored redirection table for GSIs 0..24 ([`TdIrqSink`]) merged with the MSI-X routes of the
//!   devices above them, and never KVM's irqchip routes (KVM rejects them with a split irqchip).
//!
//! The host bridge at 00.0 presents Cloud Hypervisor's ID ([`CLOUD_HYPERVISOR_HOST_BRIDGE_ID`]): OVMF refuses
//! other host bridges (see `docs/tdx-host.md` for what that platform type implies for the firmware).
//!
//! The PCI layout is [`PciLayout::for_ram`] of the TD's memory: the one the ACPI tables in fw_cfg describe
//! (`VmShape::acpi_shape`), so the firmware and the kernel find the devices where the tables say.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::shared_mem::TdMemory;
use crate::devices::ioapic::{MsiMessage, MsiSink};
use crate::devices::{Bus, BusError};
use crate::hypervisor::tdx::TdxVm;
use crate::hypervisor::{IrqRoute, Vm};
use crate::pci::msix::GsiRouter;
use crate::pci::root::{CLOUD_HYPERVISOR_HOST_BRIDGE_ID, PciAccess, PciError};
use crate::pci::{CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_SIZE, PciBusDevice, PciLayout, PciRoot};
use crate::virtio::VirtioDevice;
use crate::virtio::block::{Block, BlockError, Disk};
use crate::virtio::net::passt::PasstBackend;
use crate::virtio::net::tap::TapBackend;
use crate::virtio::net::{Net, NetBackend, NetError};
use crate::virtio::pci::{TransportError, VirtioPci};
use crate::virtio::rng::Rng;
use crate::virtio::vsock::{Vsock, VsockError};
use crate::vmm::{DeviceConfig, NetBackendConfig};

/// Why a TD's devices could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TdDeviceError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The IOAPIC's view of a TD: MSIs through `KVM_SIGNAL_MSI`; its redirection table, mirrored as MSI routes of
/// GSIs 0..24, goes to the VM's one routing owner, which merges it with the MSI-X routes.
pub struct TdIrqSink {
    pub vm: Arc<dyn TdxVm>,
    pub router: Arc<GsiRouter>,
}

impl MsiSink for TdIrqSink {
    fn send_msi(&self, msg: MsiMessage) -> Result<(), String> {
        self.vm.signal_msi(msg.address, msg.data).map_err(|e| e.to_string())
    }
    fn update_routes(&self, routes: &[IrqRoute]) -> Result<(), String> {
        self.router.set_ioapic_routes(routes).map_err(|e| e.to_string())
    }
}

/// The routing owner of a TD (split irqchip: no irqchip routes).
pub fn td_router(vm: &Arc<dyn TdxVm>) -> Arc<GsiRouter> {
    let vm: Arc<dyn Vm> = vm.clone();
    Arc::new(GsiRouter::for_split_irqchip(vm))
}

/// A device model and its bus name.
type NamedDevice = (String, Box<dyn VirtioDevice>);

/// The device models `devices` asks for, named and in PCI slot order (disks, net, vsock, rng — as the `kvm`
/// path orders them).
fn models(devices: &DeviceConfig) -> Result<Vec<NamedDevice>, TdDeviceError> {
    let mut models: Vec<NamedDevice> = Vec::new();
    for (i, d) in devices.disks.iter().enumerate() {
        models.push((
            format!("virtio-blk{i}"),
            Box::new(Block::new(Disk::open(&d.path, d.read_only)?)),
        ));
    }
    if let Some(n) = &devices.net {
        let backend: Box<dyn NetBackend> = match &n.backend {
            NetBackendConfig::Passt { socket } => Box::new(PasstBackend::connect(socket, Duration::from_secs(5))?),
            NetBackendConfig::Tap { ifname, bridge } => Box::new(TapBackend::open(ifname, bridge.as_deref())?),
        };
        models.push(("virtio-net".into(), Box::new(Net::new(n.mac, n.mtu, backend)?)));
    }
    if let Some(v) = &devices.vsock {
        models.push(("virtio-vsock".into(), Box::new(Vsock::new(v.cid, v.uds_path.clone())?)));
    }
    if devices.rng {
        models.push(("virtio-rng".into(), Box::new(Rng::default())));
    }
    Ok(models)
}

/// Puts the PCI root bus with the configured virtio devices on the TD's buses (CF8/CFC on `pio`; ECAM and the
/// BAR windows on `mmio`). The root is always present — the ACPI tables describe it — even without devices.
/// Returns the root (for tests and diagnostics).
pub fn attach_pci(
    vm: &Arc<dyn TdxVm>,
    router: &Arc<GsiRouter>,
    mem: &Arc<TdMemory>,
    memory_bytes: u64,
    devices: &DeviceConfig,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<Arc<Mutex<PciRoot>>, TdDeviceError> {
    let layout = PciLayout::for_ram(memory_bytes);
    let plain_vm: Arc<dyn Vm> = vm.clone();
    let mut root = PciRoot::with_host_bridge(layout, CLOUD_HYPERVISOR_HOST_BRIDGE_ID);
    for (name, model) in models(devices)? {
        let dev = VirtioPci::with_memory(&name, model, plain_vm.clone(), router.clone(), mem.clone())?;
        root.add_device(&name, Arc::new(Mutex::new(dev)))?;
    }
    let root = Arc::new(Mutex::new(root));
    let view = |access| {
        Arc::new(Mutex::new(PciBusDevice {
            root: root.clone(),
            access,
        }))
    };
    pio.insert(
        "pci-config-io",
        CONFIG_ADDRESS_PORT.into(),
        CONFIG_IO_LEN,
        view(PciAccess::ConfigIo),
    )?;
    mmio.insert("pci-ecam", layout.ecam, ECAM_SIZE, view(PciAccess::Ecam))?;
    mmio.insert(
        "pci-mem32",
        layout.mem32.0,
        layout.mem32.1,
        view(PciAccess::Window(layout.mem32.0)),
    )?;
    mmio.insert(
        "pci-mem64",
        layout.mem64.0,
        layout.mem64.1,
        view(PciAccess::Window(layout.mem64.0)),
    )?;
    Ok(root)
}
