//! PCI: one root bus behind a host bridge, configuration access through ports 0xCF8/0xCFC and PCIe ECAM,
//! BARs allocated from the 32-bit MMIO hole (and a 64-bit window above RAM), and MSI-X routed through KVM
//! GSI routing + irqfds. The address layout is a pure function of the RAM size ([`PciLayout::for_ram`]),
//! so the ACPI tables describing it can be predicted.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarInfo, BarKind, PciConfig, PciId};
pub use root::{PciBusDevice, PciRoot};

/// A PCI function as the root bus sees it.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    /// A guest write to configuration space (`offset` < 4096).
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// A guest read of configuration space; the default reads the register file.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// Sets BAR `bar`'s address (at setup, like firmware would).
    fn set_bar_addr(&mut self, bar: usize, addr: u64);
    /// MMIO to `offset` within BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` stopped or started decoding, or moved: `(address, size)` before and after.
    fn bar_decode_changed(&mut self, _bar: usize, _old: Option<(u64, u64)>, _new: Option<(u64, u64)>) {}
}

/// Guest-physical PCI resources and their constants (shared with the ACPI generator in `dstack-acpi`).
pub use dstack_acpi::layout::{CONFIG_ADDRESS_PORT, ECAM_SIZE, PciLayout};
pub const CONFIG_IO_LEN: u64 = 8;

/// Bus/device/function of a configuration access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}
