//! The DHCP transport before the interface has an address: an `AF_PACKET`/`SOCK_DGRAM` socket bound to
//! one interface and to IPv4. We hand the kernel whole IPv4/UDP packets (it adds the Ethernet header for
//! the broadcast MAC) and read whole IPv4 packets back, so neither the routing table, `rp_filter` nor the
//! missing local address can drop the server's reply.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use super::client::Transport;
use super::packet;

/// From `<linux/if_packet.h>` (not all are exported by the libc crate).
const PACKET_AUXDATA: libc::c_int = 8;
const PACKET_OUTGOING: u8 = 4;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

pub const DHCP_SERVER_PORT: u16 = 67;
pub const DHCP_CLIENT_PORT: u16 = 68;

/// A packet socket on one interface.
pub struct RawDhcpSocket {
    fd: OwnedFd,
    ifindex: i32,
    ip_id: u16,
}

fn sockaddr(ifindex: i32, dest: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = [0u8; 8];
    addr[..6].copy_from_slice(&dest);
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_IP as u16).to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: addr,
    }
}

impl RawDhcpSocket {
    /// Opens the socket on interface `ifindex` (needs CAP_NET_RAW).
    pub fn open(ifindex: u32) -> io::Result<Self> {
        let ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Protocol 0 first: the socket receives nothing until bound to the interface below.
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: `one` outlives the call and the length matches its type.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let sa = sockaddr(ifindex, [0; 6]);
        // SAFETY: `sa` is a valid sockaddr_ll and the length is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, ifindex, ip_id: 1 })
    }

    /// Waits until readable or `deadline`; `Ok(false)` on timeout.
    fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc > 0 {
                return Ok(true);
            }
        }
    }

    /// Receives one packet: its bytes, whether it was our own outgoing copy, and the auxdata status.
    fn recv_packet(&self, buf: &mut [u8]) -> io::Result<(usize, bool, u32, bool)> {
        let mut from = sockaddr(0, [0; 6]);
        let mut cmsg = [0u64; 16]; // 8-byte aligned control buffer
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; every pointer field is set below before use.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&cmsg);
        // SAFETY: all buffers referenced by `msg` live until the call returns and their lengths match.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
        let ctl_len = msg.msg_controllen.min(size_of_val(&cmsg));
        let ctl: Vec<u8> = cmsg.iter().flat_map(|w| w.to_ne_bytes()).take(ctl_len).collect();
        Ok((
            n as usize,
            from.sll_pkttype == PACKET_OUTGOING,
            auxdata_status(&ctl).unwrap_or(0),
            truncated,
        ))
    }
}

/// Finds the `tp_status` of a `PACKET_AUXDATA` control message in a raw control buffer
/// (`struct cmsghdr { size_t len; int level; int type; }` then data aligned to `size_t`).
fn auxdata_status(ctl: &[u8]) -> Option<u32> {
    const HDR: usize = size_of::<usize>() + 2 * size_of::<libc::c_int>();
    let align = |n: usize| n.div_ceil(size_of::<usize>()) * size_of::<usize>();
    let mut off = 0usize;
    while off + HDR <= ctl.len() {
        let len = usize::from_ne_bytes(ctl.get(off..off + size_of::<usize>())?.try_into().ok()?);
        let lvl_at = off + size_of::<usize>();
        let level = i32::from_ne_bytes(ctl.get(lvl_at..lvl_at + 4)?.try_into().ok()?);
        let ty = i32::from_ne_bytes(ctl.get(lvl_at + 4..lvl_at + 8)?.try_into().ok()?);
        if len < HDR {
            return None;
        }
        if level == libc::SOL_PACKET && ty == PACKET_AUXDATA {
            let d = off + align(HDR);
            return Some(u32::from_ne_bytes(ctl.get(d..d + 4)?.try_into().ok()?));
        }
        off += align(len);
    }
    None
}

impl Transport for RawDhcpSocket {
    fn send(&mut self, dhcp: &[u8]) -> io::Result<()> {
        let pkt = packet::build_udp(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            DHCP_CLIENT_PORT,
            DHCP_SERVER_PORT,
            self.ip_id,
            dhcp,
        );
        self.ip_id = self.ip_id.wrapping_add(1);
        let sa = sockaddr(self.ifindex, [0xff; 6]);
        // SAFETY: `pkt` and `sa` live across the call; lengths match.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 65536];
        while self.wait_readable(deadline)? {
            let (n, outgoing, status, truncated) = match self.recv_packet(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if outgoing || truncated {
                continue;
            }
            let verify = status & TP_STATUS_CSUMNOTREADY == 0;
            match packet::parse_udp(buf.get(..n).unwrap_or_default(), verify) {
                Ok(d) if d.dport == DHCP_CLIENT_PORT && d.sport == DHCP_SERVER_PORT => {
                    return Ok(Some(d.payload.to_vec()));
                }
                Ok(_) => {} // other traffic on the link
                Err(e) => tracing::debug!("net: ignoring a malformed IPv4 packet: {e}"),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auxdata_is_found_in_a_control_buffer() {
        let mut ctl = Vec::new();
        // An unrelated cmsg first (level 1 = SOL_SOCKET, 4 data bytes, padded).
        ctl.extend_from_slice(&(16usize + 4).to_ne_bytes());
        ctl.extend_from_slice(&1i32.to_ne_bytes());
        ctl.extend_from_slice(&29i32.to_ne_bytes());
        ctl.extend_from_slice(&[0; 8]);
        ctl.extend_from_slice(&(16usize + 20).to_ne_bytes());
        ctl.extend_from_slice(&libc::SOL_PACKET.to_ne_bytes());
        ctl.extend_from_slice(&PACKET_AUXDATA.to_ne_bytes());
        ctl.extend_from_slice(&TP_STATUS_CSUMNOTREADY.to_ne_bytes());
        ctl.extend_from_slice(&[0; 16]);
        assert_eq!(auxdata_status(&ctl), Some(TP_STATUS_CSUMNOTREADY));
        assert_eq!(auxdata_status(&ctl[..20]), None);
        assert_eq!(auxdata_status(&[]), None);
        // A zero length cannot loop forever.
        assert_eq!(auxdata_status(&[0; 32]), None);
    }
}
