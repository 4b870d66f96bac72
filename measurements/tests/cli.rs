//! The `dstack-measure` CLI contract: JSON shapes, lowercase hex, exit codes 0/1/2, and
//! one-line errors without panics on malformed input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dstack_measurements::quote::TdReport;
use dstack_measurements::sim::SimulatedQuoteSigner;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dstack-measure"))
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn assert_input_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{err}");
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[test]
fn quote_json_contract() {
    for f in ["tdx_quote", "tdx-quote.hex", "dstack-quote-report.json"] {
        let o = run(&["quote", data(f).to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{f}");
        let j = json(&o);
        for k in [
            "mrtd",
            "rtmr0",
            "rtmr1",
            "rtmr2",
            "rtmr3",
            "report_data",
            "mrconfigid",
            "td_attributes",
            "xfam",
        ] {
            assert!(is_lower_hex(j[k].as_str().unwrap()), "{f} {k}");
        }
        assert_eq!(j["tee_type"], 129);
        assert_eq!(j["version"], 4);
    }
}

#[test]
fn verify_exit_codes() {
    let q = data("tdx_quote");
    let c = data("tdx_quote_collateral.json");
    let (q, c) = (q.to_str().unwrap(), c.to_str().unwrap());
    let o = run(&["verify", q, "--collateral", c, "--now", "1752919234", "--json"]);
    assert!(o.status.success());
    assert_eq!(json(&o), serde_json::json!({"status": "UpToDate", "advisory_ids": []}));
    // Expired collateral: a failed check, exit 1.
    let o = run(&["verify", q, "--collateral", c, "--now", "1800000000"]);
    assert_eq!(o.status.code(), Some(1));
    // Missing collateral, bad collateral, truncated quote: malformed input, exit 2.
    assert_input_error(&run(&["verify", q, "--now", "1752919234"]), "collateral");
    assert_input_error(&run(&["verify", q, "--collateral", q]), "collateral");
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    std::fs::write(&t, &std::fs::read(q).unwrap()[..700]).unwrap();
    assert_input_error(&run(&["verify", t.to_str().unwrap(), "--collateral", c]), "offset 636");
}

#[test]
fn verify_simulated_quote() {
    let s = SimulatedQuoteSigner::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let qp = dir.path().join("sim.quote");
    let rp = dir.path().join("root.pem");
    std::fs::write(&qp, s.sign(&TdReport::zeroed()).unwrap()).unwrap();
    std::fs::write(&rp, s.root_cert_pem()).unwrap();
    let q = qp.to_str().unwrap();
    let o = run(&[
        "verify",
        q,
        "--allow-simulated",
        "--simulated-root",
        rp.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&o)["status"], "Simulated");
    let pin = hex::encode(s.root_pin_spki_sha256());
    assert!(
        run(&["verify", q, "--allow-simulated", "--simulated-root", &pin])
            .status
            .success()
    );
    // Not allowed / wrong root: exit 1 with a specific message.
    let o = run(&["verify", q]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("simulated"));
    let other = hex::encode(SimulatedQuoteSigner::generate().unwrap().root_pin_spki_sha256());
    let o = run(&["verify", q, "--allow-simulated", "--simulated-root", &other]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not among the pinned"));
    assert_input_error(&run(&["verify", q, "--allow-simulated"]), "--simulated-root");
}

#[test]
fn replay_forms_and_mismatch() {
    let o = run(&["replay", data("dstack-quote-report.json").to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let j = json(&o);
    assert_eq!(j["matches_quote"], true);
    assert!(is_lower_hex(j["rtmr3"].as_str().unwrap()));
    assert_eq!(j["identity"]["app_id"], "3763bc34552cf3a27ff71ad5f7a90471562a1a2d");
    // Raw CCEL area.
    let o = run(&["replay", data("dstack-ccel.bin").to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    assert!(json(&o).get("matches_quote").is_none());
    // JSON array only.
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data("dstack-quote-report.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let arr = dir.path().join("log.json");
    std::fs::write(&arr, v["event_log"].as_str().unwrap()).unwrap();
    let o = run(&["replay", arr.to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    // Tampered boot event digest: mismatch → exit 1, matches_quote false.
    let mut v2 = v.clone();
    let mut log: serde_json::Value = serde_json::from_str(v["event_log"].as_str().unwrap()).unwrap();
    log[0]["digest"] = serde_json::Value::String("00".repeat(48));
    v2["event_log"] = log;
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&v2).unwrap()).unwrap();
    let o = run(&["replay", bad.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json(&o)["matches_quote"], false);
    // Garbage → exit 2.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"\x01\x00\x00\x00\x03\x00\x00\x00garbage").unwrap();
    assert_input_error(&run(&["replay", junk.to_str().unwrap()]), "CCEL");
    std::fs::write(&junk, b"[{\"imr\": \"x\"}]").unwrap();
    assert_input_error(&run(&["replay", junk.to_str().unwrap()]), "event log");
}

#[test]
fn mrtd_and_image_and_diff() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["mrtd", data("tdx_quote").to_str().unwrap()]);
    assert_input_error(&o, "TDVF");
    let o = run(&["image", "/nonexistent", "--vcpus", "1", "--memory", "2G"]);
    assert_input_error(&o, "/nonexistent/metadata.json");
    let o = run(&["image", "/nonexistent", "--vcpus", "1", "--memory", "2Q"]);
    assert_input_error(&o, "--memory");

    // measurements.json built from the fixture quote's own registers: diff passes; a
    // changed RTMR1 fails with exit 1.
    let att = data("dstack-quote-report.json");
    let q = json(&run(&["quote", att.to_str().unwrap(), "--json"]));
    let mut m = serde_json::json!({
        "version": 1,
        "os_image_hash": "14ad42d0270b444eaeb53918a5a94d9b17eec7a817cd336173b17c5327541c67",
        "inputs": {},
        "shapes": [{"vcpus": 16, "memory_mb": 65536, "mrtd": q["mrtd"], "rtmr0": q["rtmr0"],
                    "rtmr1": q["rtmr1"], "rtmr2": q["rtmr2"]}]
    });
    let mp = dir.path().join("measurements.json");
    std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    let o = run(&["diff", mp.to_str().unwrap(), att.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let d = json(&o);
    assert_eq!(d["rows"].as_array().unwrap().len(), 6); // mrtd, rtmr0-2, rtmr3 replay, os_image_hash
    m["shapes"][0]["rtmr1"] = serde_json::Value::String("11".repeat(48));
    std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    let o = run(&["diff", mp.to_str().unwrap(), att.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("NO"));
    std::fs::write(&mp, b"{\"version\": 1}").unwrap();
    assert_input_error(
        &run(&["diff", mp.to_str().unwrap(), att.to_str().unwrap()]),
        "measurements.json",
    );
}

/// `dstack-measure image` on an image directory equals the `measurements.json` the library writes for it.
/// Inputs: `DSTACK_TEST_OVMF` (trixie's `OVMF.fd`, see tests/ovmf.rs) and `DSTACK_TEST_KERNEL` (a Debian
/// `vmlinuz`); skipped loudly when unset (failure under `DSTACK_REQUIRE_FIXTURES=1`).
#[test]
fn image_matches_written_measurements() {
    use dstack_measurements::predict::image::{STANDARD_SHAPES, event_log_file, write_measurements};
    let (Ok(ovmf), Ok(kernel)) = (std::env::var("DSTACK_TEST_OVMF"), std::env::var("DSTACK_TEST_KERNEL")) else {
        assert_ne!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
            Ok("1"),
            "DSTACK_TEST_OVMF / DSTACK_TEST_KERNEL unset"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP image_matches_written_measurements: set DSTACK_TEST_OVMF and DSTACK_TEST_KERNEL"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(ovmf, d.join("ovmf.fd")).unwrap();
    std::fs::copy(kernel, d.join("bzImage")).unwrap();
    std::fs::write(d.join("initramfs.cpio.gz"), vec![0x5a; 100_000]).unwrap();
    std::fs::write(
        d.join("metadata.json"),
        br#"{"bios":"ovmf.fd","kernel":"bzImage","initrd":"initramfs.cpio.gz","cmdline":"console=ttyS0"}"#,
    )
    .unwrap();
    // The manifest in GNU sha256sum's format, written by coreutils itself.
    let sums = Command::new("sha256sum")
        .args(["ovmf.fd", "bzImage", "initramfs.cpio.gz", "metadata.json"])
        .current_dir(d)
        .output()
        .unwrap();
    std::fs::write(d.join("sha256sum.txt"), &sums.stdout).unwrap();
    let m = write_measurements(d, None, &STANDARD_SHAPES).unwrap();
    for (s, shape) in m.shapes.iter().zip(&STANDARD_SHAPES) {
        assert!(d.join(event_log_file(shape)).is_file());
        let o = run(&[
            "image",
            d.to_str().unwrap(),
            "--vcpus",
            &s.vcpus.to_string(),
            "--memory",
            &format!("{}MiB", s.memory_mb),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j = json(&o);
        for (k, v) in [
            ("mrtd", &s.mrtd),
            ("rtmr0", &s.rtmr0),
            ("rtmr1", &s.rtmr1),
            ("rtmr2", &s.rtmr2),
        ] {
            assert_eq!(j[k].as_str(), Some(v.as_str()), "{k}");
        }
        assert_eq!(j["os_image_hash"].as_str(), Some(m.os_image_hash.as_str()));
    }
    // A file that no longer matches sha256sum.txt is rejected.
    std::fs::write(d.join("initramfs.cpio.gz"), b"tampered").unwrap();
    let o = run(&["image", d.to_str().unwrap(), "--vcpus", "1", "--memory", "2G"]);
    assert_input_error(&o, "sha256sum.txt");
}
