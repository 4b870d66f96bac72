//! TXT lookups for custom domains: a host name outside the base domain is routed by the record
//! `_dstack-app-address.<sni>` = `<app_id>:<port>` (passthrough).
//!
//! [`TxtResolver`] is the seam: production uses [`UdpDnsClient`] (a small stub resolver of our
//! own: one question, UDP with TCP retry on truncation); tests use a map.

use std::net::SocketAddr;
use std::time::Duration;

use dstack_rpc::BoxFuture;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// DNS errors.
#[derive(Debug, Error)]
pub enum DnsError {
    /// Network failure.
    #[error("dns i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The lookup took too long.
    #[error("dns lookup of {0} timed out")]
    Timeout(String),
    /// The server answered with an error code other than NXDOMAIN.
    #[error("dns server returned rcode {0}")]
    Rcode(u8),
    /// The answer could not be parsed.
    #[error("malformed dns message: {0}")]
    Malformed(&'static str),
    /// The name cannot be encoded.
    #[error("invalid dns name {0:?}")]
    BadName(String),
    /// No record names an app.
    #[error("no app address record for {0}")]
    NoAppAddress(String),
    /// A record exists but is not `<app_id>:<port>`.
    #[error("invalid app address record {0:?}")]
    BadAppAddress(String),
}

/// Looks up TXT records. An absent name yields an empty list, not an error.
pub trait TxtResolver: Send + Sync {
    /// Each record's character-strings joined.
    fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>>;
}

/// A `<app_id>:<port>` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppAddress {
    /// App id (lower-case hex as written).
    pub app_id: String,
    /// Port inside the CVM.
    pub port: u16,
}

/// Parse `<app_id>:<port>`.
pub fn parse_app_address(txt: &str) -> Result<AppAddress, DnsError> {
    let bad = || DnsError::BadAppAddress(txt.to_owned());
    let (app_id, port) = txt.trim().rsplit_once(':').ok_or_else(bad)?;
    if app_id.is_empty() || !app_id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok(AppAddress {
        app_id: app_id.to_ascii_lowercase(),
        port,
    })
}

/// The names tried for `sni`, in order: `<prefix>.<sni>`, then (compat) `_tapp-address.<sni>`,
/// then `<prefix>-wildcard.<parent of sni>`.
pub fn app_address_names(sni: &str, prefix: &str, compat: bool) -> Vec<String> {
    let mut names = vec![format!("{prefix}.{sni}")];
    if compat {
        names.push(format!("_tapp-address.{sni}"));
    }
    if let Some((_, parent)) = sni.split_once('.')
        && parent.contains('.')
    {
        names.push(format!("{prefix}-wildcard.{parent}"));
    }
    names
}

/// Find the app for a custom domain; the first name with a parseable record wins.
pub async fn resolve_app_address(
    resolver: &dyn TxtResolver,
    sni: &str,
    prefix: &str,
    compat: bool,
    timeout: Duration,
) -> Result<AppAddress, DnsError> {
    let work = async {
        let mut last_bad = None;
        for name in app_address_names(sni, prefix, compat) {
            for txt in resolver.lookup_txt(&name).await? {
                match parse_app_address(&txt) {
                    Ok(a) => return Ok(a),
                    Err(e) => last_bad = Some(e),
                }
            }
        }
        Err(last_bad.unwrap_or_else(|| DnsError::NoAppAddress(sni.to_owned())))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DnsError::Timeout(sni.to_owned()))?
}

/// A stub resolver asking one recursive server.
#[derive(Debug, Clone)]
pub struct UdpDnsClient {
    server: SocketAddr,
    timeout: Duration,
}

impl UdpDnsClient {
    /// Ask `server`.
    pub fn new(server: SocketAddr, timeout: Duration) -> Self {
        Self { server, timeout }
    }

    /// The first `nameserver` of `/etc/resolv.conf`.
    pub fn from_system(timeout: Duration) -> Result<Self, DnsError> {
        let text = std::fs::read_to_string("/etc/resolv.conf")?;
        let server = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .find_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
            .ok_or(DnsError::Malformed("no nameserver in /etc/resolv.conf"))?;
        Ok(Self::new(SocketAddr::new(server, 53), timeout))
    }

    async fn query(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let id = {
            let mut b = [0u8; 2];
            let _ = getrandom::fill(&mut b);
            u16::from_be_bytes(b)
        };
        let q = encode_query(id, name, 16)?;
        let bind: SocketAddr = if self.server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .map_err(|_| DnsError::Malformed("bind"))?;
        let sock = tokio::net::UdpSocket::bind(bind).await?;
        sock.connect(self.server).await?;
        sock.send(&q).await?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await?;
            let Some(msg) = buf.get(..n) else { continue };
            // Ignore stray datagrams that are not our answer.
            if msg.get(..2) != Some(&id.to_be_bytes()[..]) {
                continue;
            }
            return match parse_txt_response(msg, id)? {
                Answer::Truncated => self.query_tcp(&q, id).await,
                Answer::Records(r) => Ok(r),
            };
        }
    }

    async fn query_tcp(&self, q: &[u8], id: u16) -> Result<Vec<String>, DnsError> {
        let mut s = tokio::net::TcpStream::connect(self.server).await?;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(q);
        s.write_all(&framed).await?;
        let len = s.read_u16().await? as usize;
        let mut msg = vec![0u8; len];
        s.read_exact(&mut msg).await?;
        match parse_txt_response(&msg, id)? {
            Answer::Records(r) => Ok(r),
            Answer::Truncated => Err(DnsError::Malformed("truncated tcp answer")),
        }
    }
}

impl TxtResolver for UdpDnsClient {
    fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.query(name))
                .await
                .map_err(|_| DnsError::Timeout(name.to_owned()))?
        })
    }
}

/// Encode a recursive query for `name` (`qtype` 16 = TXT, class IN).
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, DnsError> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; QDCOUNT=1
    let trimmed = name.trim_end_matches('.');
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(DnsError::BadName(name.to_owned()));
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(DnsError::BadName(name.to_owned()));
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    Ok(m)
}

/// A parsed answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// TC bit set: ask again over TCP.
    Truncated,
    /// TXT records (NXDOMAIN / no data = empty).
    Records(Vec<String>),
}

fn be16(m: &[u8], at: usize) -> Result<u16, DnsError> {
    match m.get(at..at + 2) {
        Some(&[a, b]) => Ok(u16::from_be_bytes([a, b])),
        _ => Err(DnsError::Malformed("short message")),
    }
}

/// Skip a (possibly compressed) name starting at `at`; returns the offset after it.
fn skip_name(m: &[u8], mut at: usize) -> Result<usize, DnsError> {
    for _ in 0..128 {
        let len = *m.get(at).ok_or(DnsError::Malformed("name runs past end"))?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2), // pointer ends the name here
            l if l & 0xc0 != 0 => return Err(DnsError::Malformed("label type")),
            l => at += 1 + l as usize,
        }
    }
    Err(DnsError::Malformed("name too long"))
}

/// Parse the answer to a TXT query with id `id`.
pub fn parse_txt_response(m: &[u8], id: u16) -> Result<Answer, DnsError> {
    if be16(m, 0)? != id {
        return Err(DnsError::Malformed("id mismatch"));
    }
    let flags = be16(m, 2)?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed("not a response"));
    }
    if flags & 0x0200 != 0 {
        return Ok(Answer::Truncated);
    }
    match (flags & 0x000f) as u8 {
        0 => {}
        3 => return Ok(Answer::Records(Vec::new())), // NXDOMAIN
        rc => return Err(DnsError::Rcode(rc)),
    }
    let (qd, an) = (be16(m, 4)?, be16(m, 6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(m, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        at = skip_name(m, at)?;
        let rtype = be16(m, at)?;
        let rdlen = be16(m, at + 8)? as usize;
        let start = at + 10;
        let rdata = m
            .get(start..start + rdlen)
            .ok_or(DnsError::Malformed("rdata past end"))?;
        at = start + rdlen;
        if rtype != 16 {
            continue; // e.g. a CNAME in front of the TXT
        }
        let mut txt = Vec::new();
        let mut p = 0;
        while let Some(&l) = rdata.get(p) {
            let s = rdata
                .get(p + 1..p + 1 + l as usize)
                .ok_or(DnsError::Malformed("txt string past rdata"))?;
            txt.extend_from_slice(s);
            p += 1 + l as usize;
        }
        out.push(String::from_utf8_lossy(&txt).into_owned());
    }
    Ok(Answer::Records(out))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// In-memory resolver for tests.
    pub(crate) struct MapResolver(pub HashMap<String, Vec<String>>);

    impl TxtResolver for MapResolver {
        fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
            Box::pin(async move { Ok(self.0.get(name).cloned().unwrap_or_default()) })
        }
    }

    #[test]
    fn app_address_grammar() {
        assert_eq!(
            parse_app_address("abc123:8443").unwrap(),
            AppAddress {
                app_id: "abc123".into(),
                port: 8443
            }
        );
        for bad in ["abc", ":80", "abc:0", "abc:70000", "a b:80", "abc:-1"] {
            assert!(parse_app_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_in_order() {
        assert_eq!(
            app_address_names("www.shop.example", "_dstack-app-address", true),
            [
                "_dstack-app-address.www.shop.example",
                "_tapp-address.www.shop.example",
                "_dstack-app-address-wildcard.shop.example"
            ]
        );
        assert_eq!(app_address_names("example", "_p", false), ["_p.example"]);
    }

    #[tokio::test]
    async fn lookup_order_and_wildcard() {
        let mut m = HashMap::new();
        m.insert(
            "_dstack-app-address-wildcard.shop.example".to_owned(),
            vec!["aa11:443".to_owned()],
        );
        m.insert(
            "_tapp-address.b.shop.example".to_owned(),
            vec!["garbage".to_owned(), "bb22:8443".to_owned()],
        );
        let r = MapResolver(m);
        let t = Duration::from_secs(1);
        let a = resolve_app_address(&r, "a.shop.example", "_dstack-app-address", true, t)
            .await
            .unwrap();
        assert_eq!(
            a,
            AppAddress {
                app_id: "aa11".into(),
                port: 443
            }
        );
        let b = resolve_app_address(&r, "b.shop.example", "_dstack-app-address", true, t)
            .await
            .unwrap();
        assert_eq!(b.app_id, "bb22");
        // Without compat the legacy record is not consulted; the wildcard still is.
        let b = resolve_app_address(&r, "b.shop.example", "_dstack-app-address", false, t)
            .await
            .unwrap();
        assert_eq!(b.app_id, "aa11");
        assert!(matches!(
            resolve_app_address(&r, "x.other.example", "_dstack-app-address", true, t).await,
            Err(DnsError::NoAppAddress(_))
        ));
    }

    /// A response laid out by hand from RFC 1035 §4.1: one question, a CNAME answer, then a TXT
    /// answer with two character-strings using a compression pointer to the question name.
    #[test]
    fn parse_hand_built_response() {
        let q = encode_query(0x1234, "_a.example.com", 16).unwrap();
        assert_eq!(&q[12..], b"\x02_a\x07example\x03com\x00\x00\x10\x00\x01");
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        m.extend_from_slice(&q[12..]);
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]); // CNAME
        m.extend_from_slice(&[0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60, 0, 11]);
        m.extend_from_slice(b"\x04ab12\x05:8080");
        assert_eq!(
            parse_txt_response(&m, 0x1234).unwrap(),
            Answer::Records(vec!["ab12:8080".into()])
        );
        assert!(parse_txt_response(&m, 0x9999).is_err());
        let mut nx = m[..12].to_vec();
        nx[3] = 0x83;
        nx[7] = 0;
        assert_eq!(parse_txt_response(&nx, 0x1234).unwrap(), Answer::Records(vec![]));
        let mut tc = m.clone();
        tc[2] |= 0x02;
        assert_eq!(parse_txt_response(&tc, 0x1234).unwrap(), Answer::Truncated);
        for n in 0..m.len() {
            let _ = parse_txt_response(&m[..n], 0x1234); // never panics
        }
        assert!(encode_query(1, "a..b", 16).is_err());
    }
}
