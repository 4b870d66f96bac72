//! dstack runtime events (RTMR3, event type 0x08000001) and their digests.
//!
//! V1 digest: `SHA384(u32_le(0x08000001) ‖ ":" ‖ name ‖ ":" ‖ payload)`.
//! V2 digest: `SHA384(JCS({"name":name,"payload":hex(payload),"type":134217729}))`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha384};

use super::{DSTACK_RUNTIME_EVENT_TYPE, TdxEvent};

/// Which digest convention a runtime event uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventLogVersion {
    #[default]
    V1,
    V2,
}

impl EventLogVersion {
    /// From the JSON `version` field (absent or 1 = V1, 2 = V2).
    pub fn from_number(v: Option<u32>) -> Option<Self> {
        match v {
            None | Some(0) | Some(1) => Some(Self::V1),
            Some(2) => Some(Self::V2),
            Some(_) => None,
        }
    }

    pub fn number(self) -> u32 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }
}

/// A dstack runtime event, extended into RTMR3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    pub name: String,
    pub payload: Vec<u8>,
    pub version: EventLogVersion,
}

impl RuntimeEvent {
    pub fn new(name: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            payload: payload.into(),
            version: EventLogVersion::V1,
        }
    }

    pub fn with_version(mut self, version: EventLogVersion) -> Self {
        self.version = version;
        self
    }

    /// The bytes hashed into the digest.
    pub fn preimage(&self) -> Vec<u8> {
        match self.version {
            EventLogVersion::V1 => {
                let mut v = Vec::with_capacity(6 + self.name.len() + self.payload.len());
                v.extend_from_slice(&DSTACK_RUNTIME_EVENT_TYPE.to_le_bytes());
                v.push(b':');
                v.extend_from_slice(self.name.as_bytes());
                v.push(b':');
                v.extend_from_slice(&self.payload);
                v
            }
            EventLogVersion::V2 => canonical_json_v2(&self.name, &self.payload).into_bytes(),
        }
    }

    /// SHA-384 digest extended into RTMR3.
    pub fn digest(&self) -> [u8; 48] {
        Sha384::digest(self.preimage()).into()
    }

    /// The JSON event-log entry (digest included).
    pub fn to_tdx_event(&self) -> TdxEvent {
        TdxEvent {
            imr: 3,
            event_type: DSTACK_RUNTIME_EVENT_TYPE,
            digest: self.digest().to_vec(),
            event: self.name.clone(),
            event_payload: self.payload.clone(),
            version: match self.version {
                EventLogVersion::V1 => None,
                EventLogVersion::V2 => Some(2),
            },
        }
    }
}

/// RFC 8785 (JCS) canonical JSON of `{"name","payload","type"}`: keys already in sorted
/// order, no whitespace, the integer as-is, strings escaped per JCS.
pub fn canonical_json_v2(name: &str, payload: &[u8]) -> String {
    let mut s = String::with_capacity(48 + name.len() + 2 * payload.len());
    s.push_str("{\"name\":");
    push_jcs_string(&mut s, name);
    s.push_str(",\"payload\":\"");
    s.push_str(&hex::encode(payload));
    s.push_str("\",\"type\":");
    s.push_str(&DSTACK_RUNTIME_EVENT_TYPE.to_string());
    s.push('}');
    s
}

/// JCS string serialization: escape `"` and `\`, the short forms for \b \f \n \r \t,
/// other control characters as `\u00xx` (lowercase), everything else verbatim (UTF-8).
fn push_jcs_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected digests computed independently with Python's hashlib:
    //   hashlib.sha384(struct.pack('<I',0x08000001)+b':compose-hash:'+bytes.fromhex('abcd'))
    //   hashlib.sha384(b'{"name":"compose-hash","payload":"abcd","type":134217729}')
    const V1_COMPOSE_ABCD: &str =
        "e910bac274d132c3c6c23ac10103947a0a07783a277d9aab6bb12db5749cdb296275a888328c43479a8be40268a72a62";
    const V2_COMPOSE_ABCD: &str =
        "9dde1673f544faa94b921825209593ddde08d0baf9cd6990175dffaf3081f1bb10311d56de189491feb33842a050ad7b";

    #[test]
    fn digests_match_independent_hashlib() {
        let e = RuntimeEvent::new("compose-hash", vec![0xab, 0xcd]);
        assert_eq!(hex::encode(e.digest()), V1_COMPOSE_ABCD);
        let e2 = e.with_version(EventLogVersion::V2);
        assert_eq!(hex::encode(e2.digest()), V2_COMPOSE_ABCD);
    }

    #[test]
    fn v2_canonical_json_matches_dstack_vector() {
        assert_eq!(
            canonical_json_v2("compose-hash", &[0xab, 0xcd]),
            r#"{"name":"compose-hash","payload":"abcd","type":134217729}"#
        );
        assert_eq!(
            canonical_json_v2("", &[]),
            r#"{"name":"","payload":"","type":134217729}"#
        );
    }

    #[test]
    fn jcs_escapes() {
        assert_eq!(
            canonical_json_v2("a\"b\\c\nd\u{1}é🦀", &[0xff]),
            "{\"name\":\"a\\\"b\\\\c\\nd\\u0001é🦀\",\"payload\":\"ff\",\"type\":134217729}"
        );
    }

    #[test]
    fn v1_preimage_layout() {
        let e = RuntimeEvent::new("app-id", vec![1, 2]);
        assert_eq!(e.preimage(), b"\x01\x00\x00\x08:app-id:\x01\x02".to_vec());
    }
}
