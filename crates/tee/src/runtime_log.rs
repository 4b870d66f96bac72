//! The persisted runtime event log (dstack-compatible).
//!
//! Each measured event is one JSON line `{"event":<name>,"payload":<base64>}` (plus `"version":2` for V2
//! digests), appended to `/run/log/dstack/runtime_events.log` (mode 0600) after the event was extended into
//! RTMR3 — the layout of dstack's `cc-eventlog` `RuntimeEvent::emit`. Every append is fsynced, so a crash
//! cannot lose an event that RTMR3 already contains unless the disk write itself failed (then `measure`
//! returns the error and the log no longer replays: callers must treat that as fatal).
//!
//! When the TEE keeps the log itself ([`Tee::keeps_runtime_log`], e.g. the guest agent seen from an app
//! container), that log is the record: events are only extended through the TEE and read back from it, and no
//! file is written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use dstack_measurements::eventlog::replay_digests;
use serde::{Deserialize, Serialize};

use crate::{EventLogVersion, RuntimeEvent, TdxEvent, Tee, TeeError};

/// dstack's runtime event log path.
pub const RUNTIME_EVENT_LOG_FILE: &str = "/run/log/dstack/runtime_events.log";

#[derive(Serialize, Deserialize)]
struct Line {
    event: String,
    payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

/// The JSON line (without newline) for `event`.
pub fn runtime_log_line(event: &RuntimeEvent) -> String {
    let line = Line {
        event: event.name.clone(),
        payload: B64.encode(&event.payload),
        version: match event.version {
            EventLogVersion::V1 => None,
            EventLogVersion::V2 => Some(2),
        },
    };
    // Serializing a struct of strings and an integer cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// Parses a runtime event log (blank lines ignored); errors name the 1-based line.
pub fn parse_runtime_log(text: &str) -> Result<Vec<RuntimeEvent>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        let payload = B64
            .decode(l.payload.as_bytes())
            .map_err(|e| format!("line {}: payload is not base64: {e}", i + 1))?;
        let version = EventLogVersion::from_number(l.version)
            .ok_or_else(|| format!("line {}: unknown version {:?}", i + 1, l.version))?;
        out.push(RuntimeEvent::new(l.event, payload).with_version(version));
    }
    Ok(out)
}

/// Measures runtime events into RTMR3 through a [`Tee`] and keeps the persisted log.
#[derive(Debug)]
pub struct RuntimeEventLog {
    tee: Arc<dyn Tee>,
    path: PathBuf,
    version: EventLogVersion,
    /// Serializes extend+append so the file order is the extension order.
    order: tokio::sync::Mutex<()>,
}

impl RuntimeEventLog {
    /// `version` is app-compose's `event_log_version` (absent or 1 → V1, 2 → V2).
    pub fn new(tee: Arc<dyn Tee>, path: impl Into<PathBuf>, version: EventLogVersion) -> Self {
        Self {
            tee,
            path: path.into(),
            version,
            order: tokio::sync::Mutex::new(()),
        }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TEE events are measured into.
    pub fn tee(&self) -> &Arc<dyn Tee> {
        &self.tee
    }

    fn log_err(&self, message: impl Into<String>) -> TeeError {
        TeeError::EventLog {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    /// Extends RTMR3 with the event and appends it to the log (fsynced; nothing is written when the TEE keeps
    /// the log). Returns the event.
    pub async fn measure(&self, name: &str, payload: &[u8]) -> Result<RuntimeEvent, TeeError> {
        let event = RuntimeEvent::new(name, payload).with_version(self.version);
        let _order = self.order.lock().await;
        self.tee.extend_runtime_event(event.clone()).await?;
        if self.tee.keeps_runtime_log() {
            return Ok(event);
        }
        let line = runtime_log_line(&event);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || append_line(&path, &line))
            .await
            .map_err(|e| TeeError::Task(e.to_string()))?
            .map_err(|e| self.log_err(format!("appending event {name:?} (already in RTMR3): {e}")))?;
        Ok(event)
    }

    /// The logged events (empty if the file does not exist yet); the TEE's own log when it keeps one.
    pub async fn load(&self) -> Result<Vec<RuntimeEvent>, TeeError> {
        if self.tee.keeps_runtime_log() {
            return self.tee.runtime_events().await;
        }
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(self.log_err(e.to_string())),
        };
        parse_runtime_log(&text).map_err(|e| self.log_err(e))
    }

    /// Loads the log and checks it replays to the TEE's current RTMR3.
    pub async fn load_verified(&self) -> Result<Vec<RuntimeEvent>, TeeError> {
        let events = self.load().await?;
        let digests: Vec<[u8; 48]> = events.iter().map(RuntimeEvent::digest).collect();
        let replayed = replay_digests(&digests);
        let rtmr3 = self.tee.rtmrs().await?[3];
        if replayed != rtmr3 {
            return Err(self.log_err(format!(
                "{} events replay to RTMR3 {} but the TEE reports {}",
                events.len(),
                hex::encode(replayed),
                hex::encode(rtmr3)
            )));
        }
        Ok(events)
    }

    /// The verified runtime events as dstack JSON event-log entries (digest included).
    pub async fn tdx_events(&self) -> Result<Vec<TdxEvent>, TeeError> {
        Ok(self
            .load_verified()
            .await?
            .iter()
            .map(RuntimeEvent::to_tdx_event)
            .collect())
    }

    /// Boot events followed by the runtime events: the full log for `GetQuote.event_log` and RA-TLS.
    pub async fn full_event_log(&self) -> Result<Vec<TdxEvent>, TeeError> {
        let mut all = self.tee.boot_event_log().await?;
        all.extend(self.tdx_events().await?);
        Ok(all)
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    f.write_all(&buf)?;
    f.sync_data()
}

#[cfg(test)]
mod tests;
