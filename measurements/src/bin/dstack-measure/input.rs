//! Loading inputs: files, quotes in any accepted form, event logs, attestation bundles.

use std::path::Path;

use dstack_measurements::eventlog::{self, TdxEvent, ccel};
use dstack_measurements::quote::{Quote, decode_quote_input};

use crate::CliError;

pub fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))
}

/// Raw quote bytes from a file: binary, hex text, or a JSON object with a `quote` field.
pub fn load_quote_bytes(path: &Path) -> Result<Vec<u8>, CliError> {
    let data = read(path)?;
    if let Some(v) = as_json_object(&data) {
        return quote_from_json(&v, path);
    }
    decode_quote_input(&data).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))
}

fn quote_from_json(v: &serde_json::Value, path: &Path) -> Result<Vec<u8>, CliError> {
    let q = v
        .get("quote")
        .and_then(|q| q.as_str())
        .ok_or_else(|| CliError::Input(format!("{}: JSON has no string field \"quote\"", path.display())))?;
    decode_quote_input(q.as_bytes()).map_err(|e| CliError::Input(format!("{}: field \"quote\": {e}", path.display())))
}

pub fn parse_quote(raw: &[u8], path: &Path) -> Result<Quote, CliError> {
    Quote::parse(raw).map_err(|e| CliError::Input(format!("{}: {e}", path.display())))
}

fn as_json_object(data: &[u8]) -> Option<serde_json::Value> {
    let t = data.trim_ascii_start();
    if !t.starts_with(b"{") {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .filter(|v| v.is_object())
}

/// An attestation bundle: quote plus optional event log and vm_config.
pub struct Attestation {
    pub quote: Option<Quote>,
    pub events: Option<Vec<TdxEvent>>,
    pub vm_config: Option<String>,
}

/// Load a LOG/ATTESTATION file: raw CCEL, JSON event-log array, JSON {quote, event_log,
/// vm_config}, or (for `diff`) a bare quote.
pub fn load_attestation(path: &Path, allow_bare_quote: bool) -> Result<Attestation, CliError> {
    let data = read(path)?;
    let at = |what: &str, e: &dyn std::fmt::Display| CliError::Input(format!("{}: {what}: {e}", path.display()));
    let t = data.trim_ascii_start();
    if t.starts_with(b"[") {
        let events = eventlog::parse_json_log(&data).map_err(|e| at("event log", &e))?;
        return Ok(Attestation {
            quote: None,
            events: Some(events),
            vm_config: None,
        });
    }
    if t.starts_with(b"{") {
        let v: serde_json::Value = serde_json::from_slice(&data).map_err(|e| at("JSON", &e))?;
        let quote = match v.get("quote") {
            Some(_) => Some(parse_quote(&quote_from_json(&v, path)?, path)?),
            None => None,
        };
        let events = match v.get("event_log") {
            Some(el) => Some(eventlog::events_from_value(el.clone()).map_err(|e| at("field \"event_log\"", &e))?),
            None => None,
        };
        let vm_config = match v.get("vm_config") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(_)) => v.get("vm_config").map(|c| c.to_string()),
            _ => None,
        };
        if quote.is_none() && events.is_none() {
            return Err(CliError::Input(format!(
                "{}: JSON object has neither \"quote\" nor \"event_log\"",
                path.display()
            )));
        }
        return Ok(Attestation {
            quote,
            events,
            vm_config,
        });
    }
    // Binary: a CCEL log area starts with the EV_NO_ACTION spec-ID record; a quote with
    // version 4/5. Try CCEL unless a bare quote is wanted and the bytes parse as one.
    if allow_bare_quote
        && let Ok(raw) = decode_quote_input(&data)
        && let Ok(q) = Quote::parse(&raw)
    {
        return Ok(Attestation {
            quote: Some(q),
            events: None,
            vm_config: None,
        });
    }
    let log = ccel::parse_ccel(&data).map_err(|e| at("CCEL log", &e))?;
    let events = log.to_tdx_events().map_err(|e| at("CCEL log", &e))?;
    Ok(Attestation {
        quote: None,
        events: Some(events),
        vm_config: None,
    })
}
