#![no_main]
//! Encrypted env (`.encrypted-env`, supplied by the untrusted host). Byte 0 picks the layer:
//! even: the raw blob framing (ephemeral key ‖ IV ‖ AES-GCM) through guest-init's decrypt + filter;
//! odd: the rest is the plaintext JSON document, encrypted to the app key first so AES-GCM does not reject it,
//! then decrypted, filtered and rendered — the env file must hold exactly one line per allowed variable.
use dstack_keys::app_keys::x25519_public;
use dstack_keys::env::{decrypt_blob, encrypt_blob_with, to_env_file, validate_env_name};
use dstack_keys::{EnvError, decrypt_env, filter_allowed};
use libfuzzer_sys::fuzz_target;

const SECRET: [u8; 32] = [0x42; 32];

fn allowed() -> Vec<String> {
    ["API_TOKEN", "MODE", "A"].iter().map(|s| s.to_string()).collect()
}

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else {
        return;
    };
    if pick & 1 == 0 {
        if let Ok(vars) = guest_init::boot::env::decrypt(rest, &SECRET, &allowed()) {
            for v in &vars {
                assert!(allowed().contains(&v.key));
            }
        }
        return;
    }
    let blob = encrypt_blob_with(&x25519_public(&SECRET), rest, &[7; 32], &[9; 12]).expect("encrypts");
    assert_eq!(decrypt_blob(&SECRET, &blob).expect("decrypts").as_slice(), rest);
    match decrypt_env(&SECRET, &blob).and_then(|vars| filter_allowed(vars, &allowed())) {
        Ok(f) => {
            for v in &f.vars {
                validate_env_name(&v.key).expect("only valid names survive");
                assert!(allowed().contains(&v.key));
            }
            let text = to_env_file(&f.vars);
            assert_eq!(text.lines().count(), f.vars.len(), "{:?}", &*text);
        }
        Err(EnvError::Decrypt) => panic!("a freshly encrypted blob must decrypt"),
        Err(_) => {}
    }
});
