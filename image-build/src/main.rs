//! `dstack-image-build`: lock, fetch and build the dstack guest image.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use dstack_image_build::fetch::DebCache;
use dstack_image_build::image::{self, BuildOptions, Metadata};
use dstack_image_build::lock::{Lock, Set, wanted_requests};
use dstack_image_build::{cache_root, default_lock_path, resolve, source_date_epoch};

#[derive(Parser)]
#[command(about = "Reproducible dstack guest image from pinned Debian packages")]
struct Cli {
    /// The lock file (default: image-build/debian.lock in the source tree).
    #[arg(long, global = true)]
    lock: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the lock file against the wanted package sets; with --update, re-resolve it against the mirror.
    Lock {
        #[arg(long)]
        update: bool,
    },
    /// Download every locked package (or one set) and verify it against the lock.
    Fetch {
        #[arg(long, value_parser = parse_set)]
        set: Option<Set>,
    },
    /// Build the image directory (firmware, kernel, initramfs, rootfs, metadata, checksums).
    Build {
        /// The binary to install as /init (guest-init).
        #[arg(long)]
        init: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Skip the root filesystem (kernel + initramfs + firmware only).
        #[arg(long)]
        no_rootfs: bool,
        /// Leave out the netfilter/bridge modules Docker needs.
        #[arg(long)]
        no_docker_modules: bool,
        /// Extra modules to include (comma-separated).
        #[arg(long, value_delimiter = ',')]
        modules: Vec<String>,
    },
    /// Rebuild DIR from the lock (same init, options and SOURCE_DATE_EPOCH) and compare every file.
    Verify {
        dir: PathBuf,
        /// The binary DIR was built with as /init (checked against metadata.json).
        #[arg(long)]
        init: PathBuf,
    },
}

fn parse_set(s: &str) -> Result<Set, String> {
    Set::ALL
        .into_iter()
        .find(|set| set.name() == s)
        .ok_or_else(|| format!("unknown set {s:?} (kernel, firmware, rootfs)"))
}

fn read_lock(path: &Path) -> Result<Lock> {
    let lock = Lock::read(path)?;
    lock.check_matches(&wanted_requests())?;
    Ok(lock)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let lock_path = cli.lock.unwrap_or_else(default_lock_path);
    let cache = cache_root();
    match cli.command {
        Command::Lock { update: false } => {
            let lock = read_lock(&lock_path)?;
            for set in Set::ALL {
                let debs: Vec<_> = lock.set(set).collect();
                let size: u64 = debs.iter().map(|d| d.size).sum();
                println!("{set}: {} packages, {:.1} MiB", debs.len(), size as f64 / 1048576.0);
            }
        }
        Command::Lock { update: true } => {
            let start = Instant::now();
            let lock = resolve::resolve(
                &wanted_requests(),
                &cache.join("apt"),
                &cache.join("image-build/resolve"),
            )?;
            std::fs::write(&lock_path, lock.render()).with_context(|| format!("writing {}", lock_path.display()))?;
            eprintln!(
                "lock: wrote {} packages to {} in {:.1} s",
                lock.debs.len(),
                lock_path.display(),
                start.elapsed().as_secs_f64()
            );
        }
        Command::Fetch { set } => {
            let lock = read_lock(&lock_path)?;
            let debs: Vec<_> = lock
                .debs
                .iter()
                .filter(|d| set.is_none_or(|s| d.set == s))
                .cloned()
                .collect();
            DebCache::new(&cache)?.fetch_all(&debs)?;
        }
        Command::Build {
            init,
            out,
            no_rootfs,
            no_docker_modules,
            modules,
        } => {
            let lock = read_lock(&lock_path)?;
            let opts = BuildOptions {
                init,
                out,
                epoch: source_date_epoch()?,
                docker_modules: !no_docker_modules,
                extra_modules: modules,
                with_rootfs: !no_rootfs,
            };
            let start = Instant::now();
            let hash = image::build_image(&lock, &cache, &opts)?;
            eprintln!("build: done in {:.1} s", start.elapsed().as_secs_f64());
            println!("os_image_hash {hash}");
        }
        Command::Verify { dir, init } => {
            let lock = read_lock(&lock_path)?;
            let text = std::fs::read_to_string(dir.join("metadata.json")).context("reading metadata.json")?;
            let meta: Metadata = serde_json::from_str(&text).context("parsing metadata.json")?;
            let rebuilt = dir.with_extension(format!("verify-{}", std::process::id()));
            let opts = BuildOptions {
                init,
                out: rebuilt.clone(),
                epoch: meta.build.source_date_epoch,
                docker_modules: false,
                // The recorded module list (selection is idempotent: dependencies are already in it).
                extra_modules: meta.build.initramfs_modules.clone(),
                with_rootfs: meta.rootfs.is_some(),
            };
            image::build_image(&lock, &cache, &opts)?;
            let differ = image::compare_dirs(&dir, &rebuilt)?;
            if !differ.is_empty() {
                bail!(
                    "rebuild in {} differs from {}: {differ:?}",
                    rebuilt.display(),
                    dir.display()
                );
            }
            std::fs::remove_dir_all(&rebuilt).ok();
            println!("verify: {} rebuilt byte-identically", dir.display());
        }
    }
    Ok(())
}
