use super::*;

fn h32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// Vector from dstack's `dstack/dstack-util/src/crypto.rs`, test `test_dh_decrypt` (Dstack-TEE/dstack).
#[test]
fn dstack_dh_decrypt_vector() {
    let secret = h32("7c282bf94b35dc47801dc953bfa0896fc2bd313381d3e8eca4e42f6536d2a96f");
    let blob = hex::decode(
        "0bd18749612f4c8b9dd583c7d6a646b90abd34e3c731a7708d0caf9039095641e1f0948e775f0b7351788db7f246d51806954626dccc\
         b6a60d64665ca3715c6bef75616cab476d27bba04080361200d6a58cec",
    )
    .unwrap();
    let plain = decrypt_blob(&secret, &blob).unwrap();
    assert_eq!(&plain[..], br#"[{"key":"","value":""}]"#);
    // That plaintext is a bare list, which dstack's env parser also refuses.
    assert!(matches!(decrypt_env(&secret, &blob), Err(EnvError::Json(_))));
}

/// Same malformed inputs as dstack's `test_dh_decrypt_invalid_input`.
#[test]
fn dstack_invalid_inputs_rejected() {
    let secret = [0u8; 32];
    for len in [0, 31, 43, 44, 59] {
        let e = decrypt_blob(&secret, &vec![0u8; len]).unwrap_err();
        assert!(matches!(e, EnvError::TooShort(n) if n == len), "{len}: {e}");
    }
    // Long enough, but the all-zero ephemeral key gives an all-zero shared secret.
    assert!(matches!(
        decrypt_blob(&[7; 32], &[0u8; 60]),
        Err(EnvError::ZeroSharedSecret)
    ));
    assert!(matches!(
        decrypt_blob(&[7; 32], &vec![1u8; MAX_BLOB_LEN + 1]),
        Err(EnvError::TooLarge(_))
    ));
}

/// Deterministic vector made with pyca/cryptography (X25519 + AESGCM), an independent implementation:
/// receiver secret 0x42*32, ephemeral secret 0x24*32, IV 00..0b, plaintext as Python's json.dumps writes it.
#[test]
fn matches_pyca_cryptography_vector() {
    let recv_pub = x25519_public(&[0x42; 32]);
    assert_eq!(
        hex::encode(recv_pub),
        "132c442be010fbd57e72603328aa76e71fccc1503aae219327d14d9c9993f472"
    );
    let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
    let pt = br#"{"env": [{"key": "A", "value": "1"}]}"#;
    let blob = encrypt_blob_with(&recv_pub, pt, &[0x24; 32], &iv).unwrap();
    assert_eq!(
        hex::encode(&blob),
        "04bcd2e0d00f2cce5fe8f1c6c2fbec5c07fa56e3aa5c88a5689975d88b3fce05000102030405060708090a0b41f4636c6950044693\
         bf53a72fdd88396ee00d2eb8d091becb8e755959782bf88714d64ea123d0a586f0aa364c274a7ef8f46e3ce4"
    );
    let vars = decrypt_env(&[0x42; 32], &blob).unwrap();
    assert_eq!(vars, vec![EnvVar::new("A", "1")]);
}

fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    crate::app_keys::x25519_public(secret)
}

#[test]
fn roundtrip_and_tamper_detection() {
    let secret = [0x55; 32];
    let envs = vec![EnvVar::new("API_KEY", "s3cr3t ✓"), EnvVar::new("EMPTY", "")];
    let blob = encrypt_env(&x25519_public(&secret), &envs).unwrap();
    assert_eq!(
        blob.len(),
        32 + 12 + 16 + r#"{"env":[{"key":"API_KEY","value":"s3cr3t ✓"},{"key":"EMPTY","value":""}]}"#.len()
    );
    assert_eq!(decrypt_env(&secret, &blob).unwrap(), envs);
    // Fresh ephemeral key and IV each time.
    assert_ne!(blob, encrypt_env(&x25519_public(&secret), &envs).unwrap());

    for i in [0, 32, 44, blob.len() - 1] {
        let mut t = blob.clone();
        t[i] ^= 1;
        assert!(decrypt_env(&secret, &t).is_err(), "tamper at {i} accepted");
    }
    assert!(matches!(decrypt_env(&[0x56; 32], &blob), Err(EnvError::Decrypt)));
    let truncated = &blob[..blob.len() - 1];
    assert!(matches!(decrypt_env(&secret, truncated), Err(EnvError::Decrypt)));
}

#[test]
fn encrypt_refuses_low_order_public_key() {
    assert!(matches!(encrypt_env(&[0; 32], &[]), Err(EnvError::ZeroSharedSecret)));
}

#[test]
fn malformed_plaintext_json() {
    let secret = [0x11; 32];
    let pk = x25519_public(&secret);
    for pt in [
        &b"not json"[..],
        br#"{"env":[{"key":"A"}]}"#,
        br#"{"env":[{"key":"A","value":1}]}"#,
        br#"{"env":[],"extra":1}"#,
        br#"{"env":[{"key":"A","value":"1","note":"x"}]}"#,
        br#"{}"#,
    ] {
        let blob = encrypt_blob(&pk, pt).unwrap();
        let e = decrypt_env(&secret, &blob).unwrap_err();
        assert!(matches!(e, EnvError::Json(_)), "{:?}: {e}", String::from_utf8_lossy(pt));
    }
    let many: Vec<EnvVar> = (0..=MAX_VARS).map(|i| EnvVar::new(format!("V{i}"), "")).collect();
    let blob = encrypt_env(&pk, &many).unwrap();
    assert!(
        decrypt_env(&secret, &blob)
            .unwrap_err()
            .to_string()
            .contains("1025 variables")
    );
}

#[test]
fn filter_allowed_follows_dstack_rules() {
    let allowed: Vec<String> = ["A", "B", "bad-name"].map(String::from).to_vec();
    let envs = vec![
        EnvVar::new("B", "2"),
        EnvVar::new("NOT_ALLOWED", "x"),
        EnvVar::new("A", "first"),
        EnvVar::new("A", "last"),
        EnvVar::new("also bad but skipped", "x"),
    ];
    let f = filter_allowed(envs, &allowed).unwrap();
    assert_eq!(f.vars, vec![EnvVar::new("A", "last"), EnvVar::new("B", "2")]);
    assert_eq!(f.skipped, ["NOT_ALLOWED", "also bad but skipped"]);

    let e = filter_allowed(vec![EnvVar::new("bad-name", "x")], &allowed).unwrap_err();
    assert!(e.to_string().contains("invalid env name \"bad-name\""), "{e}");
    let e = filter_allowed(vec![EnvVar::new("A", "x".repeat(MAX_VALUE_LEN + 1))], &allowed).unwrap_err();
    assert!(e.to_string().contains("value of A"), "{e}");
    let big: Vec<String> = (0..9).map(|i| format!("K{i}")).collect();
    let envs = big.iter().map(|k| EnvVar::new(k, "x".repeat(MAX_VALUE_LEN))).collect();
    assert!(filter_allowed(envs, &big).unwrap_err().to_string().contains("total"));
}

#[test]
fn env_names() {
    for ok in ["A", "_", "_a1", "ABC_def_9"] {
        validate_env_name(ok).unwrap();
    }
    for bad in ["", "1A", "A-B", "A B", "É", "A=B"] {
        assert!(validate_env_name(bad).is_err(), "{bad:?}");
    }
    validate_env_name(&"A".repeat(255)).unwrap();
    assert!(validate_env_name(&"A".repeat(256)).is_err());
}

/// Expectations from dstack's `dstack/dstack-util/src/parse_env_file.rs`, test `test_escape_value`.
#[test]
fn env_file_escaping_matches_dstack() {
    let cases = [
        ("simple", "simple"),
        ("hello world", "\"hello world\""),
        ("say \"hello\"", "\"say \\\"hello\\\"\""),
        ("line1\nline2", "\"line1\\nline2\""),
        ("price=$100", "\"price=\\$100\""),
        ("command=`date`", "\"command=\\`date\\`\""),
    ];
    for (value, escaped) in cases {
        assert_eq!(&*to_env_file(&[EnvVar::new("K", value)]), &format!("K={escaped}\n"));
    }
}

#[test]
fn debug_redacts_values() {
    let d = format!("{:?}", EnvVar::new("TOKEN", "hunter2"));
    assert!(d.contains("TOKEN") && !d.contains("hunter2"), "{d}");
}
