//! Hex (de)serialization matching dstack's `serde_human_bytes`: lowercase on output, either case on input,
//! no `0x` prefix, and fixed-size identities as newtypes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

/// Decodes plain hex (no `0x`), either case, naming `field` in the error.
pub fn decode_hex(field: &str, s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| format!("{field}: invalid hex ({e})"))
}

/// Decodes hex into exactly `N` bytes.
pub fn decode_hex_array<const N: usize>(field: &str, s: &str) -> Result<[u8; N], String> {
    let bytes = decode_hex(field, s)?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| format!("{field}: expected {N} bytes of hex, got {len} bytes"))
}

/// `#[serde(with = "hex_vec")]` for `Vec<u8>`.
pub mod hex_vec {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(&s).map_err(|e| D::Error::custom(format!("invalid hex ({e})")))
    }
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Parses from a byte slice of exactly `LEN` bytes.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, crate::Error> {
                <[u8; $len]>::try_from(bytes).map(Self).map_err(|_| crate::Error::Length {
                    field: stringify!($name),
                    expected: $len,
                    got: bytes.len(),
                })
            }

            /// Parses from lowercase or uppercase hex of exactly `LEN` bytes.
            pub fn from_hex(s: &str) -> Result<Self, crate::Error> {
                decode_hex_array::<$len>(stringify!($name), s)
                    .map(Self)
                    .map_err(crate::Error::Invalid)
            }

            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                decode_hex_array::<$len>(stringify!($name), &s).map(Self).map_err(D::Error::custom)
            }
        }
    };
}

hex_id!(
    /// 20-byte application id (`compose_hash[..20]` or a pinned id, e.g. an on-chain contract address).
    AppId,
    20
);
hex_id!(
    /// 20-byte instance id `sha256(seed ‖ app_id)[..20]`.
    InstanceId,
    20
);
hex_id!(
    /// SHA-256 of the raw `app-compose.json` bytes.
    ComposeHash,
    32
);
hex_id!(
    /// Random 20-byte seed from which the instance id is derived.
    InstanceIdSeed,
    20
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_id_hex_roundtrip_and_errors() {
        let id = AppId::from_hex("00112233445566778899AABBCCDDEEFF00112233").unwrap();
        assert_eq!(id.to_hex(), "00112233445566778899aabbccddeeff00112233");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"00112233445566778899aabbccddeeff00112233\"");
        assert_eq!(serde_json::from_str::<AppId>(&json).unwrap(), id);

        let short = AppId::from_hex("0011").unwrap_err().to_string();
        assert!(short.contains("expected 20 bytes"), "{short}");
        let bad = serde_json::from_str::<AppId>("\"zz\"").unwrap_err().to_string();
        assert!(bad.contains("invalid hex"), "{bad}");
        assert!(serde_json::from_str::<AppId>("\"0x00112233445566778899aabbccddeeff00112233\"").is_err());
        assert!(serde_json::from_str::<AppId>("20").is_err());
        assert!(AppId::from_slice(&[0u8; 19]).is_err());
        assert_eq!(ComposeHash::from_slice(&[7u8; 32]).unwrap().0, [7u8; 32]);
    }
}
