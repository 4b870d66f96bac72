//! Interop with the real dstack Python SDK (PyPI `dstack-sdk`) and an independent Python implementation:
//! - the SDK's `encrypt_env_vars_sync` encrypts, our `decrypt_env` decrypts;
//! - the SDK's `verify_env_encrypt_public_key` (+ `_legacy`) recovers our KMS signer from our signatures;
//! - `tests/python/appkeys_xcheck.py` (pyca/cryptography + eth_keys) derives the same app keys as we do.
//!
//! External input: env `DSTACK_TEST_PYTHON` = a python interpreter with `dstack-sdk` and a Keccak backend
//! for `eth-hash` installed (the SDK's signature check needs one and does not declare it):
//! `python3 -m venv /var/cache/dstack-rs/venv &&
//!  /var/cache/dstack-rs/venv/bin/pip install dstack-sdk 'eth-hash[pycryptodome]'`.
//! Unset: each test prints a loud SKIP and passes, unless `DSTACK_REQUIRE_FIXTURES=1`, where it fails.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;

use dstack_keys::{
    EnvVar,
    app_keys::{ID_LEN, KeyAlgorithm, derive_app_keys, env_crypt_key, env_pubkey_response, get_key, x25519_public},
    decrypt_env,
    kdf::p256_from_pkcs8_der,
    sig::{compressed, k256_signing_key},
};

fn python() -> Option<String> {
    match std::env::var("DSTACK_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            if std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() == Ok("1") {
                panic!("DSTACK_TEST_PYTHON is not set but DSTACK_REQUIRE_FIXTURES=1");
            }
            // Written to the raw stderr handle so the notice survives the test harness's output capture.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP sdk_interop: DSTACK_TEST_PYTHON not set (python with `pip install dstack-sdk`)"
            );
            None
        }
    }
}

fn run_python(py: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const ROOT_CA_DER: &str = "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420f57527cea4ab7ffb\
                           49af99b158cdc0e3ec06398f528349ea236b7d2afe19cec1a1440342000491f50522407ce29dce3ed7d31a15\
                           d80c1c42f13a23552d2b33a0ce09ee11e47bce95936f3e7f80d195f879e28e1b144ef37ac9ab8e36a690cbf9\
                           30b775897b27";

fn root_ca() -> p256::SecretKey {
    p256_from_pkcs8_der(&hex::decode(ROOT_CA_DER).unwrap()).unwrap()
}

fn root_k256() -> k256::ecdsa::SigningKey {
    use sha2::{Digest, Sha256};
    k256_signing_key(&Sha256::digest(b"root-k256")).unwrap()
}

fn app_id() -> [u8; ID_LEN] {
    std::array::from_fn(|i| i as u8)
}

const ENCRYPT: &str = r#"
import json, sys
from dstack_sdk import encrypt_env_vars_sync, EnvVar
envs = [EnvVar(key=k, value=v) for k, v in json.loads(sys.argv[2])]
print(encrypt_env_vars_sync(envs, sys.argv[1]))
"#;

#[test]
fn sdk_encrypt_env_vars_decrypts_with_ours() {
    let Some(py) = python() else { return };
    let secret = env_crypt_key(&root_ca(), &app_id()).unwrap();
    let pubkey = x25519_public(&secret);
    let vars = [
        ("API_KEY", "s3cr3t"),
        ("UNICODE", "Ünïcode ✓ 😀"),
        ("QUOTES", "say \"hi\" and \\ bye\nnext line"),
        ("EMPTY", ""),
    ];
    let json = serde_json::to_string(&vars).unwrap();
    let blob_hex = run_python(&py, &["-c", ENCRYPT, &hex::encode(pubkey), &json]);
    let blob = hex::decode(blob_hex.trim()).unwrap();
    let got = decrypt_env(&secret, &blob).unwrap();
    let want: Vec<EnvVar> = vars.iter().map(|(k, v)| EnvVar::new(*k, *v)).collect();
    assert_eq!(got, want);
    // And a key that is not the recipient cannot open it.
    assert!(decrypt_env(&[0x99; 32], &blob).is_err());
}

const VERIFY: &str = r#"
import sys, warnings
from dstack_sdk import verify_env_encrypt_public_key, verify_env_encrypt_public_key_legacy
pk, sig, sig_v1, app_id, ts = bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4], int(sys.argv[5])
print(verify_env_encrypt_public_key(pk, sig_v1, app_id, ts))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    print(verify_env_encrypt_public_key_legacy(pk, sig, app_id))
print(verify_env_encrypt_public_key(pk, sig_v1, app_id, ts + 1))
"#;

#[test]
fn sdk_verifies_our_env_pubkey_signatures() {
    let Some(py) = python() else { return };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = env_pubkey_response(&root_ca(), &root_k256(), &app_id(), now).unwrap();
    let out = run_python(
        &py,
        &[
            "-c",
            VERIFY,
            &hex::encode(r.public_key),
            &hex::encode(r.signature),
            &hex::encode(r.signature_v1),
            &hex::encode(app_id()),
            &now.to_string(),
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    let expected = format!("0x{}", hex::encode(compressed(root_k256().verifying_key())));
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], expected, "timestamped signature");
    assert_eq!(lines[1], expected, "legacy signature");
    assert_ne!(lines[2], expected, "a different timestamp must not verify as our key");
}

/// Runs the independent Python derivation and compares every value with ours.
#[test]
fn independent_python_derivation_agrees() {
    let Some(py) = python() else { return };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/appkeys_xcheck.py");
    let out = run_python(&py, &[script]);
    let py: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();

    assert_eq!(
        py["dstack_vector"],
        "663afd58820be8ad645f9c035e93199d114ab16f738db62393bc1d7d623e8813"
    );
    let keys = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[0xee; 20]).unwrap();
    assert_eq!(py["disk"], hex::encode(*keys.disk_crypt_key));
    assert_eq!(py["env"], hex::encode(*keys.env_crypt_key));
    assert_eq!(py["env_pub"], hex::encode(x25519_public(&keys.env_crypt_key)));
    assert_eq!(py["k256"], hex::encode(*keys.k256_key));
    assert_eq!(py["k256_sig"], hex::encode(keys.k256_signature));
    assert_eq!(
        py["root_k256_pub"],
        hex::encode(compressed(root_k256().verifying_key()))
    );
    let no_inst = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[]).unwrap();
    assert_eq!(py["disk_noinst"], hex::encode(*no_inst.disk_crypt_key));

    let k = get_key(
        &keys.k256_key,
        &keys.k256_signature,
        "wallet/eth",
        "signing",
        KeyAlgorithm::Secp256k1,
    )
    .unwrap();
    assert_eq!(py["getkey"], hex::encode(*k.key));
    assert_eq!(py["getkey_pub"], hex::encode(&k.public_key));
    assert_eq!(py["getkey_sig"], hex::encode(&k.signature_chain[0]));
    let ed = get_key(
        &keys.k256_key,
        &keys.k256_signature,
        "wallet/eth",
        "signing",
        KeyAlgorithm::Ed25519,
    )
    .unwrap();
    assert_eq!(py["ed_pub"], hex::encode(&ed.public_key));

    let r = env_pubkey_response(&root_ca(), &root_k256(), &app_id(), 1_700_000_000).unwrap();
    assert_eq!(py["env_sig"], hex::encode(r.signature));
    assert_eq!(py["env_sig_v1"], hex::encode(r.signature_v1));
    let ca = dstack_keys::app_keys::app_ca_key(&root_ca(), &app_id()).unwrap();
    assert_eq!(py["app_ca_scalar"], hex::encode(ca.to_bytes()));
    let seed = dstack_keys::app_keys::derive_seed_app_keys(&[0x5a; 32]).unwrap();
    assert_eq!(py["seed_app_ca_scalar"], hex::encode(seed.app_ca_key.to_bytes()));
    assert_eq!(py["seed_disk"], hex::encode(*seed.disk_crypt_key));
    assert_eq!(py["seed_k256"], hex::encode(*seed.k256_key));
}
