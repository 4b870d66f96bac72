//! RA-TLS (dstack-compatible): certificates that carry TDX attestation, and TLS verifiers that check it.
//!
//! # Certificates ([`cert`])
//! A certificate's key is bound to a quote by the quote's REPORTDATA =
//! `SHA-512("ratls-cert:" ‖ SubjectPublicKeyInfo DER)` (dstack's `QuoteContentType::RaTlsCert`). The quote and
//! the event log travel in non-critical extensions whose values are DER OCTET STRINGs wrapping the raw bytes,
//! exactly as dstack's `ra-tls` `add_ext` writes them:
//!
//! | OID | content |
//! |---|---|
//! | `1.3.6.1.4.1.62397.1.1` | the raw TDX quote |
//! | `1.3.6.1.4.1.62397.1.2` | the event log: JSON array of `{imr, event_type, digest, event, event_payload}` (read also when prefixed `ELGZv1` + gzip) |
//! | `1.3.6.1.4.1.62397.1.3` | app id (raw bytes) |
//! | `1.3.6.1.4.1.62397.1.4` | special usage (UTF-8, e.g. `kms:rpc`, `app:ca`) |
//!
//! We write the TDX form dstack uses for TDX quotes (`.1.1` + `.1.2`), which every dstack release reads. The
//! newer versioned attestation (`.1.8`, SCALE/MessagePack) and app info (`.1.9`) are not produced; a
//! certificate that carries only `.1.8` is refused with [`RaTlsError::UnsupportedAttestationFormat`].
//!
//! # Verification ([`verify`], [`tls`])
//! [`AttestationVerifier`] checks, for the leaf: the quote (Intel DCAP through a [`CollateralProvider`], or a
//! simulated quote only with `allow_simulated` and a pinned simulator root), the key binding, the replay of
//! the event log against all four RTMRs of the quote, and derives the [`AttestedIdentity`]. Results are cached
//! by certificate hash. [`RaTlsServerVerifier`] / [`RaTlsClientVerifier`] plug this into rustls (ring
//! provider) after a chain check against configured roots — or, when enabled, accept a self-signed RA-TLS leaf
//! whose identity then comes only from its attestation. [`peer_identity`] returns the identity of the peer of
//! an established connection.
//!
//! # Revocation ([`revocation`], [`crl`])
//! The KMS publishes an X.509 CRL signed by its root CA; [`RevocationList`] verifies one against the pinned
//! root. [`RevocationSet`] holds the last good list per pinned CA and checks presented chains by issuer and
//! serial; [`CrlRefresher`] keeps it current from the KMS's `Revocation.GetCrl`. Both TLS verifiers consult a
//! set (`set_revocation_set`, or one list with `set_revocation_list`) and refuse a listed leaf or
//! intermediate; services that verify attestation in their handlers call [`RevocationSet::check_chain`].

pub mod cert;
pub mod crl;
mod deferred;
pub mod handshake;
pub mod oids;
mod parse;
pub mod revocation;
pub mod tls;
pub mod verify;

pub use cert::{CaCert, CertAttestation, CertRequest, ra_tls_report_data, report_data_for};
pub use crl::{CrlRefresher, CrlSource, RevocationSet};
pub use deferred::DeferredAttestationClientVerifier;
pub use parse::{ParsedCert, parse_cert};
pub use revocation::{AppRevocation, CrlContent, RevocationList, RevokedSerial, build_crl};
pub use tls::{RaTlsClientVerifier, RaTlsServerVerifier, peer_identity};
pub use verify::{AttestationPolicy, AttestationVerifier, AttestedIdentity, CollateralProvider, StaticCollateral};

use dstack_measurements::verify::VerifyError;

/// Errors of certificate creation, parsing and attestation verification.
#[derive(Debug, thiserror::Error)]
pub enum RaTlsError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate DER: {0}")]
    Certificate(String),
    #[error("extension {0} appears more than once")]
    DuplicateExtension(String),
    #[error("extension {oid}: {message}")]
    Extension { oid: String, message: String },
    #[error("certificate carries a TDX quote (.1.1) but no event log (.1.2)")]
    MissingEventLog,
    #[error(
        "certificate carries only a versioned attestation (.1.8), which this implementation does not decode; \
         expected a TDX quote (.1.1) and event log (.1.2)"
    )]
    UnsupportedAttestationFormat,
    #[error("certificate carries no attestation (no TDX quote extension)")]
    MissingAttestation,
    #[error("event log JSON: {0}")]
    EventLog(String),
    #[error(
        "quote does not bind this certificate's key: report data {found} != sha512(\"ratls-cert:\" || SPKI) {expected}"
    )]
    KeyBinding { expected: String, found: String },
    #[error("quote is simulated and simulated attestation is not allowed by this verifier")]
    SimulatedNotAllowed,
    #[error("quote verification failed: {0}")]
    Quote(VerifyError),
    #[error("event log does not match the quote: {0}")]
    EventLogMismatch(String),
    #[error("certificate usage is {found:?}, expected {expected:?}")]
    UsageMismatch { expected: String, found: Option<String> },
    #[error("certificate is not valid at {now} (valid {not_before}..={not_after})")]
    Validity { now: u64, not_before: u64, not_after: u64 },
    #[error("key: {0}")]
    Key(String),
    #[error("certificate revoked: {0}")]
    Revoked(String),
    #[error("revocation list: {0}")]
    Crl(String),
}

impl From<VerifyError> for RaTlsError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::SimulatedNotAllowed => RaTlsError::SimulatedNotAllowed,
            other => RaTlsError::Quote(other),
        }
    }
}
