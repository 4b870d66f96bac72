//! `cargo xtask demo`: the whole stack with the example app. Installs what it needs (Debian packages,
//! vhost-device-vsock), builds or reuses the guest image, then runs the `dstack-demo` binary (crate
//! `tests/`), which starts the registry, the KMS and the VM manager, deploys the gateway appliance and the
//! demo app as CVMs, verifies both and reports. Ctrl-C stops everything.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{appliance, cache, guest_image, setup};

pub fn run(args: &[String]) -> Result<i32> {
    if let Some(a) = args.first() {
        anyhow::bail!("demo takes no arguments (got {a:?}); set DSTACK_DEMO_DIR to choose its work directory");
    }
    let root = setup::workspace_root();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => dir.into(),
        None => cache::subdir("target")?,
    };
    setup::ensure_apt_packages(setup::DEMO_PACKAGES)?;
    let vhost = setup::ensure_cargo_tool("vhost-device-vsock", setup::VHOST_DEVICE_VSOCK_VERSION)?;
    let image = guest_image::ensure(&root, &target_dir).context("preparing the guest image")?;
    // The gateway runs as a CVM from its appliance: the static binary here, packaged per run by the demo
    // (through this xtask binary, `appliance --binaries`) with the run's ports and pins.
    let gateway = appliance::static_gateway(&root)?;
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    eprintln!("xtask: starting the demo (guest image {})", image.dir.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "run",
            "--quiet",
            "--release",
            "--locked",
            "-p",
            "dstack-e2e",
            "--bin",
            "dstack-demo",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("DSTACK_E2E_IMAGE", &image.dir)
        .env("DSTACK_DEMO_APP_BIN", &image.demo_app)
        .env("VHOST_DEVICE_VSOCK", &vhost)
        .env("DSTACK_GATEWAY_BIN", &gateway)
        .env("DSTACK_XTASK", &xtask)
        .status()
        .context("running dstack-demo")?;
    Ok(status.code().unwrap_or(1))
}
