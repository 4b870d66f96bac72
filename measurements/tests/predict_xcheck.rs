//! The input-dependent boot-event digests of `predict` on Debian's real OVMF and kernel, against the
//! separately written stdlib-only `tests/xcheck/predict.py`, and the CFV digest against a real dstack TD.
//!
//! Inputs: `DSTACK_TEST_OVMF` (trixie's unified `OVMF.fd`, as tests/ovmf.rs) and `DSTACK_TEST_KERNEL` (a
//! Debian `vmlinuz`), plus `python3` on PATH. Skipped loudly when unset, unless `DSTACK_REQUIRE_FIXTURES=1`.

use std::process::Command;

use dstack_measurements::predict::{BootInputs, VmShape, predict};

/// The CFV digest logged by a real dstack TD (tests/data/dstack-quote-report.json, event #1): Debian's OVMF
/// ships the same empty variable store, so our predicted CFV event must equal it.
const REAL_TD_CFV: &str =
    "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6412af21c097d473155875ffd561d6790";

#[test]
fn digests_match_independent_python() {
    let (Ok(ovmf), Ok(kernel)) = (std::env::var("DSTACK_TEST_OVMF"), std::env::var("DSTACK_TEST_KERNEL")) else {
        assert_ne!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
            Ok("1"),
            "DSTACK_TEST_OVMF / DSTACK_TEST_KERNEL unset"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP digests_match_independent_python: set DSTACK_TEST_OVMF and DSTACK_TEST_KERNEL"
        );
        return;
    };
    let fw = std::fs::read(&ovmf).unwrap();
    let k = std::fs::read(&kernel).unwrap();
    let initrd = vec![0x42u8; 123_457];
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/xcheck/predict.py");
    for (vcpus, mem) in [(1, 2u64 << 30), (2, 4 << 30), (4, 1 << 30), (8, 16 << 30)] {
        let p = predict(
            &BootInputs {
                firmware: &fw,
                kernel: &k,
                initrd: &initrd,
                cmdline: "console=ttyS0",
            },
            &VmShape {
                vcpus,
                memory_bytes: mem,
            },
        )
        .unwrap();
        let out = Command::new("python3")
            .args([script, &ovmf, &kernel, &initrd.len().to_string(), &mem.to_string()])
            .output()
            .expect("running python3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap()
                .to_owned()
        };
        assert_eq!(hex::encode(&p.events[0].digest), get("td_hob"), "TD HOB, {mem} bytes");
        assert_eq!(hex::encode(&p.events[1].digest), get("cfv"));
        assert_eq!(
            hex::encode(&p.events[11].digest),
            get("kernel"),
            "patched kernel, {mem} bytes"
        );
        assert_eq!(hex::encode(&p.events[1].digest), REAL_TD_CFV);
    }
}
