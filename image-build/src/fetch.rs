//! Fetching locked `.deb`s through the private apt and verifying them against the lock.
//!
//! Verified files live in `<cache>/image-build/debs/<file name>`; a file there is re-hashed before every use,
//! so a corrupted cache entry is detected (and refetched), never used.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dstack_apt::PrivateApt;
use sha2::{Digest, Sha256};

use crate::lock::LockedDeb;
use crate::progress::{Progress, Unit, watch_dir};

/// Errors fetching packages.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Apt(#[from] dstack_apt::AptError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{package}: sha256 mismatch: the lock says {expected}, the mirror served {actual}; \
         the file was discarded (if the archive really changed, review and run `lock --update`)"
    )]
    HashMismatch {
        /// `name version (suite)`.
        package: String,
        expected: String,
        actual: String,
    },
    #[error(
        "downloading locked packages from {suite} failed: {source}\n(packages: {packages})\nIf the mirror no longer \
         carries a locked version (Debian drops superseded point-release versions), point DSTACK_DEBIAN_MIRROR at a \
         snapshot of the archive, or review and run `dstack-image-build lock --update`."
    )]
    Download {
        suite: String,
        packages: String,
        #[source]
        source: Box<dstack_apt::AptError>,
    },
    #[error("{package} {version}: the mirror served {actual} bytes, the lock says {expected}")]
    SizeMismatch {
        package: String,
        version: String,
        expected: u64,
        actual: u64,
    },
}

type Result<T> = std::result::Result<T, FetchError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
    let context = context.into();
    move |source| FetchError::Io { context, source }
}

/// Lowercase hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks `path` against the lock entry: size first (cheap), then SHA-256.
pub fn verify(deb: &LockedDeb, path: &Path) -> Result<()> {
    let size = std::fs::metadata(path)
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    if size != deb.size {
        return Err(FetchError::SizeMismatch {
            package: deb.package.clone(),
            version: deb.version.clone(),
            expected: deb.size,
            actual: size,
        });
    }
    let actual = sha256_file(path).map_err(io(format!("hashing {}", path.display())))?;
    if actual != deb.sha256 {
        return Err(FetchError::HashMismatch {
            package: format!("{} {} ({})", deb.package, deb.version, deb.suite),
            expected: deb.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Where verified `.deb`s are kept.
pub struct DebCache {
    dir: PathBuf,
    apt_root: PathBuf,
}

/// Packages per apt-get call: large enough to be fast, small enough for visible progress.
const BATCH: usize = 24;

impl DebCache {
    pub fn new(cache_root: &Path) -> Result<Self> {
        let dir = cache_root.join("image-build/debs");
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(Self {
            dir,
            apt_root: cache_root.join("apt"),
        })
    }

    /// The cache path of a locked package (whether or not it is present).
    pub fn path(&self, deb: &LockedDeb) -> PathBuf {
        self.dir.join(deb.file_name())
    }

    fn cached_and_valid(&self, deb: &LockedDeb) -> bool {
        let path = self.path(deb);
        path.exists() && verify(deb, &path).is_ok()
    }

    /// Makes every package present and verified; returns their paths in the order given.
    pub fn fetch_all(&self, debs: &[LockedDeb]) -> Result<Vec<PathBuf>> {
        let start = Instant::now();
        let total_bytes: u64 = debs.iter().map(|d| d.size).sum();
        let missing: Vec<&LockedDeb> = debs.iter().filter(|d| !self.cached_and_valid(d)).collect();
        eprintln!(
            "fetch: {} packages ({:.1} MiB), {} cached, {} to download",
            debs.len(),
            total_bytes as f64 / 1048576.0,
            debs.len() - missing.len(),
            missing.len()
        );
        let mut by_suite: BTreeMap<&str, Vec<&LockedDeb>> = BTreeMap::new();
        for d in &missing {
            by_suite.entry(d.suite.as_str()).or_default().push(d);
        }
        let missing_bytes: u64 = missing.iter().map(|d| d.size).sum();
        let bar = Progress::new("fetch", missing_bytes, Unit::Bytes);
        let mut fetched_bytes = 0u64;
        for (suite, list) in by_suite {
            let apt = PrivateApt::new(suite, &self.apt_root)?;
            let download_dir = apt.download_dir();
            for batch in list.chunks(BATCH) {
                let specs: Vec<String> = batch.iter().map(|d| d.apt_spec()).collect();
                let paths =
                    watch_dir(&bar, &download_dir, fetched_bytes, || apt.download_many(&specs)).map_err(|source| {
                        FetchError::Download {
                            suite: suite.to_owned(),
                            packages: specs.join(" "),
                            source: Box::new(source),
                        }
                    })?;
                for (deb, downloaded) in batch.iter().zip(paths) {
                    if let Err(e) = verify(deb, &downloaded) {
                        let _ = std::fs::remove_file(&downloaded);
                        return Err(e);
                    }
                    let dest = self.path(deb);
                    // Same filesystem: rename; otherwise copy and drop apt's copy.
                    if std::fs::rename(&downloaded, &dest).is_err() {
                        std::fs::copy(&downloaded, &dest).map_err(io(format!("copying to {}", dest.display())))?;
                        let _ = std::fs::remove_file(&downloaded);
                    }
                    fetched_bytes += deb.size;
                }
                bar.set(fetched_bytes);
            }
        }
        if !missing.is_empty() {
            bar.finish(&format!("{} packages verified", missing.len()));
        }
        eprintln!("fetch: all verified in {:.1} s", start.elapsed().as_secs_f64());
        Ok(debs.iter().map(|d| self.path(d)).collect())
    }
}

/// Extracts verified `.deb`s, in order, into one directory `<cache>/image-build/unpacked/<key>` (once);
/// `key` should identify the set (e.g. a digest of their hashes). Returns that directory.
pub fn unpack_all(cache_root: &Path, key: &str, debs: &[PathBuf]) -> Result<PathBuf> {
    let dest = cache_root.join("image-build/unpacked").join(key);
    let stamp = dest.join(".dstack-unpacked");
    if stamp.exists() {
        return Ok(dest);
    }
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).map_err(io(format!("creating {}", dest.display())))?;
    let bar = Progress::new("unpack", debs.len() as u64, Unit::Items);
    for deb in debs {
        let out = std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&dest)
            .output()
            .map_err(io("starting dpkg-deb"))?;
        if !out.status.success() {
            return Err(FetchError::Io {
                context: format!("dpkg-deb -x {}", deb.display()),
                source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            });
        }
        bar.inc(1);
    }
    bar.finish("packages unpacked");
    std::fs::write(&stamp, b"").map_err(io("writing unpack stamp"))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::Set;

    fn entry(sha256: &str, size: u64) -> LockedDeb {
        LockedDeb {
            set: Set::Rootfs,
            suite: "trixie".into(),
            package: "hello".into(),
            version: "1.0-1".into(),
            arch: "amd64".into(),
            size,
            sha256: sha256.into(),
            filename: "pool/main/h/hello/hello_1.0-1_amd64.deb".into(),
        }
    }

    #[test]
    fn verify_checks_size_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.deb");
        std::fs::write(&path, b"abc").unwrap();
        // SHA-256("abc") from FIPS 180-2.
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify(&entry(good, 3), &path).unwrap();
        let e = verify(&entry(&good.replace('b', "c"), 3), &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hello 1.0-1") && e.contains("sha256 mismatch"), "{e}");
        let e = verify(&entry(good, 4), &path).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
    }
}
