//! The `Vmm` pRPC service (dstack's `vmm_rpc` names, served at `/prpc`, legacy `Teepod.` prefix accepted)
//! and the bearer-token gate for the TCP listener.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dstack_rpc::vmm::*;
use dstack_rpc::{BoxFuture, CallContext, Dispatch, Empty, EncodedResponse, Encoding, RemoteAddr, RpcError, RpcRouter};
use sha2::{Digest, Sha256};

use super::backend::Image;
use super::services;
use super::state::{Desired, Workdir};
use super::validate;
use super::vms::{Manager, ManagerError, VmSnapshot};
use dstack_types::shared_files as sf;

/// Grace period for `StopVm` (then SIGKILL).
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Grace period for `ShutdownVm`: the guest is asked to power off (guest API `Shutdown`; on `tcg` also the
/// ACPI power button via QMP) and gets this long before the hard stop ([`super::shutdown`]).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The `Vmm` service.
#[derive(Clone)]
pub struct VmmApi {
    mgr: Arc<Manager>,
}

impl VmmApi {
    pub fn new(mgr: Arc<Manager>) -> Self {
        VmmApi { mgr }
    }

    /// Runs a blocking manager operation off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<Manager>) -> Result<T, ManagerError> + Send + 'static,
    ) -> Result<T, RpcError> {
        let mgr = self.mgr.clone();
        tokio::task::spawn_blocking(move || f(&mgr))
            .await
            .map_err(|e| RpcError::handler(format!("internal error: {e}")))?
            .map_err(RpcError::handler)
    }

    fn info(&self, s: VmSnapshot, brief: bool) -> VmInfo {
        let wd = Workdir::new(&self.mgr.config.cvm.run_path, &s.manifest.id);
        let compose = wd.read_shared(sf::APP_COMPOSE).unwrap_or_default();
        let instance = wd
            .read_shared(sf::INSTANCE_INFO)
            .ok()
            .and_then(|d| dstack_types::InstanceInfo::from_slice(&d).ok())
            .unwrap_or_default();
        let app_id = if !instance.app_id.is_empty() {
            hex::encode(&instance.app_id)
        } else if let Some(pinned) = &s.manifest.config.app_id {
            pinned.to_lowercase()
        } else {
            hex::encode(&Sha256::digest(&compose)[..20])
        };
        let configuration = (!brief).then(|| {
            let mut c = s.manifest.config.clone();
            c.compose_file = String::from_utf8_lossy(&compose).into_owned();
            c.encrypted_env = wd.read_shared(sf::ENCRYPTED_ENV).unwrap_or_default();
            c.user_config = String::from_utf8_lossy(&wd.read_shared(sf::USER_CONFIG).unwrap_or_default()).into_owned();
            c
        });
        let interface = self.interface(&s);
        let image_version = Image::load(&self.mgr.config.image.path, &s.manifest.config.image)
            .map(|i| i.metadata.version)
            .unwrap_or_default();
        VmInfo {
            id: s.manifest.id.clone(),
            name: s.manifest.config.name.clone(),
            status: s.status.to_owned(),
            uptime: s.uptime.map(format_uptime).unwrap_or_default(),
            app_url: None,
            app_id,
            instance_id: (!instance.instance_id.is_empty()).then(|| hex::encode(&instance.instance_id)),
            configuration,
            exited_at: s.state.exited_at_ms.map(format_time),
            boot_progress: s.state.boot_progress,
            boot_error: s.state.boot_error,
            shutdown_progress: s.state.shutdown_progress,
            image_version,
            events: s.state.events,
            interfaces: vec![interface],
        }
    }
}

impl VmmApi {
    /// The VM's one network interface as `VmInfo.interfaces` reports it.
    fn interface(&self, s: &VmSnapshot) -> NetworkInterfaceStatus {
        let mac = mac_for(&s.manifest.id);
        if super::validate::network_mode(&self.mgr.config, &s.manifest.config) == "bridge" {
            return NetworkInterfaceStatus {
                mode: "bridge".into(),
                backend: "tap".into(),
                mac,
                bridge_name: self.mgr.bridge().map(|b| b.plan().name.clone()),
                netdev_id: Some(super::bridge::tap_name(s.manifest.cid)),
            };
        }
        NetworkInterfaceStatus {
            mode: "user".into(),
            backend: if self.mgr.backend().is_emulation() {
                "qemu-user"
            } else if self.mgr.config.cvm.passt_path.as_os_str().is_empty() {
                "none"
            } else {
                "passt"
            }
            .into(),
            mac,
            bridge_name: None,
            netdev_id: Some("net0".into()),
        }
    }
}

/// A locally administered MAC derived from the VM id (stable across restarts).
pub(crate) fn mac_for(id: &str) -> String {
    let h = Sha256::digest(id.as_bytes());
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3], h[4])
}

fn format_uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// RFC 3339 UTC from milliseconds since the epoch (civil-from-days, Howard Hinnant's algorithm).
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn unsupported(what: &str) -> RpcError {
    RpcError::handler(format!("{what} is not supported by this VMM"))
}

impl VmmRpc for VmmApi {
    async fn create_vm(&self, _ctx: &CallContext, req: VmConfiguration) -> Result<Id, RpcError> {
        let id = self.blocking(move |m| m.create(req)).await?;
        Ok(Id { id })
    }

    async fn start_vm(&self, _ctx: &CallContext, req: Id) -> Result<Empty, RpcError> {
        self.blocking(move |m| m.start(&req.id)).await?;
        Ok(Empty {})
    }

    async fn stop_vm(&self, _ctx: &CallContext, req: Id) -> Result<Empty, RpcError> {
        self.blocking(move |m| m.stop(&req.id, STOP_GRACE)).await?;
        Ok(Empty {})
    }

    async fn remove_vm(&self, _ctx: &CallContext, req: Id) -> Result<Empty, RpcError> {
        self.blocking(move |m| m.remove(&req.id)).await?;
        Ok(Empty {})
    }

    async fn upgrade_app(&self, ctx: &CallContext, req: UpdateVmRequest) -> Result<Id, RpcError> {
        self.update_vm(ctx, req).await
    }

    async fn update_vm(&self, _ctx: &CallContext, req: UpdateVmRequest) -> Result<Id, RpcError> {
        let id = req.id.clone();
        self.blocking(move |m| {
            let cfg = m.config.clone();
            let id = req.id.clone();
            m.update_stopped(&id, "UpdateVm", |wd, c| apply_update(&cfg, wd, c, req))
        })
        .await?;
        Ok(Id { id })
    }

    async fn shutdown_vm(&self, _ctx: &CallContext, req: Id) -> Result<Empty, RpcError> {
        super::shutdown::graceful(&self.mgr, &req.id, SHUTDOWN_GRACE)
            .await
            .map_err(RpcError::handler)?;
        Ok(Empty {})
    }

    async fn resize_vm(&self, _ctx: &CallContext, req: ResizeVmRequest) -> Result<Empty, RpcError> {
        let update = UpdateVmRequest {
            id: req.id,
            vcpu: req.vcpu,
            memory: req.memory,
            disk_size: req.disk_size,
            image: req.image,
            ..Default::default()
        };
        self.blocking(move |m| {
            let cfg = m.config.clone();
            m.update_stopped(&update.id.clone(), "ResizeVm", |wd, c| {
                apply_update(&cfg, wd, c, update)
            })
        })
        .await?;
        Ok(Empty {})
    }

    async fn get_compose_hash(&self, _ctx: &CallContext, req: VmConfiguration) -> Result<ComposeHash, RpcError> {
        validate::compose(&req.compose_file).map_err(RpcError::handler)?;
        Ok(ComposeHash {
            hash: hex::encode(Sha256::digest(req.compose_file.as_bytes())),
        })
    }

    async fn status(&self, _ctx: &CallContext, req: StatusRequest) -> Result<StatusResponse, RpcError> {
        let mut vms: Vec<VmSnapshot> = self
            .mgr
            .snapshots()
            .into_iter()
            .filter(|s| req.ids.is_empty() || req.ids.contains(&s.manifest.id))
            .filter(|s| {
                req.keyword.is_empty()
                    || s.manifest.config.name.contains(&req.keyword)
                    || s.manifest.id.contains(&req.keyword)
            })
            .collect();
        vms.sort_by_key(|s| (s.manifest.created_at_ms, s.manifest.id.clone()));
        let total = vms.len() as u32;
        if req.page_size > 0 {
            let page = req.page.max(1) as usize;
            let size = req.page_size as usize;
            vms = vms
                .into_iter()
                .skip((page - 1).saturating_mul(size))
                .take(size)
                .collect();
        }
        Ok(StatusResponse {
            vms: vms.into_iter().map(|s| self.info(s, req.brief)).collect(),
            port_mapping_enabled: self.mgr.config.cvm.port_mapping.enabled,
            total,
        })
    }

    async fn list_images(&self, _ctx: &CallContext, _req: Empty) -> Result<ImageListResponse, RpcError> {
        let dir = &self.mgr.config.image.path;
        let mut images = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Ok(img) = Image::load(dir, &name) {
                    images.push(ImageInfo {
                        name,
                        description: String::new(),
                        version: img.metadata.version,
                        is_dev: img.metadata.is_dev,
                    });
                }
            }
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ImageListResponse { images })
    }

    async fn get_app_env_encrypt_pub_key(
        &self,
        _ctx: &CallContext,
        _req: AppId,
    ) -> Result<PublicKeyResponse, RpcError> {
        Err(unsupported("GetAppEnvEncryptPubKey (KMS proxy)"))
    }

    async fn get_info(&self, _ctx: &CallContext, req: Id) -> Result<GetInfoResponse, RpcError> {
        Ok(match self.mgr.snapshot(&req.id) {
            Some(s) => GetInfoResponse {
                found: true,
                info: Some(self.info(s, false)),
            },
            None => GetInfoResponse {
                found: false,
                info: None,
            },
        })
    }

    async fn version(&self, _ctx: &CallContext, _req: Empty) -> Result<VersionResponse, RpcError> {
        Ok(VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            rev: format!("backend={}", self.mgr.backend().name()),
        })
    }

    async fn get_meta(&self, _ctx: &CallContext, _req: Empty) -> Result<GetMetaResponse, RpcError> {
        let cfg = &self.mgr.config;
        Ok(GetMetaResponse {
            kms: Some(KmsSettings {
                url: cfg.cvm.kms_urls.first().cloned().unwrap_or_default(),
                urls: cfg.cvm.kms_urls.clone(),
            }),
            gateway: Some(GatewaySettings {
                url: cfg.cvm.gateway_urls.first().cloned().unwrap_or_default(),
                base_domain: cfg.gateway.base_domain.clone(),
                port: cfg.gateway.port,
                agent_port: cfg.gateway.agent_port,
                urls: cfg.cvm.gateway_urls.clone(),
            }),
            resources: Some(ResourcesSettings {
                max_cvm_number: cfg.cvm.cid_pool_size,
                max_allocable_vcpu: cfg.cvm.max_allocable_vcpu,
                max_allocable_memory_in_mb: cfg.cvm.max_allocable_memory_in_mb,
            }),
            networking: Some(NetworkingCapabilities {
                supported_modes: if cfg.cvm.networking.bridge.is_some() {
                    vec!["user".into(), "bridge".into()]
                } else {
                    vec!["user".into()]
                },
                default_mode: cfg.cvm.networking.mode.clone(),
                default_bridge: cfg
                    .cvm
                    .networking
                    .bridge
                    .as_ref()
                    .map(|b| b.name.clone())
                    .unwrap_or_default(),
            }),
        })
    }

    async fn list_gpus(&self, _ctx: &CallContext, _req: Empty) -> Result<ListGpusResponse, RpcError> {
        Ok(ListGpusResponse::default())
    }

    async fn reload_vms(&self, _ctx: &CallContext, _req: Empty) -> Result<ReloadVmsResponse, RpcError> {
        Err(unsupported("ReloadVms"))
    }

    async fn sv_list(&self, _ctx: &CallContext, _req: Empty) -> Result<SvListResponse, RpcError> {
        let processes = self
            .mgr
            .snapshots()
            .into_iter()
            .flat_map(|s| {
                let running = s.state.desired == Desired::Running;
                let id = s.manifest.id.clone();
                s.state.processes.into_iter().map(move |p| SvProcessInfo {
                    id: if p.name == "vm" {
                        id.clone()
                    } else {
                        format!("{id}-{}", p.name)
                    },
                    name: p.name,
                    status: if running { "running" } else { "stopped" }.into(),
                    pid: Some(p.pid),
                    command: String::new(),
                    note: String::new(),
                })
            })
            .collect();
        Ok(SvListResponse { processes })
    }

    async fn sv_stop(&self, ctx: &CallContext, req: Id) -> Result<Empty, RpcError> {
        self.stop_vm(ctx, req).await
    }

    async fn sv_remove(&self, _ctx: &CallContext, _req: Id) -> Result<Empty, RpcError> {
        Err(unsupported("SvRemove (use RemoveVm)"))
    }

    async fn list_registry_images(
        &self,
        _ctx: &CallContext,
        _req: Empty,
    ) -> Result<RegistryImageListResponse, RpcError> {
        Ok(RegistryImageListResponse::default())
    }

    async fn pull_registry_image(&self, _ctx: &CallContext, _req: PullRegistryImageRequest) -> Result<Empty, RpcError> {
        Err(unsupported("PullRegistryImage"))
    }

    async fn delete_image(&self, _ctx: &CallContext, _req: Id) -> Result<Empty, RpcError> {
        Err(unsupported("DeleteImage"))
    }
}

/// Applies an `UpdateVmRequest` to a stopped VM (files in `shared/` and the manifest).
fn apply_update(
    cfg: &super::config::VmmConfig,
    wd: &Workdir,
    c: &mut VmConfiguration,
    req: UpdateVmRequest,
) -> Result<(), ManagerError> {
    let mut next = c.clone();
    if let Some(v) = req.vcpu {
        next.vcpu = v;
    }
    if let Some(m) = req.memory {
        next.memory = m;
    }
    if let Some(d) = req.disk_size {
        if d < c.disk_size {
            return Err(validate_err(
                "disk_size",
                format!("{d} GB: the data disk cannot shrink (now {} GB)", c.disk_size),
            ));
        }
        next.disk_size = d;
    }
    if let Some(img) = req.image {
        next.image = img;
    }
    validate::resources(cfg, next.vcpu, next.memory, next.disk_size)?;
    if req.update_ports {
        validate::ports(cfg, &req.ports)?;
        next.ports = req.ports;
    }
    if req.update_kms_urls {
        next.kms_urls = req.kms_urls;
    }
    if req.update_gateway_urls {
        next.gateway_urls = req.gateway_urls;
    }
    let image = Image::load(&cfg.image.path, &next.image)?;
    if !req.compose_file.is_empty() {
        validate::compose(&req.compose_file)?;
        wd.write_shared(sf::APP_COMPOSE, req.compose_file.as_bytes())?;
    }
    if !req.encrypted_env.is_empty() {
        services::write_optional(wd, sf::ENCRYPTED_ENV, &req.encrypted_env)?;
    }
    if !req.user_config.is_empty() {
        services::write_optional(wd, sf::USER_CONFIG, req.user_config.as_bytes())?;
    }
    services::write_sys_config(cfg, wd, &next, &image)?;
    if next.disk_size > c.disk_size && wd.data_disk().exists() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(wd.data_disk())
            .map_err(|e| ManagerError::Other(format!("data disk: {e}")))?;
        f.set_len(u64::from(next.disk_size) << 30)
            .map_err(|e| ManagerError::Other(format!("growing data disk: {e}")))?;
    }
    *c = next;
    Ok(())
}

fn validate_err(field: &str, reason: String) -> ManagerError {
    ManagerError::Invalid(validate::ValidationError {
        field: field.to_owned(),
        reason,
    })
}

/// Requires `Authorization: Bearer <token>` with one of `tokens` on TCP connections; unix-socket callers
/// are trusted (the socket's file mode is the access control, as in dstack).
pub struct AuthGate<D> {
    inner: D,
    tokens: Arc<Vec<String>>,
}

impl<D: Dispatch> AuthGate<D> {
    pub fn new(inner: D, tokens: Vec<String>) -> Self {
        AuthGate {
            inner,
            tokens: Arc::new(tokens.into_iter().filter(|t| !t.is_empty()).collect()),
        }
    }

    fn allowed(&self, ctx: &CallContext) -> bool {
        if !matches!(ctx.remote, RemoteAddr::Tcp(_)) {
            return true;
        }
        let Some(token) = ctx.bearer_token() else { return false };
        // Compare every token in full so timing does not reveal a matching prefix.
        self.tokens.iter().fold(false, |ok, t| {
            let eq = t.len() == token.len() && t.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
            ok | eq
        })
    }
}

impl<D: Dispatch> Dispatch for AuthGate<D> {
    fn service_name(&self) -> &'static str {
        self.inner.service_name()
    }
    fn methods(&self) -> &'static [&'static str] {
        self.inner.methods()
    }
    fn dispatch<'a>(
        &'a self,
        ctx: &'a CallContext,
        method: &'a str,
        encoding: Encoding,
        body: Bytes,
    ) -> BoxFuture<'a, Result<EncodedResponse, RpcError>> {
        if !self.allowed(ctx) {
            return Box::pin(async { Err(RpcError::handler("unauthorized: missing or wrong bearer token")) });
        }
        self.inner.dispatch(ctx, method, encoding, body)
    }
}

/// The `/prpc` router (with the legacy `Teepod.` service prefix).
pub fn router(mgr: Arc<Manager>) -> Arc<RpcRouter> {
    let tokens = mgr.config.auth.tokens.clone();
    Arc::new(
        RpcRouter::new("/prpc")
            .service(AuthGate::new(VmmServer::new(VmmApi::new(mgr)), tokens))
            .alias("Teepod", "Vmm"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_formatting() {
        // 2000-03-01T00:00:00Z = 951868800 (cross-checked with `date -u -d @951868800`).
        assert_eq!(format_time(951_868_800_000), "2000-03-01T00:00:00Z");
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_uptime(Duration::from_secs(3725)), "1h 2m");
    }
}
