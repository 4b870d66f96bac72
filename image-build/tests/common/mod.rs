//! Shared helpers for the image-build integration tests.
//!
//! Inputs: the locked kernel packages, fetched through the host's apt mirror into `$DSTACK_CACHE_DIR`
//! (default `/var/cache/dstack-rs`) on first use; `rustc` with glibc's static libraries (Debian `libc6-dev`)
//! to build the test init. When an input is missing the test prints a loud SKIP and passes, unless
//! `DSTACK_REQUIRE_FIXTURES=1`, where it fails.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dstack_image_build::boot::{Kernel, prepare_kernel};
use dstack_image_build::lock::{Lock, wanted_requests};

/// Skips (loudly) or, under `DSTACK_REQUIRE_FIXTURES=1`, fails.
pub fn skip(test: &str, why: &str) {
    if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
        panic!("{test}: {why} (DSTACK_REQUIRE_FIXTURES=1)");
    }
    // Raw stderr so the notice survives the harness's output capture.
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

pub fn lock() -> Lock {
    let lock = Lock::read(&dstack_image_build::default_lock_path()).expect("reading debian.lock");
    lock.check_matches(&wanted_requests())
        .expect("debian.lock matches the wanted sets");
    lock
}

/// The locked kernel, fetched and extracted into `cache_root`; None (after a skip notice) when unavailable.
pub fn kernel(test: &str, lock: &Lock, cache_root: &Path) -> Option<Kernel> {
    match prepare_kernel(lock, cache_root) {
        Ok(k) => Some(k),
        Err(e) => {
            skip(test, &format!("cannot fetch the locked kernel through apt: {e}"));
            None
        }
    }
}

/// Compiles `tests/fixtures/smoke_init.rs` into a static x86_64 binary in `dir`.
pub fn smoke_init(test: &str, dir: &Path) -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smoke_init.rs");
    let out = dir.join("init");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let result = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "-C",
            "opt-level=1",
            "-C",
            "strip=symbols",
            "-C",
            "target-feature=+crt-static",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu", "-o"])
        .arg(&out)
        .arg(&src)
        .output();
    match result {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            skip(
                test,
                &format!(
                    "rustc could not build a static init (is libc6-dev installed?): {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
            );
            None
        }
        Err(e) => {
            skip(test, &format!("cannot run rustc: {e}"));
            None
        }
    }
}

/// `DSTACK_TEST_QEMU`, else `qemu-system-x86_64` on PATH.
pub fn qemu(test: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DSTACK_TEST_QEMU")
        && !p.is_empty()
    {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip(
            test,
            "qemu-system-x86_64 not found (set DSTACK_TEST_QEMU; Debian package qemu-system-x86)",
        );
    }
    found
}

/// Whether `tool` runs (`tool --version` or `--help` exits successfully).
pub fn have_tool(test: &str, tool: &str, package: &str) -> bool {
    let ok = ["--version", "--help"].iter().any(|a| {
        Command::new(tool)
            .arg(a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        skip(test, &format!("{tool} not found (Debian package {package})"));
    }
    ok
}

/// What a TCG run printed.
pub struct Boot {
    pub elapsed: Duration,
    /// False when QEMU had to be killed.
    pub exited: bool,
    pub serial: String,
}

impl Boot {
    /// The smoke init's `SMOKE: ` lines.
    pub fn smoke(&self) -> Vec<&str> {
        self.serial.lines().filter(|l| l.starts_with("SMOKE: ")).collect()
    }

    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.serial.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Boots under QEMU TCG (1 vCPU, 512 MiB, virtio-rng, `disk` as a read-only virtio disk), killing QEMU
/// after `kill_after`.
pub fn boot(qemu: &Path, kernel: &Path, initrd: &Path, cmdline: &str, disk: &Path, kill_after: Duration) -> Boot {
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .args(["-device", "virtio-rng-pci"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw,readonly=on", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let exited = loop {
        if child.try_wait().expect("waiting for qemu").is_some() {
            break true;
        }
        if start.elapsed() > kill_after {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    Boot {
        elapsed,
        exited,
        serial: reader.join().unwrap_or_default(),
    }
}
