//! Human-readable sizes as dstack's `size-parser` accepts them: a JSON number of bytes, or a string that is
//! decimal bytes (`"1024"`), hex bytes (`"0x1000"`), or a number with one binary suffix K/M/G/T
//! (case-insensitive, 1024-based: `"4G"`). Surrounding whitespace is ignored.
//!
//! Stricter than dstack in one corner: dstack strips *every* trailing copy of the suffix letter
//! (`"4GG"` = 4 GiB); here exactly one suffix is allowed.

use serde::{Deserialize, Serialize};

/// A size as written in the file (kept so normalized output reproduces it) plus its value in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HumanSize {
    raw: SizeRepr,
    bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Number(u64),
    Text(String),
}

impl HumanSize {
    /// Parses a size string.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(Self {
            bytes: parse_size(s)?,
            raw: SizeRepr::Text(s.to_string()),
        })
    }

    /// A size given as a plain number of bytes.
    pub fn from_bytes(bytes: u64) -> Self {
        Self {
            raw: SizeRepr::Number(bytes),
            bytes,
        }
    }

    /// Value in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Parses a size string to bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("size is empty".into());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| format!("invalid hex size {s:?}"));
    }
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("unknown size suffix {c:?} in {s:?} (use K, M, G or T)")),
            };
            (t.get(..i).unwrap_or_default(), mult)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid size {s:?}"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {s:?} does not fit in 64 bits"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"))
}

impl Serialize for HumanSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size: a byte count or a string like \"4G\"")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<HumanSize, E> {
                Ok(HumanSize::from_bytes(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<HumanSize, E> {
                u64::try_from(v)
                    .map(HumanSize::from_bytes)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<HumanSize, E> {
                HumanSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dstack_forms() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size(" 2k ").unwrap(), 2048);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("0x1000").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "",
            "G",
            "4X",
            "-4G",
            "4.5G",
            "4GG",
            "0xzz",
            "99999999999999999999",
            "20000000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_keeps_written_form() {
        let s: HumanSize = serde_json::from_str("\"4G\"").unwrap();
        assert_eq!(s.bytes(), 4 << 30);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"4G\"");
        let n: HumanSize = serde_json::from_str("1048576").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "1048576");
        assert!(serde_json::from_str::<HumanSize>("-1").is_err());
        assert!(serde_json::from_str::<HumanSize>("1.5").is_err());
        assert!(serde_json::from_str::<HumanSize>("true").is_err());
    }
}
