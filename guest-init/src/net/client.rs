//! The DHCPv4 client state machine (RFC 2131 §4.4): INIT → SELECTING (DISCOVER, wait for OFFER) →
//! REQUESTING (REQUEST, wait for ACK/NAK) → BOUND. Retransmission doubles from 1 s up to 16 s with
//! ±0.5 s jitter (RFC 2131 §4.1 suggests 4 s first; we start lower because the first packet is often
//! lost while the link comes up, and the whole exchange is bounded by the caller's deadline). A NAK or
//! an unanswered REQUEST restarts from DISCOVER with a fresh xid.

use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::dhcp::{self, ClientMessage, Message, MessageType};

/// How DHCP payloads reach the wire (the raw socket in production, a fake server in tests).
pub trait Transport {
    /// Broadcasts one DHCP message from port 68 to port 67.
    fn send(&mut self, dhcp: &[u8]) -> io::Result<()>;
    /// The next UDP payload addressed to port 68, or `None` once `deadline` passes.
    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>>;
}

/// Errors acquiring a lease.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("DHCP transport: {0}")]
    Io(#[from] io::Error),
    #[error("no DHCP lease within {waited:?} ({state}){}", last_rejected.as_ref().map(|e| format!("; last refused reply: {e}")).unwrap_or_default())]
    Timeout {
        waited: Duration,
        state: &'static str,
        last_rejected: Option<String>,
    },
}

/// A lease the server acknowledged, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub mtu: Option<u16>,
    pub broadcast: Option<Ipv4Addr>,
    pub server_id: Ipv4Addr,
    pub lease_secs: u32,
    pub renewal_secs: u32,
    pub rebinding_secs: u32,
}

/// Client parameters.
#[derive(Debug, Clone)]
pub struct ClientParams {
    pub mac: [u8; 6],
    /// Interface MTU, for the max-message-size option.
    pub mtu: u32,
    pub deadline: Instant,
}

/// An address a server may hand out to a host: unicast, not 0/8, loopback, multicast, broadcast.
fn usable_host(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.octets()[0] == 0
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] >= 240)
}

/// RFC 2131 §3.3/RFC 2132 §3.3: without a subnet-mask option, use the classful default.
fn classful_prefix(ip: Ipv4Addr) -> u8 {
    match ip.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Turns an ACK into a lease, refusing anything unusable.
fn lease_from_ack(ack: &Message, requested: Ipv4Addr, server_id: Ipv4Addr) -> Result<Lease, String> {
    let o = &ack.options;
    if ack.yiaddr != requested {
        return Err(format!("ACK assigns {} but we requested {requested}", ack.yiaddr));
    }
    let lease_secs = o.lease_secs.ok_or("ACK has no lease time (option 51)")?;
    if lease_secs == 0 {
        return Err("ACK lease time is 0".into());
    }
    let prefix_len = match o.subnet_mask {
        Some(m) => dhcp::mask_to_prefix(m).ok_or("non-contiguous subnet mask")?,
        None => classful_prefix(ack.yiaddr),
    };
    if prefix_len == 0 {
        return Err("subnet mask 0.0.0.0 would put the whole Internet on-link".into());
    }
    // Routers are listed in order of preference; skip ones that cannot be a next hop.
    let gateway = o.routers.iter().copied().find(|&r| usable_host(r) && r != ack.yiaddr);
    let dns = o
        .dns
        .iter()
        .copied()
        .filter(|&d| !d.is_unspecified() && !d.is_broadcast())
        .collect();
    // RFC 2131 §4.4.5 defaults: T1 = 0.5 × lease, T2 = 0.875 × lease.
    let renewal_secs = o.renewal_secs.unwrap_or(lease_secs / 2).min(lease_secs);
    let rebinding_secs = o
        .rebinding_secs
        .unwrap_or((u64::from(lease_secs) * 7 / 8) as u32)
        .clamp(renewal_secs, lease_secs);
    Ok(Lease {
        address: ack.yiaddr,
        prefix_len,
        gateway,
        dns,
        domain: o.domain.clone(),
        hostname: o.hostname.clone(),
        mtu: o.mtu,
        broadcast: o.broadcast,
        server_id,
        lease_secs,
        renewal_secs,
        rebinding_secs,
    })
}

/// What one exchange step accepted.
enum Step<T> {
    Got(T),
    /// Restart from DISCOVER (NAK, or REQUEST unanswered).
    Restart(String),
}

struct Session<'a, T: Transport> {
    t: &'a mut T,
    p: &'a ClientParams,
    started: Instant,
    last_rejected: Option<String>,
}

impl<T: Transport> Session<'_, T> {
    fn message(&self, ty: MessageType, xid: u32, req: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
        ClientMessage {
            message_type: ty,
            xid,
            secs: self.started.elapsed().as_secs().min(u64::from(u16::MAX)) as u16,
            mac: self.p.mac,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            requested_ip: req.map(|r| r.0),
            server_id: req.map(|r| r.1),
            max_message_size: self.p.mtu.saturating_sub(28).clamp(576, u32::from(u16::MAX)) as u16,
        }
        .encode()
    }

    /// Decodes a reply and keeps it only if it is a BOOTREPLY for our xid and MAC.
    fn ours(&mut self, bytes: &[u8], xid: u32) -> Option<Message> {
        match Message::decode(bytes) {
            Ok(m) if m.op == dhcp::OP_REPLY && m.xid == xid && m.mac() == self.p.mac => Some(m),
            Ok(_) => None, // another client's exchange
            Err(e) => {
                tracing::warn!("net: refusing a malformed DHCP reply: {e}");
                self.last_rejected = Some(e.to_string());
                None
            }
        }
    }

    /// Sends `msg` with backoff until `accept` returns a result or `max_tries` sends went unanswered.
    fn exchange<R>(
        &mut self,
        msg: &dyn Fn(&Self) -> Vec<u8>,
        max_tries: u32,
        state: &'static str,
        mut accept: impl FnMut(&mut Self, Message) -> Option<Step<R>>,
        xid: u32,
    ) -> Result<Step<R>, ClientError> {
        let mut delay = Duration::from_secs(1);
        for _ in 0..max_tries {
            // A send can fail transiently while the link settles (ENOBUFS, ENETDOWN): keep trying.
            if let Err(e) = self.t.send(&msg(self)) {
                tracing::warn!("net: DHCP send failed: {e}");
                self.last_rejected = Some(format!("send failed: {e}"));
            }
            let jitter = Duration::from_millis(u64::from(random_u32() % 1000));
            let wait_until = (Instant::now() + delay + jitter)
                .checked_sub(Duration::from_millis(500))
                .unwrap_or_else(Instant::now)
                .min(self.p.deadline);
            while let Some(bytes) = self.t.recv(wait_until)? {
                if let Some(m) = self.ours(&bytes, xid)
                    && let Some(step) = accept(self, m)
                {
                    return Ok(step);
                }
            }
            if Instant::now() >= self.p.deadline {
                return Err(ClientError::Timeout {
                    waited: self.started.elapsed(),
                    state,
                    last_rejected: self.last_rejected.take(),
                });
            }
            delay = (delay * 2).min(Duration::from_secs(16));
        }
        Ok(Step::Restart(format!("no reply in {state} after {max_tries} tries")))
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // A failure leaves zeros: the xid is only a transaction tag, not a secret.
    let _ = getrandom::fill(&mut b);
    u32::from_ne_bytes(b)
}

/// Runs DISCOVER/OFFER/REQUEST/ACK until a lease is bound or the deadline passes.
pub fn acquire(t: &mut impl Transport, p: &ClientParams) -> Result<Lease, ClientError> {
    let mut s = Session {
        t,
        p,
        started: Instant::now(),
        last_rejected: None,
    };
    loop {
        let xid = random_u32();
        // SELECTING: take the first valid offer.
        let offer = s.exchange(
            &|s| s.message(MessageType::Discover, xid, None),
            u32::MAX,
            "waiting for DHCPOFFER",
            |s, m| {
                if m.options.message_type != Some(MessageType::Offer) {
                    return None;
                }
                let Some(server) = m.options.server_id else {
                    s.last_rejected = Some("OFFER without server identifier (option 54)".into());
                    return None;
                };
                if !usable_host(m.yiaddr) {
                    s.last_rejected = Some(format!("OFFER of unusable address {}", m.yiaddr));
                    return None;
                }
                Some(Step::Got((m.yiaddr, server)))
            },
            xid,
        )?;
        let Step::Got((offered, server)) = offer else {
            continue;
        };
        tracing::info!("net: DHCP offer {offered} from {server}");
        // REQUESTING: same xid (RFC 2131 §4.4.1), four tries then back to DISCOVER.
        let ack = s.exchange(
            &|s| s.message(MessageType::Request, xid, Some((offered, server))),
            4,
            "waiting for DHCPACK",
            |s, m| {
                if m.options.server_id != Some(server) {
                    return None; // another server answering our broadcast REQUEST
                }
                match m.options.message_type {
                    Some(MessageType::Nak) => Some(Step::Restart(format!(
                        "DHCPNAK from {server}: {}",
                        m.options.message.as_deref().unwrap_or("(no message)")
                    ))),
                    Some(MessageType::Ack) => match lease_from_ack(&m, offered, server) {
                        Ok(lease) => Some(Step::Got(lease)),
                        Err(e) => {
                            tracing::warn!("net: refusing DHCPACK: {e}");
                            s.last_rejected = Some(e);
                            None
                        }
                    },
                    _ => None,
                }
            },
            xid,
        )?;
        match ack {
            Step::Got(lease) => return Ok(lease),
            Step::Restart(why) => {
                tracing::warn!("net: {why}; restarting DHCP");
                s.last_rejected = Some(why);
                // RFC 2131 §3.1.5: wait a little before restarting after a NAK.
                let pause = Instant::now() + Duration::from_millis(500);
                std::thread::sleep(pause.min(p.deadline).saturating_duration_since(Instant::now()));
            }
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
