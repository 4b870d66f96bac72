//! `dstack.*` kernel command line options. The command line is measured (RTMR2), so these are trusted.
//!
//! | option | meaning | origin |
//! |---|---|---|
//! | `dstack.rootfs_hash=<hex>` | dm-verity root hash of the erofs rootfs | dstack / image-build |
//! | `dstack.rootfs_size=<bytes>` | data size = offset of the hash tree | dstack / image-build |
//! | `dstack.rootfs_device=<path>` | rootfs block device (default `/dev/vda`) | ours |
//! | `dstack.host_shared=<src>` | host-shared config: a directory, a block device (`/dev/vdX`), `virtiofs:<tag>` or `9p:<tag>` | ours |
//! | `dstack.data_device=<path>` | data disk (absent: RAM-backed tmpfs, ephemeral) | dstack |
//! | `dstack.storage_encrypted=0/1` | LUKS on the data disk (default 1) | dstack |
//! | `dstack.host_api=<url>` | host API endpoint override (`http://…`, `unix:…`) | ours |
//!
//! Without `dstack.rootfs_hash` guest-init stays in the initramfs root (development images only; the
//! absence is itself measured).

use std::path::PathBuf;

/// Errors in the command line.
#[derive(Debug, thiserror::Error)]
#[error("kernel command line: {option}: {reason}")]
pub struct CmdlineError {
    pub option: String,
    pub reason: String,
}

fn bad(option: &str, reason: impl Into<String>) -> CmdlineError {
    CmdlineError {
        option: option.to_owned(),
        reason: reason.into(),
    }
}

/// Verity-protected rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsOptions {
    pub root_hash: [u8; 32],
    pub data_size: u64,
    pub device: PathBuf,
}

/// Parsed `dstack.*` options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    pub rootfs: Option<RootfsOptions>,
    pub host_shared: Option<String>,
    pub data_device: Option<PathBuf>,
    pub storage_encrypted: bool,
    pub host_api: Option<String>,
}

impl Cmdline {
    /// Parses a command line; unknown `dstack.` options are rejected (a typo must not silently change
    /// the boot), other options are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut c = Self {
            storage_encrypted: true,
            ..Self::default()
        };
        let (mut hash, mut size, mut device) = (None, None, None);
        for word in cmdline.split_whitespace() {
            let Some(opt) = word.strip_prefix("dstack.") else {
                continue;
            };
            let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
            let name = format!("dstack.{key}");
            match key {
                "rootfs_hash" => {
                    let mut h = [0u8; 32];
                    hex::decode_to_slice(value, &mut h)
                        .map_err(|e| bad(&name, format!("expected 64 hex digits: {e}")))?;
                    hash = Some(h);
                }
                "rootfs_size" => {
                    let n: u64 = value.parse().map_err(|e| bad(&name, format!("{e}")))?;
                    if n == 0 || !n.is_multiple_of(4096) {
                        return Err(bad(&name, "must be a non-zero multiple of 4096"));
                    }
                    size = Some(n);
                }
                "rootfs_device" => device = Some(abs_path(&name, value)?),
                "host_shared" => {
                    if value.is_empty() {
                        return Err(bad(&name, "empty"));
                    }
                    c.host_shared = Some(value.to_owned());
                }
                "data_device" => c.data_device = Some(abs_path(&name, value)?),
                "storage_encrypted" => {
                    c.storage_encrypted = match value {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" => false,
                        _ => return Err(bad(&name, format!("invalid boolean {value:?}"))),
                    }
                }
                "host_api" => c.host_api = Some(value.to_owned()),
                // dstack's option; only ext4 is supported here and app-compose decides.
                "storage_fs" if value == "ext4" => {}
                _ => return Err(bad(&name, "unknown option")),
            }
        }
        c.rootfs = match (hash, size) {
            (Some(root_hash), Some(data_size)) => Some(RootfsOptions {
                root_hash,
                data_size,
                device: device.unwrap_or_else(|| PathBuf::from("/dev/vda")),
            }),
            (None, None) if device.is_none() => None,
            _ => {
                return Err(bad(
                    "dstack.rootfs_hash",
                    "dstack.rootfs_hash and dstack.rootfs_size must be given together",
                ));
            }
        };
        Ok(c)
    }
}

fn abs_path(name: &str, value: &str) -> Result<PathBuf, CmdlineError> {
    if !value.starts_with('/') || value.split('/').any(|c| c == "..") {
        return Err(bad(name, format!("{value:?} must be an absolute path")));
    }
    Ok(PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_image_build_cmdline() {
        let h = "ab".repeat(32);
        let c = Cmdline::parse(&format!(
            "console=ttyS0 panic=1 dstack.rootfs_hash={h} dstack.rootfs_size=8192 dstack.host_shared=/dev/vdc dstack.data_device=/dev/vdb"
        ))
        .unwrap();
        let r = c.rootfs.unwrap();
        assert_eq!(r.root_hash, [0xab; 32]);
        assert_eq!(r.data_size, 8192);
        assert_eq!(r.device, PathBuf::from("/dev/vda"));
        assert_eq!(c.host_shared.as_deref(), Some("/dev/vdc"));
        assert_eq!(c.data_device, Some(PathBuf::from("/dev/vdb")));
        assert!(c.storage_encrypted);
    }

    #[test]
    fn rejects_bad_options() {
        for bad in [
            "dstack.rootfs_hash=zz",
            "dstack.rootfs_size=100",
            &format!("dstack.rootfs_hash={}", "00".repeat(32)),
            "dstack.storage_encrypted=maybe",
            "dstack.data_device=vdb",
            "dstack.tyop=1",
            "dstack.storage_fs=zfs",
        ] {
            assert!(Cmdline::parse(bad).is_err(), "{bad}");
        }
        assert!(!Cmdline::parse("dstack.storage_encrypted=0").unwrap().storage_encrypted);
        assert_eq!(Cmdline::parse("quiet").unwrap().rootfs, None);
    }
}
