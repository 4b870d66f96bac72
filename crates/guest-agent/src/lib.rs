//! The dstack-compatible guest agent (DESIGN.md §5): the API apps and the real dstack SDKs use inside a CVM.
//!
//! * [`Agent`] holds the app's keys and identity and answers every call; it is built by the caller (guest-init
//!   after the boot sequence, or [`simulate`] on a host) from an [`AgentConfig`].
//! * [`service`] adapts it to the pRPC services: `DstackGuest` at the root of the dstack socket
//!   (`POST /GetKey`, `/GetQuote`, …, plus `/EmitEvent` for older SDKs) and the legacy `Tappd` service under
//!   `/prpc` (`/prpc/Tappd.TdxQuote`, also `/prpc/TdxQuote`) of the tappd socket.
//! * [`serve`] binds both sockets (mode 0777) and creates the alias symlinks dstack SDKs probe.
//! * [`guest_api`] is the host-facing `GuestApi` (vsock port 8000 in a CVM) the VM manager proxies.
//! * [`simulate`] runs everything on a host with an in-process simulated TDX module (`dstack-sim-tdx`) and a
//!   generated app identity; its quotes verify only against the printed simulator root pin, never as TDX.
//!
//! Semantics follow dstack's `guest-agent/src/rpc_service.rs` (see `dstack-facts.md` §2). Deliberate
//! differences: runtime events in `event_log` carry both their digest and payload (dstack empties the digest
//! in newer releases; the SDKs' `replay_rtmrs` needs it), `Attest` answers in dstack's SCALE `V0` format (read
//! by every dstack verifier; 0.5.11+ agents emit MessagePack `V1`, see [`attestation`]) and
//! `GetTlsKey{with_app_info: true}` is refused (the RA-TLS crate does not write the app-info extension yet).
//! The app root key is never returned by any method.

mod agent;
pub mod attestation;
pub mod cert;
pub mod guest_api;
pub mod report_data;
pub mod serve;
pub mod service;
pub mod simulate;

pub use agent::{Agent, AgentConfig, SIGN_KEY_PATH, SIGN_KEY_PURPOSE};
pub use cert::{CertSigner, LocalCaSigner};
/// `AgentConfig::device_id` from the TD's own quote (`sha256(PPID)`, unverified self-report).
pub use dstack_measurements::verify::self_reported_device_id;
pub use serve::{ALIAS_SOCKETS, AgentSockets, link_aliases, serve_agent};
pub use service::{dstack_router, tappd_router};

/// Errors of the agent's operations; each becomes a pRPC error (`{"error": "..."}`, HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("TEE: {0}")]
    Tee(#[from] dstack_tee::TeeError),
    #[error("key derivation: {0}")]
    Keys(#[from] dstack_keys::Error),
    #[error("certificate: {0}")]
    Cert(String),
    #[error("quote: {0}")]
    Quote(String),
    #[error("internal: {0}")]
    Internal(String),
}
