//! Serde adapters for protobuf `bytes` fields: lowercase hex out; on input upper- or lowercase
//! hex with an optional `0x`/`0X` prefix. Used through `#[serde(with = ...)]` by generated code.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;

fn decode_hex<E: de::Error>(s: &str) -> Result<Vec<u8>, E> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    hex::decode(digits).map_err(|e| E::custom(format_args!("invalid hex string: {e}")))
}

struct HexVisitor;

impl Visitor<'_> for HexVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a hex string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        decode_hex(v)
    }
}

/// Singular `bytes` (`Vec<u8>`).
pub mod bytes {
    use super::*;

    /// Serializes as a lowercase hex string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    /// Parses a hex string (any case, optional `0x`).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_str(HexVisitor)
    }
}

/// proto3 `optional bytes` (`Option<Vec<u8>>`); `null` is `None`.
pub mod option {
    use super::*;

    /// Serializes `Some` as a lowercase hex string and `None` as null.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&hex::encode(v)),
            None => s.serialize_none(),
        }
    }

    struct OptVisitor;

    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a hex string or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::bytes::deserialize(d).map(Some)
        }
    }

    /// Parses null or a hex string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptVisitor)
    }
}

/// `repeated bytes` (`Vec<Vec<u8>>`).
pub mod repeated {
    use super::*;

    /// Serializes as an array of lowercase hex strings.
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }

    struct Element(Vec<u8>);

    impl<'de> serde::Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::bytes::deserialize(d).map(Element)
        }
    }

    struct SeqVisitor;

    impl<'de> Visitor<'de> for SeqVisitor {
        type Value = Vec<Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of hex strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // Cap the pre-allocation: the size hint comes from the peer.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(Element(v)) = seq.next_element()? {
                out.push(v);
            }
            Ok(out)
        }
    }

    /// Parses an array of hex strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        d.deserialize_seq(SeqVisitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Default, Debug, PartialEq)]
    #[serde(default)]
    struct T {
        #[serde(with = "super::bytes")]
        one: Vec<u8>,
        #[serde(with = "super::option", skip_serializing_if = "Option::is_none")]
        opt: Option<Vec<u8>>,
        #[serde(with = "super::repeated")]
        many: Vec<Vec<u8>>,
    }

    #[test]
    fn encodes_lowercase() {
        let t = T {
            one: vec![0xab, 0x01],
            opt: Some(vec![0xff]),
            many: vec![vec![], vec![0xde, 0xad]],
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"one":"ab01","opt":"ff","many":["","dead"]}"#
        );
        let none = T::default();
        assert_eq!(serde_json::to_string(&none).unwrap(), r#"{"one":"","many":[]}"#);
    }

    #[test]
    fn accepts_case_and_prefix() {
        let t: T = serde_json::from_str(r#"{"one":"0xABcd","opt":"0XFF","many":["0x01","A0"]}"#).unwrap();
        assert_eq!(t.one, vec![0xab, 0xcd]);
        assert_eq!(t.opt, Some(vec![0xff]));
        assert_eq!(t.many, vec![vec![1], vec![0xa0]]);
        let t: T = serde_json::from_str(r#"{"opt":null}"#).unwrap();
        assert_eq!(t.opt, None);
    }

    #[test]
    fn rejects_bad_hex() {
        for bad in [
            r#"{"one":"abc"}"#,
            r#"{"one":"zz"}"#,
            r#"{"one":12}"#,
            r#"{"many":["00","0xg0"]}"#,
            r#"{"many":"00"}"#,
            r#"{"opt":"0x1"}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
    }
}
