//! The tamper matrix: a host that changes what the CVM boots or is given must not get the app's keys, and
//! the app's data must survive untouched. One KMS (simulated quotes accepted under the pinned root, OS
//! image verification on, its image cache holding only the published image) serves every case.
//!
//! - modified kernel, initrd or command line (the host also rewrites `sha256sum.txt` so the image looks
//!   consistent) → a different `os_image_hash` the KMS does not know, or registers that do not match it →
//!   no key;
//! - a flipped rootfs block → dm-verity refuses it → the boot stops before asking for keys;
//! - a flipped byte in the encrypted env → the env does not decrypt → the boot stops, nothing started;
//! - a modified app-compose → the app id stays pinned and the dev policy allows the change (an upgrade;
//!   webhook and on-chain policies restrict compose hashes), but the new compose hash is measured: verifying
//!   the CVM against the deployed compose fails on exactly that event;
//! - a KMS restart → the unmodified CVM restarts with the same keys (its disk reopens).
//!
//! Inputs: as `full_stack.rs` (the `dstack_e2e` crate docs). Each case boots a CVM under TCG; most stop at
//! the key request. About 4 minutes here.

use std::path::Path;
use std::time::Duration;

use dstack_e2e::stack::{AppSpec, free_port, http_get, tail};
use dstack_e2e::{Inputs, KmsOptions, Stack, verify_cvm};
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Copies the image directory `src` to `images/<name>` (regular files, so they can be modified).
fn copy_image(src: &Path, images: &Path, name: &str) -> std::path::PathBuf {
    let dst = images.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Rewrites `sha256sum.txt` (and `os_image_hash`) for the files as they are now: what a host that wants
/// its modified image to look consistent would do.
fn reseal(dir: &Path) {
    let sums = std::fs::read_to_string(dir.join("sha256sum.txt")).unwrap();
    let mut out = String::new();
    for line in sums.lines() {
        let (_, name) = line.split_once("  ").unwrap();
        let digest = Sha256::digest(std::fs::read(dir.join(name)).unwrap());
        out.push_str(&format!("{}  {name}\n", hex::encode(digest)));
    }
    std::fs::write(dir.join("sha256sum.txt"), &out).unwrap();
    std::fs::write(dir.join("os_image_hash"), hex::encode(Sha256::digest(out.as_bytes()))).unwrap();
}

fn flip(path: &Path, offset: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[offset] ^= 0x55;
    std::fs::write(path, data).unwrap();
}

fn app(stack: &Stack, image: &str) -> AppSpec {
    let mut app = AppSpec::demo(&stack.app_image, "secret greeting", free_port().unwrap());
    app.vcpus = 1;
    app.memory_mb = 2048;
    app.image = image.into();
    app
}

/// Deploys `app` and returns the guest's boot error; asserts no key was released and the app never ran.
async fn refused(stack: &Stack, app: &AppSpec, case: &str) -> String {
    let id = stack.deploy(app).await.unwrap();
    let err = stack.wait_boot_error(&id, BOOT_TIMEOUT).await.unwrap();
    let log = stack.serial_log(&id);
    eprintln!("{case}: boot error: {err}");
    assert!(
        !log.contains("LUKS2 formatted") && !log.contains("existing LUKS volume"),
        "{case}: {}",
        tail(&log, 30)
    );
    assert!(http_get(app.host_port, "/").is_err(), "{case}: the app must not run");
    stack.stop(&id).await.unwrap();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_boot_inputs_and_config_get_no_keys_and_lose_no_data() {
    let Some(inputs) = Inputs::for_test("tamper") else {
        return;
    };
    let original = inputs.image_dir.clone();
    let measurements = original.join("measurements.json");
    let dir = tempfile::tempdir().unwrap();
    let mut stack = Stack::start(dir.path(), inputs, KmsOptions::default()).await.unwrap();
    let images = dir.path().join("images");

    // Kernel: trailing bytes keep it bootable but change what is measured (MRTD/RTMR1 and the hash).
    let kernel = copy_image(&original, &images, "tampered-kernel");
    let mut k = std::fs::read(kernel.join("bzImage")).unwrap();
    k.extend_from_slice(&[0u8; 4096]);
    std::fs::write(kernel.join("bzImage"), k).unwrap();
    reseal(&kernel);
    let err = refused(&stack, &app(&stack, "tampered-kernel"), "kernel").await;
    assert!(err.contains("OS image"), "{err}");

    // Command line: one more word (RTMR2), claiming the published os_image_hash (not resealed).
    let cmdline = copy_image(&original, &images, "tampered-cmdline");
    let meta_path = cmdline.join("metadata.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let c = format!("{} quiet", meta["cmdline"].as_str().unwrap());
    meta["cmdline"] = c.into();
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    let err = refused(&stack, &app(&stack, "tampered-cmdline"), "cmdline").await;
    assert!(err.contains("OS image") || err.contains("rtmr"), "{err}");

    // Rootfs: a flipped byte in the erofs superblock; dm-verity refuses the block before anything runs.
    let rootfs = copy_image(&original, &images, "tampered-rootfs");
    flip(&rootfs.join("rootfs.erofs.verity"), 1024 + 8);
    let mut a = app(&stack, "tampered-rootfs");
    a.name = "rootfs".into();
    let id = stack.deploy(&a).await.unwrap();
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let log = stack.serial_log(&id);
        if log.contains("powering off") || log.contains("verified rootfs") {
            assert!(!log.contains("requesting app keys"), "{}", tail(&log, 30));
            assert!(
                log.contains("verified rootfs") || log.contains("verity"),
                "{}",
                tail(&log, 30)
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rootfs case: {}", tail(&log, 30));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack.stop(&id).await.unwrap();

    // The genuine app boots, formats its disk and answers; then the host tampers with its inputs.
    let good = app(&stack, dstack_e2e::stack::IMAGE_NAME);
    let id = stack.deploy(&good).await.unwrap();
    stack.wait_app(&id, good.host_port, BOOT_TIMEOUT, |_| {}).await.unwrap();
    stack.stop(&id).await.unwrap();
    let shared = dir.path().join("run/vm").join(&id).join("shared");
    let disk = dir.path().join("run/vm").join(&id).join("hda.img");
    // The LUKS2 header and key slots live in the first 16 MiB: the boots below must not write there.
    let header = |p: &Path| Sha256::digest(&std::fs::read(p).unwrap()[..16 << 20]);
    let header_before = header(&disk);

    // Env blob: one flipped byte → authenticated decryption fails, nothing starts.
    let env_path = shared.join(".encrypted-env");
    let env = std::fs::read(&env_path).unwrap();
    flip(&env_path, env.len() - 1);
    let log_path = dir.path().join("run/vm").join(&id).join("serial.log");
    std::fs::write(&log_path, b"").unwrap();
    stack.start_vm(&id).await.unwrap();
    let err = stack.wait_boot_error(&id, BOOT_TIMEOUT).await.unwrap();
    eprintln!("env: boot error: {err}");
    assert!(err.contains("env"), "{err}");
    assert!(http_get(good.host_port, "/").is_err());
    stack.stop(&id).await.unwrap();
    std::fs::write(&env_path, &env).unwrap();

    // App-compose: the app id is pinned after the first boot, and the dev policy lets an app change its
    // compose (an upgrade; webhook and on-chain policies restrict it). So the CVM starts, but with the new
    // compose hash measured into RTMR3: a relying party that expects the deployed compose refuses it.
    let compose_path = shared.join("app-compose.json");
    let compose = std::fs::read_to_string(&compose_path).unwrap();
    let evil = compose.replace("\"demo\"", "\"evil\"");
    assert_ne!(evil, compose);
    std::fs::write(&compose_path, &evil).unwrap();
    std::fs::write(&log_path, b"").unwrap();
    stack.start_vm(&id).await.unwrap();
    stack.wait_app(&id, good.host_port, BOOT_TIMEOUT, |_| {}).await.unwrap();
    let verdict = verify_cvm(good.host_port, &measurements, &stack.sim_root(), &good.app_compose()).unwrap();
    eprintln!("compose: {}", verdict.report());
    assert!(!verdict.ok(), "a changed compose must not verify as the deployed one");
    let failed: Vec<&str> = verdict
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.what.as_str())
        .collect();
    assert_eq!(failed, ["compose-hash event"], "{}", verdict.report());
    let log = stack.serial_log(&id);
    assert!(
        !log.contains("formatting"),
        "an existing disk is never reformatted:\n{}",
        tail(&log, 30)
    );
    stack.stop(&id).await.unwrap();
    std::fs::write(&compose_path, &compose).unwrap();
    assert_eq!(header(&disk), header_before, "the LUKS header must be left alone");

    // KMS restart: same key material on disk → the genuine CVM gets the same keys and reopens its disk.
    stack.start_kms(KmsOptions::default()).await.unwrap();
    std::fs::write(&log_path, b"").unwrap();
    stack.start_vm(&id).await.unwrap();
    let page = stack.wait_app(&id, good.host_port, BOOT_TIMEOUT, |_| {}).await.unwrap();
    assert!(page.contains("secret greeting"), "{page}");
    let log = stack.serial_log(&id);
    assert!(log.contains("existing LUKS volume"), "{}", tail(&log, 30));
}
