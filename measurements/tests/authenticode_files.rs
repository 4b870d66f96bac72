//! Optional cross-check of the Authenticode digest on real PE files.
//!
//! Input: env `DSTACK_TEST_PE_DIGESTS` = path of a text file with lines
//! `<sha384 hex> <path to PE file>`, produced by an independent tool, e.g. for each file:
//! `osslsigncode extract-data -h sha384 -in FILE -out d.der` (digest = the last 48-byte
//! OCTET STRING of d.der). Skipped loudly when unset (fails under DSTACK_REQUIRE_FIXTURES=1).

use dstack_measurements::authenticode::authenticode_sha384;

#[test]
fn real_pe_digests_match_independent_tool() {
    let Ok(list) = std::env::var("DSTACK_TEST_PE_DIGESTS") else {
        if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
            panic!("DSTACK_TEST_PE_DIGESTS is not set but DSTACK_REQUIRE_FIXTURES=1");
        }
        loud_skip("real_pe_digests_match_independent_tool: set DSTACK_TEST_PE_DIGESTS");
        return;
    };
    let text = std::fs::read_to_string(&list).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (digest, path) = line.split_once(' ').unwrap();
        let img = std::fs::read(path.trim()).unwrap();
        assert_eq!(hex::encode(authenticode_sha384(&img).unwrap()), digest, "{path}");
        n += 1;
    }
    assert!(n > 0, "no entries in {list}");
}

/// Print past libtest's output capture so the skip is visible in a normal `cargo test`.
fn loud_skip(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {what} ***\n");
}
