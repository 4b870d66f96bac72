#![no_main]
//! JSON event-log parser, replay and identity derivation never panic.
use dstack_measurements::eventlog::{derive_identity, parse_json_log, replay};
use dstack_measurements::quote::TdReport;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = parse_json_log(data) {
        let _ = replay(&events);
        let _ = derive_identity(&events, &TdReport::zeroed(), std::str::from_utf8(data).ok());
    }
});
