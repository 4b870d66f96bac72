//! DHCP encode/decode tests. Byte layouts are cross-checked against an independent encoder written with
//! Python's `struct` straight from RFC 2131 figure 1 / RFC 2132 (needs `python3` on PATH; the tests
//! skip loudly without it and fail when `DSTACK_REQUIRE_FIXTURES=1`).

use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn python(script: &str) -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("python3")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() != Ok("1"),
                "python3 is required (DSTACK_REQUIRE_FIXTURES=1): {e}"
            );
            eprintln!("SKIP: python3 not available ({e}); DHCP cross-check not run");
            return None;
        }
    };
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 failed");
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Python helpers: a BOOTP message per RFC 2131 figure 1, and TLV options per RFC 2132.
const PY_PRELUDE: &str = r#"
import struct, socket
def ip(s): return socket.inet_aton(s)
def opt(code, data): return bytes([code, len(data)]) + data
def bootp(op, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, mac, sname=b'', file=b'', options=b''):
    m = struct.pack('!BBBBIHH4s4s4s4s16s64s128s', op, 1, 6, 0, xid, secs, flags,
                    ip(ciaddr), ip(yiaddr), ip(siaddr), ip(giaddr), mac, sname, file)
    assert len(m) == 236
    return m + bytes([99, 130, 83, 99]) + options
mac = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
"#;

#[test]
fn discover_and_request_match_independent_encoder() {
    let script = format!(
        "{PY_PRELUDE}
prl = bytes([1, 3, 6, 12, 15, 26, 28, 51, 58, 59])
def client(kind, extra):
    o = opt(53, bytes([kind])) + opt(61, b'\\x01' + mac) + extra + opt(57, struct.pack('!H', 1472)) + opt(55, prl) + b'\\xff'
    m = bootp(1, 0xdeadbeef, 3, 0x8000, '0.0.0.0', '0.0.0.0', '0.0.0.0', '0.0.0.0', mac, options=o)
    return m + b'\\x00' * max(0, 300 - len(m))
print(client(1, b'').hex())
print(client(3, opt(50, ip('10.0.2.15')) + opt(54, ip('10.0.2.2'))).hex())
"
    );
    let Some(out) = python(&script) else { return };
    let mut lines = out.lines();
    let mut msg = ClientMessage {
        message_type: MessageType::Discover,
        xid: 0xdead_beef,
        secs: 3,
        mac: MAC,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        requested_ip: None,
        server_id: None,
        max_message_size: 1472,
    };
    assert_eq!(hex::encode(msg.encode()), lines.next().unwrap());
    msg.message_type = MessageType::Request;
    msg.requested_ip = Some(Ipv4Addr::new(10, 0, 2, 15));
    msg.server_id = Some(Ipv4Addr::new(10, 0, 2, 2));
    let req = msg.encode();
    assert_eq!(req.len(), MIN_MESSAGE_LEN);
    assert_eq!(hex::encode(&req), lines.next().unwrap());
    // Our own decoder reads back what we sent.
    let back = Message::decode(&req).unwrap();
    assert_eq!(
        (back.op, back.xid, back.flags, back.mac()),
        (OP_REQUEST, 0xdead_beef, FLAG_BROADCAST, MAC)
    );
    assert_eq!(back.options.message_type, Some(MessageType::Request));
    assert_eq!(back.options.server_id, Some(Ipv4Addr::new(10, 0, 2, 2)));
}

#[test]
fn decodes_an_independently_encoded_ack_with_overload() {
    // An ACK whose DNS list is split across the options field and the overloaded `file` field
    // (RFC 3396 concatenation + RFC 2132 §9.3), with PAD bytes and a trailing-NUL domain name.
    let script = format!(
        "{PY_PRELUDE}
file = opt(6, ip('1.1.1.1')) + b'\\xff'
o = (opt(53, bytes([5])) + opt(54, ip('10.0.2.2')) + b'\\x00\\x00' + opt(1, ip('255.255.255.0'))
     + opt(3, ip('10.0.2.2') + ip('10.0.2.1')) + opt(6, ip('10.0.2.3')) + opt(51, struct.pack('!I', 86400))
     + opt(26, struct.pack('!H', 1400)) + opt(15, b'corp.example\\x00') + opt(12, b'cvm-1')
     + opt(52, bytes([1])) + opt(99, b'ignored') + b'\\xff')
print(bootp(2, 0x01020304, 0, 0x8000, '0.0.0.0', '10.0.2.15', '10.0.2.2', '0.0.0.0', mac, file=file, options=o).hex())
"
    );
    let Some(out) = python(&script) else { return };
    let bytes = hex::decode(out.trim()).unwrap();
    let m = Message::decode(&bytes).unwrap();
    assert_eq!(m.op, OP_REPLY);
    assert_eq!(m.xid, 0x0102_0304);
    assert_eq!(m.mac(), MAC);
    assert_eq!(m.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(m.siaddr, Ipv4Addr::new(10, 0, 2, 2));
    let o = &m.options;
    assert_eq!(o.message_type, Some(MessageType::Ack));
    assert_eq!(o.server_id, Some(Ipv4Addr::new(10, 0, 2, 2)));
    assert_eq!(o.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
    assert_eq!(o.routers, [Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 2, 1)]);
    assert_eq!(o.dns, [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]);
    assert_eq!(o.lease_secs, Some(86400));
    assert_eq!(o.mtu, Some(1400));
    assert_eq!(o.domain.as_deref(), Some("corp.example"));
    assert_eq!(o.hostname.as_deref(), Some("cvm-1"));
}

/// A minimal valid reply: fixed header, cookie, then `options`.
fn reply_with(options: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; FIXED_LEN];
    m[0] = OP_REPLY;
    m[1] = 1;
    m[2] = 6;
    m[28..34].copy_from_slice(&MAC);
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(options);
    m
}

#[test]
fn mask_prefixes() {
    assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
    assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
    assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
    assert_eq!(mask_to_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
    assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    assert_eq!(mask_to_prefix(Ipv4Addr::new(0, 0, 0, 255)), None);
}

#[test]
fn malformed_messages_are_refused_with_the_field_named() {
    let ok = reply_with(&[53, 1, 2, 255]);
    assert_eq!(
        Message::decode(&ok).unwrap().options.message_type,
        Some(MessageType::Offer)
    );
    // Every truncation of a valid message fails cleanly.
    for n in 0..ok.len() {
        assert!(Message::decode(&ok[..n]).is_err(), "prefix {n} accepted");
    }
    let mut bad_cookie = ok.clone();
    bad_cookie[FIXED_LEN] = 0;
    assert_eq!(
        Message::decode(&bad_cookie),
        Err(DhcpError::BadCookie([0, 130, 83, 99]))
    );

    let cases: &[(&[u8], &str)] = &[
        (&[53, 1, 2], "no END"),
        (&[53, 5, 2, 255], "length 5 runs past the end"),
        (&[53], "length 0 runs past the end"),
        (&[53, 2, 2, 2, 255], "message type): length 2 is not 1"),
        (&[53, 1, 42, 255], "unknown type 42"),
        (&[1, 4, 255, 0, 255, 0, 255], "not a contiguous mask"),
        (&[1, 3, 255, 255, 255, 255], "subnet mask): length 3 is not 4"),
        (
            &[3, 5, 10, 0, 2, 2, 9, 255],
            "router): length 5 is not a non-zero multiple of 4",
        ),
        (&[6, 0, 255], "domain name server): length 0"),
        (&[51, 2, 0, 1, 255], "lease time): length 2 is not 4"),
        (&[26, 2, 0, 20, 255], "20 is below the minimum 68"),
        (&[15, 3, b'a', b'\n', b'b', 255], "byte 0x0a at position 1"),
        (&[15, 3, b'a', b' ', b'b', 255], "byte 0x20 at position 1"),
        (&[52, 1, 4, 255], "value 4 is not 1, 2 or 3"),
        (&[54, 4, 10, 0, 2, 255], "no END"), // END swallowed as option data
    ];
    for (opts, want) in cases {
        let err = Message::decode(&reply_with(opts)).unwrap_err().to_string();
        assert!(err.contains(want), "options {opts:?}: error {err:?} lacks {want:?}");
    }
    // A bad host name is only informational: dropped, the message still decodes.
    let m = Message::decode(&reply_with(&[53, 1, 2, 12, 3, b'a', b'\n', b'b', 255])).unwrap();
    assert_eq!(
        (m.options.message_type, m.options.hostname),
        (Some(MessageType::Offer), None)
    );
    // An overloaded `sname` field whose option overruns it is refused too.
    let mut m = reply_with(&[52, 1, 2, 255]);
    m[44 + 62] = 6;
    m[44 + 63] = 8;
    let err = Message::decode(&m).unwrap_err().to_string();
    assert!(err.contains("sname field"), "{err}");
}

#[test]
fn mutated_messages_never_panic() {
    // Seeds: a minimal ACK, one with overloaded sname/file, and the same ACK framed in IPv4/UDP (the raw
    // socket hands the client whole packets, so the IP/UDP parser sees attacker bytes first).
    let ack = reply_with(&[
        53, 1, 5, 54, 4, 10, 0, 2, 2, 1, 4, 255, 255, 255, 0, 6, 4, 1, 1, 1, 1, 52, 1, 3, 255,
    ]);
    let mut overloaded = ack.clone();
    overloaded[44] = 12;
    overloaded[45] = 3;
    overloaded[46..49].copy_from_slice(b"cvm");
    overloaded[49] = 255;
    overloaded[108] = 255;
    let framed = crate::net::packet::build_udp(Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::BROADCAST, 67, 68, 7, &ack);
    let seeds = vec![ack, overloaded, framed];
    let r = dstack_testkit::run("dhcp", &seeds, dstack_testkit::Budget::new(20_000, 4), |m| {
        if let Err(e) = Message::decode(m) {
            assert!(!e.to_string().is_empty());
        }
        for verify in [true, false] {
            match crate::net::packet::parse_udp(m, verify) {
                Ok(d) => {
                    let _ = Message::decode(d.payload);
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    });
    assert!(r.mutated > 1_000, "{r:?}");
}
