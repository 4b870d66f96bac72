//! Kernel and initramfs: the locked kernel's `vmlinuz`, and a deterministic gzip'd newc initramfs holding
//! `/init` and the kernel modules the guest needs.
//!
//! Initramfs layout:
//! - `/init` — the given binary (guest-init in production), mode 0755;
//! - `/dev/console` (char 5:1), `/dev`, `/proc`, `/sys`, `/run`, `/tmp`, `/mnt` mount points;
//! - `/lib/modules/<kver>/kernel/…/*.ko` — selected modules, **decompressed**, plus `modules.dep`,
//!   `modules.alias` (for the selection) and `modules.builtin` (whole kernel);
//! - `/lib/modules/load-order` — absolute paths of the modules, one per line, dependencies first: loading
//!   them in this order with `finit_module(fd, "", 0)` satisfies every dependency (`#` lines are comments).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cpio::{Cpio, CpioError, gzip};
use crate::fetch::{DebCache, FetchError, unpack_all};
use crate::lock::{Lock, Set};
use crate::modules::{Module, ModuleError, ModuleTree, modules_alias, modules_dep};

/// Modules every guest needs to boot: disks, network, vsock, entropy, verity/crypt, filesystems, TDX.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport",
    "dm_mod",
    "dm_verity",
    "dm_crypt",
    "erofs",
    "overlay",
    "configfs",
    "tsm_report",
    "tdx_guest",
    "wireguard",
    // guest-init's gateway tunnel: boringtun on a tun device.
    "tun",
    // The ACPI power button as an input device: graceful ShutdownVm presses it.
    "button",
    "evdev",
];

/// Modules dockerd needs for its default bridge network with iptables (nft backend) and overlay2.
pub const DOCKER_MODULES: &[&str] = &[
    "bridge",
    "br_netfilter",
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_masq",
    "nf_nat",
    "nf_conntrack",
    "xt_conntrack",
    "xt_addrtype",
    "xt_MASQUERADE",
    "xt_nat",
    // `-p tcp --dport` in Docker's port-publishing rules.
    "xt_tcpudp",
    "xt_comment",
    "xt_mark",
];

/// Errors building the kernel and initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel packages contain {0} kernel versions under usr/lib/modules (expected exactly one)")]
    KernelVersions(usize),
    #[error("{0} is missing from the kernel packages")]
    Missing(String),
}

type Result<T> = std::result::Result<T, BootError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootError {
    let context = context.into();
    move |source| BootError::Io { context, source }
}

/// The extracted locked kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// e.g. `7.3.4+deb13-cloud-amd64`.
    pub version: String,
    /// `…/usr/lib/modules/<version>`.
    pub modules_root: PathBuf,
    pub vmlinuz: PathBuf,
}

/// Fetches and extracts the lock's kernel set (cached by the set's hashes).
pub fn prepare_kernel(lock: &Lock, cache_root: &Path) -> Result<Kernel> {
    let debs: Vec<_> = lock.set(Set::Kernel).cloned().collect();
    let cache = DebCache::new(cache_root)?;
    let paths = cache.fetch_all(&debs)?;
    let mut key = Sha256::new();
    for d in &debs {
        key.update(d.sha256.as_bytes());
    }
    let key = format!("kernel-{}", &hex::encode(key.finalize())[..16]);
    let root = unpack_all(cache_root, &key, &paths)?;
    let modules_dir = root.join("usr/lib/modules");
    let mut versions: Vec<String> = std::fs::read_dir(&modules_dir)
        .map_err(io(format!("reading {}", modules_dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("vmlinuz").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if versions.len() != 1 {
        return Err(BootError::KernelVersions(versions.len()));
    }
    let version = versions.remove(0);
    let modules_root = modules_dir.join(&version);
    if !modules_root.join("kernel").is_dir() {
        return Err(BootError::Missing(format!("usr/lib/modules/{version}/kernel")));
    }
    Ok(Kernel {
        vmlinuz: modules_root.join("vmlinuz"),
        version,
        modules_root,
    })
}

/// A built initramfs.
#[derive(Debug)]
pub struct Initramfs {
    /// gzip-compressed newc archive.
    pub bytes: Vec<u8>,
    /// Modules in load order.
    pub modules: Vec<String>,
}

/// Builds the initramfs for `kernel` with `init` as `/init` and `wanted` modules (plus dependencies).
pub fn build_initramfs(kernel: &Kernel, init: &[u8], wanted: &[&str], mtime: u32) -> Result<Initramfs> {
    let tree = ModuleTree::open(&kernel.modules_root)?;
    let selected: Vec<Module> = tree.select(wanted)?;
    let mut c = Cpio::new();
    c.file("init", 0o755, init.to_vec())?;
    for dir in ["dev", "proc", "sys", "run", "mnt"] {
        c.dir(dir, 0o755)?;
    }
    c.dir("tmp", 0o1777)?;
    c.char_dev("dev/console", 0o600, 5, 1)?;
    let base = format!("lib/modules/{}", kernel.version);
    let mut order = String::from("# kernel modules in load order (dependencies first): finit_module(fd, \"\", 0)\n");
    for m in &selected {
        c.file(&format!("{base}/{}", m.rel_path), 0o644, m.data.clone())?;
        order.push_str(&format!("/{base}/{}\n", m.rel_path));
    }
    c.file(
        &format!("{base}/modules.dep"),
        0o644,
        modules_dep(&selected).into_bytes(),
    )?;
    c.file(
        &format!("{base}/modules.alias"),
        0o644,
        modules_alias(&selected).into_bytes(),
    )?;
    let builtin = kernel.modules_root.join("modules.builtin");
    let builtin = std::fs::read(&builtin).map_err(io(format!("reading {}", builtin.display())))?;
    c.file(&format!("{base}/modules.builtin"), 0o644, builtin)?;
    c.file("lib/modules/load-order", 0o644, order.into_bytes())?;
    let bytes = gzip(&c.to_bytes(mtime)).map_err(io("compressing initramfs"))?;
    Ok(Initramfs {
        bytes,
        modules: selected.into_iter().map(|m| m.name).collect(),
    })
}
