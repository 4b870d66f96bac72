//! `measurements.json` and the predicted boot event logs of a built image (initramfs only: the rootfs only
//! reaches the measurements through the root hash on the command line, and building it needs root).
//!
//! Checks: `dstack-measure image DIR --vcpus N --memory SIZE --json` equals every shape in
//! `measurements.json` (binary from `DSTACK_MEASURE_BIN`, e.g. `target/debug/dstack-measure`; without it the
//! same library call the CLI makes is compared and the CLI part is skipped loudly), each event log replays to
//! its shape's registers, MRTD equals the independently computed value for the locked OVMF, and
//! `metadata.json` lists the files.
//!
//! External inputs (loud SKIP when missing, failure under `DSTACK_REQUIRE_FIXTURES=1`): the locked kernel
//! and firmware packages (fetched through apt into `$DSTACK_CACHE_DIR`), `rustc` + `libc6-dev`.

mod common;

use dstack_image_build::image::{BuildOptions, Metadata, build_image, measurements_record};
use dstack_measurements::eventlog::{parse_json_log, replay};
use dstack_measurements::predict::VmShape;
use dstack_measurements::predict::image::{ImageFiles, MEASUREMENTS_FILE};
use dstack_measurements::published::MeasurementsJson;

const TEST: &str = "measurements";
/// Single-pass MRTD of trixie's OVMF.fd 2025.02-8+deb13u1 (measurements/tests/xcheck/mrtd.py).
const TRIXIE_OVMF_MRTD: &str =
    "bdc6fb145880f06f30c8b346b8dce2a99d9351b56892df22f80fcf6574caa9f9c31df8e8576d53b4d0cd1c3f28910e11";

#[test]
fn measurements_json_matches_dstack_measure_image() {
    let lock = common::lock();
    let cache = dstack_image_build::cache_root();
    if common::kernel(TEST, &lock, &cache).is_none() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let Some(init) = common::smoke_init(TEST, scratch.path()) else {
        return;
    };
    let out = scratch.path().join("image");
    let opts = BuildOptions {
        init,
        out: out.clone(),
        epoch: 1_700_000_000,
        docker_modules: false,
        extra_modules: vec![],
        with_rootfs: false,
    };
    let os_image_hash = match build_image(&lock, &cache, &opts) {
        Ok(h) => h,
        Err(e) => {
            common::skip(TEST, &format!("cannot build the image: {e}"));
            return;
        }
    };

    let m = MeasurementsJson::parse(&std::fs::read(out.join(MEASUREMENTS_FILE)).unwrap()).unwrap();
    assert_eq!(m.os_image_hash, os_image_hash);
    assert_eq!(
        m.shapes.iter().map(|s| (s.vcpus, s.memory_mb)).collect::<Vec<_>>(),
        [(1, 2048), (2, 4096)]
    );
    let meta: Metadata = serde_json::from_slice(&std::fs::read(out.join("metadata.json")).unwrap()).unwrap();
    let record = meta.measurements.expect("metadata.json has the measurements record");
    assert_eq!(record, measurements_record());
    assert_eq!(m.inputs.get("cmdline"), Some(&meta.cmdline));

    let bin = std::env::var_os("DSTACK_MEASURE_BIN");
    if bin.is_none() {
        common::skip(
            "measurements (CLI part)",
            "set DSTACK_MEASURE_BIN to a dstack-measure binary",
        );
    }
    let files = ImageFiles::load(&out).unwrap();
    for (shape, log) in m.shapes.iter().zip(&record.event_logs) {
        assert_eq!(shape.mrtd, TRIXIE_OVMF_MRTD);
        let want = serde_json::json!({
            "mrtd": shape.mrtd, "rtmr0": shape.rtmr0, "rtmr1": shape.rtmr1, "rtmr2": shape.rtmr2,
            "os_image_hash": m.os_image_hash,
        });
        let p = files
            .predict(&VmShape {
                vcpus: shape.vcpus,
                memory_bytes: shape.memory_mb << 20,
            })
            .unwrap();
        assert_eq!(
            [hex::encode(p.rtmr[0]), hex::encode(p.rtmr[1]), hex::encode(p.rtmr[2])],
            [shape.rtmr0.clone(), shape.rtmr1.clone(), shape.rtmr2.clone()]
        );
        if let Some(bin) = &bin {
            let o = std::process::Command::new(bin)
                .arg("image")
                .arg(&out)
                .args(["--vcpus", &shape.vcpus.to_string()])
                .args(["--memory", &format!("{}M", shape.memory_mb)])
                .arg("--json")
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(got, want);
        }
        let events = parse_json_log(&std::fs::read(out.join(&log.file)).unwrap()).unwrap();
        let r = replay(&events).unwrap();
        assert_eq!(
            [hex::encode(r[0]), hex::encode(r[1]), hex::encode(r[2])],
            [shape.rtmr0.clone(), shape.rtmr1.clone(), shape.rtmr2.clone()],
            "{}",
            log.file
        );
    }
}
