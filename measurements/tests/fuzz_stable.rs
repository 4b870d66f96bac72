//! Stable, bounded mutation fuzzing of every parser here that takes attacker bytes (quote, CCEL, JSON event
//! log; TDVF metadata is fuzzed beside its synthetic images in src/mrtd/tests.rs). Runs under plain `cargo test`; the nightly cargo-fuzz targets in the top-level `fuzz/` crate cover the
//! same entry points for long runs, and their local corpora (git-ignored) are replayed here when present.
use std::path::Path;

use dstack_measurements::eventlog::{ccel, derive_identity, parse_json_log, replay};
use dstack_measurements::quote::{Quote, QuoteJson, TdReport, decode_quote_input};
use dstack_measurements::sim::{SimRootPin, is_simulated_quote, verify_simulated};
use dstack_testkit::{Budget, Mutator, load_dir, run, run_with, seed_from_env};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(DATA).join(name)).unwrap()
}

/// Seeds: committed fixtures plus (if this machine ran cargo-fuzz) a bounded slice of the local corpus.
fn seeds(fixtures: Vec<Vec<u8>>, corpus: &str) -> Vec<Vec<u8>> {
    let mut all = fixtures;
    all.extend(load_dir(&Path::new(CORPUS).join(corpus), 150, 64 * 1024));
    all
}

fn event_log_strings() -> Vec<Vec<u8>> {
    ["dstack-quote-report.json", "dstack-tdx-lite-getquote.json"]
        .iter()
        .map(|f| {
            let v: serde_json::Value = serde_json::from_slice(&fixture(f)).unwrap();
            v["event_log"].as_str().unwrap().as_bytes().to_vec()
        })
        .collect()
}

fn assert_clean(e: &impl std::fmt::Display) {
    assert!(!e.to_string().is_empty(), "error with an empty message");
}

#[test]
fn quote_parser_survives_mutation() {
    let fx = vec![
        fixture("tdx_quote"),
        fixture("tdx_quote_td15ex"),
        fixture("tdx-quote.hex"),
    ];
    let r = run("quote", &seeds(fx, "quote"), Budget::new(4_000, 4), |data| {
        match Quote::parse(data) {
            Ok(q) => {
                let _ = QuoteJson::from(&q);
                let _ = is_simulated_quote(&q);
                if let Err(e) = verify_simulated(&q, data, &[SimRootPin::SpkiSha256([0; 32])], 1_800_000_000) {
                    assert_clean(&e);
                }
            }
            Err(e) => assert_clean(&e),
        }
        if let Err(e) = decode_quote_input(data) {
            assert_clean(&e);
        }
    });
    assert!(r.mutated > 100, "{r:?}");
}

#[test]
fn ccel_parser_survives_mutation() {
    let area = fixture("dstack-ccel.bin");
    // Most of the 64 KiB area is 0xff padding; a trimmed seed lets mutations land in the records.
    let end = area.iter().rposition(|&b| b != 0xff).map_or(area.len(), |p| p + 1);
    let fx = vec![area[..end].to_vec(), area];
    let r = run("ccel", &seeds(fx, "ccel"), Budget::new(3_000, 4), |data| {
        if let Err(e) = ccel::parse_ccel_table(data) {
            assert_clean(&e);
        }
        match ccel::parse_ccel(data).map(|log| log.to_tdx_events()) {
            Ok(Ok(events)) => {
                let _ = replay(&events);
            }
            Ok(Err(e)) | Err(e) => assert_clean(&e),
        }
    });
    assert!(r.mutated > 100, "{r:?}");
}

#[test]
fn json_event_log_parser_survives_mutation() {
    let m = Mutator::new(seed_from_env()).with_dictionary([
        "null",
        "-1",
        "4294967296",
        "1e999",
        "\"\"",
        "[]",
        "{}",
        "\"digest\"",
        "\"imr\"",
        "\"event_type\"",
        "\"event_payload\"",
        "\"event\"",
        "\"zz\"",
    ]);
    let r = run_with(
        "json_log",
        &seeds(event_log_strings(), "json_log"),
        Budget::new(3_000, 4),
        m,
        |data| match parse_json_log(data) {
            Ok(events) => {
                let _ = replay(&events);
                let _ = derive_identity(&events, &TdReport::zeroed(), std::str::from_utf8(data).ok());
            }
            Err(e) => assert_clean(&e),
        },
    );
    assert!(r.mutated > 100, "{r:?}");
}
