//! App identity from a replayed, quote-checked event log (DESIGN.md §6, compatible):
//! app_id, compose_hash, instance_id and key-provider info are the payloads of the RTMR3
//! runtime events of those names (search stops at `system-ready`); os_image_hash comes from
//! vm_config (falling back to the `os-image-hash` event);
//! `mr_system = sha256(mrtd‖rtmr0‖rtmr1‖rtmr2‖mr_key_provider)` with
//! `mr_key_provider = sha256(key-provider payload)` or 32 zero bytes;
//! `mr_aggregated = sha256(mrtd‖rtmr0‖rtmr1‖rtmr2‖rtmr3 [‖ mrconfigid‖mrowner‖mrownerconfig
//! when any of them is non-zero])`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::replay::{ReplayError, check_against_report, event_digest, extend};
use super::{EV_NO_ACTION, TdxEvent};
use crate::quote::TdReport;

/// Identity fields derived from a verified log. Byte fields serialize as hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppIdentity {
    #[serde(with = "crate::hexser")]
    pub app_id: Vec<u8>,
    #[serde(with = "crate::hexser")]
    pub compose_hash: Vec<u8>,
    #[serde(with = "crate::hexser")]
    pub instance_id: Vec<u8>,
    /// Raw `key-provider` payload (JSON text such as `{"name":"kms","id":"…"}`).
    pub key_provider_info: String,
    #[serde(with = "crate::hexser")]
    pub os_image_hash: Vec<u8>,
    #[serde(with = "crate::hexser")]
    pub mr_key_provider: Vec<u8>,
    #[serde(with = "crate::hexser")]
    pub mr_system: Vec<u8>,
    #[serde(with = "crate::hexser")]
    pub mr_aggregated: Vec<u8>,
    /// RTMR3 as replayed up to and including `boot-mr-done` (empty if absent).
    #[serde(with = "crate::hexser")]
    pub boot_rtmr3: Vec<u8>,
}

/// Why the identity could not be derived.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("event log does not reproduce the quote's {0}")]
    Mismatch(String),
    #[error("vm_config: {0}")]
    VmConfig(String),
}

/// `sha256(mrtd‖rtmr0‖rtmr1‖rtmr2‖mr_key_provider)`.
pub fn mr_system(report: &TdReport, mr_key_provider: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(report.mr_td);
    for r in &report.rtmr[..3] {
        h.update(r);
    }
    h.update(mr_key_provider);
    h.finalize().into()
}

/// `sha256(mrtd‖rtmr0..3 [‖ mrconfigid‖mrowner‖mrownerconfig])`.
pub fn mr_aggregated(report: &TdReport) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(report.mr_td);
    for r in &report.rtmr {
        h.update(r);
    }
    let cfg = [&report.mr_config_id, &report.mr_owner, &report.mr_owner_config];
    if cfg.iter().any(|v| v.iter().any(|&b| b != 0)) {
        for v in cfg {
            h.update(v);
        }
    }
    h.finalize().into()
}

/// Check `events` against `report` (every RTMR must match) and derive the identity.
pub fn derive_identity(
    events: &[TdxEvent],
    report: &TdReport,
    vm_config: Option<&str>,
) -> Result<AppIdentity, IdentityError> {
    let check = check_against_report(events, report)?;
    if let Some(bad) = check.registers.iter().find(|r| !r.matches) {
        return Err(IdentityError::Mismatch(bad.register.clone()));
    }

    let mut app_id = None;
    let mut compose_hash = None;
    let mut instance_id = None;
    let mut key_provider = None;
    let mut os_image_event = None;
    let mut rtmr3 = [0u8; 48];
    let mut boot_rtmr3 = Vec::new();
    for (index, e) in events.iter().enumerate() {
        if e.imr != 3 || e.event_type == EV_NO_ACTION {
            continue;
        }
        extend(&mut rtmr3, &event_digest(e, index)?);
        if !e.is_runtime() {
            continue;
        }
        let payload = || Some(e.event_payload.clone());
        match e.event.as_str() {
            "app-id" if app_id.is_none() => app_id = payload(),
            "compose-hash" if compose_hash.is_none() => compose_hash = payload(),
            "instance-id" if instance_id.is_none() => instance_id = payload(),
            "key-provider" if key_provider.is_none() => key_provider = payload(),
            "os-image-hash" if os_image_event.is_none() => os_image_event = payload(),
            "boot-mr-done" if boot_rtmr3.is_empty() => boot_rtmr3 = rtmr3.to_vec(),
            "system-ready" => break,
            _ => {}
        }
    }

    let os_image_hash = match vm_config {
        Some(cfg) => os_image_hash_from_vm_config(cfg)?,
        None => None,
    }
    .or(os_image_event)
    .unwrap_or_default();

    let mr_key_provider: [u8; 32] = key_provider
        .as_ref()
        .map(|p| Sha256::digest(p).into())
        .unwrap_or([0; 32]);
    Ok(AppIdentity {
        app_id: app_id.unwrap_or_default(),
        compose_hash: compose_hash.unwrap_or_default(),
        instance_id: instance_id.unwrap_or_default(),
        key_provider_info: key_provider
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default(),
        os_image_hash,
        mr_key_provider: mr_key_provider.to_vec(),
        mr_system: mr_system(report, &mr_key_provider).to_vec(),
        mr_aggregated: mr_aggregated(report).to_vec(),
        boot_rtmr3,
    })
}

/// `os_image_hash` (hex) from a vm_config JSON document, if present.
pub fn os_image_hash_from_vm_config(cfg: &str) -> Result<Option<Vec<u8>>, IdentityError> {
    let v: serde_json::Value = serde_json::from_str(cfg).map_err(|e| IdentityError::VmConfig(e.to_string()))?;
    match v.get("os_image_hash") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => crate::hexser::decode(s)
            .map(Some)
            .map_err(|e| IdentityError::VmConfig(format!("os_image_hash: {e}"))),
        Some(_) => Err(IdentityError::VmConfig("os_image_hash is not a string".into())),
    }
}
