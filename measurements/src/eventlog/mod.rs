//! Event logs: the TCG crypto-agile CCEL log, dstack's JSON event log, RTMR replay, checking
//! a log against a quote, and deriving the app identity from RTMR3 runtime events.
//!
//! Index convention: the JSON `imr` field is the RTMR index 0..=3; in the CCEL log the MR
//! index is 1..=4 for RTMR0..3 (0 = MRTD, which no event extends).

pub mod ccel;
mod identity;
mod replay;
pub mod runtime;

use serde::{Deserialize, Serialize};

pub use identity::{AppIdentity, IdentityError, derive_identity, mr_aggregated, mr_system};
pub use replay::{
    RegisterCheck, ReplayCheck, ReplayError, Rtmrs, check_against_report, event_digest, extend, replay, replay_digests,
};
pub use runtime::{EventLogVersion, RuntimeEvent, canonical_json_v2};

/// dstack runtime event type (RTMR3).
pub const DSTACK_RUNTIME_EVENT_TYPE: u32 = 0x0800_0001;
/// TCG EV_NO_ACTION: logged but never extended.
pub const EV_NO_ACTION: u32 = 0x3;
/// TCG EV_SEPARATOR.
pub const EV_SEPARATOR: u32 = 0x4;
/// TCG EV_EVENT_TAG.
pub const EV_EVENT_TAG: u32 = 0x6;
/// TCG EV_EFI_ACTION.
pub const EV_EFI_ACTION: u32 = 0x8000_0007;
/// TCG EV_EFI_BOOT_SERVICES_APPLICATION.
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;

/// One entry of dstack's JSON event log: `{imr, event_type, digest, event, event_payload}`.
/// Runtime events may omit the digest ("stripped" form); it is recomputed from the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TdxEvent {
    pub imr: u32,
    pub event_type: u32,
    #[serde(with = "crate::hexser", default)]
    pub digest: Vec<u8>,
    #[serde(default)]
    pub event: String,
    #[serde(with = "crate::hexser", default)]
    pub event_payload: Vec<u8>,
    /// Runtime-event digest version (absent = 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

impl TdxEvent {
    pub fn is_runtime(&self) -> bool {
        self.event_type == DSTACK_RUNTIME_EVENT_TYPE
    }

    /// The runtime event this entry describes, if it is one.
    pub fn runtime_event(&self) -> Option<Result<RuntimeEvent, u32>> {
        if !self.is_runtime() {
            return None;
        }
        Some(match EventLogVersion::from_number(self.version) {
            Some(v) => Ok(RuntimeEvent::new(self.event.clone(), self.event_payload.clone()).with_version(v)),
            None => Err(self.version.unwrap_or(0)),
        })
    }
}

/// Errors parsing a JSON event log.
#[derive(Debug, thiserror::Error)]
pub enum JsonLogError {
    #[error("event log JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parse dstack's JSON event log (an array of [`TdxEvent`]). Accepts the array itself or a
/// JSON string containing it (as `GetQuoteResponse.event_log` carries it).
pub fn parse_json_log(data: &[u8]) -> Result<Vec<TdxEvent>, JsonLogError> {
    let v: serde_json::Value = serde_json::from_slice(data)?;
    events_from_value(v)
}

/// Same as [`parse_json_log`] for an already-parsed JSON value.
pub fn events_from_value(v: serde_json::Value) -> Result<Vec<TdxEvent>, JsonLogError> {
    match v {
        serde_json::Value::String(s) => Ok(serde_json::from_str(&s)?),
        other => Ok(serde_json::from_value(other)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_log_forms() {
        let arr = r#"[{"imr":3,"event_type":134217729,"digest":"","event":"app-id","event_payload":"0x0102"},
                      {"imr":3,"event_type":134217729,"event":"x","event_payload":"ab","version":2}]"#;
        let a = parse_json_log(arr.as_bytes()).unwrap();
        let b = parse_json_log(serde_json::to_string(arr).unwrap().as_bytes()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].event_payload, vec![1, 2]);
        let rt = a[1].runtime_event().unwrap().unwrap();
        assert_eq!(rt.version, EventLogVersion::V2);
        // V2 events replay with the V2 digest.
        let r = replay(&a).unwrap();
        let expect = replay_digests([&RuntimeEvent::new("app-id", vec![1, 2]).digest(), &rt.digest()]);
        assert_eq!(r[3], expect);
        // Serialization is lowercase hex without 0x; version omitted for V1.
        let s = serde_json::to_string(&a[0]).unwrap();
        assert!(s.contains(r#""event_payload":"0102""#) && !s.contains("version"), "{s}");
    }

    #[test]
    fn malformed_json_logs() {
        assert!(parse_json_log(b"{").is_err());
        assert!(parse_json_log(br#"[{"imr":0}]"#).is_err());
        assert!(parse_json_log(br#"[{"imr":0,"event_type":1,"digest":"zz"}]"#).is_err());
        let bad_version = parse_json_log(br#"[{"imr":3,"event_type":134217729,"event":"a","version":9}]"#).unwrap();
        assert!(matches!(
            replay(&bad_version),
            Err(ReplayError::BadVersion { version: 9, .. })
        ));
        let wrong_imr = parse_json_log(br#"[{"imr":1,"event_type":134217729,"event":"a"}]"#).unwrap();
        assert!(matches!(replay(&wrong_imr), Err(ReplayError::RuntimeNotRtmr3 { .. })));
    }
}
