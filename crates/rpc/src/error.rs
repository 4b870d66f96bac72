//! The one error type of the crate, shared by server, client and generated code.

use std::time::Duration;

use http::StatusCode;

/// Errors produced while decoding, handling, transporting or encoding a pRPC call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// A JSON body (request or response) did not match the message.
    #[error("invalid JSON for {method}: {message}")]
    Json {
        /// Method whose message failed to decode.
        method: String,
        /// Error with the path of the offending field.
        message: String,
    },
    /// A protobuf body (request or response) did not decode.
    #[error("invalid protobuf for {method}: {source}")]
    Protobuf {
        /// Method whose message failed to decode.
        method: String,
        /// Decoder error.
        #[source]
        source: prost::DecodeError,
    },
    /// A GET query string did not match the request message.
    #[error("invalid query string for {method}: {message}")]
    Query {
        /// Method whose message failed to decode.
        method: String,
        /// Error with the name of the offending field.
        message: String,
    },
    /// The handler rejected the call; the message goes back to the caller verbatim.
    #[error("{0}")]
    Handler(String),
    /// No service on this router has the method (or the `Service.` prefix is unknown).
    #[error("method not found: {0}")]
    MethodNotFound(String),
    /// The request body exceeds the router's limit.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A response could not be encoded (a bug, not a client fault).
    #[error("failed to encode response of {method}: {message}")]
    Encode {
        /// Method whose response failed to encode.
        method: String,
        /// Serializer error.
        message: String,
    },
    /// Socket-level failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS configuration or handshake failure.
    #[error("TLS error: {0}")]
    Tls(String),
    /// HTTP protocol failure (malformed response, connection closed early, ...).
    #[error("HTTP error: {0}")]
    Http(String),
    /// A client endpoint URL or option that cannot be used.
    #[error("invalid endpoint {url:?}: {reason}")]
    InvalidEndpoint {
        /// The URL or value given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Connect or overall call timeout.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// Which phase timed out.
        what: &'static str,
        /// The configured timeout.
        after: Duration,
    },
    /// The server answered with a non-success status.
    #[error("remote returned HTTP {status}: {message}")]
    Remote {
        /// HTTP status code.
        status: u16,
        /// Error message from the `{"error": ...}` (or protobuf error) body.
        message: String,
    },
    /// Server-side failure that is not the caller's fault (e.g. a handler panic).
    #[error("internal server error: {0}")]
    Internal(String),
}

impl RpcError {
    /// A handler error whose message is returned to the caller with HTTP 400.
    pub fn handler(message: impl std::fmt::Display) -> Self {
        Self::Handler(message.to_string())
    }

    /// HTTP status the server answers with for this error.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::MethodNotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Encode { .. } | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(RpcError::handler("x").http_status(), StatusCode::BAD_REQUEST);
        assert_eq!(RpcError::handler("boom").to_string(), "boom");
        assert_eq!(
            RpcError::MethodNotFound("Foo".into()).to_string(),
            "method not found: Foo"
        );
        assert_eq!(
            RpcError::MethodNotFound("Foo".into()).http_status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            RpcError::PayloadTooLarge { limit: 1 }.http_status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            RpcError::Internal("p".into()).http_status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
