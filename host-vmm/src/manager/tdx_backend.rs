//! `tdx`: our VMM launching each VM as an Intel TDX guest (`dstack-vmm-run --tdx`, see [`crate::tdx::cli`]).
//!
//! The command line is the `kvm` backend's (same disks, networking, vsock socket, serial log — so passt and the
//! port mappings work the same) plus `--tdx --firmware <image>/<bios> --qgs-socket <path>`. Differences from
//! `kvm` that matter for trust:
//! - the host is checked when the backend is built ([`TdxBackend::probe`]): KVM must offer `KVM_X86_TDX_VM`.
//!   On a host without it the daemon still serves the API (to list, stop and remove VMs), but every start
//!   fails before anything is prepared with the launch module's "this host cannot run TDX guests: …" error;
//! - no simulated TEE: the manager runs no simulated TDX module for these VMs and tells the guest `tee = "tdx"`
//!   (so guest-init uses the real TDX interfaces or stops), and images whose measured command line selects a
//!   simulated TEE (`dstack.tee=simulated:…`) are refused — that guest would wait for a module no one serves;
//! - `--mrconfigid`: the TD's MRCONFIGID binds its `app-compose.json` (and `.instance_info`) per
//!   [`crate::tdx::mr_config`] unless `[cvm.tdx] use_mrconfigid = false`;
//! - `--control-socket` (from the `kvm` plan) is served by the TD's VMM too: `ShutdownVm` presses the TD's ACPI
//!   power button there (`manager::shutdown`), then asks the guest API, as for `kvm`.

use std::path::PathBuf;

use super::backend::{Backend, BackendError, KvmBackend, LaunchInput, effective_cmdline};
use super::supervisor::ProcSpec;
use crate::hypervisor::tdx::TdxHypervisor;
use crate::tdx::check_host;

const NAME: &str = "tdx";

/// The `tdx` backend.
#[derive(Debug, Clone)]
pub struct TdxBackend {
    /// Disks, networking, vsock and serial exactly as `kvm` plans them.
    pub kvm: KvmBackend,
    /// Intel QGS socket handed to the VMM (`None`: the VMM default, `/var/run/tdx-qgs/qgs.socket`).
    pub qgs_socket: Option<PathBuf>,
    /// Pass the MRCONFIGID binding the app configuration (default true).
    pub use_mrconfigid: bool,
    /// Why this host cannot run TDs (`None`: it can).
    unavailable: Option<String>,
}

impl TdxBackend {
    /// Builds the backend, asking `host` (normally `/dev/kvm`) whether it can run TDs.
    pub fn probe(host: &dyn TdxHypervisor, kvm: KvmBackend, qgs_socket: Option<PathBuf>) -> Self {
        Self {
            kvm,
            qgs_socket,
            use_mrconfigid: true,
            unavailable: check_host(host).err().map(|e| e.to_string()),
        }
    }

    /// A backend for a host that has no usable KVM at all (`reason`, e.g. opening `/dev/kvm` failed).
    pub fn unavailable(kvm: KvmBackend, qgs_socket: Option<PathBuf>, reason: String) -> Self {
        Self {
            kvm,
            qgs_socket,
            use_mrconfigid: true,
            unavailable: Some(reason),
        }
    }

    /// `Err` with the reason if this host cannot run TDs.
    pub fn available(&self) -> Result<(), BackendError> {
        match &self.unavailable {
            None => Ok(()),
            Some(reason) => Err(BackendError::Unsupported {
                backend: NAME,
                reason: reason.clone(),
            }),
        }
    }

    fn firmware(input: &LaunchInput<'_>) -> Result<PathBuf, BackendError> {
        let img = input.image;
        let bios = &img.metadata.bios;
        if bios.is_empty() || bios.contains('/') || bios == ".." || bios == "." {
            return Err(BackendError::Image {
                name: img.name.clone(),
                reason: format!("metadata.json bios: {bios:?} is not a firmware file in the image directory"),
            });
        }
        Ok(img.dir.join(bios))
    }
}

impl TdxBackend {
    /// The MRCONFIGID for the VM's app configuration as written to its shared directory.
    fn mrconfigid(input: &LaunchInput<'_>) -> Result<[u8; 48], BackendError> {
        use dstack_types::shared_files as sf;
        let err = |reason: String| BackendError::Prepare {
            what: "MRCONFIGID".into(),
            reason,
        };
        let compose = input
            .workdir
            .read_shared(sf::APP_COMPOSE)
            .map_err(|e| err(e.to_string()))?;
        let info = input.workdir.read_shared(sf::INSTANCE_INFO).ok();
        crate::tdx::mr_config::for_app(&compose, info.as_deref()).map_err(|e| err(e.to_string()))
    }
}

/// True if the command line selects a simulated TEE (`dstack.tee=simulated:…`).
fn selects_simulated_tee(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| {
        w.strip_prefix("dstack.tee=")
            .is_some_and(|v| v.starts_with("simulated"))
    })
}

impl Backend for TdxBackend {
    fn name(&self) -> &'static str {
        NAME
    }
    fn is_emulation(&self) -> bool {
        false
    }
    fn prepare(&self, input: &LaunchInput<'_>) -> Result<(), BackendError> {
        self.available()?;
        let fw = Self::firmware(input)?;
        if !fw.is_file() {
            return Err(BackendError::Image {
                name: input.image.name.clone(),
                reason: format!("TDVF firmware {} is missing", fw.display()),
            });
        }
        self.kvm.prepare(input)
    }
    fn plan(&self, input: &LaunchInput<'_>) -> Result<Vec<ProcSpec>, BackendError> {
        self.available()?;
        if selects_simulated_tee(&effective_cmdline(input.image)?) {
            return Err(BackendError::Unsupported {
                backend: NAME,
                reason: format!(
                    "image {} selects the simulated TEE on its kernel command line; a TD attests with real TDX",
                    input.image.name
                ),
            });
        }
        let mut procs = self.kvm.plan(input)?;
        let vm = procs.last_mut().ok_or_else(|| BackendError::Prepare {
            what: "tdx plan".into(),
            reason: "the kvm plan has no VM process".into(),
        })?;
        let mut args = vec![
            "--tdx".to_owned(),
            "--firmware".into(),
            Self::firmware(input)?.display().to_string(),
        ];
        if let Some(q) = &self.qgs_socket {
            args.extend(["--qgs-socket".into(), q.display().to_string()]);
        }
        if self.use_mrconfigid {
            args.extend(["--mrconfigid".into(), hex::encode(Self::mrconfigid(input)?)]);
        }
        args.append(&mut vm.args);
        vm.args = args;
        Ok(procs)
    }
}

#[cfg(test)]
#[path = "tdx_backend_tests.rs"]
mod tests;
