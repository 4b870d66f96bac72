//! What a handler knows about the caller.

use std::net::SocketAddr;
use std::path::PathBuf;

use http::HeaderMap;
use rustls_pki_types::CertificateDer;

/// Credentials of a unix-socket peer (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// Process id, when the kernel reports it.
    pub pid: Option<i32>,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Where a connection came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAddr {
    /// TCP (plain or TLS).
    Tcp(SocketAddr),
    /// Unix socket; the peer address is usually unnamed.
    Unix {
        /// The peer's bound path, if any.
        path: Option<PathBuf>,
        /// Peer credentials, if available.
        peer: Option<UnixPeer>,
    },
    /// Any other transport (e.g. vsock), described by its owner.
    Other(String),
}

impl std::fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix { path, peer } => {
                f.write_str("unix:")?;
                if let Some(p) = path {
                    write!(f, "{}", p.display())?;
                }
                if let Some(p) = peer {
                    write!(f, "(uid={}", p.uid)?;
                    if let Some(pid) = p.pid {
                        write!(f, ",pid={pid}")?;
                    }
                    f.write_str(")")?;
                }
                Ok(())
            }
            Self::Other(s) => f.write_str(s),
        }
    }
}

/// Per-connection facts, fixed after accept (and the TLS handshake).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Peer address.
    pub remote: RemoteAddr,
    /// The client's certificate chain (leaf first) when it authenticated with TLS.
    pub peer_certificates: Option<Vec<CertificateDer<'static>>>,
}

impl ConnInfo {
    /// A connection without TLS client authentication.
    pub fn plain(remote: RemoteAddr) -> Self {
        Self {
            remote,
            peer_certificates: None,
        }
    }
}

/// Passed to every handler call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// Peer address.
    pub remote: RemoteAddr,
    /// The client's TLS certificate chain (DER, leaf first) when it presented one.
    pub peer_certificates: Option<Vec<CertificateDer<'static>>>,
    /// Request headers (e.g. `Authorization`).
    pub headers: HeaderMap,
    /// The router's path prefix (`""`, `"/prpc"`, `"/api"`).
    pub path_prefix: String,
    /// Name of the service handling the call.
    pub service: &'static str,
    /// Bare method name (without `Service.`).
    pub method: String,
}

impl CallContext {
    /// A context for in-process calls and tests: no peer, no headers.
    pub fn local() -> Self {
        Self {
            remote: RemoteAddr::Other("local".to_owned()),
            peer_certificates: None,
            headers: HeaderMap::new(),
            path_prefix: String::new(),
            service: "",
            method: String::new(),
        }
    }

    /// The client's leaf certificate, if it presented one.
    pub fn peer_leaf_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.peer_certificates.as_ref().and_then(|c| c.first())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        let mut ctx = CallContext::local();
        assert_eq!(ctx.bearer_token(), None);
        ctx.headers
            .insert(http::header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(ctx.bearer_token(), Some("abc"));
        ctx.headers
            .insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(ctx.bearer_token(), None);
    }

    #[test]
    fn display() {
        let u = RemoteAddr::Unix {
            path: None,
            peer: Some(UnixPeer {
                pid: Some(7),
                uid: 0,
                gid: 0,
            }),
        };
        assert_eq!(u.to_string(), "unix:(uid=0,pid=7)");
        let t = RemoteAddr::Tcp("127.0.0.1:80".parse().unwrap());
        assert_eq!(t.to_string(), "127.0.0.1:80");
    }
}
