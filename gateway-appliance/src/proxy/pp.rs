//! HAProxy PROXY protocol (versions 1 and 2): headers we send to backends whose port policy has
//! `pp`, and parsing of a header from a load balancer in front of the gateway.

use std::net::{IpAddr, SocketAddr};

use thiserror::Error;

/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line including CRLF (spec §2.1).
const V1_MAX: usize = 107;
/// Largest v2 header we accept (fixed part + addresses + TLVs).
const V2_MAX: usize = 16 + 512;

/// PROXY header errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PpError {
    /// More bytes needed.
    #[error("incomplete PROXY header")]
    Incomplete,
    /// Not a PROXY header or a malformed one.
    #[error("invalid PROXY header: {0}")]
    Invalid(&'static str),
}

/// Encode a header announcing a TCP connection from `src` to `dst`.
pub fn encode(version: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    if version == 1 {
        encode_v1(src, dst)
    } else {
        encode_v2(src, dst)
    }
}

/// Mixed families are announced as IPv6 with IPv4-mapped addresses.
fn unify(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = unify(src, dst);
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// Binary v2 header, command PROXY, transport STREAM, no TLVs.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = unify(src, dst);
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        // `unify` made both families equal.
        _ => unreachable_families(&mut out),
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// Families were unified, so this is never reached; emit an UNSPEC header rather than panic.
fn unreachable_families(out: &mut Vec<u8>) {
    out.push(0x00);
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// A parsed inbound header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PpHeader {
    /// The original client and destination; `None` for LOCAL / UNKNOWN.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Header length in bytes.
    pub len: usize,
}

/// Parse a v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<PpHeader, PpError> {
    let probe = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..probe) == V2_SIGNATURE.get(..probe) {
        return parse_v2(buf);
    }
    let probe = buf.len().min(6);
    if buf.get(..probe) == b"PROXY ".get(..probe) {
        return parse_v1(buf);
    }
    Err(PpError::Invalid("no PROXY signature"))
}

fn parse_v1(buf: &[u8]) -> Result<PpHeader, PpError> {
    let window = buf.get(..buf.len().min(V1_MAX)).unwrap_or_default();
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(PpError::Invalid("v1 line too long"))
        } else {
            Err(PpError::Incomplete)
        };
    };
    let line =
        std::str::from_utf8(window.get(..end).unwrap_or_default()).map_err(|_| PpError::Invalid("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(PpHeader { addrs: None, len }),
        ["PROXY", fam @ ("TCP4" | "TCP6"), s, d, sp, dp] => {
            let ip = |t: &str| t.parse::<IpAddr>().map_err(|_| PpError::Invalid("v1 address"));
            let port = |t: &str| t.parse::<u16>().map_err(|_| PpError::Invalid("v1 port"));
            let (s, d) = (ip(s)?, ip(d)?);
            if s.is_ipv4() != (*fam == "TCP4") || d.is_ipv4() != (*fam == "TCP4") {
                return Err(PpError::Invalid("v1 address family"));
            }
            Ok(PpHeader {
                addrs: Some((SocketAddr::new(s, port(sp)?), SocketAddr::new(d, port(dp)?))),
                len,
            })
        }
        _ => Err(PpError::Invalid("v1 fields")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<PpHeader, PpError> {
    let Some(fixed) = buf.get(..16) else {
        return Err(PpError::Incomplete);
    };
    if fixed.get(..12) != Some(&V2_SIGNATURE[..]) {
        return Err(PpError::Invalid("v2 signature"));
    }
    let (ver_cmd, fam) = (fixed[12], fixed[13]);
    let body_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(PpError::Invalid("v2 version"));
    }
    if 16 + body_len > V2_MAX {
        return Err(PpError::Invalid("v2 header too long"));
    }
    let Some(body) = buf.get(16..16 + body_len) else {
        return Err(PpError::Incomplete);
    };
    let len = 16 + body_len;
    match ver_cmd & 0x0f {
        0 => return Ok(PpHeader { addrs: None, len }), // LOCAL
        1 => {}
        _ => return Err(PpError::Invalid("v2 command")),
    }
    let port = |at: usize| body.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    let addrs = match fam >> 4 {
        1 => {
            let b: [u8; 12] = body
                .get(..12)
                .and_then(|b| b.try_into().ok())
                .ok_or(PpError::Invalid("v2 ipv4 length"))?;
            let s = std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let d = std::net::Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            let (sp, dp) = (port(8).unwrap_or_default(), port(10).unwrap_or_default());
            Some((SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp)))
        }
        2 => {
            let s: [u8; 16] = body
                .get(..16)
                .and_then(|b| b.try_into().ok())
                .ok_or(PpError::Invalid("v2 ipv6 length"))?;
            let d: [u8; 16] = body
                .get(16..32)
                .and_then(|b| b.try_into().ok())
                .ok_or(PpError::Invalid("v2 ipv6 length"))?;
            let sp = port(32).ok_or(PpError::Invalid("v2 ipv6 length"))?;
            let dp = port(34).ok_or(PpError::Invalid("v2 ipv6 length"))?;
            Some((SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp)))
        }
        _ => None, // UNSPEC / unix: keep the socket's addresses
    };
    Ok(PpHeader { addrs, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_matches_spec_example() {
        // The example line from the PROXY protocol spec, §2.1.
        let h = encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let p = parse(&h).unwrap();
        assert_eq!(p.len, h.len());
        assert_eq!(p.addrs, Some((sa("192.168.0.1:56324"), sa("192.168.0.11:443"))));
    }

    #[test]
    fn v2_ipv4_layout_by_hand() {
        let h = encode_v2(sa("10.1.2.3:4660"), sa("10.0.0.9:80"));
        let mut want = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 10, 1, 2, 3, 10, 0, 0, 9, 0x12, 0x34, 0x00, 0x50]);
        assert_eq!(h, want);
        let p = parse(&h).unwrap();
        assert_eq!(p.addrs, Some((sa("10.1.2.3:4660"), sa("10.0.0.9:80"))));
        assert_eq!(p.len, 28);
    }

    #[test]
    fn v2_mixed_families_become_ipv6() {
        let h = encode(2, sa("[2001:db8::1]:1000"), sa("10.0.0.2:443"));
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        let p = parse(&h).unwrap();
        assert_eq!(p.addrs.unwrap().1, sa("[::ffff:10.0.0.2]:443"));
        let h1 = encode(1, sa("[2001:db8::1]:1000"), sa("10.0.0.2:443"));
        assert_eq!(h1, b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.2 1000 443\r\n");
    }

    #[test]
    fn incomplete_and_invalid() {
        let h = encode_v2(sa("1.2.3.4:5"), sa("5.6.7.8:9"));
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Err(PpError::Incomplete), "prefix {n}");
        }
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Err(PpError::Incomplete));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Err(PpError::Invalid(_))));
        assert!(matches!(
            parse(b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n"),
            Err(PpError::Invalid(_))
        ));
        assert!(matches!(
            parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20)),
            Err(PpError::Invalid(_))
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\nxyz").unwrap(),
            PpHeader { addrs: None, len: 15 }
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).unwrap(), PpHeader { addrs: None, len: 16 });
    }
}
