//! The whole image directory, in dstack's layout:
//!
//! | file | what |
//! |---|---|
//! | `ovmf.fd` | Debian's OVMF (TDVF metadata), from the locked `ovmf` package |
//! | `bzImage` | the locked kernel's `vmlinuz` |
//! | `initramfs.cpio.gz` | [`crate::boot`] initramfs with guest-init as `/init` |
//! | `rootfs.erofs.verity` | [`crate::rootfs`] erofs + appended dm-verity tree (optional) |
//! | `metadata.json` | dstack's `ImageInfo` fields (`bios`, `kernel`, `cmdline`, `initrd`, `rootfs`, `rootfs_hash`, `version`, `is_dev`) plus our `build` record |
//! | `sha256sum.txt` | `sha256sum` lines for `ovmf.fd bzImage initramfs.cpio.gz metadata.json`, in that order (dstack's list; the rootfs is committed through the root hash on the cmdline inside `metadata.json`) |
//! | `digest.txt`, `os_image_hash` | `sha256(sha256sum.txt)` in lowercase hex + newline: dstack's `os_image_hash` definition |
//! | `measurements.json` | MRTD and RTMR0-2 of a TD booting this image with OVMF direct boot under our VMM, for [`STANDARD_SHAPES`] (1 vCPU / 2 GiB, 2 vCPUs / 4 GiB); written last, not part of `os_image_hash` (it is derived from the hashed files) |
//! | `boot-eventlog-<vcpus>vcpu-<memory_mb>mb.json` | the predicted boot event log (JSON array of `TdxEvent`) per standard shape, listed in `metadata.json`'s `measurements` record |

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use dstack_measurements::predict::image::{MEASUREMENTS_FILE, STANDARD_SHAPES, event_log_file, write_measurements};

use crate::boot::{self, BOOT_MODULES, BootError, DOCKER_MODULES};
use crate::fetch::{DebCache, FetchError, sha256_file, unpack_all};
use crate::lock::{Lock, Set};
use crate::progress::Steps;
use crate::rootfs::{self, RootfsError};

/// Errors building the image directory.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("predicting measurements: {0}")]
    Measurements(#[from] dstack_measurements::predict::image::ImageError),
}

type Result<T> = std::result::Result<T, ImageError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// The OVMF image inside Debian's `ovmf` package.
const OVMF_IN_PACKAGE: &str = "usr/share/ovmf/OVMF.fd";
/// Files hashed into `sha256sum.txt`, in order.
pub const CHECKSUM_FILES: &[&str] = &["ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json"];
pub const ROOTFS_FILE: &str = "rootfs.erofs.verity";

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The binary installed as `/init`.
    pub init: PathBuf,
    pub out: PathBuf,
    /// `SOURCE_DATE_EPOCH` for every timestamp.
    pub epoch: u32,
    pub docker_modules: bool,
    pub extra_modules: Vec<String>,
    pub with_rootfs: bool,
}

/// dstack's `metadata.json` fields plus our build record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Metadata {
    pub bios: String,
    pub kernel: String,
    pub cmdline: String,
    pub initrd: String,
    pub rootfs: Option<String>,
    pub rootfs_hash: Option<String>,
    pub version: String,
    pub is_dev: bool,
    pub build: BuildRecord,
    /// Where the published measurements are (absent in images built before they existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurements: Option<MeasurementsRecord>,
}

/// What a VMM needs to boot this image as a TD (or as a simulated one) and start its measurement registers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeasurementsRecord {
    /// The boot path the measurements are for: `tdx-ovmf-direct` (OVMF from `bios`, kernel/initrd/cmdline and
    /// ACPI tables through fw_cfg, TDVF sections added single-pass; `dstack_measurements::predict`).
    pub boot: String,
    /// `measurements.json`.
    pub file: String,
    /// The predicted boot event log per published shape; other shapes are predicted on demand with the same code.
    pub event_logs: Vec<ShapeEventLog>,
}

/// One shape's predicted boot event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShapeEventLog {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub file: String,
}

/// The record for [`STANDARD_SHAPES`].
pub fn measurements_record() -> MeasurementsRecord {
    MeasurementsRecord {
        boot: "tdx-ovmf-direct".into(),
        file: MEASUREMENTS_FILE.into(),
        event_logs: STANDARD_SHAPES
            .iter()
            .map(|s| ShapeEventLog {
                vcpus: s.vcpus,
                memory_mb: s.memory_bytes >> 20,
                file: event_log_file(s),
            })
            .collect(),
    }
}

/// How the image was built (enough to rebuild it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildRecord {
    pub source_date_epoch: u32,
    /// SHA-256 of the canonical lock text.
    pub lock_sha256: String,
    pub kernel_release: String,
    /// `package=version` of every locked kernel and firmware package.
    pub packages: Vec<String>,
    pub init_sha256: String,
    pub initramfs_modules: Vec<String>,
    pub rootfs_data_size: Option<u64>,
}

/// The kernel command line for a rootfs (dstack's parameter names). The disk order is the VM manager's
/// (rootfs, data disk, host-shared config), fixed here so the measured command line is the one the VM
/// really boots with.
pub fn cmdline(rootfs: Option<&rootfs::Rootfs>) -> String {
    let mut c = String::from("console=ttyS0 panic=1");
    if let Some(r) = rootfs {
        c.push_str(&format!(
            " dstack.rootfs_hash={} dstack.rootfs_size={} dstack.data_device=/dev/vdb dstack.host_shared=/dev/vdc",
            r.root_hash, r.data_size
        ));
    }
    c
}

/// `sha256sum`-format manifest of `files` in `dir`, in the given order.
pub fn checksum_manifest(dir: &Path, files: &[&str]) -> Result<String> {
    let mut out = String::new();
    for f in files {
        let h = sha256_file(&dir.join(f)).map_err(io(format!("hashing {f}")))?;
        out.push_str(&format!("{h}  {f}\n"));
    }
    Ok(out)
}

/// Builds the image directory; returns the `os_image_hash`.
pub fn build_image(lock: &Lock, cache_root: &Path, opts: &BuildOptions) -> Result<String> {
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    let init = std::fs::read(&opts.init).map_err(io(format!("reading init {}", opts.init.display())))?;
    if init.get(..4) != Some(b"\x7fELF") {
        return Err(ImageError::Invalid(format!(
            "{} is not an ELF executable",
            opts.init.display()
        )));
    }

    let mut steps = Steps::new(if opts.with_rootfs { 5 } else { 4 });
    steps.begin("firmware");
    let firmware: Vec<_> = lock.set(Set::Firmware).cloned().collect();
    let fw_paths = DebCache::new(cache_root)?.fetch_all(&firmware)?;
    let fw_key: String = firmware.iter().map(|d| &d.sha256[..16]).collect();
    let fw_root = unpack_all(cache_root, &format!("firmware-{fw_key}"), &fw_paths)?;
    std::fs::copy(fw_root.join(OVMF_IN_PACKAGE), out.join("ovmf.fd"))
        .map_err(io(format!("copying {OVMF_IN_PACKAGE}")))?;

    steps.begin("kernel");
    let kernel = boot::prepare_kernel(lock, cache_root)?;
    std::fs::copy(&kernel.vmlinuz, out.join("bzImage")).map_err(io("copying vmlinuz"))?;
    let mut wanted: Vec<&str> = BOOT_MODULES.to_vec();
    if opts.docker_modules {
        wanted.extend_from_slice(DOCKER_MODULES);
    }
    wanted.extend(opts.extra_modules.iter().map(String::as_str));
    steps.begin("initramfs");
    let start = std::time::Instant::now();
    let initramfs = boot::build_initramfs(&kernel, &init, &wanted, opts.epoch)?;
    std::fs::write(out.join("initramfs.cpio.gz"), &initramfs.bytes).map_err(io("writing initramfs"))?;
    eprintln!(
        "image: initramfs with {} modules, {:.1} MiB, in {:.1} s",
        initramfs.modules.len(),
        initramfs.bytes.len() as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );

    let rootfs = if opts.with_rootfs {
        steps.begin("rootfs (erofs + dm-verity)");
        // Scratch space beside the output (so parallel builds never share it); removed when done.
        let work = PathBuf::from(format!("{}.rootfs-work", out.display()));
        Some(rootfs::build_rootfs(
            lock,
            cache_root,
            &work,
            &out.join(ROOTFS_FILE),
            opts.epoch,
        )?)
    } else {
        let _ = std::fs::remove_file(out.join(ROOTFS_FILE));
        None
    };

    steps.begin("metadata, checksums and measurements");
    let packages = lock
        .debs
        .iter()
        .filter(|d| d.set != Set::Rootfs)
        .map(|d| d.apt_spec())
        .collect();
    let metadata = Metadata {
        bios: "ovmf.fd".into(),
        kernel: "bzImage".into(),
        cmdline: cmdline(rootfs.as_ref()),
        initrd: "initramfs.cpio.gz".into(),
        rootfs: rootfs.as_ref().map(|_| ROOTFS_FILE.to_owned()),
        rootfs_hash: rootfs.as_ref().map(|r| r.root_hash.clone()),
        version: env!("CARGO_PKG_VERSION").into(),
        is_dev: false,
        build: BuildRecord {
            source_date_epoch: opts.epoch,
            lock_sha256: hex::encode(Sha256::digest(lock.render().as_bytes())),
            kernel_release: kernel.version.clone(),
            packages,
            init_sha256: hex::encode(Sha256::digest(&init)),
            initramfs_modules: initramfs.modules,
            rootfs_data_size: rootfs.as_ref().map(|r| r.data_size),
        },
        measurements: Some(measurements_record()),
    };
    let mut json = serde_json::to_string_pretty(&metadata).map_err(|e| ImageError::Invalid(e.to_string()))?;
    json.push('\n');
    std::fs::write(out.join("metadata.json"), json).map_err(io("writing metadata.json"))?;

    let manifest = checksum_manifest(out, CHECKSUM_FILES)?;
    std::fs::write(out.join("sha256sum.txt"), &manifest).map_err(io("writing sha256sum.txt"))?;
    let os_image_hash = hex::encode(Sha256::digest(manifest.as_bytes()));
    for f in ["digest.txt", "os_image_hash"] {
        std::fs::write(out.join(f), format!("{os_image_hash}\n")).map_err(io(format!("writing {f}")))?;
    }
    // Last: the predictor reads the finished directory (and checks sha256sum.txt) like a verifier would.
    let image = format!("dstack-rs-{}", env!("CARGO_PKG_VERSION"));
    write_measurements(out, Some(image), &STANDARD_SHAPES)?;
    steps.end();
    Ok(os_image_hash)
}

/// Compares every regular file of `a` with the same file in `b`; returns the names that differ or are
/// missing on either side.
pub fn compare_dirs(a: &Path, b: &Path) -> Result<Vec<String>> {
    let names = |dir: &Path| -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    };
    let (na, nb) = (names(a)?, names(b)?);
    let mut differ = Vec::new();
    for n in na.iter().filter(|n| !nb.contains(n)) {
        differ.push(format!("{n} (only in {})", a.display()));
    }
    for n in nb.iter().filter(|n| !na.contains(n)) {
        differ.push(format!("{n} (only in {})", b.display()));
    }
    for n in na.iter().filter(|n| nb.contains(n)) {
        let ha = sha256_file(&a.join(n)).map_err(io(format!("hashing {n}")))?;
        let hb = sha256_file(&b.join(n)).map_err(io(format!("hashing {n}")))?;
        if ha != hb {
            differ.push(n.clone());
        }
    }
    Ok(differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_matches_sha256sum_format() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"abc").unwrap();
        std::fs::write(dir.path().join("b"), b"").unwrap();
        let m = checksum_manifest(dir.path(), &["b", "a"]).unwrap();
        // Digests of "" and "abc" from FIPS 180-2; two spaces as GNU sha256sum writes in text mode.
        assert_eq!(
            m,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  b\n\
             ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a\n"
        );
    }

    #[test]
    fn compare_reports_differences() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(a.path().join("same"), b"1").unwrap();
        std::fs::write(b.path().join("same"), b"1").unwrap();
        std::fs::write(a.path().join("diff"), b"1").unwrap();
        std::fs::write(b.path().join("diff"), b"2").unwrap();
        std::fs::write(a.path().join("only"), b"1").unwrap();
        let d = compare_dirs(a.path(), b.path()).unwrap();
        assert_eq!(d.len(), 2);
        assert!(d.contains(&"diff".to_owned()) && d.iter().any(|s| s.starts_with("only (only in")));
    }

    #[test]
    fn cmdline_carries_rootfs_hash_and_size() {
        let r = rootfs::Rootfs {
            image: PathBuf::from("x"),
            root_hash: "ab".repeat(32),
            data_size: 8192,
        };
        assert_eq!(
            cmdline(Some(&r)),
            format!(
                "console=ttyS0 panic=1 dstack.rootfs_hash={} dstack.rootfs_size=8192 \
                 dstack.data_device=/dev/vdb dstack.host_shared=/dev/vdc",
                "ab".repeat(32)
            )
        );
        assert_eq!(cmdline(None), "console=ttyS0 panic=1");
    }
}
