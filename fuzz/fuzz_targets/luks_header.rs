#![no_main]
//! LUKS2 header validation (the data disk is host-controlled: a swapped header could downgrade the cipher).
//! Byte 0 picks the check: the binary header (magic, version, checksum algorithm, label, offsets) or the
//! `luksDump --dump-json-metadata` document. Never panics; an accepted binary header really has the
//! LUKS2 magic and version, an accepted document really uses aes-xts-plain64.
use guest_init::boot::luks::{validate_binary_header, validate_metadata};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else {
        return;
    };
    if pick & 1 == 0 {
        if validate_binary_header(rest).is_ok() {
            assert_eq!(rest.get(..6), Some(&b"LUKS\xba\xbe"[..]));
            assert_eq!(rest.get(6..8), Some(&[0u8, 2][..]));
        }
    } else if let Ok(json) = serde_json::from_slice::<serde_json::Value>(rest)
        && validate_metadata(&json).is_ok()
    {
        assert_eq!(json["segments"]["0"]["encryption"], "aes-xts-plain64");
        assert_eq!(json["keyslots"]["0"]["area"]["encryption"], "aes-xts-plain64");
        assert_eq!(json["keyslots"]["0"]["kdf"]["type"], "pbkdf2");
    }
});
