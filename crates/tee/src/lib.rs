//! Guest-side access to the TEE: quotes, RTMR extension and the boot event log.
//!
//! * [`Tee`]: one object-safe async interface over the backends — [`TdxTee`] (real TDX through the Linux ABIs
//!   in [`tdx`]) and [`SimulatedTee`] (a client of the simulated TDX module the host VMM runs, reached over
//!   vsock or a unix socket; its quotes only verify with `allow_simulated`, and it reports
//!   [`TeeKind::Simulated`], never TDX), and [`AgentTee`] (a client of the dstack guest agent socket, for apps
//!   such as the KMS and gateway appliances running inside a CVM; its kind is read from the quotes).
//! * [`detect`]: explicit selection. TDX when the `tdx_guest` interfaces exist; the simulated module only when
//!   configured (kernel command line `dstack.tee=simulated:vsock:2:<port>` or a config value); the guest agent
//!   only when configured (`agent:/var/run/dstack.sock`); otherwise [`TeeError::NoTee`], so every
//!   key-dependent operation fails closed.
//! * [`RuntimeEventLog`]: measures dstack runtime events into RTMR3 and persists them as dstack-compatible
//!   JSON lines (`/run/log/dstack/runtime_events.log`), replayable against RTMR3. Backends that keep the log
//!   themselves ([`Tee::keeps_runtime_log`]: the guest agent) are the record instead of the file.
//!
//! Boot event logs are returned as dstack JSON event-log entries ([`TdxEvent`], RTMR0-2, digests only): the
//! TDX backend parses the CCEL table, the simulated one asks the module.

mod agent;
mod detect;
mod runtime_log;
mod sim;
pub mod tdx;
mod tdx_tee;

use std::future::Future;
use std::pin::Pin;

pub use agent::{AGENT_CONNECT_WAIT, AgentTee};
pub use detect::{SimEndpoint, TeeConfig, TeeRequest, detect};
pub use dstack_measurements::eventlog::{EventLogVersion, RuntimeEvent, TdxEvent};
pub use runtime_log::{RUNTIME_EVENT_LOG_FILE, RuntimeEventLog, parse_runtime_log, runtime_log_line};
pub use sim::SimulatedTee;
pub use tdx_tee::TdxTee;

/// Length of an RTMR / SHA-384 digest.
pub const RTMR_LEN: usize = 48;
/// Length of TDREPORT/quote report data.
pub const QUOTE_REPORT_DATA_LEN: usize = 64;

/// Errors from the TEE backends.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    /// The platform or kernel lacks the interface.
    #[error("TEE interface unavailable: {0}")]
    Unsupported(String),
    #[error("no TEE: neither TDX nor the simulated TDX module is available ({0}); refusing to continue")]
    NoTee(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("malformed TEE output: {0}")]
    Malformed(String),
    #[error("concurrent use of the TEE interface: {0}")]
    Race(String),
    /// The simulated TDX module refused the request or could not be reached.
    #[error("simulated TDX module at {endpoint}: {message}")]
    Simulator { endpoint: String, message: String },
    /// The persisted runtime event log does not replay to the current RTMR3.
    #[error("runtime event log {path}: {message}")]
    EventLog { path: String, message: String },
    /// The guest agent refused the request or could not be reached.
    #[error("guest agent at {socket}: {message}")]
    Agent { socket: String, message: String },
    /// A blocking TEE call could not be completed (task panicked or was cancelled).
    #[error("TEE task failed: {0}")]
    Task(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// RTMR0..RTMR3.
pub type Rtmrs = [[u8; RTMR_LEN]; 4];

/// The boxed future every [`Tee`] method returns (keeps the trait object-safe).
pub type TeeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, TeeError>> + Send + 'a>>;

/// Which TEE a backend talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeeKind {
    /// Intel TDX hardware through the guest kernel.
    Tdx,
    /// The simulated TDX module of the host VMM (no hardware protection).
    Simulated,
}

impl TeeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TeeKind::Tdx => "tdx",
            TeeKind::Simulated => "simulated",
        }
    }
}

/// A TEE backend: evidence, RTMR extension and the boot event log.
pub trait Tee: Send + Sync + std::fmt::Debug {
    /// Which TEE this is.
    fn kind(&self) -> TeeKind;
    /// A quote whose REPORTDATA is `report_data`.
    fn quote(&self, report_data: [u8; QUOTE_REPORT_DATA_LEN]) -> TeeFuture<'_, Vec<u8>>;
    /// `RTMR[index] ← SHA384(RTMR[index] ‖ digest)`; only RTMR2 and RTMR3 are extendable.
    fn extend_rtmr(&self, index: u32, digest: [u8; RTMR_LEN]) -> TeeFuture<'_, ()>;
    /// Extends RTMR3 with a dstack runtime event's digest. Backends that keep their own log (the simulated
    /// module) also record the event's name and payload.
    fn extend_runtime_event(&self, event: RuntimeEvent) -> TeeFuture<'_, ()> {
        self.extend_rtmr(3, event.digest())
    }
    /// Current RTMR0..3.
    fn rtmrs(&self) -> TeeFuture<'_, Rtmrs>;
    /// The boot events (RTMR0-2) as dstack JSON event-log entries.
    fn boot_event_log(&self) -> TeeFuture<'_, Vec<TdxEvent>>;
    /// True when the backend records the runtime (RTMR3) events itself — the guest agent does, for every
    /// process of the CVM. Then [`Tee::runtime_events`] is the log and [`RuntimeEventLog`] keeps no file.
    fn keeps_runtime_log(&self) -> bool {
        false
    }
    /// The runtime events the backend recorded, in extension order (only when [`Tee::keeps_runtime_log`]).
    fn runtime_events(&self) -> TeeFuture<'_, Vec<RuntimeEvent>> {
        Box::pin(async {
            Err(TeeError::Unsupported(
                "this TEE keeps no runtime event log (the RuntimeEventLog file is the record)".into(),
            ))
        })
    }
}
