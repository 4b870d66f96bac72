//! Guest-side access to the TEE: quotes, RTMR extension and the boot event log.
//!
//! Backends: [`tdx::TdxGuest`] for real TDX guests (Linux ABIs), and the simulated TDX module reached over vsock
//! on hosts without TDX. Detection is explicit; with neither present every key-dependent operation fails closed.

pub mod tdx;

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
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
