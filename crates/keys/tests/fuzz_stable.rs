//! Stable, bounded mutation fuzzing of the encrypted env blob (attacker-controlled: it comes from the host).
//! Two layers: the blob framing (ephemeral key ‖ IV ‖ ciphertext) and, because AES-GCM rejects nearly every
//! mutated ciphertext, the JSON document inside, reached by encrypting mutated plaintexts.
use dstack_keys::app_keys::x25519_public;
use dstack_keys::env::{decrypt_blob, encrypt_blob, to_env_file, validate_env_name};
use dstack_keys::{EnvError, EnvVar, decrypt_env, encrypt_env, filter_allowed};
use dstack_testkit::{Budget, Mutator, run, run_with, seed_from_env};

const SECRET: [u8; 32] = [0x42; 32];

fn sample_vars() -> Vec<EnvVar> {
    vec![
        EnvVar::new("API_TOKEN", "s3cr3t value with spaces"),
        EnvVar::new("MODE", "prod"),
        EnvVar::new("QUOTED", "a\"b$c`d\\e\nf"),
    ]
}

#[test]
fn blob_framing_survives_mutation() {
    let public = x25519_public(&SECRET);
    let seeds = vec![
        encrypt_env(&public, &sample_vars()).unwrap(),
        encrypt_env(&public, &[]).unwrap(),
    ];
    assert_eq!(decrypt_env(&SECRET, &seeds[0]).unwrap(), sample_vars());
    let mut accepted = 0;
    let r = run("env_blob", &seeds, Budget::new(800, 3), |blob| {
        match decrypt_env(&SECRET, blob) {
            Ok(_) => accepted += 1,
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    });
    assert!(r.mutated > 100, "{r:?}");
    // AES-GCM authenticates the ciphertext: only unmutated seeds (the mutator can reproduce one, e.g. by
    // splicing a seed onto itself at the same offset) may decrypt.
    assert!(
        accepted <= seeds.len() + r.mutated / 50,
        "{accepted} mutated blobs decrypted"
    );
}

#[test]
fn decrypted_document_survives_mutation() {
    let public = x25519_public(&SECRET);
    let seeds = vec![
        serde_json::to_vec(&serde_json::json!({"env": [
            {"key": "API_TOKEN", "value": "x y"}, {"key": "MODE", "value": "prod"},
            {"key": "9BAD", "value": ""}, {"key": "MODE", "value": "again"}
        ]}))
        .unwrap(),
        br#"{"env":[]}"#.to_vec(),
    ];
    let allowed = vec!["API_TOKEN".to_owned(), "MODE".to_owned()];
    let m = Mutator::new(seed_from_env()).with_dictionary([
        "null",
        "\"\"",
        "[]",
        "{}",
        "\"key\"",
        "\"value\"",
        "\"env\"",
        "\"\\u0000\"",
        "\"\\n\"",
        "1",
        "\"A=B\"",
    ]);
    let r = run_with("env_document", &seeds, Budget::new(800, 3), m, |plain| {
        let blob = encrypt_blob(&public, plain).unwrap();
        assert_eq!(decrypt_blob(&SECRET, &blob).unwrap().as_slice(), plain);
        match decrypt_env(&SECRET, &blob).and_then(|vars| filter_allowed(vars, &allowed)) {
            Ok(f) => {
                // Whatever survives filtering is a valid, allowed name, so the env file cannot smuggle lines.
                for v in &f.vars {
                    validate_env_name(&v.key).unwrap();
                    assert!(allowed.contains(&v.key));
                }
                let text = to_env_file(&f.vars);
                assert_eq!(text.lines().count(), f.vars.len(), "{:?}", &*text);
            }
            Err(EnvError::Decrypt) => panic!("a freshly encrypted blob must decrypt"),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    });
    assert!(r.mutated > 100, "{r:?}");
}
