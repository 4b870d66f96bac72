//! Emulated devices and the PIO/MMIO buses that dispatch guest accesses to them.

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod ioapic;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};

/// Something a device asks the VMM to do after a guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    /// Nothing beyond the access itself.
    None,
    /// The guest wrote the debug-exit port: stop the VM with this status.
    DebugExit(u32),
    /// The guest asked for a reset (i8042 0xFE, ACPI reset register): stop the VM.
    Reset,
    /// The guest entered S5 through the ACPI sleep control register.
    PowerOff,
}
