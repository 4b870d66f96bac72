//! Reproducible dstack guest image from pinned Debian packages.
//!
//! Pipeline: [`lock`] (what is pinned) → [`resolve`] (`lock --update` only) → [`fetch`] (download through the
//! host's apt mirror with a private apt state, verify against the lock, cache) → [`boot`] (kernel +
//! initramfs via the deterministic [`cpio`] writer and [`modules`] selection) → [`rootfs`] (erofs + dm-verity)
//! → [`image`] (the output directory with `metadata.json`, `sha256sum.txt`, `os_image_hash`).
//!
//! Caches live under `$DSTACK_CACHE_DIR` (default `/var/cache/dstack-rs`): verified debs in
//! `image-build/debs`, extracted trees in `image-build/unpacked`, apt state in `apt`.

pub mod boot;
pub mod cpio;
pub mod fetch;
pub mod image;
pub mod lock;
pub mod modules;
pub mod progress;
pub mod resolve;
pub mod rootfs;

use std::path::PathBuf;

/// The cache root: `$DSTACK_CACHE_DIR`, else `/var/cache/dstack-rs`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("DSTACK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/dstack-rs"))
}

/// The lock file shipped with this crate.
pub fn default_lock_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("debian.lock")
}

/// Errors reading `SOURCE_DATE_EPOCH`.
#[derive(Debug, thiserror::Error)]
#[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds that fits in 32 bits (the cpio mtime field)")]
pub struct BadEpoch(String);

/// `SOURCE_DATE_EPOCH` for timestamps in outputs; 0 when unset, so builds are reproducible by default.
pub fn source_date_epoch() -> Result<u32, BadEpoch> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse().map_err(|_| BadEpoch(v)),
        Err(_) => Ok(0),
    }
}
