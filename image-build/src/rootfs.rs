//! Root filesystem: a local apt repository holding exactly the locked `.deb`s (so apt cannot pick any other
//! version), `mmdebstrap` from it with `SOURCE_DATE_EPOCH`, removal of files that differ between builds or
//! leak the build host, then an erofs image with fixed timestamps and UUID and a dm-verity hash tree
//! appended to it with a zero salt and zero UUID (the layout dstack uses: hash tree at offset `data_size`;
//! cmdline `dstack.rootfs_hash=<root hash> dstack.rootfs_size=<data_size>`).
//!
//! For guest-init: `veritysetup format` puts its 512-byte superblock (padded to one 4096-byte block) at the
//! hash offset, so a raw device-mapper table reads
//! `verity 1 <dev> <dev> 4096 4096 <data_size/4096> <data_size/4096 + 1> sha256 <root hash> <64 zeros>`
//! (`veritysetup open <dev> root <dev> <hash> --hash-offset=<data_size>` finds the same by itself).
//!
//! Host tools: `mmdebstrap`, `mkfs.erofs` (erofs-utils), `veritysetup` (cryptsetup-bin), `dpkg-deb`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fetch::{DebCache, FetchError, sha256_file};
use crate::lock::{Lock, LockedDeb, Set};

/// Errors building the root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("the built rootfs differs from the lock: {0}")]
    Mismatch(String),
    #[error("veritysetup printed no root hash")]
    NoRootHash,
}

type Result<T> = std::result::Result<T, RootfsError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let context = context.into();
    move |source| RootfsError::Io { context, source }
}

fn run(cmd: &mut Command) -> Result<String> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(io(format!("starting {tool} (is it installed?)")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The tail is what explains a failure; mmdebstrap is verbose.
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        return Err(RootfsError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The suite name the local repository advertises (mmdebstrap selects essential/required packages by it).
const REPO_SUITE: &str = "trixie";

/// Writes a signed-by-nobody apt repository with exactly `debs` under `repo`.
fn write_local_repo(repo: &Path, debs: &[(LockedDeb, PathBuf)], epoch: u32) -> Result<()> {
    let _ = std::fs::remove_dir_all(repo);
    let pool = repo.join("pool");
    let bin = repo.join(format!("dists/{REPO_SUITE}/main/binary-amd64"));
    std::fs::create_dir_all(&pool).map_err(io("creating repo pool"))?;
    std::fs::create_dir_all(&bin).map_err(io("creating repo dists"))?;
    let mut sorted: Vec<&(LockedDeb, PathBuf)> = debs.iter().collect();
    sorted.sort_by(|a, b| a.0.package.cmp(&b.0.package));
    let mut packages = String::new();
    for (deb, path) in sorted {
        let dest = pool.join(deb.file_name());
        if std::fs::hard_link(path, &dest).is_err() {
            std::fs::copy(path, &dest).map_err(io(format!("copying {}", deb.file_name())))?;
        }
        let control = run(Command::new("dpkg-deb").arg("-f").arg(path))?;
        packages.push_str(control.trim_end());
        let _ = write!(
            packages,
            "\nFilename: pool/{}\nSize: {}\nSHA256: {}\n\n",
            deb.file_name(),
            deb.size,
            deb.sha256
        );
    }
    std::fs::write(bin.join("Packages"), &packages).map_err(io("writing Packages"))?;
    let packages_sha = sha256_file(&bin.join("Packages")).map_err(io("hashing Packages"))?;
    let release = format!(
        "Origin: dstack-image-build\nLabel: dstack-image-build\nSuite: {REPO_SUITE}\nCodename: {REPO_SUITE}\n\
         Date: {}\nArchitectures: amd64\nComponents: main\nSHA256:\n {packages_sha} {} main/binary-amd64/Packages\n",
        rfc2822(epoch),
        packages.len()
    );
    std::fs::write(repo.join(format!("dists/{REPO_SUITE}/Release")), release).map_err(io("writing Release"))?;
    Ok(())
}

/// `Thu, 01 Jan 1970 00:00:00 UTC` for a Unix time (civil-from-days, proleptic Gregorian).
fn rfc2822(epoch: u32) -> String {
    let secs = u64::from(epoch);
    let days = (secs / 86400) as i64;
    let (h, m, s) = (secs % 86400 / 3600, secs % 3600 / 60, secs % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let wd = DAYS.get(days.rem_euclid(7) as usize).copied().unwrap_or("Thu");
    let mon = MONTHS.get((month - 1) as usize).copied().unwrap_or("Jan");
    format!("{wd}, {d:02} {mon} {year} {h:02}:{m:02}:{s:02} UTC")
}

/// Paths (relative to the rootfs) removed after bootstrap: build-host leakage, logs, caches, backups.
const REMOVE: &[&str] = &[
    "etc/resolv.conf",
    "etc/hostname",
    "etc/apt/sources.list",
    "etc/apt/sources.list.d",
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/subuid-",
    "etc/subgid-",
    "var/cache/ldconfig/aux-cache",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dbus/machine-id",
];

/// Directories emptied after bootstrap (kept as empty mount points or state dirs).
const EMPTY: &[&str] = &[
    "dev",
    "run",
    "tmp",
    "var/log",
    "var/tmp",
    "var/cache/apt",
    "var/lib/apt/lists",
];

fn remove_path(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io(format!("removing {}", path.display()))),
        Ok(_) => std::fs::remove_file(path).map_err(io(format!("removing {}", path.display()))),
    }
}

fn clean(root: &Path) -> Result<()> {
    for rel in REMOVE {
        remove_path(&root.join(rel))?;
    }
    for rel in EMPTY {
        let dir = root.join(rel);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                remove_path(&e.path())?;
            }
        }
    }
    // systemd-style "uninitialized" machine-id: empty, so every boot gets a fresh one.
    if root.join("etc/machine-id").exists() {
        std::fs::write(root.join("etc/machine-id"), b"").map_err(io("clearing machine-id"))?;
    }
    Ok(())
}

/// Checks that dpkg inside the rootfs installed exactly the locked rootfs set.
fn check_installed(root: &Path, debs: &[(LockedDeb, PathBuf)]) -> Result<()> {
    let out = run(Command::new("dpkg-query")
        .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
        .args(["-W", "-f", "${Package} ${Version} ${db:Status-Status}\n"]))?;
    let mut installed: Vec<String> = out
        .lines()
        .filter(|l| l.ends_with(" installed"))
        .map(|l| l.trim_end_matches(" installed").to_owned())
        .collect();
    installed.sort();
    let mut locked: Vec<String> = debs
        .iter()
        .map(|(d, _)| format!("{} {}", d.package, d.version))
        .collect();
    locked.sort();
    if installed != locked {
        let extra: Vec<&String> = installed.iter().filter(|i| !locked.contains(i)).collect();
        let missing: Vec<&String> = locked.iter().filter(|l| !installed.contains(l)).collect();
        return Err(RootfsError::Mismatch(format!(
            "installed but not locked {extra:?}, locked but not installed {missing:?}"
        )));
    }
    Ok(())
}

/// The verity-protected rootfs image.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// erofs data followed by the hash tree.
    pub image: PathBuf,
    pub root_hash: String,
    /// Bytes of erofs data (a multiple of 4096) = offset of the hash tree.
    pub data_size: u64,
}

/// Builds `out_image` from the lock's rootfs set, using `work` as scratch space (emptied first).
pub fn build_rootfs(lock: &Lock, cache_root: &Path, work: &Path, out_image: &Path, epoch: u32) -> Result<Rootfs> {
    let debs: Vec<LockedDeb> = lock.set(Set::Rootfs).cloned().collect();
    let paths = DebCache::new(cache_root)?.fetch_all(&debs)?;
    let pairs: Vec<(LockedDeb, PathBuf)> = debs.into_iter().zip(paths).collect();
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(io(format!("creating {}", work.display())))?;
    let repo = work.join("repo");
    write_local_repo(&repo, &pairs, epoch)?;

    let root = work.join("root");
    let names: Vec<&str> = pairs.iter().map(|(d, _)| d.package.as_str()).collect();
    eprintln!("rootfs: mmdebstrap of {} packages…", names.len());
    let start = std::time::Instant::now();
    run(Command::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env_remove("http_proxy")
        .args(["--mode=root", "--variant=required", "--format=directory", "--quiet"])
        .arg(format!("--include={}", names.join(",")))
        .args(["--skip=check/signed-by", "--aptopt=Acquire::Languages \"none\""])
        .arg(REPO_SUITE)
        .arg(&root)
        .arg(format!("deb [trusted=yes] copy://{} {REPO_SUITE} main", repo.display())))?;
    eprintln!("rootfs: bootstrapped in {:.0} s", start.elapsed().as_secs_f64());
    check_installed(&root, &pairs)?;
    clean(&root)?;

    let start = std::time::Instant::now();
    let _ = std::fs::remove_file(out_image);
    run(Command::new("mkfs.erofs")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .arg(format!("-T{epoch}"))
        .arg("-U00000000-0000-0000-0000-000000000000")
        .args(["-x-1", "-zlz4hc", "--quiet"])
        .arg(out_image)
        .arg(&root))?;
    let size = std::fs::metadata(out_image).map_err(io("stat rootfs image"))?.len();
    let data_size = size.div_ceil(4096) * 4096;
    std::fs::File::options()
        .write(true)
        .open(out_image)
        .and_then(|f| f.set_len(data_size))
        .map_err(io("padding rootfs image"))?;
    let zero_salt = "0".repeat(64);
    let out = run(Command::new("veritysetup")
        .arg("format")
        .arg(out_image)
        .arg(out_image)
        .arg(format!("--hash-offset={data_size}"))
        .args(["--data-block-size=4096", "--hash-block-size=4096", "--hash=sha256"])
        .arg("--uuid=00000000-0000-0000-0000-000000000000")
        .arg(format!("--salt={zero_salt}")))?;
    let root_hash = out
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_owned())
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(RootfsError::NoRootHash)?;
    eprintln!(
        "rootfs: erofs {:.0} MiB + verity in {:.0} s, root hash {root_hash}",
        data_size as f64 / 1048576.0,
        start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(work);
    Ok(Rootfs {
        image: out_image.to_owned(),
        root_hash,
        data_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2822_dates() {
        // Cross-checked with `date -u -R -d @N`.
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 UTC");
        assert_eq!(rfc2822(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 UTC");
        assert_eq!(rfc2822(951_782_400), "Tue, 29 Feb 2000 00:00:00 UTC");
    }

    #[test]
    fn clean_removes_leaks_and_keeps_mount_points() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["etc/apt/sources.list.d", "var/log/apt", "dev", "tmp"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        for f in [
            "etc/resolv.conf",
            "etc/machine-id",
            "var/log/apt/history.log",
            "dev/null",
            "etc/passwd",
        ] {
            std::fs::write(r.join(f), b"x").unwrap();
        }
        clean(r).unwrap();
        assert!(!r.join("etc/resolv.conf").exists());
        assert!(!r.join("etc/apt/sources.list.d").exists());
        assert!(r.join("var/log").is_dir() && !r.join("var/log/apt").exists());
        assert!(r.join("dev").is_dir() && !r.join("dev/null").exists());
        assert_eq!(std::fs::read(r.join("etc/machine-id")).unwrap(), b"");
        assert_eq!(std::fs::read(r.join("etc/passwd")).unwrap(), b"x");
    }
}
