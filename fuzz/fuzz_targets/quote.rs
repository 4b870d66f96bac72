#![no_main]
//! Quote parser + simulated-path checks never panic on arbitrary bytes.
use dstack_measurements::quote::{Quote, QuoteJson, decode_quote_input};
use dstack_measurements::sim::{SimRootPin, is_simulated_quote, verify_simulated};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = Quote::parse(data) {
        let _ = QuoteJson::from(&q);
        let _ = is_simulated_quote(&q);
        let _ = verify_simulated(&q, data, &[SimRootPin::SpkiSha256([0; 32])], 1_800_000_000);
    }
    let _ = decode_quote_input(data);
});
