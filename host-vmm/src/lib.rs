//! dstack host VMM: boots a VM directly on KVM with rust-vmm crates.
//!
//! Structure (Firecracker / Cloud Hypervisor style):
//! - [`hypervisor`]: every raw KVM ioctl, behind the `Hypervisor` → `Vm` → `Vcpu` traits, plus a recording
//!   fake for unit tests.
//! - [`memory`]: guest RAM regions around the 32-bit MMIO hole.
//! - [`arch::x86_64`]: kernel loading, zero page, page tables, long-mode registers, CPUID, MSRs, MP table.
//! - [`devices`]: PIO/MMIO buses, 16550 serial, i8042, debug-exit port.
//! - [`pci`]: the PCI root bus (CF8/ECAM config access, BAR windows, MSI-X over KVM GSI routing).
//! - [`virtio`]: the virtio-pci transport and userspace devices (block, vsock, rng; net backends).
//! - [`tdx`]: launching Intel TDX guests (TDs) through upstream KVM's TDX API.
//! - [`vcpu`]: the run loop and failure diagnostics; [`vmm`]: building and running one VM.
//! - [`cli`]: the operator CLI behind `dstack-vmm-cli` (deploy with env encryption, lifecycle, logs).
//! - [`manager`]: the VM manager daemon behind the `dstack-vmm` binary (API, state, supervisor, backends).

pub mod arch;
pub mod cli;
pub mod control;
pub mod devices;
pub mod hypervisor;
pub mod manager;
pub mod memory;
pub mod payload;
pub mod pci;
pub mod tdx;
pub mod timing;
pub mod vcpu;
pub mod virtio;
pub mod vmm;

pub use vcpu::{VcpuDiagnostics, VmExit};
pub use vmm::{DeviceConfig, DiskConfig, RunReport, VmConfig, Vmm, VmmError, VsockConfig};
