//! The guest-visible platform description as pure functions of the VM shape: the RAM / MMIO layout, the PCI
//! root bridge's resources, the ACPI tables, and the QEMU-style fw_cfg ACPI files (`etc/table-loader`,
//! `etc/acpi/rsdp`, `etc/acpi/tables`) a firmware would read.
//!
//! host-vmm writes these into the guest; the `measurements` crate hashes the very same bytes to predict RTMR0,
//! so nothing here may depend on KVM or on guest memory.

pub mod aml;
pub mod fw_cfg;
pub mod layout;
pub mod tables;
