//! The guest image the end-to-end tests and the demo boot: guest-init and the demo app built statically,
//! then `dstack-image-build build` with guest-init as `/init`. The image is reused while its inputs (the
//! guest-init binary, the package lock and image-build's sources) are unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{cache, proc};

/// The built image and the static demo app binary.
pub struct GuestImage {
    pub dir: PathBuf,
    pub demo_app: PathBuf,
}

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Hash of everything the image is built from (besides the Debian packages, which the lock pins).
fn stamp(root: &Path, init: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut add = |path: &Path| -> Result<()> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        h.update(path.strip_prefix(root).unwrap_or(path).display().to_string().as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
        Ok(())
    };
    add(init)?;
    add(&root.join("image-build/debian.lock"))?;
    let mut sources = Vec::new();
    // The measurements crate and the ACPI tables it predicts from decide measurements.json.
    for dir in ["image-build/src", "measurements/src", "crates/acpi/src"] {
        collect_files(&root.join(dir), &mut sources)?;
    }
    sources.sort();
    for f in &sources {
        add(f)?;
    }
    Ok(hex_lower(&h.finalize()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds (or reuses) the guest image under the cache. `target_dir` is the workspace's normal target dir
/// (image-build runs from it); the static binaries get their own, since RUSTFLAGS differ.
pub fn ensure(root: &Path, target_dir: &Path) -> Result<GuestImage> {
    let static_dir = cache::subdir("target-static")?;
    eprintln!("xtask: building guest-init and the demo app (static)");
    proc::run(
        cargo(root)
            .args(["build", "--release", "--locked", "--target", TARGET])
            .args(["-p", "dstack-guest-init", "-p", "dstack-demo-app"])
            .env("CARGO_TARGET_DIR", &static_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )
    .context("building the static guest binaries")?;
    let bin_dir = static_dir.join(TARGET).join("release");
    let init = bin_dir.join("guest-init");
    let demo_app = bin_dir.join("dstack-demo-app");

    let images = cache::subdir("images")?;
    let dir = images.join("dstack-dev");
    let stamp_file = images.join("dstack-dev.stamp");
    let want = stamp(root, &init)?;
    let have = std::fs::read_to_string(&stamp_file).unwrap_or_default();
    if have.trim() == want && dir.join("measurements.json").exists() {
        eprintln!("xtask: guest image {} is up to date", dir.display());
        return Ok(GuestImage { dir, demo_app });
    }
    eprintln!("xtask: building the guest image (dstack-image-build; a few minutes when cold)");
    let fresh = images.join("dstack-dev.new");
    let _ = std::fs::remove_dir_all(&fresh);
    proc::run(
        cargo(root)
            .args([
                "run",
                "--quiet",
                "--locked",
                "-p",
                "dstack-image-build",
                "--",
                "build",
                "--init",
            ])
            .arg(&init)
            .arg("--out")
            .arg(&fresh)
            .env("CARGO_TARGET_DIR", target_dir),
    )
    .context("building the guest image")?;
    if !fresh.join("measurements.json").exists() {
        bail!("dstack-image-build left no measurements.json in {}", fresh.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&fresh, &dir).with_context(|| format!("moving the image to {}", dir.display()))?;
    std::fs::write(&stamp_file, &want).with_context(|| format!("writing {}", stamp_file.display()))?;
    Ok(GuestImage { dir, demo_app })
}
