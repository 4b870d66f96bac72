#![no_main]
//! TDVF locator/parser and MRTD never panic; bounded work on hostile metadata.
use dstack_measurements::authenticode::authenticode_sha384;
use dstack_measurements::mrtd::{PageOrder, compute_mrtd_with, parse_tdvf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tdvf) = parse_tdvf(data) {
        // Keep iterations cheap: only hash small layouts.
        let pages: u64 = tdvf.sections.iter().map(|s| s.memory_data_size / 4096).sum();
        if pages < 4096 {
            let _ = compute_mrtd_with(data, &tdvf, PageOrder::SinglePass);
            let _ = compute_mrtd_with(data, &tdvf, PageOrder::TwoPass);
        }
    }
    let _ = authenticode_sha384(data);
});
