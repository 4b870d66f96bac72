//! `MRCONFIGID` values (48 bytes) binding a TD to its app config, as dstack's `mr_config.rs` defines them:
//! - V1: `0x01 ‖ compose_hash(32) ‖ 0…`
//! - V2: `0x02 ‖ keccak256(compose_hash ‖ app_id(20) ‖ kind_byte ‖ key_provider_id) ‖ 0…`
//!   with kind_byte none 0, local 1, kms 2, tpm 3
//! - V3: `0x03 ‖ sha256("dstack-mr-config-v3:" ‖ 0x00 ‖ document) ‖ 0…` over the document string as given.

use sha2::Sha256;
use sha3::{Digest, Keccak256};

use crate::{AppId, ComposeHash, KeyProviderKind};

/// Length of TDX MRCONFIGID.
pub const MR_CONFIG_ID_LEN: usize = 48;
const V3_DOMAIN: &[u8] = b"dstack-mr-config-v3:";

/// An MRCONFIGID layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MrConfig<'a> {
    V1 {
        compose_hash: &'a ComposeHash,
    },
    V2 {
        compose_hash: &'a ComposeHash,
        app_id: &'a AppId,
        key_provider: KeyProviderKind,
        key_provider_id: &'a [u8],
    },
    V3 {
        document: &'a str,
    },
}

/// dstack's byte for each key provider kind.
pub fn key_provider_byte(kind: KeyProviderKind) -> u8 {
    match kind {
        KeyProviderKind::None => 0,
        KeyProviderKind::Local => 1,
        KeyProviderKind::Kms => 2,
        KeyProviderKind::Tpm => 3,
    }
}

impl MrConfig<'_> {
    /// The 48-byte MRCONFIGID.
    pub fn to_mr_config_id(&self) -> [u8; MR_CONFIG_ID_LEN] {
        let mut id = [0u8; MR_CONFIG_ID_LEN];
        let (version, digest): (u8, [u8; 32]) = match self {
            Self::V1 { compose_hash } => (1, compose_hash.0),
            Self::V2 {
                compose_hash,
                app_id,
                key_provider,
                key_provider_id,
            } => {
                let mut h = Keccak256::new();
                h.update(compose_hash.0);
                h.update(app_id.0);
                h.update([key_provider_byte(*key_provider)]);
                h.update(key_provider_id);
                (2, h.finalize().into())
            }
            Self::V3 { document } => {
                let mut h = Sha256::new();
                h.update(V3_DOMAIN);
                h.update([0u8]);
                h.update(document.as_bytes());
                (3, h.finalize().into())
            }
        };
        id[0] = version;
        id[1..33].copy_from_slice(&digest);
        id
    }
}

/// True when MRCONFIGID is unset (all zero): the host did not bind the config, nothing to verify.
pub fn is_unset(mr_config_id: &[u8; MR_CONFIG_ID_LEN]) -> bool {
    mr_config_id.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed independently in Python (pycryptodome keccak + hashlib):
    //   ch = bytes(range(32)); app = b'\xaa'*20; kpid = bytes.fromhex('3059301306072a8648ce3d0201')
    //   v1 = b'\x01' + ch + bytes(15)
    //   v2 = b'\x02' + keccak256(ch + app + b'\x02' + kpid) + bytes(15)
    //   v3 = b'\x03' + sha256(b'dstack-mr-config-v3:' + b'\0' + doc) + bytes(15)
    const V1: &str = "01000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f000000000000000000000000000000";
    const V2_KMS: &str =
        "026c322f058eda0a2bb5549ad1f2288bd225bbbe5fd631b750a39a79862003b7d4000000000000000000000000000000";
    const V2_NONE: &str =
        "02a0fae9cbfe0ff1442911d84ec24b442a67dd08924f45a74918a2412337a4e8eb000000000000000000000000000000";
    const V3: &str = "034d8c0de4e917ee9b6a2cb1abcdaf86d2cefa58d75ab7db48d064c7f4fc05225c000000000000000000000000000000";

    fn ch() -> ComposeHash {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        ComposeHash(b)
    }

    #[test]
    fn v1_layout() {
        let id = MrConfig::V1 { compose_hash: &ch() }.to_mr_config_id();
        assert_eq!(hex::encode(id), V1);
        assert!(!is_unset(&id));
        assert!(is_unset(&[0; 48]));
    }

    #[test]
    fn v2_matches_python_keccak() {
        let kpid = hex::decode("3059301306072a8648ce3d0201").unwrap();
        let app = AppId([0xaa; 20]);
        let id = MrConfig::V2 {
            compose_hash: &ch(),
            app_id: &app,
            key_provider: KeyProviderKind::Kms,
            key_provider_id: &kpid,
        }
        .to_mr_config_id();
        assert_eq!(hex::encode(id), V2_KMS);
        let none = MrConfig::V2 {
            compose_hash: &ch(),
            app_id: &app,
            key_provider: KeyProviderKind::None,
            key_provider_id: &[],
        }
        .to_mr_config_id();
        assert_eq!(hex::encode(none), V2_NONE);
    }

    #[test]
    fn v3_hashes_document_bytes() {
        let doc = r#"{"compose_hash":"2222222222222222222222222222222222222222222222222222222222222222","key_provider":"none"}"#;
        assert_eq!(hex::encode(MrConfig::V3 { document: doc }.to_mr_config_id()), V3);
    }
}
