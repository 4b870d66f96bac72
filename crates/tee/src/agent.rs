//! [`Tee`] through the dstack guest agent's unix socket (`/var/run/dstack.sock`): what an app container sees of
//! its CVM's TEE. The KMS and the gateway run as compose apps inside CVMs (like in dstack) and get their evidence
//! this way: `GetQuote` for quotes (the agent answers with the quote and its event log together) and `EmitEvent`
//! for runtime events, which the agent measures into RTMR3 and records in its own log.
//!
//! The kind is read from the quotes themselves, never assumed: a quote with the simulator's QE vendor id or
//! marker is [`TeeKind::Simulated`], one with Intel's QE vendor id is [`TeeKind::Tdx`] (a label only — verifiers
//! still check the signature chain), anything else is refused. The kind is fixed by a probe quote when the
//! backend is created, and every later quote must be of the same kind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dstack_measurements::eventlog::{DSTACK_RUNTIME_EVENT_TYPE, parse_json_log, replay_digests};
use dstack_measurements::quote::{INTEL_QE_VENDOR_ID, Quote};
use dstack_measurements::sim::is_simulated_quote;
use dstack_rpc::agent::{DstackGuestClient, EmitEventArgs, RawQuoteArgs};
use dstack_rpc::{Client, RpcError};

use crate::{
    EventLogVersion, QUOTE_REPORT_DATA_LEN, RTMR_LEN, Rtmrs, RuntimeEvent, TdxEvent, Tee, TeeError, TeeFuture, TeeKind,
};

/// How long [`AgentTee::connect`] waits for the socket to accept connections (the agent starts before the app,
/// but may be restarting).
pub const AGENT_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Report data of the probe quote that fixes the kind: ASCII `dstack-rs agent TEE probe`, zero-padded.
const PROBE_REPORT_DATA: [u8; QUOTE_REPORT_DATA_LEN] = {
    let text = b"dstack-rs agent TEE probe";
    let mut rd = [0u8; QUOTE_REPORT_DATA_LEN];
    let mut i = 0;
    while i < text.len() {
        rd[i] = text[i];
        i += 1;
    }
    rd
};

/// A client of the guest agent's `DstackGuest` API used as a TEE.
#[derive(Debug, Clone)]
pub struct AgentTee {
    client: DstackGuestClient<Client>,
    socket: PathBuf,
    kind: TeeKind,
}

/// One `GetQuote` answer, checked: the quote parses, carries the requested report data and the runtime events
/// in its event log replay to its RTMR3.
struct Evidence {
    raw: Vec<u8>,
    quote: Quote,
    boot: Vec<TdxEvent>,
    runtime: Vec<RuntimeEvent>,
}

impl AgentTee {
    /// Connects to the agent at `socket` (waiting up to [`AGENT_CONNECT_WAIT`] for it to accept connections) and
    /// fixes the kind from a probe quote.
    pub async fn connect(socket: impl Into<PathBuf>) -> Result<Self, TeeError> {
        Self::connect_with_wait(socket, AGENT_CONNECT_WAIT).await
    }

    /// [`AgentTee::connect`] with an explicit wait for the socket.
    pub async fn connect_with_wait(socket: impl Into<PathBuf>, wait: Duration) -> Result<Self, TeeError> {
        let socket = socket.into();
        let mut tee = Self {
            client: DstackGuestClient::new(Client::unix(&socket, "")),
            socket,
            // Overwritten below from the probe quote, before the value is ever returned.
            kind: TeeKind::Simulated,
        };
        let deadline = Instant::now() + wait;
        let resp = loop {
            match tee.get_quote(PROBE_REPORT_DATA).await {
                Ok(resp) => break resp,
                // Not listening yet (missing socket, refused connection): retry until the deadline.
                Err(RpcError::Io(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(tee.err(e)),
            }
        };
        let quote = Quote::parse(&resp.quote).map_err(|e| tee.malformed(format!("probe quote: {e}")))?;
        tee.kind = quote_kind(&quote).map_err(|e| tee.malformed(e))?;
        Ok(tee)
    }

    /// [`AgentTee::connect_with_wait`] from synchronous code, inside or outside a Tokio runtime (it runs on its
    /// own thread with its own runtime, so it never blocks on the caller's).
    pub fn connect_blocking(socket: impl Into<PathBuf>, wait: Duration) -> Result<Self, TeeError> {
        let socket = socket.into();
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| TeeError::Task(format!("runtime for the guest agent probe: {e}")))?
                    .block_on(Self::connect_with_wait(socket, wait))
            })
            .join()
            .map_err(|_| TeeError::Task("guest agent probe thread panicked".into()))?
        })
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn err(&self, e: RpcError) -> TeeError {
        TeeError::Agent {
            socket: self.socket.display().to_string(),
            message: e.to_string(),
        }
    }

    fn malformed(&self, message: impl std::fmt::Display) -> TeeError {
        TeeError::Malformed(format!("guest agent at {}: {message}", self.socket.display()))
    }

    async fn get_quote(
        &self,
        report_data: [u8; QUOTE_REPORT_DATA_LEN],
    ) -> Result<dstack_rpc::agent::GetQuoteResponse, RpcError> {
        self.client
            .get_quote(RawQuoteArgs {
                report_data: report_data.to_vec(),
            })
            .await
    }

    /// `GetQuote` with every check of [`Evidence`], and the kind fixed at connect time.
    async fn evidence(&self, report_data: [u8; QUOTE_REPORT_DATA_LEN]) -> Result<Evidence, TeeError> {
        let resp = self.get_quote(report_data).await.map_err(|e| self.err(e))?;
        let quote = Quote::parse(&resp.quote).map_err(|e| self.malformed(format!("quote: {e}")))?;
        let kind = quote_kind(&quote).map_err(|e| self.malformed(e))?;
        if kind != self.kind {
            return Err(self.malformed(format!(
                "returned a {} quote but its first quote was {}",
                kind.as_str(),
                self.kind.as_str()
            )));
        }
        if quote.report.report_data != report_data {
            return Err(self.malformed("the quote's REPORTDATA is not the report data asked for"));
        }
        let log = parse_json_log(resp.event_log.as_bytes()).map_err(|e| self.malformed(format!("event_log: {e}")))?;
        let (boot, runtime) = split_log(log).map_err(|e| self.malformed(e))?;
        let digests: Vec<[u8; RTMR_LEN]> = runtime.iter().map(RuntimeEvent::digest).collect();
        let replayed = replay_digests(&digests);
        if replayed != quote.report.rtmr[3] {
            return Err(self.malformed(format!(
                "{} runtime events replay to {} but the quote's RTMR3 is {}",
                runtime.len(),
                hex::encode(replayed),
                hex::encode(quote.report.rtmr[3])
            )));
        }
        Ok(Evidence {
            raw: resp.quote,
            quote,
            boot,
            runtime,
        })
    }

    async fn emit(&self, event: RuntimeEvent) -> Result<(), TeeError> {
        // The agent measures with its own app-compose `event_log_version`; the caller's version is not sent.
        self.client
            .emit_event(EmitEventArgs {
                event: event.name,
                payload: event.payload,
            })
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// The kind a parsed quote proves: the simulator's vendor id or marker → simulated; Intel's QE vendor id → TDX.
fn quote_kind(quote: &Quote) -> Result<TeeKind, String> {
    if is_simulated_quote(quote) {
        Ok(TeeKind::Simulated)
    } else if quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID {
        Ok(TeeKind::Tdx)
    } else {
        Err(format!(
            "quote has QE vendor id {}: neither Intel's nor the simulated TDX module's",
            hex::encode(quote.header.qe_vendor_id)
        ))
    }
}

/// Splits an agent event log into boot events (RTMR0-2) and runtime events (RTMR3). Runtime entries must be
/// dstack runtime events; a non-empty digest must match the name and payload (newer dstack agents leave it
/// empty, so an empty one is recomputed — the RTMR3 replay check covers it either way).
fn split_log(log: Vec<TdxEvent>) -> Result<(Vec<TdxEvent>, Vec<RuntimeEvent>), String> {
    let mut boot = Vec::new();
    let mut runtime = Vec::new();
    for (i, e) in log.into_iter().enumerate() {
        match e.imr {
            0..=2 => boot.push(e),
            3 => {
                if e.event_type != DSTACK_RUNTIME_EVENT_TYPE {
                    return Err(format!(
                        "event_log[{i}]: RTMR3 event type 0x{:x} is not a dstack runtime event",
                        e.event_type
                    ));
                }
                let version = EventLogVersion::from_number(e.version)
                    .ok_or_else(|| format!("event_log[{i}] ({}): unknown version {:?}", e.event, e.version))?;
                let ev = RuntimeEvent::new(e.event, e.event_payload).with_version(version);
                if !e.digest.is_empty() && e.digest[..] != ev.digest()[..] {
                    return Err(format!(
                        "event_log[{i}] ({}): digest does not match the event name and payload",
                        ev.name
                    ));
                }
                runtime.push(ev);
            }
            other => return Err(format!("event_log[{i}]: imr {other} is not an RTMR (0..=3)")),
        }
    }
    Ok((boot, runtime))
}

impl Tee for AgentTee {
    fn kind(&self) -> TeeKind {
        self.kind
    }

    fn quote(&self, report_data: [u8; QUOTE_REPORT_DATA_LEN]) -> TeeFuture<'_, Vec<u8>> {
        Box::pin(async move { Ok(self.evidence(report_data).await?.raw) })
    }

    fn extend_rtmr(&self, index: u32, _digest: [u8; RTMR_LEN]) -> TeeFuture<'_, ()> {
        Box::pin(async move {
            Err(TeeError::Unsupported(format!(
                "the guest agent ({}) only extends RTMR3 with named runtime events (EmitEvent); a raw digest for \
                 RTMR{index} cannot be extended through it",
                self.socket.display()
            )))
        })
    }

    fn extend_runtime_event(&self, event: RuntimeEvent) -> TeeFuture<'_, ()> {
        Box::pin(self.emit(event))
    }

    fn rtmrs(&self) -> TeeFuture<'_, Rtmrs> {
        Box::pin(async move { Ok(self.evidence([0; QUOTE_REPORT_DATA_LEN]).await?.quote.report.rtmr) })
    }

    fn boot_event_log(&self) -> TeeFuture<'_, Vec<TdxEvent>> {
        Box::pin(async move { Ok(self.evidence([0; QUOTE_REPORT_DATA_LEN]).await?.boot) })
    }

    fn keeps_runtime_log(&self) -> bool {
        true
    }

    fn runtime_events(&self) -> TeeFuture<'_, Vec<RuntimeEvent>> {
        Box::pin(async move { Ok(self.evidence([0; QUOTE_REPORT_DATA_LEN]).await?.runtime) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(name: &str, payload: &[u8]) -> TdxEvent {
        RuntimeEvent::new(name, payload).to_tdx_event()
    }

    #[test]
    fn log_split_checks_runtime_entries() {
        let boot = TdxEvent {
            imr: 1,
            event_type: 0x8000_0003,
            digest: vec![7; 48],
            event: String::new(),
            event_payload: Vec::new(),
            version: None,
        };
        let (b, r) = split_log(vec![boot.clone(), runtime("app-id", b"x"), runtime("k", b"")]).unwrap();
        assert_eq!(b, vec![boot.clone()]);
        assert_eq!(r, vec![RuntimeEvent::new("app-id", b"x"), RuntimeEvent::new("k", b"")]);

        // An empty digest (newer dstack agents) is recomputed; a wrong one is refused.
        let mut empty = runtime("a", b"1");
        empty.digest.clear();
        assert_eq!(split_log(vec![empty]).unwrap().1, vec![RuntimeEvent::new("a", b"1")]);
        let mut forged = runtime("a", b"1");
        forged.event_payload = b"2".to_vec();
        let e = split_log(vec![forged]).unwrap_err();
        assert!(e.contains("event_log[0] (a): digest does not match"), "{e}");

        let mut wrong_type = runtime("a", b"");
        wrong_type.event_type = 1;
        assert!(
            split_log(vec![wrong_type])
                .unwrap_err()
                .contains("not a dstack runtime event")
        );
        let mut bad_version = runtime("a", b"");
        bad_version.version = Some(9);
        assert!(split_log(vec![bad_version]).unwrap_err().contains("unknown version"));
        let mut bad_imr = boot;
        bad_imr.imr = 4;
        assert!(split_log(vec![bad_imr]).unwrap_err().contains("imr 4"));
    }

    #[test]
    fn probe_report_data_is_the_ascii_label() {
        let label = b"dstack-rs agent TEE probe";
        assert_eq!(&PROBE_REPORT_DATA[..label.len()], label);
        assert!(PROBE_REPORT_DATA[label.len()..].iter().all(|b| *b == 0));
    }

    #[tokio::test]
    async fn missing_socket_fails_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("absent.sock");
        let started = Instant::now();
        let e = AgentTee::connect_with_wait(&sock, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            matches!(e, TeeError::Agent { ref socket, .. } if socket.ends_with("absent.sock")),
            "{e}"
        );
    }
}
