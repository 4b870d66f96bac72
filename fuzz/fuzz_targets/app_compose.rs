#![no_main]
//! app-compose.json (host-supplied, measured but attacker-chosen by whoever deploys): parsing never panics,
//! every accessor works on an accepted compose, and the normalized JSON is a fixed point (normalizing the
//! normalized form gives the same bytes), which the compose-hash tooling relies on.
use dstack_types::AppCompose;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(compose) = AppCompose::from_slice(data) else {
        return;
    };
    let _ = compose.key_provider();
    let _ = compose.key_provider_id();
    let _ = compose.event_log_version();
    let _ = (compose.swap_size(), compose.restrict_mode(), compose.init_scripts().len());
    let _ = dstack_types::identity::compose_hash(data);
    let Ok(normal) = compose.to_normalized_json() else {
        return;
    };
    let again = AppCompose::from_slice(normal.as_bytes()).expect("normalized compose must parse");
    assert_eq!(again.to_normalized_json().expect("normalizes"), normal);
});
