//! From the initramfs to the real root.
//!
//! Choice: guest-init **continues as PID 1** after the switch (no second exec). The measured initramfs
//! binary keeps running with its state (log sinks, reaper table); the rootfs needs no copy of it, and
//! later children that need the binary (`guest-init agent`) are started from `/proc/self/exe`.
//!
//! Layout: the dm-verity erofs is mounted read-only at `/sysroot.ro`; a tmpfs at `/sysroot.rw` holds the
//! overlay's upper and work dirs; the overlay (whole root writable in RAM, base verified) is mounted at
//! `/sysroot`. Then, like util-linux `switch_root`: move `/dev`, `/proc`, `/sys`, `/run` into it, delete
//! the initramfs contents (files on the initramfs device only, never crossing mounts), move the new root
//! onto `/`, `chroot(".")`, `chdir("/")`. Persistent data lives on the encrypted data disk, not here.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};

/// `RAMFS_MAGIC` from `<linux/magic.h>` (nix does not export it).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);

/// Errors switching root.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("{what}: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to switch root: / is not an initramfs (ramfs/tmpfs)")]
    NotInitramfs,
}

fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> SwitchError {
    let what = what.into();
    move |errno| SwitchError::Sys { what, errno }
}

fn mkdir(p: &Path) -> Result<(), SwitchError> {
    std::fs::create_dir_all(p).map_err(|source| SwitchError::Io {
        what: format!("mkdir {}", p.display()),
        source,
    })
}

/// Mounts the verified read-only rootfs (`erofs` on `device`) plus a tmpfs overlay at `<root>/sysroot`.
pub fn mount_new_root(root: &Path, device: &Path) -> Result<PathBuf, SwitchError> {
    let ro = root.join("sysroot.ro");
    let rw = root.join("sysroot.rw");
    let new = root.join("sysroot");
    for d in [&ro, &rw, &new] {
        mkdir(d)?;
    }
    mount(
        Some(device),
        &ro,
        Some("erofs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(sys(format!("mount erofs {} on {}", device.display(), ro.display())))?;
    mount(Some("tmpfs"), &rw, Some("tmpfs"), MsFlags::MS_NODEV, Some("mode=0755"))
        .map_err(sys(format!("mount tmpfs on {}", rw.display())))?;
    mkdir(&rw.join("upper"))?;
    mkdir(&rw.join("work"))?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        ro.display(),
        rw.join("upper").display(),
        rw.join("work").display()
    );
    mount(
        Some("overlay"),
        &new,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(sys(format!("mount overlay on {}", new.display())))?;
    tracing::info!(
        "root filesystem: erofs {} (read-only, verity) + tmpfs overlay",
        device.display()
    );
    Ok(new)
}

/// Deletes everything on `dev` below `dir` without crossing into other filesystems.
fn remove_initramfs(dir: &Path, dev: u64, skip: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p == skip {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != dev {
            continue;
        }
        if md.is_dir() {
            remove_initramfs(&p, dev, skip);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Switches `/` to `new_root` (a mount point) and continues as PID 1 there.
pub fn switch_root(new_root: &Path) -> Result<(), SwitchError> {
    let fs = statfs("/").map_err(sys("statfs /"))?;
    if fs.filesystem_type() != RAMFS_MAGIC && fs.filesystem_type() != TMPFS_MAGIC {
        return Err(SwitchError::NotInitramfs);
    }
    for m in ["dev", "proc", "sys", "run"] {
        let from = Path::new("/").join(m);
        let to = new_root.join(m);
        mkdir(&to)?;
        mount(Some(&from), &to, None::<&OsStr>, MsFlags::MS_MOVE, None::<&str>).map_err(sys(format!(
            "move {} to {}",
            from.display(),
            to.display()
        )))?;
    }
    let root_dev = std::fs::symlink_metadata("/")
        .map_err(|source| SwitchError::Io {
            what: "stat /".into(),
            source,
        })?
        .dev();
    nix::unistd::chdir(new_root).map_err(sys(format!("chdir {}", new_root.display())))?;
    remove_initramfs(Path::new("/"), root_dev, new_root);
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(sys("move new root onto /"))?;
    nix::unistd::chroot(".").map_err(sys("chroot"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    tracing::info!("switched root; continuing as PID 1");
    Ok(())
}
