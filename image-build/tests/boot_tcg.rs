//! Boots the locked kernel with our initramfs under QEMU TCG and checks what the init saw.
//!
//! External inputs:
//! - `DSTACK_TEST_QEMU` = path to `qemu-system-x86_64` (Debian `qemu-system-x86`); else it is looked up on
//!   PATH;
//! - the locked kernel (fetched through apt into `$DSTACK_CACHE_DIR`) and `rustc` + `libc6-dev` for the
//!   static test init (see `common/mod.rs`).
//!
//! Missing inputs: loud SKIP, or failure under `DSTACK_REQUIRE_FIXTURES=1`.

mod common;

use std::time::{Duration, Instant};

use dstack_image_build::boot::{BOOT_MODULES, DOCKER_MODULES, build_initramfs};

const TEST: &str = "boot_tcg";
/// The budget for boot-to-marker under TCG; the kill timeout is more generous so a slow machine reports
/// the time instead of a bare timeout.
const BUDGET: Duration = Duration::from_secs(60);
const KILL_AFTER: Duration = Duration::from_secs(120);

#[test]
fn locked_kernel_boots_initramfs_under_tcg() {
    let Some(qemu) = common::qemu(TEST) else {
        return;
    };
    let lock = common::lock();
    let Some(kernel) = common::kernel(TEST, &lock, &dstack_image_build::cache_root()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(init) = common::smoke_init(TEST, dir.path()) else {
        return;
    };
    let wanted: Vec<&str> = BOOT_MODULES.iter().chain(DOCKER_MODULES).copied().collect();
    let start = Instant::now();
    let initramfs = build_initramfs(&kernel, &std::fs::read(&init).unwrap(), &wanted, 0).unwrap();
    eprintln!(
        "initramfs: {} bytes, built in {:?}",
        initramfs.bytes.len(),
        start.elapsed()
    );
    let initrd = dir.path().join("initramfs.cpio.gz");
    std::fs::write(&initrd, &initramfs.bytes).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    let boot = common::boot(
        &qemu,
        &kernel.vmlinuz,
        &initrd,
        "console=ttyS0 panic=-1",
        &disk,
        KILL_AFTER,
    );
    let smoke = boot.smoke();
    eprintln!("TCG boot to power-off: {:?}\n{}", boot.elapsed, smoke.join("\n"));
    assert!(
        boot.exited,
        "qemu did not exit within {KILL_AFTER:?}; serial tail:\n{}",
        boot.tail()
    );
    assert!(
        smoke.contains(&"SMOKE: DSTACK-INITRAMFS-OK"),
        "no marker; serial tail:\n{}",
        boot.tail()
    );
    assert!(
        smoke.contains(&format!("SMOKE: kernel={}", kernel.version).as_str()),
        "wrong kernel; {smoke:?}"
    );
    // Every module loads except tdx-guest, which refuses (ENODEV) outside a TD.
    let failures: Vec<&&str> = smoke.iter().filter(|l| l.starts_with("SMOKE: load ")).collect();
    assert!(
        failures
            .iter()
            .all(|l| l.contains("tdx-guest.ko") && l.contains("No such device")),
        "unexpected module failures: {failures:?}"
    );
    let loaded = format!(
        "SMOKE: modules loaded={} failed={}",
        initramfs.modules.len() - failures.len(),
        failures.len()
    );
    assert!(smoke.contains(&loaded.as_str()), "expected {loaded:?} in {smoke:?}");
    // The drivers bound to the devices QEMU gave the guest.
    assert!(
        smoke.contains(&"SMOKE: vda=true virtio_rng_bound=true vsock=true"),
        "devices not bound: {smoke:?}"
    );
    assert!(smoke.contains(&"SMOKE: rootfs none"), "{smoke:?}");
    assert!(
        boot.elapsed < BUDGET,
        "TCG boot took {:?}, budget {BUDGET:?}",
        boot.elapsed
    );
}
