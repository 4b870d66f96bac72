//! Builds the initramfs twice — from separately extracted kernel trees in different directories, a second
//! apart — and requires identical bytes; a different SOURCE_DATE_EPOCH must change them.
//!
//! External inputs: the locked kernel (fetched through apt) and `rustc` + `libc6-dev` (see `common/mod.rs`).

mod common;

use dstack_image_build::boot::{BOOT_MODULES, DOCKER_MODULES, build_initramfs};
use dstack_image_build::lock::Set;

const TEST: &str = "reproducible";

#[test]
fn initramfs_is_byte_identical_across_builds() {
    let lock = common::lock();
    let cache = dstack_image_build::cache_root();
    let Some(first_kernel) = common::kernel(TEST, &lock, &cache) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(init) = common::smoke_init(TEST, dir.path()) else {
        return;
    };
    let init = std::fs::read(init).unwrap();
    let wanted: Vec<&str> = BOOT_MODULES.iter().chain(DOCKER_MODULES).copied().collect();
    let first = build_initramfs(&first_kernel, &init, &wanted, 1_700_000_000).unwrap();

    // A second cache root: the verified debs are copied (no network), extraction happens afresh elsewhere.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let other = tempfile::tempdir().unwrap();
    let debs = other.path().join("image-build/debs");
    std::fs::create_dir_all(&debs).unwrap();
    for d in lock.set(Set::Kernel) {
        std::fs::copy(
            cache.join("image-build/debs").join(d.file_name()),
            debs.join(d.file_name()),
        )
        .unwrap();
    }
    let second_kernel = common::kernel(TEST, &lock, other.path()).expect("kernel from the copied cache");
    assert_ne!(first_kernel.modules_root, second_kernel.modules_root);
    let second = build_initramfs(&second_kernel, &init, &wanted, 1_700_000_000).unwrap();
    assert_eq!(first.modules, second.modules);
    assert!(first.bytes == second.bytes, "initramfs differs between two builds");

    let shifted = build_initramfs(&second_kernel, &init, &wanted, 1_700_000_001).unwrap();
    assert!(shifted.bytes != first.bytes, "SOURCE_DATE_EPOCH must reach the archive");
}
