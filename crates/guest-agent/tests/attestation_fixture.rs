//! dstack's own `Attest` output (a real TDX attestation from dstack's repository, see `fixtures/README.md`)
//! against our SCALE codec: it decodes, re-encodes to the identical bytes, its quote parses, and its event log
//! and runtime events replay to the quoted registers. This is the independent check of the wire format.

use dstack_guest_agent::attestation::Attestation;
use dstack_measurements::eventlog::{replay, replay_digests};
use dstack_measurements::quote::Quote;

const FIXTURE: &[u8] = include_bytes!("fixtures/dstack-v0.5.8-attestation.bin");

#[test]
fn dstack_attestation_roundtrips_byte_for_byte() {
    let a = Attestation::from_scale(FIXTURE).expect("dstack's attestation decodes");
    assert_eq!(a.to_scale(), FIXTURE, "re-encoding differs from dstack's bytes");
}

#[test]
fn dstack_attestation_is_consistent() {
    let a = Attestation::from_scale(FIXTURE).unwrap();
    let quote = Quote::parse(&a.quote).expect("TDX quote parses");
    // Boot events replay to RTMR0-2 and the whole log to RTMR3.
    let rtmrs = replay(&a.event_log).expect("event log replays");
    assert_eq!(rtmrs[..3], quote.report.rtmr[..3]);
    assert_eq!(rtmrs[3], quote.report.rtmr[3]);
    // dstack verifiers replay RTMR3 from `runtime_events` alone (V1 digests).
    let digests: Vec<[u8; 48]> = a.runtime_events.iter().map(|e| e.digest()).collect();
    assert_eq!(replay_digests(&digests), quote.report.rtmr[3]);
    let names: Vec<&str> = a.runtime_events.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&"compose-hash") && names.contains(&"app-id"),
        "{names:?}"
    );
    let cfg: serde_json::Value = serde_json::from_str(&a.config).expect("config is JSON");
    assert!(cfg.is_object());
    assert_eq!(quote.report.report_data, a.report_data);
}
