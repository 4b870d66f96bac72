//! The API filesystems PID 1 mounts, relative to a root (`/` in the CVM, a temporary directory in tests).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Errors mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {fstype} on {target}: {errno}")]
    Mount {
        fstype: String,
        target: String,
        errno: Errno,
    },
    #[error("creating mount point {target}: {source}")]
    Mkdir {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

/// One mount.
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    pub source: &'static str,
    /// Relative to the root.
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
    /// A missing optional filesystem (e.g. securityfs on a kernel without it) is only logged.
    pub required: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// Needed before anything else (module loading, the rootfs switch, logging to the console).
pub const EARLY: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: true,
    },
    MountSpec {
        source: "sysfs",
        target: "sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: true,
    },
    MountSpec {
        source: "devtmpfs",
        target: "dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        required: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        required: true,
    },
];

/// Mounted in the final root (after the switch, which moves the early ones along).
pub const LATE: &[MountSpec] = &[
    MountSpec {
        source: "devpts",
        target: "dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,ptmxmode=0666"),
        required: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        required: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        required: true,
    },
    MountSpec {
        source: "configfs",
        target: "sys/kernel/config",
        fstype: "configfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        // Needed for TDX quotes (configfs-tsm); the TEE layer reports its absence.
        required: false,
    },
    MountSpec {
        source: "securityfs",
        target: "sys/kernel/security",
        fstype: "securityfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: false,
    },
    MountSpec {
        source: "cgroup2",
        target: "sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
        // dockerd cannot run containers without it.
        required: true,
    },
];

/// Mounts `specs` under `root`, in order; returns the mount points it mounted (already-mounted targets
/// are left alone and not returned).
pub fn mount_all(root: &Path, specs: &[MountSpec]) -> Result<Vec<PathBuf>, MountError> {
    let mut done = Vec::new();
    for spec in specs {
        let target = root.join(spec.target);
        // Under /sys the kernel provides the directory (or not: the feature is absent).
        if let Err(source) = std::fs::create_dir_all(&target) {
            if !spec.required {
                tracing::warn!("optional {} not mounted: {}: {source}", spec.fstype, target.display());
                continue;
            }
            return Err(MountError::Mkdir {
                target: target.display().to_string(),
                source,
            });
        }
        match mount(Some(spec.source), &target, Some(spec.fstype), spec.flags, spec.data) {
            Ok(()) => {
                tracing::info!("mounted {} on {}", spec.fstype, target.display());
                done.push(target);
            }
            Err(Errno::EBUSY) => tracing::info!("{} already mounted on {}", spec.fstype, target.display()),
            Err(errno) if !spec.required => {
                tracing::warn!("optional {} not mounted on {}: {errno}", spec.fstype, target.display());
            }
            Err(errno) => {
                return Err(MountError::Mount {
                    fstype: spec.fstype.to_owned(),
                    target: target.display().to_string(),
                    errno,
                });
            }
        }
    }
    Ok(done)
}

/// Mount points listed in a mountinfo text, in mount order, restricted to `root` and below (octal escapes
/// such as `\040` decoded).
pub fn mount_points(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .filter(|p| p.starts_with(root))
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = b.get(i + 1..i + 4)
            && oct.iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Filesystems PID 1 keeps until the very end (logging, /proc for the process list).
pub fn is_essential(path: &Path, root: &Path) -> bool {
    ["", "proc", "sys", "dev", "dev/pts", "run"]
        .iter()
        .any(|p| path == root.join(p).as_path() || (p.is_empty() && path == root))
}

/// Unmounts `path`; when busy, remounts it read-only and detaches it lazily so data is flushed.
pub fn unmount(path: &Path) -> Result<(), Errno> {
    match umount2(path, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => {
            let _ = mount(
                None::<&str>,
                path,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            umount2(path, MntFlags::MNT_DETACH)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let info = "22 1 0:21 / / rw - rootfs rootfs rw\n\
                    23 22 0:22 / /proc rw,nosuid - proc proc rw\n\
                    40 22 0:30 / /r/a\\040b rw - tmpfs tmpfs rw\n\
                    41 40 0:31 / /r/a\\040b/c rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(info, Path::new("/r")),
            [PathBuf::from("/r/a b"), PathBuf::from("/r/a b/c")]
        );
        assert_eq!(mount_points(info, Path::new("/")).len(), 4);
    }

    #[test]
    fn essential_mounts() {
        let root = Path::new("/");
        assert!(is_essential(Path::new("/proc"), root));
        assert!(is_essential(Path::new("/"), root));
        assert!(!is_essential(Path::new("/tmp"), root));
        assert!(!is_essential(Path::new("/var/lib/data"), root));
    }

    #[test]
    fn required_late_mounts_cover_docker_needs() {
        let need = ["dev/pts", "dev/shm", "tmp", "sys/fs/cgroup"];
        for n in need {
            assert!(LATE.iter().any(|m| m.target == n && m.required), "{n}");
        }
        assert_eq!(EARLY[0].target, "proc");
    }
}
