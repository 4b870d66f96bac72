//! Where build outputs and downloads live: outside the checkout, so repeated runs (and CI on the same machine)
//! reuse them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The cache root: `$DSTACK_CACHE_DIR`, else `/var/cache/dstack-rs` when writable, else `~/.cache/dstack-rs`.
pub fn root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DSTACK_CACHE_DIR") {
        let dir = PathBuf::from(dir);
        ensure_dir(&dir)?;
        return Ok(dir);
    }
    let system = PathBuf::from("/var/cache/dstack-rs");
    if ensure_dir(&system).is_ok() && is_writable(&system) {
        return Ok(system);
    }
    let home = std::env::var_os("HOME").context("neither DSTACK_CACHE_DIR nor HOME is set")?;
    let user = PathBuf::from(home).join(".cache/dstack-rs");
    ensure_dir(&user)?;
    Ok(user)
}

/// A named subdirectory of the cache, created if missing.
pub fn subdir(name: &str) -> Result<PathBuf> {
    let dir = root()?.join(name);
    ensure_dir(&dir)?;
    Ok(dir)
}

pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn is_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}
