//! OS image verification (`[core.image] verify = true`) and `Admin.ClearImageCache`.
//!
//! The expected registers come from the KMS's measurement cache (`measurements/<config_hash>.json`), seeded here
//! with the simulated CVM's own MRTD/RTMR0-2 (read from the module, independently of the KMS), or from an image
//! directory the KMS re-hashes and predicts.
//!
//! Optional external inputs for the prediction path (loud SKIP when unset, failure under
//! `DSTACK_REQUIRE_FIXTURES=1`): `DSTACK_TEST_OVMF` = a TDX-capable OVMF.fd (e.g. Debian trixie's
//! `/usr/share/ovmf/OVMF.fd` from package `ovmf` 2025.02) and `DSTACK_TEST_KERNEL` = a bzImage (e.g. Debian's
//! `/boot/vmlinuz-*`).

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use dstack_kms::Kms;
use dstack_kms::image::config_hash;
use dstack_measurements::published::{MEASUREMENTS_VERSION, MeasurementsJson, ShapeMeasurements};
use dstack_rpc::Client;
use dstack_rpc::kms::{AdminClient, ClearImageCacheRequest, GetAppKeyRequest};
use dstack_sim_tdx::SimTdx;
use tokio::net::TcpListener;

const APP: [u8; 20] = [0xa1; 20];
const INSTANCE: [u8; 20] = [0x1d; 20];
const GOOD: [u8; 32] = [0x60; 32];
const TAMPERED: [u8; 32] = [0x61; 32];
const UNCACHED: [u8; 32] = [0x62; 32];
const MISFILED: [u8; 32] = [0x63; 32];
const TOKEN: &str = "admin-secret-token";
const MEM: u64 = 2 << 30;

fn vm_config(image: &[u8; 32], cpus: u32) -> String {
    format!(
        r#"{{"os_image_hash":"{}","cpu_count":{cpus},"memory_size":{MEM}}}"#,
        hex::encode(image)
    )
}

/// Writes the measurement cache entry for (image, cpus, MEM) with the given registers.
fn seed(cache: &Path, image: &[u8; 32], cpus: u32, regs: [[u8; 48]; 4]) {
    let m = MeasurementsJson {
        version: MEASUREMENTS_VERSION,
        image: None,
        os_image_hash: hex::encode(image),
        inputs: Default::default(),
        shapes: vec![ShapeMeasurements {
            vcpus: cpus,
            memory_mb: MEM >> 20,
            mrtd: hex::encode(regs[0]),
            rtmr0: hex::encode(regs[1]),
            rtmr1: hex::encode(regs[2]),
            rtmr2: hex::encode(regs[3]),
        }],
    };
    let dir = cache.join("measurements");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", config_hash(image, cpus, MEM))),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
}

fn registers(sim: &SimTdx) -> [[u8; 48]; 4] {
    let r = sim.registers();
    [r.mrtd, r.rtmr[0], r.rtmr[1], r.rtmr[2]]
}

#[tokio::test]
async fn image_verification_and_clear_image_cache() {
    let (dir, certs) = tempdir();
    let cache = dir.path().join("images-cache");
    let ktee = kms_tee(dir.path()).await;
    let app_sim = cvm(APP, INSTANCE);
    let mut cfg = config(&certs, vec![write_pin(dir.path(), "cvm.pem", &app_sim)], true, None);
    cfg.core.image.verify = true;
    cfg.core.image.cache_dir = cache.clone();
    cfg.core.admin.auth_token = TOKEN.into();
    let kms = Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap();
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let admin = kms
        .start_admin(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let admin_url = format!("http://{}/prpc", admin.addr);

    let good = registers(&app_sim);
    seed(&cache, &GOOD, 1, good);
    let mut tampered = good;
    tampered[2][0] ^= 1; // RTMR1: another kernel
    seed(&cache, &TAMPERED, 1, tampered);
    // An image directory whose files hash to something else than its name.
    let misfiled = cache.join("images").join(hex::encode(MISFILED));
    std::fs::create_dir_all(&misfiled).unwrap();
    std::fs::write(
        misfiled.join("metadata.json"),
        r#"{"bios":"fw","kernel":"k","initrd":"i","cmdline":"console=ttyS0"}"#,
    )
    .unwrap();
    let mut sums = String::new();
    for (name, data) in [("fw", &b"firmware"[..]), ("k", b"kernel"), ("i", b"initrd")] {
        std::fs::write(misfiled.join(name), data).unwrap();
        use sha2::Digest;
        sums += &format!("{}  {name}\n", hex::encode(sha2::Sha256::digest(data)));
    }
    std::fs::write(misfiled.join("sha256sum.txt"), sums).unwrap();

    let get = |cfg: String| {
        let (cert, key) = client_cert(&app_sim, |_| {});
        let c = client(&handle, &certs, &ktee.sim, Some((cert, &key)));
        async move {
            c.get_app_key(GetAppKeyRequest {
                api_version: 1,
                vm_config: cfg,
            })
            .await
        }
    };
    let refused = |r: Result<dstack_rpc::kms::AppKeyResponse, dstack_rpc::RpcError>, what: &[&str]| {
        let e = r.unwrap_err().to_string();
        eprintln!("refused: {e}");
        assert!(e.contains("denied by OS image verification"), "{e}");
        for w in what {
            assert!(e.contains(w), "expected {w:?} in {e}");
        }
    };

    // The quote matches the image's registers for this shape.
    let ok = get(vm_config(&GOOD, 1)).await.unwrap();
    assert_eq!(ok.os_image_hash, GOOD.to_vec());
    // Same image, another shape: nothing predicted and no image files → refused.
    refused(get(vm_config(&GOOD, 2)).await, &["not in the image cache"]);
    refused(
        get(vm_config(&TAMPERED, 1)).await,
        &["RTMR1", &hex::encode(tampered[2])],
    );
    refused(
        get(vm_config(&UNCACHED, 1)).await,
        &["not in the image cache", &hex::encode(UNCACHED)],
    );
    refused(get(vm_config(&MISFILED, 1)).await, &["hash to"]);
    refused(
        get(r#"{"cpu_count":1,"memory_size":1}"#.into()).await,
        &["no os_image_hash"],
    );
    refused(get(String::new()).await, &["empty"]);

    // Admin.ClearImageCache: a token is required.
    let no_token = AdminClient::new(Client::new(&admin_url).unwrap());
    let wrong = AdminClient::new(Client::new(&admin_url).unwrap().with_bearer_token("nope").unwrap());
    let right = AdminClient::new(Client::new(&admin_url).unwrap().with_bearer_token(TOKEN).unwrap());
    let clear_good = ClearImageCacheRequest {
        image_hash: String::new(),
        config_hash: config_hash(&GOOD, 1, MEM),
    };
    for c in [&no_token, &wrong] {
        let e = c.clear_image_cache(clear_good.clone()).await.unwrap_err().to_string();
        assert!(e.contains("bearer token"), "{e}");
    }
    get(vm_config(&GOOD, 1)).await.unwrap();
    let e = right
        .clear_image_cache(ClearImageCacheRequest {
            image_hash: "../../etc".into(),
            config_hash: String::new(),
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid cache key"), "{e}");
    right.clear_image_cache(clear_good).await.unwrap();
    // The prediction is gone (from disk and memory): refused until the image is cached again.
    refused(get(vm_config(&GOOD, 1)).await, &["not in the image cache"]);
    right
        .clear_image_cache(ClearImageCacheRequest {
            image_hash: hex::encode(MISFILED),
            config_hash: "all".into(),
        })
        .await
        .unwrap();
    assert!(!misfiled.exists());
    assert!(!cache.join("measurements").exists());
    refused(get(vm_config(&MISFILED, 1)).await, &["not in the image cache"]);

    handle.shutdown().await.unwrap();
    admin.shutdown().await.unwrap();
}

/// The prediction path: the KMS re-hashes an image directory, predicts MRTD/RTMR0-2 for the CVM's shape with the
/// measurements crate and caches the result. The CVM's simulated module boots from the same prediction's event
/// log (what host-vmm does), so a match shows the plumbing; a different shape must be refused.
#[tokio::test]
async fn prediction_from_an_image_directory() {
    let (Some(ovmf), Some(kernel)) = (
        std::env::var_os("DSTACK_TEST_OVMF"),
        std::env::var_os("DSTACK_TEST_KERNEL"),
    ) else {
        assert!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() != Ok("1"),
            "DSTACK_TEST_OVMF / DSTACK_TEST_KERNEL are not set but DSTACK_REQUIRE_FIXTURES=1"
        );
        eprintln!(
            "!!! SKIP: DSTACK_TEST_OVMF and DSTACK_TEST_KERNEL are not set; image prediction test did not run !!!"
        );
        return;
    };
    let (dir, certs) = tempdir();
    let cache = dir.path().join("images-cache");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(&ovmf, staging.join("ovmf.fd")).unwrap();
    std::fs::copy(&kernel, staging.join("bzImage")).unwrap();
    std::fs::write(staging.join("initrd.img"), b"not really an initramfs").unwrap();
    std::fs::write(
        staging.join("metadata.json"),
        r#"{"bios":"ovmf.fd","kernel":"bzImage","initrd":"initrd.img","cmdline":"console=ttyS0"}"#,
    )
    .unwrap();
    let mut sums = String::new();
    for name in ["ovmf.fd", "bzImage", "initrd.img", "metadata.json"] {
        use sha2::Digest;
        sums += &format!(
            "{}  {name}\n",
            hex::encode(sha2::Sha256::digest(std::fs::read(staging.join(name)).unwrap()))
        );
    }
    std::fs::write(staging.join("sha256sum.txt"), &sums).unwrap();
    let os_image_hash: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(sums.as_bytes()).into()
    };
    let files = dstack_measurements::predict::image::ImageFiles::load(&staging).unwrap();
    let shape = dstack_measurements::predict::VmShape {
        vcpus: 1,
        memory_bytes: MEM,
    };
    let prediction = match files.predict(&shape) {
        Ok(p) => p,
        Err(e) => panic!("DSTACK_TEST_OVMF / DSTACK_TEST_KERNEL cannot be predicted: {e}"),
    };
    std::fs::create_dir_all(cache.join("images")).unwrap();
    std::fs::rename(&staging, cache.join("images").join(hex::encode(os_image_hash))).unwrap();

    // A CVM booted from the prediction (MRTD + predicted boot event log), then dstack's runtime events.
    let init = dstack_sim_tdx::InitialState {
        mrtd: prediction.mrtd.to_vec(),
        boot_event_log: prediction.events.clone(),
        ..Default::default()
    };
    let app_sim = SimTdx::new(
        &init,
        dstack_measurements::sim::SimulatedQuoteSigner::generate().unwrap(),
    )
    .unwrap();
    dstack_sim_tdx::fixture::measure_dstack_boot(&app_sim, &APP, &[0xc0; 32], &INSTANCE).unwrap();

    let ktee = kms_tee(dir.path()).await;
    let mut cfg = config(&certs, vec![write_pin(dir.path(), "cvm.pem", &app_sim)], true, None);
    cfg.core.image.verify = true;
    cfg.core.image.cache_dir = cache.clone();
    let kms = Arc::new(Kms::with_tee(cfg, Some(ktee.self_tee.clone())).unwrap());
    kms.bootstrap(DOMAIN).await.unwrap();
    let handle = start(&kms).await;
    let get = |cpus: u32| {
        let (cert, key) = client_cert(&app_sim, |_| {});
        let c = client(&handle, &certs, &ktee.sim, Some((cert, &key)));
        async move {
            c.get_app_key(GetAppKeyRequest {
                api_version: 1,
                vm_config: vm_config(&os_image_hash, cpus),
            })
            .await
        }
    };
    get(1).await.unwrap();
    // The KMS wrote its prediction to the measurement cache.
    let written = std::fs::read(
        cache
            .join("measurements")
            .join(format!("{}.json", config_hash(&os_image_hash, 1, MEM))),
    )
    .unwrap();
    let m = MeasurementsJson::parse(&written).unwrap();
    assert_eq!(m.shapes[0].mrtd, hex::encode(prediction.mrtd));
    assert_eq!(m.shapes[0].rtmr1, hex::encode(prediction.rtmr[1]));
    // Two vCPUs change the ACPI tables (RTMR0): refused.
    let e = get(2).await.unwrap_err().to_string();
    assert!(e.contains("RTMR0"), "{e}");
    handle.shutdown().await.unwrap();
}
