#![no_main]
//! The gateway's other attacker-facing wire formats: the inbound PROXY protocol header (v1 text / v2 binary)
//! and DNS TXT answers used for custom-domain routing (`_dstack-app-address`). Byte 0 picks the parser.
use dstack_gateway::dns::{Answer, parse_app_address, parse_txt_response};
use dstack_gateway::proxy::pp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else {
        return;
    };
    if pick & 1 == 0 {
        if let Ok(h) = pp::parse(rest) {
            assert!(h.len <= rest.len());
        }
    } else if let Ok(Answer::Records(records)) = parse_txt_response(rest, 0x1234) {
        for txt in records {
            let _ = parse_app_address(&txt);
        }
    }
});
