//! Prediction of MRTD and RTMR0-2 — and the full boot event log — for a TD that our VMM boots with OVMF
//! (TDVF) and a direct kernel boot: the `tdx` backend's boot path (host-vmm presents QEMU's Q35 chipset and
//! hands OVMF the kernel, initrd, command line and ACPI tables through fw_cfg, like QEMU; why Q35: [`platform`]).
//!
//! What each register covers (tdx-facts §2–§3; the order is the order OVMF logs them):
//! - **MRTD**: the firmware's TDVF sections, single-pass page order (how our VMM issues
//!   `KVM_TDX_INIT_MEM_REGION`, one call per section in metadata order).
//! - **RTMR0**: TD HOB ([`hob`]), CFV (the TDVF CFV section's bytes), SecureBoot/PK/KEK/db/dbx (absent),
//!   separator, the three fw_cfg ACPI files ([`VmShape::acpi_fw_cfg`]: loader, rsdp, tables; fixed-hardware
//!   tables with the PCI windows of [`platform::td_pci_layout`]), BootOrder and Boot0000.
//! - **RTMR1**: Authenticode SHA-384 of the loader-patched kernel ([`loader`]), "Calling EFI Application
//!   from Boot Option", separator, "Exit Boot Services Invocation", "Exit Boot Services Returned with
//!   Success".
//! - **RTMR2**: the command line OVMF passes to the kernel (`cmdline + " initrd=initrd"` when there is an
//!   initrd, UTF-16LE + NUL) and SHA-384 of the initrd.
//!
//! Confirmed by reading edk2-stable202502 (the base of the image's OVMF): with a Q35 host bridge OVMF installs
//! its ACPI tables with the fw_cfg table loader and measures `etc/table-loader` and each ALLOCATEd blob as
//! EV_PLATFORM_CONFIG_FLAGS "ACPI DATA" before linking them (`AcpiPlatformLib/QemuFwCfgAcpi.c`:
//! `InstallQemuFwCfgTables`, `ProcessCmdAllocate`); nothing else about the tables is extended. host-vmm serves
//! exactly [`VmShape::acpi_fw_cfg`] and writes exactly [`hob::build`] (tested against the recording fake).
//!
//! Not confirmable here (no TDX hardware, no run of our VMM under OVMF): that OVMF logs exactly these RTMR0
//! events in this order for our fw_cfg content (the event set and payload layouts match a real dstack TD
//! booted by QEMU with OVMF 2025.02-era firmware; edk2-stable202505 and later add BootMenu/bootorder fw_cfg,
//! EV_EFI_VARIABLE_AUTHORITY and a second boot option), in particular that the rsdp blob is measured before
//! the tables blob, that the CFV digest is the hash of the whole TDVF CFV section, and that the TD HOB is
//! measured without its END_OF_HOB_LIST terminator.

pub mod events;
pub mod hob;
pub mod image;
pub mod loader;
pub mod platform;

use dstack_acpi::fw_cfg::AcpiFwCfg;
use dstack_acpi::layout::PciLayout;
use dstack_acpi::tables::{AcpiError, AcpiShape, PmModel};

use crate::authenticode::{PeError, authenticode_sha384};
use crate::eventlog::{ReplayError, TdxEvent, replay};
use crate::mrtd::{MrtdError, PageOrder, compute_mrtd_with, parse_tdvf};
use crate::rtmr::{
    EFI_CALLING_APPLICATION, EFI_EXIT_BOOT_SERVICES, EFI_EXIT_BOOT_SERVICES_OK, rtmr1_from_digest, rtmr2,
};

/// What the TD boots.
#[derive(Debug, Clone, Copy)]
pub struct BootInputs<'a> {
    pub firmware: &'a [u8],
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    /// The command line as configured (OVMF appends ` initrd=initrd` itself).
    pub cmdline: &'a str,
}

/// The VM shape the prediction is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// Smallest and largest memory we predict for (the TDVF sections must fit; 1 TiB as host-vmm).
pub const MIN_MEMORY: u64 = 64 << 20;
pub const MAX_MEMORY: u64 = 1 << 40;

/// The TD's ACPI power-management model: fixed hardware (FACS, PM1a blocks at ICH9's PMBASE 0x600, SCI 9), so
/// the host can press the power button; OVMF's Q35 code already uses the same PM1 block ([`platform`]).
pub const TD_PM_MODEL: PmModel = PmModel::FixedHardware;

impl VmShape {
    /// The TD's PCI layout ([`platform::td_pci_layout`]: the windows OVMF computes on Q35).
    pub fn pci_layout(&self) -> PciLayout {
        platform::td_pci_layout(self.memory_bytes)
    }

    /// The ACPI shape our VMM uses for this VM: every VM has virtio-pci devices, so the PCI root bridge is
    /// always described.
    pub fn acpi_shape(&self) -> AcpiShape {
        AcpiShape {
            vcpus: self.vcpus,
            pci: Some(self.pci_layout()),
        }
    }

    /// The three fw_cfg ACPI files of this TD — what host-vmm serves and what RTMR0's "ACPI DATA" events hash.
    pub fn acpi_fw_cfg(&self) -> Result<AcpiFwCfg, AcpiError> {
        dstack_acpi::fw_cfg::build_for(&self.acpi_shape(), TD_PM_MODEL)
    }
}

/// The predicted registers and the boot event log that produces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prediction {
    pub mrtd: [u8; 48],
    /// RTMR0..2.
    pub rtmr: [[u8; 48]; 3],
    /// Boot events in OVMF's logging order (RTMR0-2 only; RTMR3 belongs to the guest).
    pub events: Vec<TdxEvent>,
}

/// Why a prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error("firmware: {0}")]
    Firmware(#[from] MrtdError),
    #[error("firmware: TDVF metadata has no CFV section, or it lies outside the file")]
    NoCfv,
    #[error("TD HOB: {0}")]
    Hob(#[from] hob::HobError),
    #[error("kernel: {0}")]
    Loader(#[from] loader::LoaderError),
    #[error("kernel: {0}")]
    Pe(#[from] PeError),
    #[error("ACPI: {0}")]
    Acpi(#[from] dstack_acpi::tables::AcpiError),
    #[error("memory {0} bytes: must be a whole number of MiB in 64 MiB..=1 TiB")]
    BadMemory(u64),
    #[error("replaying the predicted log: {0}")]
    Replay(#[from] ReplayError),
}

/// The command line OVMF measures and passes on.
pub fn measured_cmdline(cmdline: &str, initrd: &[u8]) -> String {
    if initrd.is_empty() {
        cmdline.to_owned()
    } else {
        format!("{cmdline} initrd=initrd")
    }
}

/// Predicts MRTD, RTMR0-2 and the boot event log.
pub fn predict(inputs: &BootInputs<'_>, shape: &VmShape) -> Result<Prediction, PredictError> {
    let mem = shape.memory_bytes;
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem) || !mem.is_multiple_of(1 << 20) {
        return Err(PredictError::BadMemory(mem));
    }
    let tdvf = parse_tdvf(inputs.firmware)?;
    let mrtd = compute_mrtd_with(inputs.firmware, &tdvf, PageOrder::SinglePass);
    let hob = hob::build(&tdvf, mem)?;
    let cfv_section = tdvf
        .sections
        .iter()
        .find(|s| s.section_type == hob::SECTION_CFV)
        .ok_or(PredictError::NoCfv)?;
    let cfv_start = cfv_section.data_offset as usize;
    let cfv_bytes = inputs
        .firmware
        .get(cfv_start..cfv_start.saturating_add(cfv_section.raw_data_size as usize))
        .ok_or(PredictError::NoCfv)?;
    let acpi = shape.acpi_fw_cfg()?;
    let patched = loader::patch_kernel(inputs.kernel, inputs.initrd.len() as u64, mem)?;
    let kernel_digest = authenticode_sha384(&patched)?;

    let mut ev = vec![
        events::td_hob(hob.measured(), hob.base),
        events::cfv(cfv_bytes, cfv_section.memory_address),
    ];
    ev.extend(events::secure_boot_variables());
    ev.push(events::separator(0));
    ev.extend([&acpi.table_loader, &acpi.rsdp, &acpi.tables].map(|f| events::acpi_data(f)));
    ev.push(events::kernel(kernel_digest));
    ev.extend(events::boot_variables());
    ev.push(events::action(EFI_CALLING_APPLICATION));
    ev.push(events::separator(1));
    ev.push(events::cmdline(&measured_cmdline(inputs.cmdline, inputs.initrd)));
    ev.push(events::initrd(inputs.initrd));
    ev.push(events::action(EFI_EXIT_BOOT_SERVICES));
    ev.push(events::action(EFI_EXIT_BOOT_SERVICES_OK));

    // RTMR1/2 through the separately written `rtmr` helpers; the tests require replaying `ev` to agree.
    let rtmr0 = replay(&ev)?[0];
    let rtmr1 = rtmr1_from_digest(kernel_digest);
    let rtmr2 = rtmr2(&measured_cmdline(inputs.cmdline, inputs.initrd), inputs.initrd);
    Ok(Prediction {
        mrtd,
        rtmr: [rtmr0, rtmr1, rtmr2],
        events: ev,
    })
}

#[cfg(test)]
mod tests;
