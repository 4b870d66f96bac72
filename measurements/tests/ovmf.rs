//! MRTD of Debian's OVMF (trixie `ovmf` package).
//!
//! Input: env `DSTACK_TEST_OVMF` = path to the unified `/usr/share/ovmf/OVMF.fd` extracted
//! from trixie's `ovmf` package. (The split `OVMF_CODE_4M.fd` is not a standalone TDVF: its
//! section data offsets refer to the unified CODE+VARS layout, so it is rejected.) When unset the
//! test is skipped loudly, unless `DSTACK_REQUIRE_FIXTURES=1`, which turns the skip into a
//! failure. Expected values for the known builds were computed independently with
//! `tests/xcheck/mrtd.py`.

use dstack_measurements::mrtd::{Locator, PageOrder, compute_mrtd_with, parse_tdvf};
use sha2::{Digest, Sha256};

/// (sha256 of the file, single-pass MRTD, two-pass MRTD) for trixie ovmf 2025.02-8+deb13u1.
const KNOWN: &[(&str, &str, &str)] = &[(
    "14954040cc754ade0c625ac3470ea46d4c14318b5b1396de4ef77090203d76db", // ovmf/OVMF.fd
    "bdc6fb145880f06f30c8b346b8dce2a99d9351b56892df22f80fcf6574caa9f9c31df8e8576d53b4d0cd1c3f28910e11",
    "456f07902150d008bb913c3e1e84e9297f735a6c83cd2a957a1f0a8bbedb06df188e3837ae48d32c73d473d097dc0db2",
)];

#[test]
fn debian_ovmf_mrtd_both_orders() {
    let Ok(path) = std::env::var("DSTACK_TEST_OVMF") else {
        if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
            panic!("DSTACK_TEST_OVMF is not set but DSTACK_REQUIRE_FIXTURES=1");
        }
        loud_skip("debian_ovmf_mrtd_both_orders: set DSTACK_TEST_OVMF to trixie's OVMF.fd");
        return;
    };
    let fw = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let tdvf = parse_tdvf(&fw).unwrap();
    // Debian's builds: the footer GUID table is present and the legacy pointer is zero.
    assert_eq!(tdvf.located_by, Locator::GuidTable);
    let single = hex::encode(compute_mrtd_with(&fw, &tdvf, PageOrder::SinglePass));
    let two = hex::encode(compute_mrtd_with(&fw, &tdvf, PageOrder::TwoPass));
    println!("{path}: single-pass {single}\n{path}: two-pass    {two}");
    assert_ne!(single, two);
    let sha = hex::encode(Sha256::digest(&fw));
    match KNOWN.iter().find(|(s, _, _)| *s == sha) {
        Some((_, s, t)) => {
            assert_eq!(&single, s);
            assert_eq!(&two, t);
        }
        None => eprintln!("note: {path} (sha256 {sha}) is not a known build; values not pinned"),
    }
}

/// Print past libtest's output capture so the skip is visible in a normal `cargo test`.
fn loud_skip(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {what} ***\n");
}
