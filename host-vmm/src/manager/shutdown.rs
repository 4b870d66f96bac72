//! Graceful `ShutdownVm`: ask the guest to power off, wait up to the grace period for the VM process to
//! exit on its own, then fall back to the hard stop (SIGTERM, then SIGKILL).
//!
//! How the guest is asked:
//! - every backend: the guest agent's `GuestApi.Shutdown` over vsock (guest port 8000), which is all
//!   dstack's `ShutdownVm` does;
//! - `tcg` in addition: QMP `system_powerdown` on `<workdir>/qmp.sock` (an ACPI power-button press); needs
//!   QEMU started with `-qmp unix:<workdir>/qmp.sock,server=on,wait=off`, and a guest whose userspace acts on
//!   the power button (the kernel only reports it as `KEY_POWER` on an input device);
//! - `kvm` in addition: the ACPI fixed-feature power button of our VMM (`power-button` on its control
//!   socket `<workdir>/vmm-control.sock`: PM1 `PWRBTN_STS` + SCI, see `devices::acpi_pm::Pm1`); the guest
//!   sees the same "Power Button" input device as under QEMU.
//!
//! A guest nobody could ask gets the hard stop at once (nothing to wait for).
//!
//! A guest that powers off makes the VM process exit cleanly, which the monitor records as stopped (no
//! auto-restart); the final [`Manager::stop`] then only tidies up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::backend::control_socket_path;
use super::guest_proxy;
use super::qmp;
use super::state::Workdir;
use super::vms::{Manager, ManagerError};

/// How long the power-off request itself may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace for the hard stop after the guest did not power off (SIGTERM → SIGKILL).
const HARD_STOP_GRACE: Duration = Duration::from_secs(3);

/// Asks the guest of VM `id` to power off, without waiting: on `tcg` an ACPI power-button press through
/// QMP, and on every backend the guest agent's `GuestApi.Shutdown` (dstack's way; harmless when both
/// arrive). Returns the requests that were delivered, or why none was.
pub async fn request_poweroff(mgr: &Arc<Manager>, id: &str) -> Result<Vec<&'static str>, String> {
    let wd = Workdir::new(&mgr.config.cvm.run_path, id);
    let mut asked = Vec::new();
    let mut failures = Vec::new();
    match mgr.backend().name() {
        "tcg" => match qmp::system_powerdown(&qmp::socket_path(&wd), REQUEST_TIMEOUT).await {
            Ok(()) => asked.push("ACPI power button (QMP system_powerdown)"),
            Err(e) => failures.push(e.to_string()),
        },
        "kvm" | "tdx" => match press_power_button(&wd).await {
            Ok(()) => asked.push("ACPI power button (VMM control socket)"),
            Err(e) => failures.push(e),
        },
        _ => {}
    }
    match guest_proxy::guest_client(&wd, REQUEST_TIMEOUT).shutdown().await {
        Ok(_) => asked.push("guest API Shutdown"),
        // Not connected: nobody was asked.
        Err(e @ dstack_rpc::RpcError::Io(_)) => failures.push(format!("guest API Shutdown: {e}")),
        // Connected but no clean answer: a guest going down may drop the call; wait for it anyway.
        Err(e) => {
            warn!("VM {id}: guest API Shutdown: {e}");
            asked.push("guest API Shutdown (no answer)");
        }
    }
    if asked.is_empty() {
        Err(failures.join("; "))
    } else {
        Ok(asked)
    }
}

/// Presses the ACPI power button of our VMM through its control socket.
pub async fn press_power_button(wd: &Workdir) -> Result<(), String> {
    let path = control_socket_path(wd);
    let shown = path.display().to_string();
    let reply =
        tokio::task::spawn_blocking(move || crate::control::send(&path, crate::control::POWER_BUTTON, REQUEST_TIMEOUT))
            .await
            .map_err(|e| format!("internal error: {e}"))?
            .map_err(|e| format!("ACPI power button via {shown}: {e}"))?;
    if reply == "OK" {
        Ok(())
    } else {
        Err(format!("ACPI power button via {shown}: {reply}"))
    }
}

/// `ShutdownVm`: power-off request, wait up to `grace`, then [`Manager::stop`].
pub async fn graceful(mgr: &Arc<Manager>, id: &str, grace: Duration) -> Result<(), ManagerError> {
    let snap = mgr.snapshot(id).ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
    if snap.status == "running" {
        match request_poweroff(mgr, id).await {
            Err(why) => warn!("VM {id}: no graceful power-off available ({why}); stopping it"),
            Ok(how) => {
                info!(
                    "VM {id}: power-off requested ({}); waiting up to {grace:?}",
                    how.join(", ")
                );
                let deadline = Instant::now() + grace;
                loop {
                    let running = mgr.snapshot(id).is_some_and(|s| s.status == "running");
                    if !running {
                        info!("VM {id}: guest powered off");
                        break;
                    }
                    if Instant::now() >= deadline {
                        warn!("VM {id}: guest did not power off within {grace:?}; killing it");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let mgr = mgr.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || mgr.stop(&id, HARD_STOP_GRACE))
        .await
        .map_err(|e| ManagerError::Other(format!("internal error: {e}")))?
}
