//! RTMR3 runtime events in dstack's order (DESIGN.md §3 step 4, dstack `measure_app_info` / `setup_fs`):
//! `system-preparing` (empty) → `app-id` → `compose-hash` → `init-script-hash` ×N → `instance-id` →
//! `boot-mr-done` (empty) → *keys* → `os-image-hash` (KMS only) → `key-provider` → `storage-fs` →
//! `system-ready` (empty).
//!
//! Events go through the [`Measurer`] trait; production uses [`super::tee::TeeMeasurer`] (crates/tee's event
//! log: extend RTMR3, append the JSON line). [`digest`] and [`RecordingMeasurer`] are here for tests and for
//! checking the order: they compute dstack's digests and replay an RTMR3 value, they do not touch a TEE.

use sha2::{Digest, Sha256, Sha384};

use dstack_types::{AppCompose, AppIdentity, EventLogVersion};

/// dstack's runtime event type.
pub const RUNTIME_EVENT_TYPE: u32 = 0x0800_0001;

pub mod names {
    pub const SYSTEM_PREPARING: &str = "system-preparing";
    pub const APP_ID: &str = "app-id";
    pub const COMPOSE_HASH: &str = "compose-hash";
    pub const INIT_SCRIPT_HASH: &str = "init-script-hash";
    pub const INSTANCE_ID: &str = "instance-id";
    pub const BOOT_MR_DONE: &str = "boot-mr-done";
    pub const OS_IMAGE_HASH: &str = "os-image-hash";
    pub const KEY_PROVIDER: &str = "key-provider";
    pub const STORAGE_FS: &str = "storage-fs";
    pub const SYSTEM_READY: &str = "system-ready";
}

/// One event to extend into RTMR3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    pub name: String,
    pub payload: Vec<u8>,
}

impl RuntimeEvent {
    pub fn new(name: &str, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.to_owned(),
            payload: payload.into(),
        }
    }
}

/// Errors from measuring.
#[derive(Debug, thiserror::Error)]
#[error("measuring runtime event {event:?}: {reason}")]
pub struct MeasureError {
    pub event: String,
    pub reason: String,
}

/// Extends RTMR3 with a runtime event and records it in the event log. Implemented by the TEE layer.
pub trait Measurer: Send + Sync {
    fn measure(&self, version: EventLogVersion, event: &RuntimeEvent) -> Result<(), MeasureError>;
}

/// The events measured before keys are requested.
pub fn app_events(identity: &AppIdentity, compose: &AppCompose) -> Vec<RuntimeEvent> {
    let mut ev = vec![
        RuntimeEvent::new(names::SYSTEM_PREPARING, []),
        RuntimeEvent::new(names::APP_ID, identity.app_id.0),
        RuntimeEvent::new(names::COMPOSE_HASH, identity.compose_hash.0),
    ];
    for script in compose.init_scripts() {
        ev.push(RuntimeEvent::new(
            names::INIT_SCRIPT_HASH,
            Sha256::digest(script.as_bytes()).to_vec(),
        ));
    }
    ev.push(RuntimeEvent::new(names::INSTANCE_ID, identity.instance_id_bytes()));
    ev.push(RuntimeEvent::new(names::BOOT_MR_DONE, []));
    ev
}

/// `key-provider` payload: dstack's `KeyProviderInfo{name, id}` as serde_json writes the struct (`name`
/// first). Built explicitly: a `json!` map would sort the keys (`id` first) unless `preserve_order` is on.
pub fn key_provider_payload(name: &str, id_hex: &str) -> Vec<u8> {
    let n = serde_json::Value::String(name.to_owned());
    let i = serde_json::Value::String(id_hex.to_owned());
    format!("{{\"name\":{n},\"id\":{i}}}").into_bytes()
}

/// dstack's event digest: V1 `SHA384(u32_le(type) ‖ ":" ‖ name ‖ ":" ‖ payload)`, V2 SHA384 of the JCS
/// JSON `{"name":…,"payload":"<hex>","type":134217729}`.
pub fn digest(version: EventLogVersion, event: &RuntimeEvent) -> [u8; 48] {
    let mut h = Sha384::new();
    match version {
        EventLogVersion::V1 => {
            h.update(RUNTIME_EVENT_TYPE.to_le_bytes());
            h.update(b":");
            h.update(event.name.as_bytes());
            h.update(b":");
            h.update(&event.payload);
        }
        EventLogVersion::V2 => {
            let v = serde_json::json!({
                "name": event.name,
                "payload": hex::encode(&event.payload),
                "type": RUNTIME_EVENT_TYPE,
            });
            h.update(dstack_types::canonical_json::to_canonical_string(&v).as_bytes());
        }
    }
    h.finalize().into()
}

/// Records events and replays RTMR3 from 48 zero bytes (`RTMR ← SHA384(RTMR ‖ digest)`). Not a TEE.
#[derive(Debug, Default)]
pub struct RecordingMeasurer {
    events: std::sync::Mutex<Vec<(EventLogVersion, RuntimeEvent)>>,
}

impl RecordingMeasurer {
    pub fn events(&self) -> Vec<RuntimeEvent> {
        self.events
            .lock()
            .map(|e| e.iter().map(|(_, ev)| ev.clone()).collect())
            .unwrap_or_default()
    }
    pub fn names(&self) -> Vec<String> {
        self.events().into_iter().map(|e| e.name).collect()
    }
    pub fn replay_rtmr3(&self) -> [u8; 48] {
        let events = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        events.iter().fold([0u8; 48], |rtmr, (v, ev)| {
            let mut h = Sha384::new();
            h.update(rtmr);
            h.update(digest(*v, ev));
            h.finalize().into()
        })
    }
}

impl Measurer for RecordingMeasurer {
    fn measure(&self, version: EventLogVersion, event: &RuntimeEvent) -> Result<(), MeasureError> {
        tracing::info!("measure {} ({} bytes)", event.name, event.payload.len());
        self.events
            .lock()
            .map_err(|_| MeasureError {
                event: event.name.clone(),
                reason: "event log lock poisoned".into(),
            })?
            .push((version, event.clone()));
        Ok(())
    }
}

/// Used until the TEE layer is wired: every measurement fails, so a boot without a TEE stops before
/// any key is requested.
#[derive(Debug, Default)]
pub struct NoTee;

impl Measurer for NoTee {
    fn measure(&self, _: EventLogVersion, event: &RuntimeEvent) -> Result<(), MeasureError> {
        Err(MeasureError {
            event: event.name.clone(),
            reason: "no TEE backend is available to extend RTMR3 (crates/tee not wired yet)".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected digests computed independently with Python hashlib:
    //   sha384(struct.pack('<I', 0x08000001) + b':' + name + b':' + payload)
    #[test]
    fn v1_digests_match_hashlib() {
        assert_eq!(
            hex::encode(digest(EventLogVersion::V1, &RuntimeEvent::new("system-preparing", []))),
            "f9974020ef507068183313d0ca808e0d1ca9b2d1ad0c61f5784e7157c362c06536f5ddacdad4451693f48fcc72fff624"
        );
        assert_eq!(
            hex::encode(digest(EventLogVersion::V1, &RuntimeEvent::new("app-id", [0x11; 20]))),
            "3f1fbb6cfe25e7f19bd48cfa9dc590cabaa946da04f9215402e7083550177292c1478402b258a90c649ccfcb5f408175"
        );
    }

    // dstack's V2 vector (cc-eventlog runtime_events.rs tests): canonical JSON
    // {"name":"compose-hash","payload":"abcd","type":134217729}; SHA-384 from Python hashlib.
    #[test]
    fn v2_digest_matches_dstack_vector() {
        assert_eq!(
            hex::encode(digest(
                EventLogVersion::V2,
                &RuntimeEvent::new("compose-hash", [0xab, 0xcd])
            )),
            "9dde1673f544faa94b921825209593ddde08d0baf9cd6990175dffaf3081f1bb10311d56de189491feb33842a050ad7b"
        );
    }

    #[test]
    fn key_provider_payload_is_dstack_shape() {
        assert_eq!(key_provider_payload("none", ""), br#"{"name":"none","id":""}"#);
        assert_eq!(key_provider_payload("kms", "3059"), br#"{"name":"kms","id":"3059"}"#);
    }

    #[test]
    fn no_tee_fails_closed() {
        let err = NoTee
            .measure(EventLogVersion::V1, &RuntimeEvent::new("app-id", []))
            .unwrap_err();
        assert!(err.to_string().contains("no TEE"), "{err}");
    }
}
