#![no_main]
//! CCEL parser + replay never panic on arbitrary bytes.
use dstack_measurements::eventlog::{ccel, replay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ccel::parse_ccel_table(data);
    if let Ok(log) = ccel::parse_ccel(data)
        && let Ok(events) = log.to_tdx_events()
    {
        let _ = replay(&events);
    }
});
