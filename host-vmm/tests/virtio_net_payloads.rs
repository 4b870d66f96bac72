//! virtio-net payloads on the real /dev/kvm (see `virtio_payloads.rs` for the approach): the guest drives the
//! device's RX/TX queues by polling and reports over serial.
//!
//! - `arp_through_passt`: the guest asks passt (Debian `passt`) for its gateway's MAC address and prints the
//!   ARP reply. passt is found through `DSTACK_PASST` (default: `passt` on `$PATH`); without it the test is
//!   skipped, or fails when `DSTACK_REQUIRE_PASST=1`.
//! - `echo_through_fake_passt`: a host thread plays passt on the unix socket (same framing) and echoes every
//!   frame; both sides check the bytes.
//!
//! Skipped when /dev/kvm is absent; `DSTACK_REQUIRE_KVM=1` turns that skip into a failure.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use common::net_guest::*;
use common::virtio_guest::*;
use common::*;
use dstack_host_vmm::VmExit;
use dstack_host_vmm::virtio::net::passt::PasstProcess;
use dstack_host_vmm::vmm::{NetBackendConfig, NetConfig};

const OK: u8 = 0x50;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];

fn expect_ok(b: &Booted) {
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(v) if v == u32::from(OK)),
        "exit: {:?}\nserial: {:?}",
        b.report.exit,
        String::from_utf8_lossy(&b.serial)
    );
}

/// The passt binary, or None (skip) when it is not installed.
fn passt_or_skip(test: &str) -> Option<PathBuf> {
    let required = std::env::var("DSTACK_REQUIRE_PASST").is_ok_and(|v| v == "1");
    let p = PathBuf::from(std::env::var("DSTACK_PASST").unwrap_or_else(|_| "passt".into()));
    let found = std::process::Command::new(&p)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            !required,
            "{test}: DSTACK_REQUIRE_PASST=1 but {} cannot be run",
            p.display()
        );
        eprintln!(
            "SKIPPED {test}: passt ({}) not found; install Debian's passt or set DSTACK_PASST",
            p.display()
        );
        return None;
    }
    Some(p)
}

fn net_config(socket: PathBuf) -> NetConfig {
    NetConfig {
        mac: GUEST_MAC,
        mtu: None,
        backend: NetBackendConfig::Passt { socket },
    }
}

#[test]
fn arp_through_passt() {
    let Some(hv) = kvm_or_skip("arp_through_passt") else {
        return;
    };
    let Some(passt) = passt_or_skip("arp_through_passt") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("passt.sock");
    let ip = |a: [u8; 4]| std::net::Ipv4Addr::from(a).to_string();
    let _passt = PasstProcess::spawn(
        &passt,
        &socket,
        &[],
        &["-a", &ip(GUEST_IP), "-n", "24", "-g", &ip(GATEWAY_IP)],
    )
    .expect("starting passt");

    let mut a = asm();
    let mut f = Fails::default();
    setup(&mut a, &mut f);
    // ARP request (RFC 826): who has 10.0.2.2? tell 10.0.2.15.
    tx_eth_header(&mut a, [0xff; 6], 0x0806);
    a.mov(rdi, TXBUF + u64::from(HDR)).unwrap();
    a.mov(word_ptr(rdi + 14), 0x0100u32).unwrap(); // htype 1 (Ethernet), big endian
    a.mov(word_ptr(rdi + 16), 0x0008u32).unwrap(); // ptype 0x0800
    a.mov(word_ptr(rdi + 18), 0x0406u32).unwrap(); // hlen 6, plen 4
    a.mov(word_ptr(rdi + 20), 0x0100u32).unwrap(); // op 1 (request)
    copy_mac(&mut a, 22);
    a.mov(dword_ptr(rdi + 28), u32::from_le_bytes(GUEST_IP)).unwrap();
    a.mov(dword_ptr(rdi + 32), 0u32).unwrap();
    a.mov(word_ptr(rdi + 36), 0u32).unwrap();
    a.mov(dword_ptr(rdi + 38), u32::from_le_bytes(GATEWAY_IP)).unwrap();
    send(&mut a, &mut f, 42, 0x10);
    // Look at up to four received frames for the ARP reply; print it (virtio header included).
    let mut found = a.create_label();
    for k in 0..4u8 {
        let mut next = a.create_label();
        recv(&mut a, &mut f, 0x20 + 2 * k);
        a.cmp(word_ptr(rbx + HDR as i32 + 12), 0x0608u32).unwrap();
        a.jne(next).unwrap();
        a.cmp(word_ptr(rbx + HDR as i32 + 20), 0x0200u32).unwrap();
        a.je(found).unwrap();
        a.set_label(&mut next).unwrap();
        repost(&mut a);
    }
    emit_exit(&mut a, 0x30);
    a.set_label(&mut found).unwrap();
    a.mov(rsi, rbx).unwrap();
    a.mov(ecx, r8d).unwrap();
    emit_write_rsi(&mut a);
    emit_exit(&mut a, OK);
    f.emit(&mut a);

    let mut cfg = config(write_elf(dir.path(), &assemble(a)));
    cfg.devices.net = Some(net_config(socket));
    let b = boot_config(&hv, dir.path(), &cfg);
    expect_ok(&b);
    let s = &b.serial;
    assert!(s.len() >= 12 + 42, "short reply: {s:02x?}");
    assert_eq!(
        &s[..12],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "virtio-net header, num_buffers 1"
    );
    let eth = &s[12..];
    assert_eq!(&eth[..6], &GUEST_MAC, "addressed to the guest");
    assert_eq!(&eth[12..14], &[0x08, 0x06], "ARP");
    assert_eq!(&eth[14..22], &[0, 1, 8, 0, 6, 4, 0, 2], "Ethernet/IPv4 reply");
    let gw_mac = &eth[22..28];
    assert_eq!(gw_mac, &eth[6..12], "sender hardware address is the frame's source");
    assert!(
        gw_mac[0] & 1 == 0 && gw_mac != [0; 6],
        "unicast gateway MAC {gw_mac:02x?}"
    );
    assert_eq!(&eth[28..32], &GATEWAY_IP);
    assert_eq!(&eth[32..38], &GUEST_MAC);
    assert_eq!(&eth[38..42], &GUEST_IP);
    eprintln!("passt gateway {GATEWAY_IP:?} is at {gw_mac:02x?}");
}

const ECHO_SIZES: [u32; 3] = [60, 1514, 333];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

#[test]
fn echo_through_fake_passt() {
    let Some(hv) = kvm_or_skip("echo_through_fake_passt") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake-passt.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut frames = Vec::new();
        for _ in ECHO_SIZES {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut frame).unwrap();
            s.write_all(&len).unwrap();
            s.write_all(&frame).unwrap();
            frames.push(frame);
        }
        frames
    });

    let mut a = asm();
    let mut f = Fails::default();
    setup(&mut a, &mut f);
    tx_eth_header(&mut a, PEER_MAC, 0x88b5);
    for (k, &len) in ECHO_SIZES.iter().enumerate() {
        let code = 0x10 + 0x10 * k as u8;
        fill_pattern(&mut a, len, k as u8);
        send(&mut a, &mut f, len, code);
        recv(&mut a, &mut f, code + 2);
        let bad_len = f.at(&mut a, code + 4);
        a.cmp(r8d, HDR + len).unwrap();
        a.jne(bad_len).unwrap();
        let bad_hdr = f.at(&mut a, code + 5);
        a.cmp(word_ptr(rbx + 10), 1u32).unwrap();
        a.jne(bad_hdr).unwrap();
        compare_with_tx(&mut a, &mut f, len, code + 6);
        repost(&mut a);
    }
    emit_print(&mut a, b"net echo ok\n");
    emit_exit(&mut a, OK);
    f.emit(&mut a);

    let mut cfg = config(write_elf(dir.path(), &assemble(a)));
    cfg.devices.net = Some(net_config(socket));
    let b = boot_config(&hv, dir.path(), &cfg);
    expect_ok(&b);
    assert_eq!(String::from_utf8_lossy(&b.serial), "net echo ok\n");
    let frames = peer.join().unwrap();
    for (k, (got, &len)) in frames.iter().zip(&ECHO_SIZES).enumerate() {
        let want = pattern_frame(PEER_MAC, GUEST_MAC, 0x88b5, len as usize, k as u8);
        assert_eq!(got, &want, "frame {k} as the peer received it");
    }
    assert_eq!(b.report.unknown_count, 0, "{:?}", b.report.unknown);
}
