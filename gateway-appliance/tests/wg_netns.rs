//! The boringtun data plane between two network namespaces made by this test: the gateway's
//! `WgDevice` in one, the CVM's `ClientTunnel` (built from a `RegisterCvmResponse`) in the other,
//! joined by a veth pair. TCP runs both ways through the tunnel.
//!
//! Needs root, iproute2 (`ip`) and `/dev/net/tun`; skipped with a reason otherwise, and a failure
//! under `DSTACK_REQUIRE_FIXTURES=1`. Only namespace-local addresses are used; the namespaces are
//! deleted on drop, also when the test fails.
//!
//! Interop: `DSTACK_WG_TOOLS_DIR` names a directory holding `wireguard-go` and `wg` (Debian packages
//! `wireguard-go` and `wireguard-tools`; `apt-get download` + `dpkg-deb -x` is enough, the binaries
//! are in `usr/bin`). Then the CVM side is run by wireguard-go, configured with `wg setconf` from
//! the client's rendered config, against the boringtun gateway.

mod common;

use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::*;
use dstack_gateway::config::Cidr;
use dstack_gateway::registration::{WgBackend, WgPeer};
use dstack_gateway::wg::client::ClientTunnel;
use dstack_gateway::wg::{DeviceConfig, WgDevice, generate_private_key, public_key_b64};
use dstack_rpc::gateway::{RegisterCvmResponse, WireGuardConfig, WireGuardPeer};

fn response(gw_pub: &str) -> RegisterCvmResponse {
    RegisterCvmResponse {
        wg: Some(WireGuardConfig {
            client_ip: "10.0.0.2".into(),
            servers: vec![WireGuardPeer {
                pk: gw_pub.into(),
                ip: "10.0.0.1".into(),
                endpoint: "192.168.77.1:51820".into(),
            }],
        }),
        ..Default::default()
    }
}

#[test]
fn tcp_both_ways_through_boringtun_tunnel() {
    if prerequisites_missing() {
        return;
    }
    let pair = NetnsPair::create('a');
    let gw_key = generate_private_key().unwrap();
    let cvm_key = generate_private_key().unwrap();
    let gw_pub = public_key_b64(&gw_key);
    let cvm_pub = public_key_b64(&cvm_key);
    let cvm_peer = WgPeer {
        public_key: cvm_pub.clone(),
        ip: Ipv4Addr::new(10, 0, 0, 2),
    };

    // Baseline: veth only.
    in_netns(&pair.gw, || drop(echo_server("192.168.77.1:7100".parse().unwrap())))
        .join()
        .unwrap();
    let (plain_rtt, plain_mbs) = exercise_in(&pair.cvm, "192.168.77.1:7100").unwrap();

    // Gateway: the data plane as `Registrar` drives it, through `WgBackend`.
    let peers = vec![cvm_peer.clone()];
    let gw = DeviceThread::start(&pair.gw, move || {
        Box::pin(async move {
            let dev = WgDevice::start(DeviceConfig {
                ifname: "wg-gw".into(),
                private_key: gw_key,
                listen: "0.0.0.0:51820".parse().unwrap(),
                address: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
                mtu: 1420,
                routes: Vec::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
            dev.set_peers(&peers).map_err(|e| e.to_string())?;
            Ok(dev)
        })
    })
    .unwrap();
    in_netns(&pair.gw, || drop(echo_server("10.0.0.1:7000".parse().unwrap())))
        .join()
        .unwrap();

    // CVM: the guest-side client, configured from the registration answer.
    let resp = response(&gw_pub);
    let cvm = DeviceThread::start(&pair.cvm, move || {
        Box::pin(async move {
            let t = ClientTunnel::from_response(&resp, cvm_key, "wg-cvm").map_err(|e| e.to_string())?;
            t.start().await.map_err(|e| e.to_string())
        })
    })
    .unwrap();
    in_netns(&pair.cvm, || drop(echo_server("10.0.0.2:7001".parse().unwrap())))
        .join()
        .unwrap();

    // Gateway → CVM first: only possible because the client handshakes as soon as it is up.
    let (g2c_rtt, g2c_mbs) = exercise_in(&pair.gw, "10.0.0.2:7001").unwrap();
    let (c2g_rtt, c2g_mbs) = exercise_in(&pair.cvm, "10.0.0.1:7000").unwrap();
    eprintln!(
        "veth: rtt {plain_rtt:.0} µs, {plain_mbs:.0} MB/s | tunnel gw→cvm: rtt {g2c_rtt:.0} µs, {g2c_mbs:.0} MB/s | \
         cvm→gw: rtt {c2g_rtt:.0} µs, {c2g_mbs:.0} MB/s | added rtt {:.0} µs",
        g2c_rtt.min(c2g_rtt) - plain_rtt
    );

    let (hs, status) = gw.call(Cmd::Status);
    let first_hs = *hs.get(&cvm_pub).expect("gateway saw a handshake from the CVM");
    assert!(first_hs.elapsed().unwrap_or_default() < Duration::from_secs(60));
    let st = status.iter().find(|s| s.public_key == cvm_pub).unwrap();
    assert_eq!(
        st.endpoint,
        Some("192.168.77.2:9182".parse().unwrap()),
        "roamed to the client's port 9182"
    );
    assert!(st.rx_bytes >= 2 * (8 << 20) as u64, "rx {}", st.rx_bytes);

    // Junk from the network (wrong types, truncated, forged handshakes) is dropped without harm.
    in_netns(&pair.cvm, || {
        let sock = std::net::UdpSocket::bind("192.168.77.2:0").unwrap();
        let mut junk: Vec<Vec<u8>> = vec![vec![], vec![1], vec![4, 0, 0, 0], vec![9; 2000]];
        for t in 1u8..=4 {
            for len in [32usize, 64, 92, 148, 1500] {
                let mut d: Vec<u8> = (0..len).map(|i| (i * 31 + usize::from(t)) as u8).collect();
                d[..4].copy_from_slice(&[t, 0, 0, 0]);
                junk.push(d);
            }
        }
        for d in &junk {
            sock.send_to(d, "192.168.77.1:51820").unwrap();
        }
    })
    .join()
    .unwrap();
    exercise_in(&pair.cvm, "10.0.0.1:7000").unwrap();

    // Adding another peer leaves the live session alone (same handshake, traffic still flows).
    let other = WgPeer {
        public_key: public_key_b64(&generate_private_key().unwrap()),
        ip: Ipv4Addr::new(10, 0, 0, 3),
    };
    gw.call(Cmd::SetPeers(vec![cvm_peer.clone(), other]));
    exercise_in(&pair.gw, "10.0.0.2:7001").unwrap();
    let (hs, _) = gw.call(Cmd::Status);
    // (Handshake times are derived as now − age, so allow clock jitter, not a new handshake.)
    let again = *hs.get(&cvm_pub).unwrap();
    let drift = again.duration_since(first_hs).unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_millis(100),
        "session kept across peer-set change ({drift:?})"
    );

    // Removing the CVM cuts it off; re-adding lets it back in (its next packet re-handshakes).
    gw.call(Cmd::SetPeers(Vec::new()));
    let cut = in_netns(&pair.gw, || {
        TcpStream::connect_timeout(&"10.0.0.2:7001".parse().unwrap(), Duration::from_secs(2))
    })
    .join()
    .unwrap();
    assert!(cut.is_err(), "removed peer still reachable");
    // The CVM still holds a session the gateway forgot; like any WireGuard peer it re-handshakes
    // once its packets go unanswered (KEEPALIVE 10 s + REKEY_TIMEOUT 5 s), hence the longer wait.
    gw.call(Cmd::SetPeers(vec![cvm_peer]));
    exercise_within(&pair.cvm, "10.0.0.1:7000", Duration::from_secs(40)).unwrap();
    let (_, cvm_status) = cvm.call(Cmd::Status);
    assert!(cvm_status[0].latest_handshake.is_some());
    drop((cvm, gw, pair));
}

#[test]
fn boringtun_gateway_interoperates_with_wireguard_go_client() {
    if prerequisites_missing() {
        return;
    }
    let Some(dir) = std::env::var_os("DSTACK_WG_TOOLS_DIR").map(std::path::PathBuf::from) else {
        skip_or_fail("DSTACK_WG_TOOLS_DIR not set (dir with wireguard-go and wg)");
        return;
    };
    let (wggo, wg) = (dir.join("wireguard-go"), dir.join("wg"));
    let pair = NetnsPair::create('i');
    let gw_key = generate_private_key().unwrap();
    let cvm_key = generate_private_key().unwrap();
    let gw_pub = public_key_b64(&gw_key);
    let peers = vec![WgPeer {
        public_key: public_key_b64(&cvm_key),
        ip: Ipv4Addr::new(10, 0, 0, 2),
    }];
    let gw = DeviceThread::start(&pair.gw, move || {
        Box::pin(async move {
            let dev = WgDevice::start(DeviceConfig {
                ifname: "wg-gw".into(),
                private_key: gw_key,
                listen: "0.0.0.0:51820".parse().unwrap(),
                address: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
                mtu: 1420,
                routes: Vec::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
            dev.set_peers(&peers).map_err(|e| e.to_string())?;
            Ok(dev)
        })
    })
    .unwrap();
    in_netns(&pair.gw, || drop(echo_server("10.0.0.1:7000".parse().unwrap())))
        .join()
        .unwrap();

    // wireguard-go in the CVM namespace, in the foreground so that we own (and kill) its pid.
    let ifname = format!("dgwo{}", std::process::id());
    let sock = std::path::PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
    let _wggo = Child(
        Command::new("ip")
            .args(["netns", "exec", &pair.cvm])
            .arg(&wggo)
            .args(["-f", &ifname])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        sock.clone(),
    );
    let deadline = Instant::now() + STEP;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let tunnel = ClientTunnel::from_response(&response(&gw_pub), cvm_key, &ifname).unwrap();
    // `wg setconf` takes the file without wg-quick's `Address`.
    let conf: String = tunnel
        .wg_quick_conf()
        .lines()
        .filter(|l| !l.starts_with("Address"))
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let conf_path = tmp.path().join("wg.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let wg = wg.display().to_string();
    run(&[
        "ip",
        "netns",
        "exec",
        &pair.cvm,
        &wg,
        "setconf",
        &ifname,
        &conf_path.display().to_string(),
    ])
    .unwrap();
    run(&["ip", "-n", &pair.cvm, "addr", "add", "10.0.0.2/32", "dev", &ifname]).unwrap();
    run(&["ip", "-n", &pair.cvm, "link", "set", &ifname, "mtu", "1420", "up"]).unwrap();
    run(&["ip", "-n", &pair.cvm, "route", "add", "10.0.0.1/32", "dev", &ifname]).unwrap();
    in_netns(&pair.cvm, || drop(echo_server("10.0.0.2:7001".parse().unwrap())))
        .join()
        .unwrap();

    let (c2g_rtt, c2g_mbs) = exercise_in(&pair.cvm, "10.0.0.1:7000").unwrap();
    let (g2c_rtt, g2c_mbs) = exercise_in(&pair.gw, "10.0.0.2:7001").unwrap();
    eprintln!(
        "wireguard-go client ↔ boringtun gateway: cvm→gw rtt {c2g_rtt:.0} µs, {c2g_mbs:.0} MB/s | gw→cvm rtt {g2c_rtt:.0} µs, {g2c_mbs:.0} MB/s"
    );
    // wireguard-go's view: a handshake with our gateway.
    let dump = run(&[
        "ip",
        "netns",
        "exec",
        &pair.cvm,
        &wg,
        "show",
        &ifname,
        "latest-handshakes",
    ])
    .unwrap();
    let ts: u64 = dump.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
    assert!(ts > 0, "wg reports no handshake: {dump}");
    let (hs, _) = gw.call(Cmd::Status);
    assert_eq!(hs.len(), 1, "gateway saw the wireguard-go peer's handshake");
    drop((gw, pair));
}
