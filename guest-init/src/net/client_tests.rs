//! The state machine against a scripted in-memory server.

use std::collections::VecDeque;

use super::*;
use crate::net::dhcp::{FIXED_LEN, MAGIC_COOKIE, OP_REPLY, opt};

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// A fake server: `respond` sees each decoded client message and returns raw replies to queue.
struct Fake<F: FnMut(&Message, usize) -> Vec<Vec<u8>>> {
    respond: F,
    sent: Vec<Message>,
    queue: VecDeque<Vec<u8>>,
}

impl<F: FnMut(&Message, usize) -> Vec<Vec<u8>>> Transport for Fake<F> {
    fn send(&mut self, dhcp: &[u8]) -> io::Result<()> {
        let m = Message::decode(dhcp).expect("client sent an undecodable message");
        let replies = (self.respond)(&m, self.sent.len());
        self.sent.push(m);
        self.queue.extend(replies);
        Ok(())
    }
    fn recv(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        if let Some(r) = self.queue.pop_front() {
            return Ok(Some(r));
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        Ok(None)
    }
}

fn fake<F: FnMut(&Message, usize) -> Vec<Vec<u8>>>(respond: F) -> Fake<F> {
    Fake {
        respond,
        sent: Vec::new(),
        queue: VecDeque::new(),
    }
}

/// Builds a server reply for client message `to` with the given type, address and extra options.
fn reply(to: &Message, ty: MessageType, yiaddr: Ipv4Addr, extra: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; FIXED_LEN];
    m[0] = OP_REPLY;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&to.xid.to_be_bytes());
    m[16..20].copy_from_slice(&yiaddr.octets());
    m[28..44].copy_from_slice(&to.chaddr);
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(&[opt::MESSAGE_TYPE, 1, ty as u8, opt::SERVER_ID, 4]);
    m.extend_from_slice(&SERVER.octets());
    m.extend_from_slice(extra);
    m.push(opt::END);
    m
}

const LEASE_OPTS: &[u8] = &[
    1, 4, 255, 255, 255, 0, // mask
    3, 4, 10, 0, 2, 2, // router
    6, 4, 10, 0, 2, 3, // dns
    51, 4, 0, 1, 81, 128, // lease 86400
];

fn params(timeout_ms: u64) -> ClientParams {
    ClientParams {
        mac: MAC,
        mtu: 1500,
        deadline: Instant::now() + Duration::from_millis(timeout_ms),
    }
}

fn standard_server(m: &Message, _n: usize) -> Vec<Vec<u8>> {
    match m.options.message_type {
        Some(MessageType::Discover) => vec![reply(m, MessageType::Offer, ADDR, &[])],
        Some(MessageType::Request) => vec![reply(m, MessageType::Ack, ADDR, LEASE_OPTS)],
        _ => vec![],
    }
}

#[test]
fn full_exchange_binds_the_lease() {
    let mut t = fake(standard_server);
    let lease = acquire(&mut t, &params(5000)).unwrap();
    assert_eq!(lease.address, ADDR);
    assert_eq!(lease.prefix_len, 24);
    assert_eq!(lease.gateway, Some(SERVER));
    assert_eq!(lease.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
    assert_eq!(
        (lease.lease_secs, lease.renewal_secs, lease.rebinding_secs),
        (86400, 43200, 75600)
    );
    assert_eq!(t.sent.len(), 2);
    let (d, r) = (&t.sent[0], &t.sent[1]);
    assert_eq!(d.options.message_type, Some(MessageType::Discover));
    assert_eq!(r.options.message_type, Some(MessageType::Request));
    assert_eq!(d.xid, r.xid, "REQUEST reuses the DISCOVER's xid");
    assert_eq!(r.mac(), MAC);
    assert_eq!(r.options.server_id, Some(SERVER));
    assert_eq!(r.flags, dhcp::FLAG_BROADCAST);
}

#[test]
fn foreign_and_malformed_replies_are_ignored() {
    let mut t = fake(|m, _| match m.options.message_type {
        Some(MessageType::Discover) => {
            let mut wrong_xid = reply(m, MessageType::Offer, Ipv4Addr::new(10, 0, 2, 99), &[]);
            wrong_xid[4] ^= 0xff;
            let mut wrong_mac = reply(m, MessageType::Offer, Ipv4Addr::new(10, 0, 2, 98), &[]);
            wrong_mac[33] ^= 1;
            let mut garbage = reply(m, MessageType::Offer, Ipv4Addr::new(10, 0, 2, 97), &[3, 200]);
            garbage.pop();
            let no_server = {
                let mut r = reply(m, MessageType::Offer, Ipv4Addr::new(10, 0, 2, 96), &[]);
                // Overwrite option 54 with PADs.
                let at = FIXED_LEN + 4 + 3;
                r[at..at + 6].fill(0);
                r
            };
            let bad_addr = reply(m, MessageType::Offer, Ipv4Addr::new(224, 0, 0, 1), &[]);
            vec![
                wrong_xid,
                wrong_mac,
                garbage,
                no_server,
                bad_addr,
                reply(m, MessageType::Offer, ADDR, &[]),
            ]
        }
        Some(MessageType::Request) => {
            // An ACK for another address, then the right one.
            vec![
                reply(m, MessageType::Ack, Ipv4Addr::new(10, 0, 2, 50), LEASE_OPTS),
                reply(m, MessageType::Ack, ADDR, LEASE_OPTS),
            ]
        }
        _ => vec![],
    });
    let lease = acquire(&mut t, &params(5000)).unwrap();
    assert_eq!(lease.address, ADDR);
    assert_eq!(t.sent.len(), 2);
}

#[test]
fn nak_restarts_with_a_new_xid() {
    let mut naks = 0;
    let mut t = fake(|m, _| match m.options.message_type {
        Some(MessageType::Discover) => vec![reply(m, MessageType::Offer, ADDR, &[])],
        Some(MessageType::Request) if naks == 0 => {
            naks += 1;
            vec![reply(
                m,
                MessageType::Nak,
                Ipv4Addr::UNSPECIFIED,
                &[56, 3, b'n', b'o', b'!'],
            )]
        }
        Some(MessageType::Request) => vec![reply(m, MessageType::Ack, ADDR, LEASE_OPTS)],
        _ => vec![],
    });
    let lease = acquire(&mut t, &params(5000)).unwrap();
    assert_eq!(lease.address, ADDR);
    let types: Vec<_> = t.sent.iter().map(|m| m.options.message_type.unwrap()).collect();
    assert_eq!(
        types,
        [
            MessageType::Discover,
            MessageType::Request,
            MessageType::Discover,
            MessageType::Request
        ]
    );
    assert_ne!(t.sent[0].xid, t.sent[2].xid);
}

#[test]
fn lost_discover_is_retransmitted() {
    let mut t = fake(|m, n| if n == 0 { vec![] } else { standard_server(m, n) });
    let started = Instant::now();
    let lease = acquire(&mut t, &params(10_000)).unwrap();
    assert_eq!(lease.address, ADDR);
    assert_eq!(t.sent.len(), 3);
    // The first retransmission waits 1 s ± 0.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn silence_times_out_with_the_last_refusal() {
    let mut t = fake(|m, _| {
        let mut bad = reply(m, MessageType::Offer, ADDR, &[]);
        bad[FIXED_LEN] = 0; // broken cookie
        vec![bad]
    });
    let err = acquire(&mut t, &params(300)).unwrap_err().to_string();
    assert!(err.contains("no DHCP lease"), "{err}");
    assert!(err.contains("DHCPOFFER"), "{err}");
    assert!(err.contains("magic cookie"), "{err}");
}

#[test]
fn ack_without_lease_time_or_with_zero_mask_is_refused() {
    let offer_then = |ack_opts: &'static [u8]| {
        move |m: &Message, _: usize| match m.options.message_type {
            Some(MessageType::Discover) => vec![reply(m, MessageType::Offer, ADDR, &[])],
            Some(MessageType::Request) => vec![reply(m, MessageType::Ack, ADDR, ack_opts)],
            _ => vec![],
        }
    };
    let err = acquire(&mut fake(offer_then(&[1, 4, 255, 255, 255, 0])), &params(400))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no lease time"), "{err}");
    let err = acquire(
        &mut fake(offer_then(&[1, 4, 0, 0, 0, 0, 51, 4, 0, 0, 0, 60])),
        &params(400),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("whole Internet"), "{err}");
    // Without a mask the classful default applies (10/8).
    let lease = acquire(&mut fake(offer_then(&[51, 4, 0, 0, 0, 60])), &params(2000)).unwrap();
    assert_eq!((lease.prefix_len, lease.gateway), (8, None));
}
