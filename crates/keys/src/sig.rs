//! secp256k1 recoverable signatures over Keccak-256, as dstack's KMS and guest agent produce them
//! (`dstack/kms/src/crypto.rs`, `dstack/guest-agent/src/rpc_service.rs`): 65 bytes `r ‖ s ‖ v`, `v` the
//! recovery id (0 or 1 in practice), `s` low (k256 normalizes), RFC 6979 deterministic nonces.
//!
//! Message layouts:
//! - `sign_message`: `Keccak256(prefix ‖ ":" ‖ app_id ‖ msg)` (e.g. `dstack-kms-issued`)
//! - `sign_message_with_timestamp`: `Keccak256(prefix ‖ ":" ‖ app_id ‖ u64_be(ts) ‖ msg)`
//! - GetKey chain link: `Keccak256("{purpose}:{hex(pubkey)}")`

use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use sha3::{Digest, Keccak256};

use crate::Error;

/// Length of a recoverable signature.
pub const RECOVERABLE_SIG_LEN: usize = 65;
/// Prefix of the KMS signature over an app's k256 public key.
pub const KMS_ISSUED_PREFIX: &[u8] = b"dstack-kms-issued";
/// Prefix of the KMS signature over an app's env-encryption public key.
pub const ENV_PUBKEY_PREFIX: &[u8] = b"dstack-env-encrypt-pubkey";

/// Keccak-256 of the concatenation of `parts`.
pub fn keccak256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Keccak256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Signs a 32-byte digest, returning `r ‖ s ‖ recid`.
pub fn sign_prehash_recoverable(key: &SigningKey, digest: &[u8; 32]) -> [u8; RECOVERABLE_SIG_LEN] {
    let (sig, recid) = key.sign_prehash_recoverable(digest);
    let mut out = [0u8; RECOVERABLE_SIG_LEN];
    out[..64].copy_from_slice(&sig.to_bytes());
    out[64] = recid.to_byte();
    out
}

/// Digest of dstack's `sign_message`.
pub fn message_digest(prefix: &[u8], app_id: &[u8], msg: &[u8]) -> [u8; 32] {
    keccak256(&[prefix, b":", app_id, msg])
}

/// Digest of dstack's `sign_message_with_timestamp`.
pub fn message_digest_with_timestamp(prefix: &[u8], app_id: &[u8], timestamp: u64, msg: &[u8]) -> [u8; 32] {
    keccak256(&[prefix, b":", app_id, &timestamp.to_be_bytes(), msg])
}

/// dstack's `sign_message(key, prefix, app_id, msg)`.
pub fn sign_message(key: &SigningKey, prefix: &[u8], app_id: &[u8], msg: &[u8]) -> [u8; RECOVERABLE_SIG_LEN] {
    sign_prehash_recoverable(key, &message_digest(prefix, app_id, msg))
}

/// dstack's `sign_message_with_timestamp(key, prefix, app_id, timestamp, msg)`.
pub fn sign_message_with_timestamp(
    key: &SigningKey,
    prefix: &[u8],
    app_id: &[u8],
    timestamp: u64,
    msg: &[u8],
) -> [u8; RECOVERABLE_SIG_LEN] {
    sign_prehash_recoverable(key, &message_digest_with_timestamp(prefix, app_id, timestamp, msg))
}

/// Recovers the signer of `digest` from a 65-byte signature. Rejects other lengths, recovery ids > 3 and
/// high-S signatures (dstack never produces them; accepting them would make signatures malleable).
pub fn recover(digest: &[u8; 32], sig: &[u8]) -> Result<VerifyingKey, Error> {
    let bytes: &[u8; RECOVERABLE_SIG_LEN] = sig
        .try_into()
        .map_err(|_| Error::Signature(format!("expected 65 bytes, got {}", sig.len())))?;
    let (rs, v) = bytes.split_at(64);
    let recid = v
        .first()
        .and_then(|b| RecoveryId::from_byte(*b))
        .ok_or_else(|| Error::Signature(format!("invalid recovery id {:?}", v.first())))?;
    let signature = Signature::from_slice(rs).map_err(|_| Error::Signature("r or s out of range".into()))?;
    if signature.normalize_s() != signature {
        return Err(Error::Signature("high-S signature rejected".into()));
    }
    VerifyingKey::recover_from_prehash(digest, &signature, recid)
        .map_err(|_| Error::Signature("public key recovery failed".into()))
}

/// Recovers the signer and checks it equals `expected`.
pub fn verify_recoverable(expected: &VerifyingKey, digest: &[u8; 32], sig: &[u8]) -> Result<(), Error> {
    let got = recover(digest, sig)?;
    if &got != expected {
        return Err(Error::Signature(format!(
            "signed by {}, expected {}",
            hex::encode(compressed(&got)),
            hex::encode(compressed(expected))
        )));
    }
    Ok(())
}

/// SEC1 compressed public key (33 bytes), as dstack's `to_sec1_bytes` writes for k256.
pub fn compressed(key: &VerifyingKey) -> Vec<u8> {
    key.to_sec1_point(true).as_bytes().to_vec()
}

/// Parses a secp256k1 secret of exactly 32 bytes (the crate's `from_slice` would zero-pad shorter input).
pub fn k256_signing_key(secret: &[u8]) -> Result<SigningKey, Error> {
    if secret.len() != 32 {
        return Err(Error::Length {
            what: "secp256k1 secret",
            expected: 32,
            got: secret.len(),
        });
    }
    SigningKey::from_slice(secret).map_err(|_| Error::InvalidScalar("secp256k1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keccak_known_answers() {
        // Keccak-256 (not SHA3-256) of "" and "abc": Ethereum's well-known values.
        assert_eq!(
            hex::encode(keccak256(&[])),
            "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
        );
        assert_eq!(
            hex::encode(keccak256(&[b"a", b"bc"])),
            "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"
        );
    }

    #[test]
    fn sign_and_recover_roundtrip() {
        let key = k256_signing_key(&[0x11; 32]).unwrap();
        let sig = sign_message(&key, KMS_ISSUED_PREFIX, &[7; 20], b"payload");
        assert!(sig[64] <= 1);
        let digest = message_digest(KMS_ISSUED_PREFIX, &[7; 20], b"payload");
        assert_eq!(&recover(&digest, &sig).unwrap(), key.verifying_key());
        verify_recoverable(key.verifying_key(), &digest, &sig).unwrap();
        // Deterministic (RFC 6979).
        assert_eq!(sig, sign_message(&key, KMS_ISSUED_PREFIX, &[7; 20], b"payload"));

        let ts = sign_message_with_timestamp(&key, ENV_PUBKEY_PREFIX, &[7; 20], 1_700_000_000, b"pk");
        let d = message_digest_with_timestamp(ENV_PUBKEY_PREFIX, &[7; 20], 1_700_000_000, b"pk");
        assert_eq!(
            d,
            keccak256(&[
                ENV_PUBKEY_PREFIX,
                b":",
                &[7; 20],
                &1_700_000_000u64.to_be_bytes(),
                b"pk"
            ])
        );
        verify_recoverable(key.verifying_key(), &d, &ts).unwrap();
    }

    #[test]
    fn recover_rejects_malformed() {
        let key = k256_signing_key(&[0x22; 32]).unwrap();
        let digest = [5u8; 32];
        let sig = sign_prehash_recoverable(&key, &digest);
        assert!(recover(&digest, &sig[..64]).is_err());
        let mut bad_v = sig;
        bad_v[64] = 27;
        assert!(
            recover(&digest, &bad_v)
                .unwrap_err()
                .to_string()
                .contains("recovery id")
        );
        let mut zero = sig;
        zero[..32].fill(0);
        assert!(recover(&digest, &zero).is_err());
        // High-S twin of a valid signature: same signer, but rejected.
        let s = Signature::from_slice(&sig[..64]).unwrap();
        let (r, s_scalar) = s.split_scalars();
        let high = Signature::from_scalars(r.to_bytes(), (-*s_scalar).to_bytes()).unwrap();
        let mut high_sig = [0u8; 65];
        high_sig[..64].copy_from_slice(&high.to_bytes());
        high_sig[64] = sig[64] ^ 1;
        assert!(recover(&digest, &high_sig).unwrap_err().to_string().contains("high-S"));
        // Wrong signer detected.
        let other = k256_signing_key(&[0x33; 32]).unwrap();
        assert!(verify_recoverable(other.verifying_key(), &digest, &sig).is_err());
        assert!(k256_signing_key(&[0; 32]).is_err());
        assert!(k256_signing_key(&[1; 31]).is_err());
    }
}
