//! guest-init: the CVM's PID 1 ([`pid1`]), the dstack-compatible boot sequence ([`boot`]) and its
//! production backends ([`backends`]: the TEE chosen by `dstack.tee=`, the KMS over RA-TLS, the in-process
//! guest agent).
//!
//! Static build: `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target
//! x86_64-unknown-linux-gnu -p dstack-guest-init`. Nothing in the boot path resolves host names (glibc's
//! NSS does not work statically): endpoints must be IP literals (tokio parses those without
//! `getaddrinfo`), vsock or unix sockets.

pub mod backends;
pub mod boot;
pub mod cmdline;
pub mod log;
pub mod net;
pub mod pid1;
pub mod proc;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;

use boot::config::HostSharedSource;
use boot::{BootEnv, DataDisk};
use cmdline::Cmdline;
use pid1::{InitState, PowerAction};

/// How long the boot waits for a DHCP lease.
pub const NET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Default host-shared location when the command line names none.
pub const DEFAULT_HOST_SHARED: &str = "/dstack/.host-shared-src";

/// The boot thread of the real CVM: runs [`boot::run`] and asks PID 1 to power off on failure.
pub fn boot_thread(state: Arc<InitState>, cmdline: Cmdline) {
    let result = (|| -> Result<(), String> {
        let src = cmdline
            .host_shared
            .clone()
            .unwrap_or_else(|| DEFAULT_HOST_SHARED.to_owned());
        let host_shared = HostSharedSource::parse(&src).map_err(|e| e.to_string())?;
        let data = match &cmdline.data_device {
            Some(p) => DataDisk::Device {
                path: p.clone(),
                encrypted: cmdline.storage_encrypted,
            },
            None => DataDisk::Tmpfs,
        };
        let env = BootEnv {
            root: PathBuf::from("/"),
            host_shared,
            data,
            host_api: cmdline.host_api.clone(),
            start_app: true,
        };
        // The network is untrusted plumbing (DHCP from the host); it must be up before the KMS step.
        match net::configure(std::path::Path::new("/"), NET_TIMEOUT) {
            Ok(n) => tracing::info!(
                "network: {} {}/{} via {:?}, dns {:?} (DHCP in {:?})",
                n.interface,
                n.address,
                n.prefix_len,
                n.gateway,
                n.dns,
                n.elapsed
            ),
            Err(e @ net::NetError::NoInterface { .. }) => tracing::warn!("network: {e}; continuing without one"),
            Err(e) => return Err(format!("network: {e}")),
        }
        let shared = boot::intake(&env).map_err(|e| e.to_string())?;
        // The TEE is chosen explicitly: `dstack.tee=` on the command line, else the host config's `tee`
        // (the VM manager names its simulated TDX module there), else TDX when present; without one the
        // boot stops here.
        let mut tee_cfg = dstack_tee::TeeConfig::system().map_err(|e| e.to_string())?;
        tee_cfg.request = boot::tee::own_tee_request(tee_cfg.request.clone(), shared.sys_config.tee.as_deref())?;
        let tee = dstack_tee::detect(&tee_cfg).map_err(|e| e.to_string())?;
        tracing::info!("TEE: {}", tee.kind().as_str());
        let backends = backends::Backends::new(tee, dstack_tee::RUNTIME_EVENT_LOG_FILE, None)
            .map_err(|e| format!("runtime: {e}"))?;
        let deps = backends.deps(Some(&state));
        let result = boot::run_from(&env, &deps, shared)
            .map(|_| ())
            .map_err(|e| e.to_string());
        // The agent and the KMS signer live on the backends' runtime: keep it for the life of PID 1.
        std::mem::forget(backends);
        result
    })();
    match result {
        Ok(()) => tracing::info!("boot complete"),
        Err(e) => {
            tracing::error!("boot failed: {e}");
            pid1::request_power(PowerAction::PowerOff, format!("boot failed: {e}"));
        }
    }
}
