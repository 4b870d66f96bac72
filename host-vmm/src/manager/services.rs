//! Host-side services of one VM, reachable from the guest over vsock (CID 2): the host API
//! (`HostApi.Info`, `HostApi.Notify`) at `/api` on `<vsock uds>_<host_api.port>`, and the simulated TDX
//! module's pRPC server on `<vsock uds>_<sim_tdx.port>`. Also the host-shared files written at creation.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use dstack_measurements::predict::VmShape;
use dstack_measurements::predict::image::ImageFiles;
use dstack_rpc::host_api::{
    GetSealingKeyRequest, GetSealingKeyResponse, HostApiRpc, HostApiServer, HostInfo, Notification,
};
use dstack_rpc::vmm::VmConfiguration;
use dstack_rpc::{CallContext, Empty, RpcError, RpcRouter};
use dstack_sim_tdx::{InitialState, SimTdx};
use dstack_types::shared_files as sf;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::backend::Image;
use super::config::VmmConfig;
use super::state::Workdir;
use super::vms::{Manager, ManagerError};

/// Guest notifications larger than this are refused.
const MAX_NOTIFY_BYTES: usize = 64 << 10;

/// What the services need to know about their VM.
#[derive(Debug, Clone)]
pub struct VmCtx {
    pub id: String,
    pub wd: Workdir,
    pub image: String,
    pub vcpu: u32,
    pub memory_mb: u32,
    /// The VM kept running while the manager restarted (re-adopted): its simulated TDX module resumes from
    /// its journal instead of starting a new boot.
    pub resume: bool,
}

/// The simulated TDX module's journal in a VM's work directory (`dstack_sim_tdx` journal format).
pub fn sim_tdx_journal(wd: &Workdir) -> std::path::PathBuf {
    wd.path().join("sim-tdx-journal.jsonl")
}

/// Running servers of one VM; dropping the senders stops them.
pub struct VmServices {
    stops: Vec<oneshot::Sender<()>>,
    /// The sockets they listen on, with the inode each was bound as.
    sockets: Vec<(PathBuf, u64)>,
}

impl VmServices {
    /// Stops the servers and removes their sockets at once, so a restart of the VM can bind the same paths
    /// without waiting for the old servers to wind down (they stop accepting when they see the signal).
    pub fn shutdown(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        for (path, ino) in self.sockets {
            // Only the socket these servers bound: never one a newer start put there since.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Binds a VM service socket (mode 0600) and remembers it for [`VmServices::shutdown`].
fn bind(path: &Path, what: &str, sockets: &mut Vec<(PathBuf, u64)>) -> Result<tokio::net::UnixListener, String> {
    let listener = dstack_rpc::bind_unix(path, 0o600).map_err(|e| format!("{what} socket {}: {e}", path.display()))?;
    let ino = std::fs::symlink_metadata(path)
        .map_err(|e| format!("{what} socket {}: {e}", path.display()))?
        .ino();
    sockets.push((path.to_path_buf(), ino));
    Ok(listener)
}

/// Hex field of `metadata.json` → 48 bytes, or `None` (with a warning when present but malformed).
fn measurement(image: &str, field: &str, v: Option<&String>) -> Option<Vec<u8>> {
    let v = v?;
    match hex::decode(v) {
        Ok(b) if b.len() == 48 => Some(b),
        _ => {
            warn!("image {image}: metadata.json {field} is not 48 bytes of hex; ignoring it");
            None
        }
    }
}

/// The simulated TDX module's starting registers for this VM: what a TD booting this image with this shape
/// would have, predicted by `dstack_measurements::predict` from the image's firmware, kernel, initrd and
/// cmdline (with the boot event log that produces them). Images without those inputs fall back to the
/// registers written in `metadata.json`, else zeros, loudly.
pub fn initial_state(image: Option<&Image>, vm_id: &str, vcpus: u32, memory_mb: u32) -> InitialState {
    if let Some(image) = image {
        let shape = VmShape {
            vcpus,
            memory_bytes: u64::from(memory_mb) << 20,
        };
        let files = ImageFiles::load(&image.dir)
            .map_err(|e| e.to_string())
            .and_then(|mut files| {
                files.cmdline = super::backend::effective_cmdline(image).map_err(|e| e.to_string())?;
                files.predict(&shape).map_err(|e| e.to_string())
            });
        match files {
            Ok(prediction) => {
                info!(
                    "VM {vm_id}: simulated TDX module starts from the predicted measurements of image {} \
                     ({vcpus} vCPU, {memory_mb} MiB): MRTD {}",
                    image.name,
                    hex::encode(prediction.mrtd)
                );
                return InitialState {
                    mrtd: prediction.mrtd.to_vec(),
                    rtmr0: Some(prediction.rtmr[0].to_vec()),
                    rtmr1: Some(prediction.rtmr[1].to_vec()),
                    rtmr2: Some(prediction.rtmr[2].to_vec()),
                    boot_event_log: prediction.events,
                    ..Default::default()
                };
            }
            Err(e) => warn!("VM {vm_id}: cannot predict measurements of image {}: {e}", image.name),
        }
    }
    let md = image.map(|i| (&i.name, &i.metadata));
    let get = |field: &str, pick: fn(&super::backend::ImageMetadata) -> Option<&String>| {
        md.and_then(|(name, m)| measurement(name, field, pick(m)))
    };
    let mrtd = get("mrtd", |m| m.mrtd.as_ref());
    if mrtd.is_none() {
        warn!(
            "VM {vm_id}: the image carries no predicted measurements; the simulated TDX module starts with \
             MRTD and RTMR0-2 all zero"
        );
    }
    InitialState {
        mrtd: mrtd.unwrap_or_else(|| vec![0; 48]),
        rtmr0: get("rtmr0", |m| m.rtmr0.as_ref()),
        rtmr1: get("rtmr1", |m| m.rtmr1.as_ref()),
        rtmr2: get("rtmr2", |m| m.rtmr2.as_ref()),
        ..Default::default()
    }
}

/// Binds and serves the VM's host API and simulated TDX module.
pub fn start(mgr: &Arc<Manager>, ctx: VmCtx) -> Result<VmServices, String> {
    let _guard = mgr.runtime().enter();
    let cfg = &mgr.config;
    let mut stops = Vec::new();
    let mut sockets = Vec::new();

    let host_api = RpcRouter::new("/api").service(HostApiServer::new(GuestHostApi {
        mgr: Arc::downgrade(mgr),
        id: ctx.id.clone(),
        node_name: cfg.node_name.clone(),
    }));
    let path = ctx.wd.vsock_port_path(cfg.host_api.port);
    let listener = bind(&path, "host API", &mut sockets)?;
    let (tx, rx) = oneshot::channel::<()>();
    stops.push(tx);
    let router = Arc::new(host_api);
    mgr.runtime().spawn(async move {
        if let Err(e) = dstack_rpc::serve_unix(listener, router, async {
            let _ = rx.await;
        })
        .await
        {
            warn!("host API server: {e}");
        }
    });

    // A TD attests with the real TDX module: no simulated one beside it (`manager::tdx_backend`).
    if cfg.cvm.backend == super::BackendKind::Tdx {
        info!(
            "VM {}: host API on vsock port {} (TDX: no simulated TDX module)",
            ctx.id, cfg.host_api.port
        );
        return Ok(VmServices { stops, sockets });
    }
    // One simulated attestation key per host (not per VM), so a KMS pins one root for all of them.
    let signer =
        dstack_sim_tdx::ensure_signer(&cfg.sim_tdx_state_dir()).map_err(|e| format!("simulated TDX module: {e}"))?;
    let journal = sim_tdx_journal(&ctx.wd);
    let sim = if ctx.resume && journal.exists() {
        // The registers belong to the boot still running, not to whatever the image is now.
        SimTdx::resume(signer, &journal).map_err(|e| format!("resuming the simulated TDX module: {e}"))?
    } else {
        if ctx.resume {
            warn!(
                "VM {}: no simulated TDX module journal to resume from; its module restarts from the initial \
                 registers, so its attestation will not match its event log until it reboots",
                ctx.id
            );
        }
        let image = Image::load(&cfg.image.path, &ctx.image).ok();
        let init = initial_state(image.as_ref(), &ctx.id, ctx.vcpu, ctx.memory_mb);
        SimTdx::new_journaled(&init, signer, &journal).map_err(|e| format!("simulated TDX module: {e}"))?
    };
    let path = ctx.wd.vsock_port_path(cfg.sim_tdx.port);
    let listener = bind(&path, "sim-tdx", &mut sockets)?;
    let (tx, rx) = oneshot::channel::<()>();
    stops.push(tx);
    let router = dstack_sim_tdx::router(Arc::new(sim));
    mgr.runtime().spawn(async move {
        if let Err(e) = dstack_rpc::serve_unix(listener, router, async {
            let _ = rx.await;
        })
        .await
        {
            warn!("sim-tdx server: {e}");
        }
    });
    info!(
        "VM {}: host API on vsock port {}, simulated TDX module (not real TDX) on vsock port {}",
        ctx.id, cfg.host_api.port, cfg.sim_tdx.port
    );
    Ok(VmServices { stops, sockets })
}

/// The host API as one guest sees it.
struct GuestHostApi {
    mgr: Weak<Manager>,
    id: String,
    node_name: String,
}

impl HostApiRpc for GuestHostApi {
    async fn info(&self, _ctx: &CallContext, _req: Empty) -> Result<HostInfo, RpcError> {
        Ok(HostInfo {
            name: self.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
    }

    async fn notify(&self, _ctx: &CallContext, req: Notification) -> Result<Empty, RpcError> {
        if req.event.len() > 256 || req.payload.len() > MAX_NOTIFY_BYTES {
            return Err(RpcError::handler("notification too large"));
        }
        let mgr = self
            .mgr
            .upgrade()
            .ok_or_else(|| RpcError::handler("VMM shutting down"))?;
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || mgr.guest_event(&id, &req.event, &req.payload))
            .await
            .map_err(|e| RpcError::handler(e.to_string()))?
            .map_err(RpcError::handler)?;
        Ok(Empty {})
    }

    async fn get_sealing_key(
        &self,
        _ctx: &CallContext,
        _req: GetSealingKeyRequest,
    ) -> Result<GetSealingKeyResponse, RpcError> {
        Err(RpcError::handler(
            "GetSealingKey: no local key provider is configured on this host",
        ))
    }
}

/// sha256 of the image's `sha256sum.txt` (dstack's `os_image_hash`), if the image has one.
fn os_image_hash(image: &Image) -> Vec<u8> {
    std::fs::read(image.dir.join("sha256sum.txt")).map_or_else(|_| Vec::new(), |d| Sha256::digest(&d).to_vec())
}

/// Writes `shared/`: app-compose.json (verbatim: its sha256 is the compose hash), .sys-config.json,
/// .encrypted-env, .user-config and .instance_info (pinned app id, if any).
pub fn write_shared_files(
    cfg: &VmmConfig,
    wd: &Workdir,
    req: &VmConfiguration,
    image: &Image,
) -> Result<(), ManagerError> {
    wd.write_shared(sf::APP_COMPOSE, req.compose_file.as_bytes())?;
    write_sys_config(cfg, wd, req, image)?;
    write_optional(wd, sf::ENCRYPTED_ENV, &req.encrypted_env)?;
    write_optional(wd, sf::USER_CONFIG, req.user_config.as_bytes())?;
    let app_id = match &req.app_id {
        Some(h) => hex::decode(h).map_err(|e| ManagerError::Other(format!("app_id: {e}")))?,
        None => Vec::new(),
    };
    let info = dstack_types::InstanceInfo {
        app_id,
        ..Default::default()
    };
    let json = serde_json::to_vec(&info).map_err(|e| ManagerError::Other(e.to_string()))?;
    wd.write_shared(sf::INSTANCE_INFO, &json)?;
    Ok(())
}

pub fn write_optional(wd: &Workdir, name: &str, data: &[u8]) -> Result<(), ManagerError> {
    if data.is_empty() {
        let _ = std::fs::remove_file(wd.shared_file(name));
        Ok(())
    } else {
        Ok(wd.write_shared(name, data)?)
    }
}

/// `.sys-config.json` for the VM's current shape.
pub fn write_sys_config(
    cfg: &VmmConfig,
    wd: &Workdir,
    req: &VmConfiguration,
    image: &Image,
) -> Result<(), ManagerError> {
    let pick = |own: &Vec<String>, default: &Vec<String>| if own.is_empty() { default.clone() } else { own.clone() };
    let vm_config = dstack_types::VmConfig {
        os_image_hash: os_image_hash(image),
        cpu_count: req.vcpu,
        memory_size: u64::from(req.memory) << 20,
        qemu_single_pass_add_pages: None,
        pic: None,
        qemu_version: None,
        pci_hole64_size: 0,
        hugepages: false,
        num_gpus: 0,
        num_nvswitches: 0,
        num_nics: 1,
        num_verity_volumes: 0,
        swtpm: false,
        hotplug_off: false,
        image: Some(image.name.clone()),
        host_share_mode: String::new(),
        ovmf_variant: None,
        tdx_attestation_variant: None,
        tdx_measurement: None,
        spec_version: Some(1),
    };
    let sys = dstack_types::SysConfig {
        kms_urls: pick(&req.kms_urls, &cfg.cvm.kms_urls),
        gateway_urls: pick(&req.gateway_urls, &cfg.cvm.gateway_urls),
        pccs_url: cfg.cvm.pccs_url.clone(),
        collateral_urls: None,
        nvidia_attestation_proxy_url: None,
        docker_registry: cfg.cvm.docker_registry.clone(),
        host_api_url: Some(format!("vsock://2:{}/api", cfg.host_api.port)),
        mr_config: None,
        vm_config: vm_config.to_json_string(),
        // `kvm`/`tcg` run the simulated TDX module beside the VM; a TD must use real TDX ("tdx": TDX or fail).
        tee: Some(if cfg.cvm.backend == super::BackendKind::Tdx {
            "tdx".to_owned()
        } else {
            format!("simulated:vsock:2:{}", cfg.sim_tdx.port)
        }),
    };
    let json = serde_json::to_vec_pretty(&sys).map_err(|e| ManagerError::Other(e.to_string()))?;
    Ok(wd.write_shared(sf::SYS_CONFIG, &json)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs Debian's OVMF and a kernel (`DSTACK_TEST_OVMF`, `DSTACK_TEST_KERNEL`, set by `cargo xtask test`).
    fn fixtures() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        let get = |v: &str| std::env::var_os(v).map(std::path::PathBuf::from).filter(|p| p.exists());
        match (get("DSTACK_TEST_OVMF"), get("DSTACK_TEST_KERNEL")) {
            (Some(ovmf), Some(kernel)) => Some((ovmf, kernel)),
            _ => {
                assert_ne!(
                    std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
                    Ok("1"),
                    "DSTACK_TEST_OVMF and DSTACK_TEST_KERNEL are required"
                );
                eprintln!("skipped: set DSTACK_TEST_OVMF and DSTACK_TEST_KERNEL");
                None
            }
        }
    }

    #[test]
    fn simulated_module_starts_from_the_predicted_boot() {
        let Some((ovmf, kernel)) = fixtures() else { return };
        let images = tempfile::tempdir().unwrap();
        let dir = images.path().join("img");
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(&ovmf, dir.join("ovmf.fd")).unwrap();
        std::fs::copy(&kernel, dir.join("bzImage")).unwrap();
        std::fs::write(dir.join("initramfs.cpio.gz"), b"not a real initrd, only measured").unwrap();
        std::fs::write(
            dir.join("metadata.json"),
            r#"{"bios":"ovmf.fd","kernel":"bzImage","initrd":"initramfs.cpio.gz","cmdline":"console=ttyS0","version":"t","is_dev":true}"#,
        )
        .unwrap();
        let mut sums = String::new();
        for f in ["ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json"] {
            let digest = Sha256::digest(std::fs::read(dir.join(f)).unwrap());
            sums.push_str(&format!("{}  {f}\n", hex::encode(digest)));
        }
        std::fs::write(dir.join("sha256sum.txt"), sums).unwrap();

        let image = Image::load(images.path(), "img").unwrap();
        let init = initial_state(Some(&image), "vm", 2, 4096);
        // The VM boots with the image's command line plus the disk parameters (this image names none): the
        // prediction must be of that effective command line.
        let mut files = ImageFiles::load(&dir).unwrap();
        files.cmdline = super::super::backend::effective_cmdline(&image).unwrap();
        assert_eq!(
            files.cmdline,
            "console=ttyS0 dstack.data_device=/dev/vda dstack.host_shared=/dev/vdb"
        );
        let expected = files
            .predict(&VmShape {
                vcpus: 2,
                memory_bytes: 4096 << 20,
            })
            .unwrap();
        assert_eq!(init.mrtd, expected.mrtd.to_vec());
        assert_eq!(init.rtmr0.as_deref(), Some(&expected.rtmr[0][..]));
        assert_eq!(init.rtmr2.as_deref(), Some(&expected.rtmr[2][..]));
        assert!(!init.boot_event_log.is_empty());
        // The module accepts the state only if its boot log replays to the registers.
        let state = tempfile::tempdir().unwrap();
        SimTdx::open(&init, state.path()).unwrap();

        // Another shape gives another RTMR0 (TD HOB and ACPI depend on it), same MRTD.
        let other = initial_state(Some(&image), "vm", 1, 2048);
        assert_eq!(other.mrtd, init.mrtd);
        assert_ne!(other.rtmr0, init.rtmr0);
    }

    #[test]
    fn image_without_boot_inputs_falls_back_to_zeros() {
        let init = initial_state(None, "vm", 1, 2048);
        assert_eq!(init.mrtd, vec![0; 48]);
        assert!(init.boot_event_log.is_empty());
    }
}
