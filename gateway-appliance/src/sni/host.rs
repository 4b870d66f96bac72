//! The dstack host grammar: `<id>[-<port>][s|g].<base_domain>`.
//!
//! * suffix `s`: TLS passthrough to the app (default port 443);
//! * suffix `g`: TLS terminated at the gateway advertising ALPN h2 (default port 80);
//! * no suffix: TLS terminated at the gateway, plain TCP to the app (default port 80).
//!
//! Examples: `myapp` → 80, `myapp-8080` → 8080 terminate, `myapp-443s` / `myapp-s` → 443
//! passthrough, `myapp-8080g` → 8080 h2. `gs` (and any other suffix) is invalid.

use thiserror::Error;

/// How the proxy treats the TLS session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Splice the client's TLS bytes to the app unchanged.
    Passthrough,
    /// Terminate TLS at the gateway, plain TCP to the app.
    Terminate,
    /// Terminate TLS advertising ALPN `h2`, plain TCP (h2c) to the app.
    TerminateH2,
}

/// A parsed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Instance id or app id (matched in that order by the router).
    pub id: String,
    /// Port inside the CVM.
    pub port: u16,
    /// TLS handling.
    pub mode: TlsMode,
}

/// Why a host name does not name a destination.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HostError {
    /// The name is not `<label>.<base_domain>`.
    #[error("host {0:?} is not directly under the base domain")]
    NotUnderBaseDomain(String),
    /// The subdomain does not follow `<id>[-<port>][s|g]`.
    #[error("invalid subdomain {sub:?}: {why}")]
    InvalidSubdomain {
        /// The offending first label.
        sub: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Strip `.<base_domain>` (case-insensitive) from `host`; `None` when `host` is not one label
/// directly under it.
pub fn subdomain_of<'a>(host: &'a str, base_domain: &str) -> Option<&'a str> {
    let base = base_domain.trim_end_matches('.');
    let host = host.trim_end_matches('.');
    let cut = host.len().checked_sub(base.len() + 1)?;
    let (sub, rest) = (host.get(..cut)?, host.get(cut..)?);
    let rest = rest.strip_prefix('.')?;
    (rest.eq_ignore_ascii_case(base) && !sub.is_empty() && !sub.contains('.')).then_some(sub)
}

/// Parse `host` as `<id>[-<port>][s|g].<base_domain>`.
pub fn parse_host(host: &str, base_domain: &str) -> Result<Destination, HostError> {
    let sub = subdomain_of(host, base_domain).ok_or_else(|| HostError::NotUnderBaseDomain(host.to_owned()))?;
    parse_subdomain(sub)
}

/// Parse the first label `<id>[-<port>][s|g]`.
pub fn parse_subdomain(sub: &str) -> Result<Destination, HostError> {
    // Host names are case-insensitive (the ClientHello parser already lower-cases SNI).
    let lower = sub.to_ascii_lowercase();
    let bad = |why| HostError::InvalidSubdomain {
        sub: sub.to_owned(),
        why,
    };
    let mut parts = lower.split('-');
    let id = parts.next().unwrap_or_default();
    if id.is_empty() {
        return Err(bad("empty id"));
    }
    if !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(bad("id characters"));
    }
    let (port, mode) = match parts.next() {
        None | Some("") => (None, TlsMode::Terminate),
        Some(part) => {
            let (digits, mode) = if let Some(d) = part.strip_suffix('s') {
                (d, TlsMode::Passthrough)
            } else if let Some(d) = part.strip_suffix('g') {
                (d, TlsMode::TerminateH2)
            } else {
                (part, TlsMode::Terminate)
            };
            if digits.is_empty() {
                (None, mode)
            } else {
                if !digits.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(bad("port is not a number (only one of the suffixes s or g)"));
                }
                let port: u16 = digits.parse().map_err(|_| bad("port out of range"))?;
                if port == 0 {
                    return Err(bad("port 0"));
                }
                (Some(port), mode)
            }
        }
    };
    if parts.next().is_some() {
        return Err(bad("more than one '-'"));
    }
    let default_port = if mode == TlsMode::Passthrough { 443 } else { 80 };
    Ok(Destination {
        id: id.to_owned(),
        port: port.unwrap_or(default_port),
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(id: &str, port: u16, mode: TlsMode) -> Destination {
        Destination {
            id: id.into(),
            port,
            mode,
        }
    }

    #[test]
    fn dstack_examples() {
        let b = "example.com";
        assert_eq!(
            parse_host("myapp.example.com", b),
            Ok(dst("myapp", 80, TlsMode::Terminate))
        );
        assert_eq!(
            parse_host("myapp-8080.example.com", b),
            Ok(dst("myapp", 8080, TlsMode::Terminate))
        );
        assert_eq!(
            parse_host("myapp-443s.example.com", b),
            Ok(dst("myapp", 443, TlsMode::Passthrough))
        );
        assert_eq!(
            parse_host("myapp-s.example.com", b),
            Ok(dst("myapp", 443, TlsMode::Passthrough))
        );
        assert_eq!(
            parse_host("myapp-8080g.example.com", b),
            Ok(dst("myapp", 8080, TlsMode::TerminateH2))
        );
        assert_eq!(
            parse_host("myapp-g.example.com", b),
            Ok(dst("myapp", 80, TlsMode::TerminateH2))
        );
        assert_eq!(
            parse_host("myapp-.example.com", b),
            Ok(dst("myapp", 80, TlsMode::Terminate))
        );
        assert_eq!(
            parse_host("MyApp-22S.Example.Com.", b),
            Ok(dst("myapp", 22, TlsMode::Passthrough))
        );
    }

    #[test]
    fn invalid_subdomains() {
        for sub in [
            "myapp-8080gs",
            "myapp-gs",
            "myapp-sg",
            "myapp-80x",
            "myapp-1-2",
            "-80",
            "myapp-0",
            "myapp-65536",
            "my.app",
        ] {
            assert!(parse_subdomain(sub).is_err(), "{sub}");
        }
        assert_eq!(parse_subdomain("myapp-65535").unwrap().port, 65535);
    }

    #[test]
    fn base_domain_matching() {
        assert_eq!(subdomain_of("a.example.com", "example.com"), Some("a"));
        assert_eq!(subdomain_of("a.example.com", "Example.Com."), Some("a"));
        assert_eq!(subdomain_of("a.b.example.com", "example.com"), None);
        assert_eq!(subdomain_of("example.com", "example.com"), None);
        assert_eq!(subdomain_of("aexample.com", "example.com"), None);
        assert_eq!(subdomain_of(".example.com", "example.com"), None);
        assert_eq!(subdomain_of("a.example.org", "example.com"), None);
        assert!(matches!(
            parse_host("a.example.org", "example.com"),
            Err(HostError::NotUnderBaseDomain(_))
        ));
    }
}
