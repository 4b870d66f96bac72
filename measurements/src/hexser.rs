//! Serde helpers: bytes as lowercase hex (accepting an optional `0x` prefix on input).

use serde::{Deserialize, Deserializer, Serializer};

/// `#[serde(with = "crate::hexser")]` for `Vec<u8>`.
pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// Inverse of [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    decode(&s).map_err(serde::de::Error::custom)
}

/// Decode hex text with an optional `0x` prefix.
pub fn decode(s: &str) -> Result<Vec<u8>, hex::FromHexError> {
    let t = s.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    hex::decode(t)
}

/// Decode exactly `N` bytes of hex.
pub fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], String> {
    let v = decode(s).map_err(|e| e.to_string())?;
    v.as_slice()
        .try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", v.len()))
}
