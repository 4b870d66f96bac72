//! The whole image: built twice (different directories and filesystems, a moment apart) it must be byte-identical, and
//! booted under TCG the smoke init must open the rootfs through dm-verity with the root hash from the
//! measured command line — and must fail to read it once a single byte of the image is flipped.
//!
//! External inputs (loud SKIP when missing, failure under `DSTACK_REQUIRE_FIXTURES=1`): the locked packages
//! (fetched through apt into `$DSTACK_CACHE_DIR`), `mmdebstrap`, `mkfs.erofs` (erofs-utils), `veritysetup`
//! (cryptsetup-bin), root (mmdebstrap's root mode), QEMU (`DSTACK_TEST_QEMU` or PATH; qemu-system-x86),
//! `rustc` + `libc6-dev`. Takes ~3 minutes.

mod common;

use std::time::{Duration, Instant};

use dstack_image_build::image::{BuildOptions, Metadata, build_image, compare_dirs};

const TEST: &str = "image_full";
const KILL_AFTER: Duration = Duration::from_secs(120);

#[test]
fn full_image_is_reproducible_and_its_verity_rootfs_boots() {
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.erofs", "erofs-utils"),
        ("veritysetup", "cryptsetup-bin"),
    ] {
        if !common::have_tool(TEST, tool, package) {
            return;
        }
    }
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref().ok() != Some("0") {
        common::skip(TEST, "mmdebstrap's root mode needs root");
        return;
    }
    let Some(qemu) = common::qemu(TEST) else {
        return;
    };
    let lock = common::lock();
    let cache = dstack_image_build::cache_root();
    if common::kernel(TEST, &lock, &cache).is_none() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let Some(init) = common::smoke_init(TEST, scratch.path()) else {
        return;
    };
    let opts = |out| BuildOptions {
        init: init.clone(),
        out,
        epoch: 1_700_000_000,
        docker_modules: true,
        extra_modules: vec![],
        with_rootfs: true,
    };
    // The second build goes to tmpfs when there is one: a different filesystem lists directories in a
    // different order (ext4 hashes names, tmpfs lists newest first), which the build must not depend on.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let start = Instant::now();
    let hash_a = build_image(&lock, &cache, &opts(a.path().join("image"))).unwrap();
    eprintln!("first build: {:?}", start.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    let hash_b = build_image(&lock, &cache, &opts(b.path().join("image"))).unwrap();
    eprintln!("second build: {:?}", start.elapsed());
    let (a, b) = (a.path().join("image"), b.path().join("image"));
    assert_eq!(compare_dirs(&a, &b).unwrap(), Vec::<String>::new(), "builds differ");
    assert_eq!(hash_a, hash_b);
    // os_image_hash = sha256(sha256sum.txt), cross-checked with GNU coreutils.
    let out = std::process::Command::new("sha256sum")
        .arg(a.join("sha256sum.txt"))
        .output()
        .unwrap();
    let coreutils = String::from_utf8_lossy(&out.stdout);
    assert_eq!(coreutils.split_whitespace().next(), Some(hash_a.as_str()));
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "--quiet", "sha256sum.txt"])
        .current_dir(&a)
        .status();
    assert!(check.unwrap().success(), "sha256sum -c sha256sum.txt failed");

    let meta: Metadata = serde_json::from_str(&std::fs::read_to_string(a.join("metadata.json")).unwrap()).unwrap();
    assert!(
        meta.cmdline
            .contains(&format!("dstack.rootfs_hash={}", meta.rootfs_hash.clone().unwrap()))
    );
    // The measured cmdline has panic=1: with -no-reboot QEMU exits either way.
    let rootfs = a.join(meta.rootfs.clone().unwrap());
    let boot = common::boot(
        &qemu,
        &a.join("bzImage"),
        &a.join("initramfs.cpio.gz"),
        &meta.cmdline,
        &rootfs,
        KILL_AFTER,
    );
    let smoke = boot.smoke();
    eprintln!("TCG boot with verity rootfs: {:?}\n{}", boot.elapsed, smoke.join("\n"));
    assert!(
        smoke
            .iter()
            .any(|l| l.starts_with("SMOKE: rootfs debian=13.") && l.ends_with("dockerd=true")),
        "rootfs not mounted; serial tail:\n{}",
        boot.tail()
    );

    // Flip one byte of the erofs superblock (offset 1024): dm-verity must refuse the read.
    let mut bytes = std::fs::read(&rootfs).unwrap();
    bytes[1024 + 8] ^= 0x01;
    let tampered = scratch.path().join("tampered.img");
    std::fs::write(&tampered, bytes).unwrap();
    let boot = common::boot(
        &qemu,
        &a.join("bzImage"),
        &a.join("initramfs.cpio.gz"),
        &meta.cmdline,
        &tampered,
        KILL_AFTER,
    );
    let smoke = boot.smoke();
    assert!(
        smoke
            .iter()
            .any(|l| l.starts_with("SMOKE: rootfs error mount: Input/output error")),
        "tampered rootfs was not rejected; {smoke:?}\n{}",
        boot.tail()
    );
    assert!(boot.serial.contains("verity"), "no dm-verity complaint in the log");
}
