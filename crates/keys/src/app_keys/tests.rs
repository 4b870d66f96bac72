//! Expected values come from `tests/python/appkeys_xcheck.py`, an independent implementation of dstack's
//! derivation written with pyca/cryptography (HKDF by hand with `hmac`, P-256 PKCS#8 from OpenSSL) and
//! `eth_keys` (secp256k1, RFC 6979). That script reproduces dstack's own `kdf.rs` vector (`663afd58…8813`),
//! which is what makes its other outputs trustworthy.

use super::*;
use crate::kdf::p256_from_pkcs8_der;

const ROOT_CA_DER: &str = "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420f57527cea4ab7ffb\
                           49af99b158cdc0e3ec06398f528349ea236b7d2afe19cec1a1440342000491f50522407ce29dce3ed7d31a15\
                           d80c1c42f13a23552d2b33a0ce09ee11e47bce95936f3e7f80d195f879e28e1b144ef37ac9ab8e36a690cbf9\
                           30b775897b27";

fn root_ca() -> p256::SecretKey {
    p256_from_pkcs8_der(&hex::decode(ROOT_CA_DER).unwrap()).unwrap()
}

fn root_k256() -> SigningKey {
    // sha256(b"root-k256")
    use sha2::{Digest, Sha256};
    k256_signing_key(&Sha256::digest(b"root-k256")).unwrap()
}

fn app_id() -> [u8; 20] {
    std::array::from_fn(|i| i as u8)
}

#[test]
fn app_key_set_matches_independent_implementation() {
    let keys = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[0xee; 20]).unwrap();
    assert_eq!(
        hex::encode(*keys.disk_crypt_key),
        "7eaa58cddcc31c337d5a3cdfacf389205a4c1309c79d4f602404b23ac7dcce4a"
    );
    assert_eq!(
        hex::encode(*keys.env_crypt_key),
        "23c369b81c99eb4031520ff5627b8243607ae43ff0befafab62bf142d3d709a2"
    );
    assert_eq!(
        hex::encode(*keys.k256_key),
        "a5fe464b1c3b6099d1260a48864d0bd3192f8775fe1342a8e394155c10a41e59"
    );
    assert_eq!(
        hex::encode(keys.k256_signature),
        "1384f5da564953312dc47ea9e520389fc66f0682f2e92f02315d4e00cd9656af30a4f8184e8891d7a8b36e0ce70f399a6baa0c1549b1\
         bbd4667e344918c7b97b01"
    );
    let dbg = format!("{keys:?}");
    assert!(!dbg.contains("7eaa58cd"), "secret in Debug: {dbg}");
}

#[test]
fn empty_instance_id_and_bad_lengths() {
    let keys = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[]).unwrap();
    assert_eq!(
        hex::encode(*keys.disk_crypt_key),
        "dec15ef21ec90508f9c4b954d106bfea89fc4a47832afce48d4a01845b7189db"
    );
    assert!(derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[1; 19]).is_err());
}

#[test]
fn env_pubkey_and_signatures() {
    let r = env_pubkey_response(&root_ca(), &root_k256(), &app_id(), 1_700_000_000).unwrap();
    assert_eq!(
        hex::encode(r.public_key),
        "d91e3f8d29423e75315020c59144cc7b2ca05777066b7d490f4208d54635e120"
    );
    assert_eq!(
        hex::encode(r.signature),
        "607dfb768f9fe1cef2f033fb17105969c1f5af30bc9edfb2d7e0cbccab49327442002654718f48d900063d4d3245d1ed437989148135\
         758ae7f9045d1ed09dc600"
    );
    assert_eq!(
        hex::encode(r.signature_v1),
        "6d3961dbdfcb31406f5c1c0b1d92a0f5f5e0cb756c496dc730f179fc14cc2b3974a44cce7ccc80a12c4d387096d904d526b906935b66\
         1d18b5b10bcca6df229d00"
    );
    let root_pub = compressed(root_k256().verifying_key());
    assert_eq!(
        hex::encode(&root_pub),
        "02f9a411bccd2c2ff1241f6d9c086f92014fb94e4f2845f2971145998d46f18672"
    );
    let signer = recover_env_pubkey_signer(&app_id(), &r.public_key, r.timestamp, &r.signature_v1).unwrap();
    assert_eq!(compressed(&signer), root_pub);
    let legacy = recover_env_pubkey_signer_legacy(&app_id(), &r.public_key, &r.signature).unwrap();
    assert_eq!(compressed(&legacy), root_pub);
    // A different timestamp recovers someone else.
    let wrong = recover_env_pubkey_signer(&app_id(), &r.public_key, r.timestamp + 1, &r.signature_v1).unwrap();
    assert_ne!(compressed(&wrong), root_pub);
    // The env secret's public key is what the KMS publishes.
    let secret = env_crypt_key(&root_ca(), &app_id()).unwrap();
    assert_eq!(x25519_public(&secret), r.public_key);
}

#[test]
fn app_ca_key_matches_independent_implementation() {
    let ca = app_ca_key(&root_ca(), &app_id()).unwrap();
    assert_eq!(
        hex::encode(ca.to_bytes()),
        "f562b104a3513a1894c24ebe16d7286550aedf9017373e96fc35a2d0c21a1da9"
    );
}

#[test]
fn get_key_chain_matches_and_verifies() {
    let keys = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[0xee; 20]).unwrap();
    let k = get_key(
        &keys.k256_key,
        &keys.k256_signature,
        "wallet/eth",
        "signing",
        KeyAlgorithm::Secp256k1,
    )
    .unwrap();
    assert_eq!(
        hex::encode(*k.key),
        "c029c2b72ea10a960842ff1d5fc3eb3edaec273d98facb51c40ef104ce10e3e9"
    );
    assert_eq!(
        hex::encode(&k.public_key),
        "036a231b8ea246ea97345deab5702f9b9b50600de2849d3956df54d84b4586868d"
    );
    assert_eq!(
        hex::encode(&k.signature_chain[0]),
        "aefd3bfcd3da3b7b2e80f88c130048d10b97e5bf541834301b50da01c35f2dbc1a372abfff207573a7f072eaafa20107777d9d310f66\
         732da623ccb66cd0c49101"
    );
    assert_eq!(k.signature_chain[1], keys.k256_signature.to_vec());

    let chain = verify_key_chain(&app_id(), "signing", &k.public_key, &k.signature_chain).unwrap();
    assert_eq!(
        hex::encode(&chain.app_public_key),
        "033d02a56e3bb70196ea57f3e85d7070b614cbede5deaa890d7120f83af3970cec"
    );
    assert_eq!(chain.kms_public_key, compressed(root_k256().verifying_key()));

    // Wrong purpose or app id yields different (untrusted) keys.
    let other = verify_key_chain(&app_id(), "other", &k.public_key, &k.signature_chain).unwrap();
    assert_ne!(other.app_public_key, chain.app_public_key);
    let other = verify_key_chain(&[9; 20], "signing", &k.public_key, &k.signature_chain).unwrap();
    assert_ne!(other.kms_public_key, chain.kms_public_key);
    assert!(verify_key_chain(&app_id(), "signing", &k.public_key, &k.signature_chain[..1]).is_err());
}

#[test]
fn get_key_ed25519_same_secret_different_pubkey() {
    let keys = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[0xee; 20]).unwrap();
    let ed = get_key(
        &keys.k256_key,
        &keys.k256_signature,
        "wallet/eth",
        "signing",
        KeyAlgorithm::Ed25519,
    )
    .unwrap();
    assert_eq!(
        hex::encode(*ed.key),
        "c029c2b72ea10a960842ff1d5fc3eb3edaec273d98facb51c40ef104ce10e3e9"
    );
    assert_eq!(
        hex::encode(&ed.public_key),
        "4b4adee60b141a4ecb29b87a400fafeaf781999fbde712284e89a58cbde695f6"
    );
    verify_key_chain(&app_id(), "signing", &ed.public_key, &ed.signature_chain).unwrap();
}

#[test]
fn algorithm_names() {
    assert_eq!(KeyAlgorithm::parse("").unwrap(), KeyAlgorithm::Secp256k1);
    assert_eq!(KeyAlgorithm::parse("k256").unwrap(), KeyAlgorithm::Secp256k1);
    assert_eq!(KeyAlgorithm::parse("secp256k1").unwrap(), KeyAlgorithm::Secp256k1);
    assert_eq!(KeyAlgorithm::parse("ed25519").unwrap(), KeyAlgorithm::Ed25519);
    assert!(KeyAlgorithm::parse("rsa").is_err());
}

#[test]
fn cached_app_level_keys_give_the_same_set() {
    let direct = derive_app_keys(&root_ca(), &root_k256(), &app_id(), &[0xee; 20]).unwrap();
    let app = AppLevelKeys::derive(&root_ca(), &root_k256(), &app_id()).unwrap();
    let cached = app.for_instance(&root_ca(), &[0xee; 20]).unwrap();
    assert_eq!(*cached.disk_crypt_key, *direct.disk_crypt_key);
    assert_eq!(*cached.env_crypt_key, *direct.env_crypt_key);
    assert_eq!(*cached.k256_key, *direct.k256_key);
    assert_eq!(cached.k256_signature, direct.k256_signature);
    let other = app.for_instance(&root_ca(), &[0xef; 20]).unwrap();
    assert_ne!(*other.disk_crypt_key, *direct.disk_crypt_key);
    assert!(app.for_instance(&root_ca(), &[1; 5]).is_err());
    assert!(!format!("{app:?}").contains("23c369b8"));
}

#[test]
fn seed_app_keys_match_independent_implementation() {
    let k = derive_seed_app_keys(&[0x5a; 32]).unwrap();
    assert_eq!(
        hex::encode(k.app_ca_key.to_bytes()),
        "b55e8ddbbd90fb600aaa168604e8ddcf59b1c87e315306b89270b67a80c6dc06"
    );
    assert_eq!(
        hex::encode(*k.disk_crypt_key),
        "fed13aca32a4211e49ec404ae69ffc9661ab9a979ed09da085200decea252e88"
    );
    assert_eq!(
        hex::encode(*k.k256_key),
        "b27467775543ff733ad3d3eac2729b005432f87012d56ac6eb3c2c3d1a544b55"
    );
}
