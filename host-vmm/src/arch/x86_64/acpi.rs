//! ACPI tables as a pure function of the VM shape: the generator lives in the shared `dstack-acpi` crate so the
//! measurement predictor hashes exactly the bytes the VMM writes (and, for OVMF boots, the fw_cfg form of them).

pub use dstack_acpi::tables::*;
