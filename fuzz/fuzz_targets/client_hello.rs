#![no_main]
//! The gateway's first read of every connection: TLS record reassembly + ClientHello/SNI extraction, then the
//! `<id>[-<port>][s|g]` routing grammar applied to the SNI. Never panics, never reads past the input or the
//! bound, and what it accepts is a sane host name.
use dstack_gateway::sni::{parse_client_hello, parse_client_hello_bounded, parse_host, parse_subdomain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_client_hello(data) {
        assert!(info.consumed <= data.len());
        if let Some(sni) = &info.sni {
            assert!(!sni.is_empty() && sni.len() <= 253, "{sni:?}");
            assert_eq!(sni, &sni.to_ascii_lowercase());
            if let Ok(dest) = parse_host(sni, "apps.test") {
                assert!(!dest.id.is_empty());
            }
        }
        // A strict prefix is never a different success past its own end.
        let cut = &data[..info.consumed / 2];
        if let Ok(i) = parse_client_hello(cut) {
            assert!(i.consumed <= cut.len());
        }
    }
    let limit = data.first().map_or(0, |b| usize::from(*b) * 4);
    if let Ok(info) = parse_client_hello_bounded(data, limit) {
        assert!(info.consumed <= limit.min(data.len()));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_subdomain(s);
        let _ = parse_host(s, "apps.test");
    }
});
