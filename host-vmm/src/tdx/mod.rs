//! Intel TDX guests on upstream KVM (Linux ≥ 6.16), written against the hypervisor traits in
//! [`crate::hypervisor::tdx`]:
//! - [`params`]: TD attributes, XFAM and the INIT_VM CPUID derived from the host's TDX capabilities;
//! - [`launch`]: the launch sequence up to `KVM_TDX_FINALIZE_VM`;
//! - [`mr_config`]: the MRCONFIGID binding a TD to its app configuration;
//! - [`fw_cfg`]: the QEMU-compatible fw_cfg device OVMF reads for direct kernel boot;
//! - [`quote`]: the GetQuote TDVMCALL forwarded to Intel's quote generation service;
//! - [`chipset`]: the Q35 MCH/ICH9 LPC registers OVMF touches (the TD presents QEMU's Q35 platform);
//! - [`devices`]: virtio-pci devices on shared memory, MSI-X routes merged with the IOAPIC's;
//! - [`exits`]: the TD-specific vCPU exits (GetQuote TDVMCALL, private/shared conversions);
//! - [`run`]: booting a TD with OVMF direct boot and running its vCPUs.
//!
//! MRTD and the TD HOB come from the `measurements` crate's code (TDVF metadata parser, HOB builder), so what
//! this VMM hands to KVM and the firmware is by construction what `dstack-measure` predicts; the tests check it
//! against the recording fake with Debian's OVMF.

pub mod chipset;
pub mod cli;
pub mod devices;
pub mod exits;
pub mod fw_cfg;
pub mod launch;
pub mod mr_config;
pub mod params;
pub mod quote;
pub mod run;
pub mod shared_mem;

pub use launch::{LaunchedTd, TdLayout, TdxConfig, TdxError, check_host, launch};

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_devices;
#[cfg(test)]
mod tests_power;
#[cfg(test)]
mod tests_run;
