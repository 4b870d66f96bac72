//! The passt backend against the real Debian `passt` (no VM: the test plays the guest through
//! `PasstBackend`): ARP for the gateway, then a host connection to a forwarded port must reach the "guest" as
//! a TCP SYN to the mapped guest port — the same `-t ADDR/HOST:GUEST` form the VM manager passes.
//!
//! passt is found through `DSTACK_PASST` (default: `passt` on `$PATH`); without it the test is skipped, or
//! fails when `DSTACK_REQUIRE_PASST=1`.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dstack_host_vmm::virtio::net::passt::{PasstBackend, PasstProcess, PortForward};
use dstack_host_vmm::virtio::net::{MAX_FRAME, NetBackend};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];

fn passt_or_skip(test: &str) -> Option<PathBuf> {
    let required = std::env::var("DSTACK_REQUIRE_PASST").is_ok_and(|v| v == "1");
    let p = PathBuf::from(std::env::var("DSTACK_PASST").unwrap_or_else(|_| "passt".into()));
    let ok = std::process::Command::new(&p)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !ok {
        assert!(
            !required,
            "{test}: DSTACK_REQUIRE_PASST=1 but {} cannot be run",
            p.display()
        );
        eprintln!("SKIPPED {test}: passt ({}) not found", p.display());
        return None;
    }
    Some(p)
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GATEWAY_IP);
    f
}

/// Receives frames until `pred` accepts one (or 5 s pass).
fn recv_until(b: &mut PasstBackend, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(n) = b.recv(&mut buf).unwrap() {
            if pred(&buf[..n]) {
                return buf[..n].to_vec();
            }
            continue;
        }
        assert!(Instant::now() < deadline, "no {what} from passt");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn passt_answers_arp_and_forwards_a_host_port() {
    let Some(passt) = passt_or_skip("passt_answers_arp_and_forwards_a_host_port") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("passt.sock");
    let host_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let fwd = PortForward::parse("tcp", "127.0.0.1", u32::from(host_port), 8080).unwrap();
    let ip = |a: [u8; 4]| Ipv4Addr::from(a).to_string();
    let _p = PasstProcess::spawn(
        &passt,
        &socket,
        &[fwd],
        &["-a", &ip(GUEST_IP), "-n", "24", "-g", &ip(GATEWAY_IP)],
    )
    .expect("starting passt");
    let mut b = PasstBackend::connect(&socket, Duration::from_secs(5)).unwrap();
    b.send(&arp_request()).unwrap();
    let reply = recv_until(&mut b, "ARP reply", |f| {
        f.get(12..14) == Some(&[8, 6]) && f.get(20..22) == Some(&[0, 2])
    });
    assert_eq!(&reply[..6], &GUEST_MAC);
    assert_eq!(&reply[28..32], &GATEWAY_IP);

    // A host client on the forwarded port: passt opens the connection towards the guest.
    let _client = std::thread::spawn(move || TcpStream::connect(("127.0.0.1", host_port)));
    let syn = recv_until(&mut b, "TCP SYN", |f| {
        f.get(12..14) == Some(&[8, 0]) && f.get(23) == Some(&6) && f.get(47).is_some_and(|fl| fl & 0x02 != 0)
    });
    assert_eq!(&syn[..6], &GUEST_MAC, "to the guest's MAC");
    let ihl = usize::from(syn[14] & 0x0f) * 4;
    assert_eq!(&syn[30..34], &GUEST_IP, "to the guest's address");
    let tcp = &syn[14 + ihl..];
    assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 8080, "mapped guest port");
}
