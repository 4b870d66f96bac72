//! A minimal rtnetlink client (`NETLINK_ROUTE`): list links, set a link up and its MTU, add an IPv4
//! address, add an IPv4 route. Messages are encoded by hand in host byte order (`<linux/netlink.h>`,
//! `<linux/rtnetlink.h>`); every request asks for an ACK and kernel errors come back as errno values.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const NLM_F_REPLACE: u16 = libc::NLM_F_REPLACE as u16;
const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
/// `RTPROT_DHCP` from `<linux/rtnetlink.h>` (not in the libc crate): routes installed by a DHCP client.
pub const RTPROT_DHCP: u8 = 16;

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("netlink {op}: kernel error {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("netlink {op}: malformed reply ({reason})")]
    Malformed { op: &'static str, reason: String },
}

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// ARPHRD_* type (1 = Ethernet, 772 = loopback).
    pub hw_type: u16,
    pub flags: u32,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
}

/// A request under construction: header, fixed family struct, then attributes, 4-byte aligned.
struct Msg(Vec<u8>);

impl Msg {
    fn new(ty: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut b = vec![0u8; NLMSG_HDR];
        b[4..6].copy_from_slice(&ty.to_ne_bytes());
        b[6..8].copy_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(fixed);
        Msg(b)
    }

    fn attr(mut self, ty: u16, data: &[u8]) -> Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.0
    }
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One received netlink message: type, sequence number, payload after the header.
struct Received<'a> {
    ty: u16,
    seq: u32,
    body: &'a [u8],
}

/// Splits a receive buffer into messages.
fn split_messages(buf: &[u8]) -> Result<Vec<Received<'_>>, String> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        let len = ne_u32(buf, off).ok_or("short header")? as usize;
        let ty = ne_u16(buf, off + 4).ok_or("short header")?;
        let seq = ne_u32(buf, off + 8).ok_or("short header")?;
        if len < NLMSG_HDR {
            return Err(format!("message length {len} below header size"));
        }
        let body = buf.get(off + NLMSG_HDR..off + len).ok_or("message runs past buffer")?;
        out.push(Received { ty, seq, body });
        off += len.div_ceil(4) * 4;
    }
    Ok(out)
}

/// Iterates `(type, data)` route attributes.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(ne_u16(b, 0)?);
        let ty = ne_u16(b, 2)?;
        let data = b.get(4..len)?;
        b = b.get(len.div_ceil(4) * 4..).unwrap_or_default();
        Some((ty & 0x3fff, data)) // strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
    })
}

/// An open `NETLINK_ROUTE` socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `raw` is a fresh descriptor we own. Unbound netlink sockets auto-bind on first send and
        // send to the kernel (port 0) by default.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd, seq: 1 })
    }

    fn send(&mut self, msg: Msg) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        // SAFETY: `bytes` lives across the call and the length matches.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(self.seq)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, NetlinkError> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }

    /// Sends a request and reads replies until its ACK/error (or DONE for dumps), handing other
    /// messages of that sequence to `each`.
    fn transact(
        &mut self,
        op: &'static str,
        msg: Msg,
        mut each: impl FnMut(u16, &[u8]) -> Result<(), String>,
    ) -> Result<(), NetlinkError> {
        let seq = self.send(msg)?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let msgs = split_messages(buf.get(..n).unwrap_or_default())
                .map_err(|reason| NetlinkError::Malformed { op, reason })?;
            for Received { ty, seq: mseq, body } in msgs {
                if mseq != seq {
                    continue; // a stale reply to an earlier request
                }
                match ty {
                    NLMSG_ERROR => {
                        let code = ne_u32(body, 0).ok_or_else(|| NetlinkError::Malformed {
                            op,
                            reason: "short error message".into(),
                        })? as i32;
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(NetlinkError::Kernel { op, errno: -code })
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ => each(ty, body).map_err(|reason| NetlinkError::Malformed { op, reason })?,
                }
            }
        }
    }

    /// All links (RTM_GETLINK dump).
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let ifinfo = [0u8; 16]; // family AF_UNSPEC, all fields zero
        let msg = Msg::new(libc::RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, &ifinfo);
        let mut links = Vec::new();
        self.transact("list links", msg, |ty, body| {
            if ty != libc::RTM_NEWLINK {
                return Ok(());
            }
            let hw_type = ne_u16(body, 2).ok_or("short ifinfomsg")?;
            let index = ne_u32(body, 4).ok_or("short ifinfomsg")?;
            let flags = ne_u32(body, 8).ok_or("short ifinfomsg")?;
            let mut link = Link {
                index,
                name: String::new(),
                hw_type,
                flags,
                mac: None,
                mtu: None,
            };
            for (aty, data) in attrs(body.get(16..).unwrap_or_default()) {
                match aty {
                    libc::IFLA_IFNAME => {
                        let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                        link.name = String::from_utf8_lossy(data.get(..end).unwrap_or_default()).into_owned();
                    }
                    libc::IFLA_ADDRESS => link.mac = data.try_into().ok(),
                    libc::IFLA_MTU => link.mtu = ne_u32(data, 0),
                    _ => {}
                }
            }
            links.push(link);
            Ok(())
        })?;
        Ok(links)
    }

    /// Sets a link administratively up and optionally its MTU (RTM_NEWLINK).
    pub fn set_link_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut ifinfo = [0u8; 16];
        ifinfo[4..8].copy_from_slice(&index.to_ne_bytes());
        ifinfo[8..12].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_flags
        ifinfo[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_change
        let mut msg = Msg::new(libc::RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, &ifinfo);
        if let Some(mtu) = mtu {
            msg = msg.attr(libc::IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.transact("set link up", msg, |_, _| Ok(()))
    }

    /// Adds (or replaces) an IPv4 address with the given prefix; the kernel adds the subnet route.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        broadcast: Option<Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        let scope = if addr.is_loopback() {
            libc::RT_SCOPE_HOST
        } else {
            libc::RT_SCOPE_UNIVERSE
        };
        let mut ifaddr = [libc::AF_INET as u8, prefix, 0, scope, 0, 0, 0, 0];
        ifaddr[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut msg = Msg::new(
            libc::RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &ifaddr,
        )
        .attr(libc::IFA_LOCAL, &addr.octets())
        .attr(libc::IFA_ADDRESS, &addr.octets());
        if let Some(b) = broadcast {
            msg = msg.attr(libc::IFA_BROADCAST, &b.octets());
        }
        self.transact("add address", msg, |_, _| Ok(()))
    }

    /// Adds (or replaces) an IPv4 route in the main table: `dst/dst_len` via `gateway` (or on-link when
    /// `None`) out of `oif`, preferring source `src`.
    pub fn add_route(
        &mut self,
        dst: Ipv4Addr,
        dst_len: u8,
        gateway: Option<Ipv4Addr>,
        oif: u32,
        src: Option<Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        let scope = if gateway.is_some() {
            libc::RT_SCOPE_UNIVERSE
        } else {
            libc::RT_SCOPE_LINK
        };
        let rtmsg = [
            libc::AF_INET as u8,
            dst_len,
            0, // src_len
            0, // tos
            libc::RT_TABLE_MAIN,
            RTPROT_DHCP,
            scope,
            libc::RTN_UNICAST,
            0,
            0,
            0,
            0, // rtm_flags
        ];
        let mut msg = Msg::new(
            libc::RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &rtmsg,
        );
        if dst_len > 0 {
            msg = msg.attr(libc::RTA_DST, &dst.octets());
        }
        if let Some(gw) = gateway {
            msg = msg.attr(libc::RTA_GATEWAY, &gw.octets());
        }
        if let Some(s) = src {
            msg = msg.attr(libc::RTA_PREFSRC, &s.octets());
        }
        msg = msg.attr(libc::RTA_OIF, &oif.to_ne_bytes());
        self.transact("add route", msg, |_, _| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_matches_netlink_headers() {
        let m = Msg::new(libc::RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK, &[2, 24, 0, 0, 3, 0, 0, 0])
            .attr(libc::IFA_LOCAL, &[10, 0, 2, 15])
            .attr(3, b"eth0\0")
            .finish(42);
        // 16 header + 8 ifaddrmsg + 8 (IFA_LOCAL) + 12 (5-byte name padded to 8, plus 4 header).
        assert_eq!(m.len(), 44);
        assert_eq!(ne_u32(&m, 0), Some(44));
        assert_eq!(ne_u16(&m, 4), Some(20)); // RTM_NEWADDR in <linux/rtnetlink.h>
        assert_eq!(ne_u16(&m, 6), Some(0x5)); // NLM_F_REQUEST | NLM_F_ACK
        assert_eq!(ne_u32(&m, 8), Some(42));
        let parsed: Vec<_> = attrs(&m[24..]).collect();
        assert_eq!(parsed, vec![(2, &[10u8, 0, 2, 15][..]), (3, &b"eth0\0"[..])]);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(split_messages(&[1, 0, 0]).is_err());
        let mut b = vec![0u8; 16];
        b[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(split_messages(&b).is_err());
        b[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(split_messages(&b).is_err());
        // Attribute lengths that lie are cut off, not read past.
        assert_eq!(attrs(&[200, 0, 1, 0, 9]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }

    #[test]
    fn constants_match_linux_headers() {
        // Values from <linux/netlink.h> and <linux/rtnetlink.h>.
        assert_eq!((NLMSG_ERROR, NLMSG_DONE), (2, 3));
        assert_eq!((NLM_F_DUMP, NLM_F_CREATE, NLM_F_REPLACE), (0x300, 0x400, 0x100));
        assert_eq!((libc::RTM_GETLINK, libc::RTM_NEWROUTE), (18, 24));
        assert_eq!(RTPROT_DHCP, 16);
    }
}
