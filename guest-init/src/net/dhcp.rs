//! DHCPv4 messages (RFC 2131) and the options we use (RFC 2132): encoding of client requests and strict
//! decoding of server replies. Replies come from the untrusted host network, so every length is checked
//! and every malformed field is refused with an error naming it; nothing here panics on input bytes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Fixed BOOTP header length (op … file), before the magic cookie.
pub const FIXED_LEN: usize = 236;
/// RFC 2131 §3: the options field starts with these four octets.
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// RFC 951/1542: relay agents and old servers expect at least a 300-octet BOOTP message.
pub const MIN_MESSAGE_LEN: usize = 300;
/// BOOTREQUEST / BOOTREPLY.
pub const OP_REQUEST: u8 = 1;
pub const OP_REPLY: u8 = 2;
/// `htype` for Ethernet (ARP hardware type 1) and its address length.
pub const HTYPE_ETHERNET: u8 = 1;
pub const HLEN_ETHERNET: u8 = 6;
/// The broadcast bit of `flags`: asks the server to broadcast its replies, because we cannot receive
/// unicast IP before the address is configured.
pub const FLAG_BROADCAST: u16 = 0x8000;

/// Option codes (RFC 2132).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const INTERFACE_MTU: u8 = 26;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_LIST: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// Errors decoding a server reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    #[error("DHCP message truncated: {what} needs {need} bytes at offset {offset}, message has {have}")]
    Truncated {
        what: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("DHCP magic cookie is {0:02x?}, expected 63:82:53:63")]
    BadCookie([u8; 4]),
    #[error("DHCP option {code} at offset {offset}: length {len} runs past the end of the {area} field")]
    OptionOverrun {
        code: u8,
        offset: usize,
        len: usize,
        area: &'static str,
    },
    #[error("DHCP options in the {0} field have no END option")]
    MissingEnd(&'static str),
    #[error("DHCP option {code} ({name}): {reason}")]
    BadOption {
        code: u8,
        name: &'static str,
        reason: String,
    },
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
}

/// The options a client needs, decoded and validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub message_type: Option<MessageType>,
    pub server_id: Option<Ipv4Addr>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub broadcast: Option<Ipv4Addr>,
    pub lease_secs: Option<u32>,
    pub renewal_secs: Option<u32>,
    pub rebinding_secs: Option<u32>,
    pub mtu: Option<u16>,
    pub hostname: Option<String>,
    pub domain: Option<String>,
    /// Option 56: a server's explanation (typically in a NAK), made printable.
    pub message: Option<String>,
}

/// A decoded BOOTREPLY (or any BOOTP message: `op` is reported, the client checks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub htype: u8,
    pub hlen: u8,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    pub options: Options,
}

fn take<'a>(buf: &'a [u8], offset: usize, len: usize, what: &'static str) -> Result<&'a [u8], DhcpError> {
    offset
        .checked_add(len)
        .and_then(|end| buf.get(offset..end))
        .ok_or(DhcpError::Truncated {
            what,
            offset,
            need: len,
            have: buf.len(),
        })
}

fn ip_at(buf: &[u8], offset: usize, what: &'static str) -> Result<Ipv4Addr, DhcpError> {
    let b = take(buf, offset, 4, what)?;
    Ok(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// Walks one options area, appending each option's bytes to `out` (RFC 3396: repeated codes concatenate).
/// `base` is the area's offset in the message, for error messages.
fn collect_options(
    area: &[u8],
    base: usize,
    name: &'static str,
    require_end: bool,
    out: &mut BTreeMap<u8, Vec<u8>>,
) -> Result<(), DhcpError> {
    let mut i = 0usize;
    while let Some(&code) = area.get(i) {
        match code {
            opt::PAD => i += 1,
            opt::END => return Ok(()),
            _ => {
                let len = *area.get(i + 1).ok_or(DhcpError::OptionOverrun {
                    code,
                    offset: base + i,
                    len: 0,
                    area: name,
                })? as usize;
                let data = area.get(i + 2..i + 2 + len).ok_or(DhcpError::OptionOverrun {
                    code,
                    offset: base + i,
                    len,
                    area: name,
                })?;
                out.entry(code).or_default().extend_from_slice(data);
                i += 2 + len;
            }
        }
    }
    // sname/file areas may simply be filled to the end; the main options area must end with END.
    if require_end {
        Err(DhcpError::MissingEnd(name))
    } else {
        Ok(())
    }
}

fn bad(code: u8, name: &'static str, reason: impl Into<String>) -> DhcpError {
    DhcpError::BadOption {
        code,
        name,
        reason: reason.into(),
    }
}

fn one_ip(code: u8, name: &'static str, v: &[u8]) -> Result<Ipv4Addr, DhcpError> {
    match v {
        [a, b, c, d] => Ok(Ipv4Addr::new(*a, *b, *c, *d)),
        _ => Err(bad(code, name, format!("length {} is not 4", v.len()))),
    }
}

fn ip_list(code: u8, name: &'static str, v: &[u8]) -> Result<Vec<Ipv4Addr>, DhcpError> {
    if v.is_empty() || !v.len().is_multiple_of(4) {
        return Err(bad(
            code,
            name,
            format!("length {} is not a non-zero multiple of 4", v.len()),
        ));
    }
    Ok(v.chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect())
}

fn u32_opt(code: u8, name: &'static str, v: &[u8]) -> Result<u32, DhcpError> {
    let b: [u8; 4] = v
        .try_into()
        .map_err(|_| bad(code, name, format!("length {} is not 4", v.len())))?;
    Ok(u32::from_be_bytes(b))
}

/// A host or domain name: RFC 1035 letters, digits, '-', '_' and '.', 1..=253 bytes; trailing NULs
/// (sent by some servers) are dropped. Anything else is refused because these strings end up in files
/// such as resolv.conf, where a newline would inject configuration.
fn dns_name(code: u8, name: &'static str, v: &[u8]) -> Result<String, DhcpError> {
    let mut end = v.len();
    while end > 0 && v.get(end - 1) == Some(&0) {
        end -= 1;
    }
    let s = v.get(..end).unwrap_or_default();
    if s.is_empty() || s.len() > 253 {
        return Err(bad(code, name, format!("length {} outside 1..=253", s.len())));
    }
    if let Some(pos) = s
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.'))
    {
        return Err(bad(
            code,
            name,
            format!("byte 0x{:02x} at position {pos} is not allowed", s[pos]),
        ));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

fn decode_options(raw: &BTreeMap<u8, Vec<u8>>) -> Result<Options, DhcpError> {
    let mut o = Options::default();
    for (&code, v) in raw {
        match code {
            opt::MESSAGE_TYPE => {
                let [t] = v.as_slice() else {
                    return Err(bad(code, "message type", format!("length {} is not 1", v.len())));
                };
                o.message_type = Some(
                    MessageType::from_u8(*t).ok_or_else(|| bad(code, "message type", format!("unknown type {t}")))?,
                );
            }
            opt::SERVER_ID => o.server_id = Some(one_ip(code, "server identifier", v)?),
            opt::SUBNET_MASK => {
                let m = one_ip(code, "subnet mask", v)?;
                if mask_to_prefix(m).is_none() {
                    return Err(bad(code, "subnet mask", format!("{m} is not a contiguous mask")));
                }
                o.subnet_mask = Some(m);
            }
            opt::ROUTER => o.routers = ip_list(code, "router", v)?,
            opt::DNS => o.dns = ip_list(code, "domain name server", v)?,
            opt::BROADCAST => o.broadcast = Some(one_ip(code, "broadcast address", v)?),
            opt::LEASE_TIME => o.lease_secs = Some(u32_opt(code, "lease time", v)?),
            opt::RENEWAL_TIME => o.renewal_secs = Some(u32_opt(code, "renewal time", v)?),
            opt::REBINDING_TIME => o.rebinding_secs = Some(u32_opt(code, "rebinding time", v)?),
            opt::INTERFACE_MTU => {
                let b: [u8; 2] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad(code, "interface MTU", format!("length {} is not 2", v.len())))?;
                let mtu = u16::from_be_bytes(b);
                // RFC 2132 §5.1: the minimum legal value is 68.
                if mtu < 68 {
                    return Err(bad(code, "interface MTU", format!("{mtu} is below the minimum 68")));
                }
                o.mtu = Some(mtu);
            }
            // Informational only (never written anywhere), so a bad name is dropped, not fatal.
            opt::HOSTNAME => {
                o.hostname = dns_name(code, "host name", v)
                    .inspect_err(|e| tracing::warn!("net: ignoring DHCP host name: {e}"))
                    .ok()
            }
            opt::DOMAIN_NAME => o.domain = Some(dns_name(code, "domain name", v)?),
            opt::MESSAGE => {
                let printable: String = v
                    .iter()
                    .take(255)
                    .map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' })
                    .collect();
                o.message = Some(printable);
            }
            _ => {} // Options we did not ask for are ignored, as RFC 2131 allows.
        }
    }
    Ok(o)
}

impl Message {
    /// Decodes a BOOTP/DHCP message from a UDP payload.
    pub fn decode(buf: &[u8]) -> Result<Self, DhcpError> {
        let fixed = take(buf, 0, FIXED_LEN, "fixed BOOTP header")?;
        let cookie: [u8; 4] = take(buf, FIXED_LEN, 4, "magic cookie")?
            .try_into()
            .map_err(|_| DhcpError::BadCookie([0; 4]))?;
        if cookie != MAGIC_COOKIE {
            return Err(DhcpError::BadCookie(cookie));
        }
        let mut raw = BTreeMap::new();
        let opts_start = FIXED_LEN + 4;
        collect_options(
            buf.get(opts_start..).unwrap_or_default(),
            opts_start,
            "options",
            true,
            &mut raw,
        )?;
        // Option overload (52): the file and/or sname fields carry more options (RFC 2132 §9.3).
        if let Some(v) = raw.get(&opt::OVERLOAD).cloned() {
            let [mode] = v.as_slice() else {
                return Err(bad(
                    opt::OVERLOAD,
                    "option overload",
                    format!("length {} is not 1", v.len()),
                ));
            };
            if !(1..=3).contains(mode) {
                return Err(bad(
                    opt::OVERLOAD,
                    "option overload",
                    format!("value {mode} is not 1, 2 or 3"),
                ));
            }
            if mode & 1 != 0 {
                collect_options(take(fixed, 108, 128, "file")?, 108, "file", false, &mut raw)?;
            }
            if mode & 2 != 0 {
                collect_options(take(fixed, 44, 64, "sname")?, 44, "sname", false, &mut raw)?;
            }
        }
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(take(fixed, 28, 16, "chaddr")?);
        let xid = u32::from_be_bytes(take(fixed, 4, 4, "xid")?.try_into().unwrap_or_default());
        let flags = u16::from_be_bytes(take(fixed, 10, 2, "flags")?.try_into().unwrap_or_default());
        Ok(Message {
            op: fixed[0],
            htype: fixed[1],
            hlen: fixed[2],
            xid,
            flags,
            ciaddr: ip_at(fixed, 12, "ciaddr")?,
            yiaddr: ip_at(fixed, 16, "yiaddr")?,
            siaddr: ip_at(fixed, 20, "siaddr")?,
            giaddr: ip_at(fixed, 24, "giaddr")?,
            chaddr,
            options: decode_options(&raw)?,
        })
    }

    /// The client hardware address as an Ethernet MAC (first 6 bytes of `chaddr`).
    pub fn mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.chaddr[..6]);
        m
    }
}

/// Prefix length of a contiguous netmask, or `None` for a mask such as 255.0.255.0.
pub fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// Parameters we ask for (option 55), in preference order.
pub const PARAMETER_REQUEST_LIST: [u8; 10] = [
    opt::SUBNET_MASK,
    opt::ROUTER,
    opt::DNS,
    opt::HOSTNAME,
    opt::DOMAIN_NAME,
    opt::INTERFACE_MTU,
    opt::BROADCAST,
    opt::LEASE_TIME,
    opt::RENEWAL_TIME,
    opt::REBINDING_TIME,
];

/// A client message to encode (DISCOVER or REQUEST in the SELECTING state).
#[derive(Debug, Clone)]
pub struct ClientMessage {
    pub message_type: MessageType,
    pub xid: u32,
    /// Seconds since the client began acquiring (RFC 2131 `secs`).
    pub secs: u16,
    pub mac: [u8; 6],
    pub ciaddr: Ipv4Addr,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    /// Largest DHCP message we accept (option 57), from the interface MTU minus IP and UDP headers.
    pub max_message_size: u16,
}

fn put_option(out: &mut Vec<u8>, code: u8, data: &[u8]) {
    // Every option we send is far shorter than 255 bytes; longer data is split per RFC 3396.
    for chunk in data.chunks(255) {
        out.push(code);
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

impl ClientMessage {
    /// Encodes a BOOTREQUEST with the broadcast flag set, padded to 300 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_MESSAGE_LEN);
        out.extend_from_slice(&[OP_REQUEST, HTYPE_ETHERNET, HLEN_ETHERNET, 0]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&FLAG_BROADCAST.to_be_bytes());
        out.extend_from_slice(&self.ciaddr.octets());
        out.extend_from_slice(&[0; 12]); // yiaddr, siaddr, giaddr
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&[0; 10 + 64 + 128]); // chaddr padding, sname, file
        out.extend_from_slice(&MAGIC_COOKIE);
        put_option(&mut out, opt::MESSAGE_TYPE, &[self.message_type as u8]);
        // Client identifier = hardware type ‖ MAC (RFC 2132 §9.14), as most clients send.
        let mut client_id = vec![HTYPE_ETHERNET];
        client_id.extend_from_slice(&self.mac);
        put_option(&mut out, opt::CLIENT_ID, &client_id);
        if let Some(ip) = self.requested_ip {
            put_option(&mut out, opt::REQUESTED_IP, &ip.octets());
        }
        if let Some(ip) = self.server_id {
            put_option(&mut out, opt::SERVER_ID, &ip.octets());
        }
        put_option(&mut out, opt::MAX_MESSAGE_SIZE, &self.max_message_size.to_be_bytes());
        put_option(&mut out, opt::PARAMETER_LIST, &PARAMETER_REQUEST_LIST);
        out.push(opt::END);
        if out.len() < MIN_MESSAGE_LEN {
            out.resize(MIN_MESSAGE_LEN, opt::PAD);
        }
        out
    }
}

#[cfg(test)]
#[path = "dhcp_tests.rs"]
mod tests;
