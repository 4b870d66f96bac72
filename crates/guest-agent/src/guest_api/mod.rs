//! The guest API (dstack's `guest_api.GuestApi`, DESIGN.md §8): what the VM manager asks the guest, served at
//! `/api/<Method>` on vsock port [`GUEST_API_PORT`] inside the CVM; the manager reaches it through the VM's
//! hybrid-vsock unix socket and re-exposes it per VM as `ProxiedGuestApi` (`/guest`).
//!
//! - `Info` → `GuestInfo{version, app_id, instance_id, app_cert, tcb_info, device_id}` from the agent.
//! - `SysInfo` → OS, kernel, CPU, memory, swap, load, uptime and block-device mounts ([`sys`]).
//! - `NetworkInfo` → interfaces with addresses and counters, default gateways, DNS servers, WireGuard
//!   interfaces ([`sys`]).
//! - `ListContainers` → the Docker daemon's containers ([`docker`]).
//! - `Shutdown` → answers, then runs the configured power-off action (guest-init: an orderly power-off).
//!
//! The host is outside the trust boundary, so the app's privacy choices in `app-compose.json` apply (ours):
//! `tcb_info` is empty unless `public_tcbinfo` (default true), and `SysInfo` is refused unless
//! `public_sysinfo` (default false).

pub mod docker;
pub mod sys;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dstack_rpc::guest_api::{
    GuestApiRpc, GuestApiServer, GuestInfo, ListContainersResponse, NetworkInformation, SystemInfo,
};
use dstack_rpc::vsock::{VMADDR_CID_ANY, VsockListener};
use dstack_rpc::{CallContext, Empty, RpcError, RpcRouter};

use crate::Agent;

/// The guest API's vsock port (dstack's `[guest-api]` default).
pub const GUEST_API_PORT: u32 = 8000;
/// How long `Shutdown` waits before acting, so its answer reaches the host first.
const SHUTDOWN_DELAY: Duration = Duration::from_millis(200);

/// A power-off action.
pub type ShutdownAction = Arc<dyn Fn() + Send + Sync>;

/// Where the guest API reads the system state and what `Shutdown` does.
#[derive(Clone)]
pub struct GuestApiOptions {
    /// Root of the files `SysInfo`/`NetworkInfo` read (`/` in a CVM).
    pub root: PathBuf,
    /// Docker's API socket (`/var/run/docker.sock`).
    pub docker_socket: PathBuf,
    /// What `Shutdown` runs; None refuses `Shutdown`.
    pub on_shutdown: Option<ShutdownAction>,
}

impl Default for GuestApiOptions {
    fn default() -> Self {
        Self {
            root: "/".into(),
            docker_socket: "/var/run/docker.sock".into(),
            on_shutdown: None,
        }
    }
}

/// The `GuestApi` service over an [`Agent`].
#[derive(Clone)]
pub struct GuestApiService {
    agent: Arc<Agent>,
    opts: GuestApiOptions,
    public_sysinfo: bool,
    public_tcbinfo: bool,
}

impl GuestApiService {
    /// The privacy flags come from the agent's `app-compose.json` (defaults when it does not parse).
    pub fn new(agent: Arc<Agent>, opts: GuestApiOptions) -> Self {
        let compose = dstack_types::AppCompose::from_slice(agent.config().app_compose.as_bytes()).ok();
        GuestApiService {
            public_sysinfo: compose.as_ref().is_some_and(|c| c.public_sysinfo()),
            public_tcbinfo: compose.as_ref().is_none_or(|c| c.public_tcbinfo()),
            agent,
            opts,
        }
    }
}

impl GuestApiRpc for GuestApiService {
    async fn info(&self, _: &CallContext, _: Empty) -> Result<GuestInfo, RpcError> {
        let app = self.agent.info().await.map_err(RpcError::handler)?;
        Ok(GuestInfo {
            version: crate::service::version().version,
            app_id: app.app_id,
            instance_id: app.instance_id,
            app_cert: app.app_cert,
            tcb_info: if self.public_tcbinfo {
                app.tcb_info
            } else {
                String::new()
            },
            device_id: app.device_id,
        })
    }

    async fn sys_info(&self, _: &CallContext, _: Empty) -> Result<SystemInfo, RpcError> {
        if !self.public_sysinfo {
            return Err(RpcError::handler(
                "SysInfo is not public for this app (app-compose.json public_sysinfo = false)",
            ));
        }
        let root = self.opts.root.clone();
        tokio::task::spawn_blocking(move || sys::system_info(&root))
            .await
            .map_err(|e| RpcError::handler(format!("internal error: {e}")))
    }

    async fn network_info(&self, _: &CallContext, _: Empty) -> Result<NetworkInformation, RpcError> {
        let root = self.opts.root.clone();
        tokio::task::spawn_blocking(move || sys::network_info(&root))
            .await
            .map_err(|e| RpcError::handler(format!("internal error: {e}")))
    }

    async fn list_containers(&self, _: &CallContext, _: Empty) -> Result<ListContainersResponse, RpcError> {
        let containers = docker::list_containers(&self.opts.docker_socket)
            .await
            .map_err(RpcError::handler)?;
        Ok(ListContainersResponse { containers })
    }

    async fn shutdown(&self, _: &CallContext, _: Empty) -> Result<Empty, RpcError> {
        let action = self
            .opts
            .on_shutdown
            .clone()
            .ok_or_else(|| RpcError::handler("Shutdown is not available in this agent"))?;
        tracing::info!("guest API: the host asked for a shutdown");
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_DELAY).await;
            action();
        });
        Ok(Empty {})
    }
}

/// The guest API at `/api` (`POST /api/Info`, also `/api/GuestApi.Info`).
pub fn guest_api_router(service: GuestApiService) -> RpcRouter {
    RpcRouter::new("/api").service(GuestApiServer::new(service))
}

/// Serves the guest API on vsock port `port` (any local CID) until `shutdown` completes. Inside a CVM only:
/// needs the guest's vsock transport (`vmw_vsock_virtio_transport`).
pub async fn serve_vsock(
    service: GuestApiService,
    port: u32,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let listener = VsockListener::bind(VMADDR_CID_ANY, port)?;
    dstack_rpc::serve(listener, Arc::new(guest_api_router(service)), shutdown).await
}

#[cfg(test)]
mod tests;
