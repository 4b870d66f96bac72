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
//! The chipset is QEMU's Q35 ([`super::chipset`]: MCH host bridge at 00.0, ICH9 LPC at 1f.0), so OVMF runs
//! its QEMU code paths — the fw_cfg ACPI table loader among them (why: `dstack_measurements::predict::platform`).
//!
//! The PCI layout is `VmShape::pci_layout` of the TD: the windows OVMF computes on Q35, which the ACPI tables in
//! fw_cfg (`VmShape::acpi_shape`) describe too, so the firmware and the kernel find the devices where the
//! tables say and every BAR OVMF assigns lies in a window this root decodes.

use std::sync::{Arc, Mutex};

use super::chipset::{ChipsetView, Q35_MCH_ID, Q35Chipset};
use super::shared_mem::TdMemory;
use crate::devices::ioapic::{MsiMessage, MsiSink};
use crate::devices::{Bus, BusError};
use crate::hypervisor::tdx::TdxVm;
use crate::hypervisor::{IrqRoute, Vm};
use crate::pci::msix::GsiRouter;
use crate::pci::root::{PciAccess, PciError};
use crate::pci::{CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, ECAM_SIZE, PciBusDevice, PciRoot};
use crate::virtio::block::BlockError;
use crate::virtio::models;
use crate::virtio::net::NetError;
use crate::virtio::pci::{TransportError, VirtioPci};
use crate::virtio::vsock::VsockError;
use crate::vmm::DeviceConfig;
use dstack_measurements::predict::platform::td_pci_layout;

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
    let layout = td_pci_layout(memory_bytes);
    let plain_vm: Arc<dyn Vm> = vm.clone();
    let mut root = PciRoot::with_host_bridge(layout, Q35_MCH_ID);
    for (name, model) in models::from_config::<TdDeviceError>(devices)? {
        let dev = VirtioPci::with_memory(&name, model, plain_vm.clone(), router.clone(), mem.clone())?;
        root.add_device(&name, Arc::new(Mutex::new(dev)))?;
    }
    let root = Arc::new(Mutex::new(root));
    // Configuration space through the chipset (MCH registers, the LPC function); BAR windows straight to the root.
    let chipset = Arc::new(Mutex::new(Q35Chipset::new(root.clone())));
    let config = |access| {
        Arc::new(Mutex::new(ChipsetView {
            chipset: chipset.clone(),
            access,
        }))
    };
    pio.insert(
        "pci-config-io",
        CONFIG_ADDRESS_PORT.into(),
        CONFIG_IO_LEN,
        config(PciAccess::ConfigIo),
    )?;
    mmio.insert("pci-ecam", layout.ecam, ECAM_SIZE, config(PciAccess::Ecam))?;
    for (name, (base, len)) in [("pci-mem32", layout.mem32), ("pci-mem64", layout.mem64)] {
        let window = Arc::new(Mutex::new(PciBusDevice {
            root: root.clone(),
            access: PciAccess::Window(base),
        }));
        mmio.insert(name, base, len, window)?;
    }
    Ok(root)
}
