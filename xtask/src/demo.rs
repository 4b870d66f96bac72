//! `cargo xtask demo`: the whole stack with the example app. Installs what it needs (Debian packages,
//! vhost-device-vsock), builds or reuses the guest image, then runs the `dstack-demo` binary (crate
//! `tests/`), which starts the registry, the KMS and the VM manager, deploys the demo app, verifies the
//! CVM and reports. Ctrl-C stops everything.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{cache, guest_image, setup};

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
        .status()
        .context("running dstack-demo")?;
    Ok(status.code().unwrap_or(1))
}
