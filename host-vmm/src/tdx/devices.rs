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

use super::shared_mem::TdMemory;
use crate::devices::ioapic::{MsiMessage, MsiSink};
use crate::devices::{Bus, BusError};
use crate::hypervisor::tdx::TdxVm;
use crate::hypervisor::{IrqRoute, Vm};
use crate::pci::msix::GsiRouter;
use crate::pci::root::{CLOUD_HYPERVISOR_HOST_BRIDGE_ID, PciError, attach_to_buses};
use crate::pci::{PciLayout, PciRoot};
use crate::virtio::block::BlockError;
use crate::virtio::models;
use crate::virtio::net::NetError;
use crate::virtio::pci::{TransportError, VirtioPci};
use crate::virtio::vsock::VsockError;
use crate::vmm::DeviceConfig;

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
    for (name, model) in models::from_config::<TdDeviceError>(devices)? {
        let dev = VirtioPci::with_memory(&name, model, plain_vm.clone(), router.clone(), mem.clone())?;
        root.add_device(&name, Arc::new(Mutex::new(dev)))?;
    }
    Ok(attach_to_buses(root, layout, pio, mmio)?)
}
