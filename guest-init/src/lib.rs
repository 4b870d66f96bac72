//! guest-init: the CVM's PID 1 ([`pid1`]) and the dstack-compatible boot sequence ([`boot`]).
//! The guest agent (`guest-init agent`) comes in a later change.
//!
//! Static build: `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target
//! x86_64-unknown-linux-gnu -p dstack-guest-init`. Nothing in the boot path resolves host names (glibc's
//! NSS does not work statically): endpoints must be IP literals (tokio parses those without
//! `getaddrinfo`), vsock or unix sockets.

pub mod boot;
pub mod cmdline;
pub mod log;
pub mod pid1;
pub mod proc;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;

use boot::config::HostSharedSource;
use boot::{BootEnv, DataDisk, Deps};
use cmdline::Cmdline;
use pid1::{InitState, PowerAction};

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
        // The TEE (RTMR3) and KMS backends are wired in when crates/tee and crates/ra-tls land; until
        // then measurement fails closed and no key is ever requested.
        let deps = Deps {
            measurer: &boot::measure::NoTee,
            kms: None,
            state: Some(&state),
        };
        boot::run(&env, &deps).map(|_| ()).map_err(|e| e.to_string())
    })();
    match result {
        Ok(()) => tracing::info!("boot complete"),
        Err(e) => {
            tracing::error!("boot failed: {e}");
            pid1::request_power(PowerAction::PowerOff, format!("boot failed: {e}"));
        }
    }
}
