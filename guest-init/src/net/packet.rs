//! IPv4 + UDP framing for DHCP before the interface has an address: the raw socket sends and receives
//! whole IP packets, so we build and check the IP and UDP headers ourselves (RFC 791, RFC 768, RFC 1071).

use std::net::Ipv4Addr;

pub const IPPROTO_UDP: u8 = 17;
const IPV4_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// Errors parsing a received IPv4/UDP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("IPv4 packet truncated: {what} needs {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("not IPv4 (version {0})")]
    NotIpv4(u8),
    #[error("IPv4 header length {0} bytes is below 20")]
    BadHeaderLength(usize),
    #[error("IPv4 header checksum mismatch")]
    BadIpChecksum,
    #[error("IPv4 fragment (flags/offset 0x{0:04x}): DHCP replies are never fragmented here")]
    Fragment(u16),
    #[error("IPv4 protocol {0} is not UDP")]
    NotUdp(u8),
    #[error("UDP length {udp_len} does not fit the IPv4 payload of {ip_payload} bytes")]
    BadUdpLength { udp_len: usize, ip_payload: usize },
    #[error("UDP checksum mismatch")]
    BadUdpChecksum,
}

/// RFC 1071 one's-complement sum over `data` (odd trailing byte padded with zero), not yet inverted.
fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (what goes into the header field).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut acc = sum16(0, &src.octets());
    acc = sum16(acc, &dst.octets());
    acc += u32::from(IPPROTO_UDP);
    acc += udp.len() as u32;
    let c = !fold(sum16(acc, udp));
    // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
    if c == 0 { 0xffff } else { c }
}

/// Builds an IPv4 packet (no options, TTL 64, DF clear) carrying one UDP datagram with a checksum.
pub fn build_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, ip_id: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = UDP_HEADER + payload.len();
    let total = IPV4_MIN_HEADER + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0x00]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&ip_id.to_be_bytes());
    p.extend_from_slice(&[0, 0, 64, IPPROTO_UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let hc = internet_checksum(&p);
    p[10..12].copy_from_slice(&hc.to_be_bytes());
    let udp_start = p.len();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let uc = udp_checksum(src, dst, &p[udp_start..]);
    p[udp_start + 6..udp_start + 8].copy_from_slice(&uc.to_be_bytes());
    p
}

/// A UDP datagram parsed out of an IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload: &'a [u8],
}

fn get<'a>(p: &'a [u8], start: usize, len: usize, what: &'static str) -> Result<&'a [u8], PacketError> {
    p.get(start..start.saturating_add(len)).ok_or(PacketError::Truncated {
        what,
        need: start.saturating_add(len),
        have: p.len(),
    })
}

fn be16(b: &[u8]) -> u16 {
    match b {
        [a, c, ..] => u16::from_be_bytes([*a, *c]),
        _ => 0,
    }
}

/// Parses and checks an IPv4/UDP packet. `verify_udp_checksum` is false when the kernel says the
/// checksum was never computed (checksum offload on a local path, `TP_STATUS_CSUMNOTREADY`).
/// Bytes after the IPv4 total length (Ethernet padding) are ignored.
pub fn parse_udp(p: &[u8], verify_udp_checksum: bool) -> Result<UdpDatagram<'_>, PacketError> {
    let first = *get(p, 0, 1, "IPv4 version")?.first().unwrap_or(&0);
    if first >> 4 != 4 {
        return Err(PacketError::NotIpv4(first >> 4));
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < IPV4_MIN_HEADER {
        return Err(PacketError::BadHeaderLength(ihl));
    }
    let header = get(p, 0, ihl, "IPv4 header")?;
    if internet_checksum(header) != 0 {
        return Err(PacketError::BadIpChecksum);
    }
    let total = usize::from(be16(get(header, 2, 2, "total length")?));
    if total < ihl {
        return Err(PacketError::BadHeaderLength(total));
    }
    let packet = get(p, 0, total, "IPv4 total length")?;
    let frag = be16(get(header, 6, 2, "fragment")?);
    // MF set or a non-zero offset: a fragment. The DF bit (0x4000) is fine.
    if frag & 0x3fff != 0 {
        return Err(PacketError::Fragment(frag));
    }
    let proto = *get(header, 9, 1, "protocol")?.first().unwrap_or(&0);
    if proto != IPPROTO_UDP {
        return Err(PacketError::NotUdp(proto));
    }
    let src = get(header, 12, 4, "source")?;
    let dst = get(header, 16, 4, "destination")?;
    let src = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
    let dst = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
    let ip_payload = packet.get(ihl..).unwrap_or_default();
    let udp_hdr = get(ip_payload, 0, UDP_HEADER, "UDP header")?;
    let udp_len = usize::from(be16(get(udp_hdr, 4, 2, "UDP length")?));
    if udp_len < UDP_HEADER || udp_len > ip_payload.len() {
        return Err(PacketError::BadUdpLength {
            udp_len,
            ip_payload: ip_payload.len(),
        });
    }
    let udp = get(ip_payload, 0, udp_len, "UDP datagram")?;
    let csum = be16(get(udp_hdr, 6, 2, "UDP checksum")?);
    if verify_udp_checksum && csum != 0 {
        // Summing the datagram including its checksum field must give all ones.
        let mut acc = sum16(0, &src.octets());
        acc = sum16(acc, &dst.octets());
        acc += u32::from(IPPROTO_UDP) + udp_len as u32;
        if fold(sum16(acc, udp)) != 0xffff {
            return Err(PacketError::BadUdpChecksum);
        }
    }
    Ok(UdpDatagram {
        src,
        dst,
        sport: be16(udp_hdr),
        dport: be16(get(udp_hdr, 2, 2, "UDP destination port")?),
        payload: udp.get(UDP_HEADER..).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2 (before inversion).
    #[test]
    fn rfc1071_example_sum() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum16(0, &data)), 0xddf2);
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    /// A well-known IPv4 header (Wikipedia "Internet checksum" example) with checksum 0xb861.
    #[test]
    fn known_ipv4_header_checksum() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(internet_checksum(&h), 0);
    }

    #[test]
    fn build_then_parse_roundtrip() {
        let p = build_udp(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, 7, b"hello dhcp");
        assert_eq!(p.len(), 20 + 8 + 10);
        let d = parse_udp(&p, true).unwrap();
        assert_eq!(
            (d.src, d.dst, d.sport, d.dport),
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67)
        );
        assert_eq!(d.payload, b"hello dhcp");
        // Trailing Ethernet padding is ignored.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 18]);
        assert_eq!(parse_udp(&padded, true).unwrap().payload, b"hello dhcp");
    }

    #[test]
    fn corrupted_packets_are_refused() {
        let p = build_udp(Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::BROADCAST, 67, 68, 1, b"payload!");
        let mut bad_ip = p.clone();
        bad_ip[8] ^= 1; // TTL
        assert_eq!(parse_udp(&bad_ip, true), Err(PacketError::BadIpChecksum));
        let mut bad_udp = p.clone();
        *bad_udp.last_mut().unwrap() ^= 0x20;
        assert_eq!(parse_udp(&bad_udp, true), Err(PacketError::BadUdpChecksum));
        // Unverified when the kernel says the checksum is not computed yet.
        assert!(parse_udp(&bad_udp, false).is_ok());
        for n in 0..p.len() {
            assert!(parse_udp(&p[..n], true).is_err(), "prefix of {n} bytes accepted");
        }
        let mut frag = p.clone();
        frag[6] = 0x20; // MF
        let c = internet_checksum(&{
            let mut h = frag[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_udp(&frag, true), Err(PacketError::Fragment(0x2000)));
        assert_eq!(parse_udp(&[0x65; 40], true), Err(PacketError::NotIpv4(6)));
        assert_eq!(parse_udp(&[0x44; 40], true), Err(PacketError::BadHeaderLength(16)));
    }
}
