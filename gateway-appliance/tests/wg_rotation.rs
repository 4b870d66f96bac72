//! Rotation of the gateway's WireGuard key under an established TCP connection: the gateway's
//! boringtun device in one namespace, the CVM's in another (made by this test, deleted on drop).
//!
//! 1. rotate: the new key becomes current, the CVM's session stays on the old one;
//! 2. the CVM learns the new public key (as from a re-registration) and handshakes with it;
//! 3. the old key is retired.
//!
//! One TCP connection through the tunnel is used across all steps and must keep working.
//! Needs root, iproute2 and `/dev/net/tun`; skipped with a reason otherwise (failure under
//! `DSTACK_REQUIRE_FIXTURES=1`).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::netns::{NetnsPair, echo_server, in_netns, prerequisites_missing};
use dstack_gateway::config::Cidr;
use dstack_gateway::registration::{WgBackend, WgPeer};
use dstack_gateway::wg::client::ClientTunnel;
use dstack_gateway::wg::{DeviceConfig, WgDevice, generate_private_key, public_key_b64};
use dstack_rpc::gateway::{RegisterCvmResponse, WireGuardConfig, WireGuardPeer};

type Job = Box<dyn FnOnce(&WgDevice) -> Result<String, String> + Send>;

/// A device on its own thread in a namespace, driven by closures.
struct Dev {
    tx: tokio::sync::mpsc::UnboundedSender<(Job, mpsc::Sender<Result<String, String>>)>,
}

impl Dev {
    fn start(
        ns: &str,
        make: impl FnOnce() -> Result<(DeviceConfig, Vec<dstack_gateway::wg::PeerConfig>), String> + Send + 'static,
    ) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Job, mpsc::Sender<Result<String, String>>)>();
        let (ready_tx, ready_rx) = mpsc::channel();
        in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (cfg, peers) = match make() {
                    Ok(v) => v,
                    Err(e) => return ready_tx.send(Err(e)).unwrap(),
                };
                let dev = match WgDevice::start(cfg).await {
                    Ok(d) => d,
                    Err(e) => return ready_tx.send(Err(e.to_string())).unwrap(),
                };
                dev.set_peer_configs(&peers).unwrap();
                dev.initiate_handshakes();
                ready_tx.send(Ok(())).unwrap();
                let deadline = tokio::time::sleep(Duration::from_secs(120));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        Some((job, reply)) = rx.recv() => { let _ = reply.send(job(&dev)); }
                        () = &mut deadline => return,
                        else => return,
                    }
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        Self { tx }
    }

    fn run(&self, job: impl FnOnce(&WgDevice) -> Result<String, String> + Send + 'static) -> String {
        let (tx, rx) = mpsc::channel();
        self.tx.send((Box::new(job), tx)).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap()
    }
}

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

/// One echo round trip of `n` bytes on the long-lived connection.
fn ping(s: &mut TcpStream, tag: u8) {
    let msg = vec![tag; 1000];
    s.write_all(&msg).unwrap_or_else(|e| panic!("ping {tag}: write: {e}"));
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("ping {tag}: read: {e}"));
    assert_eq!(got, msg);
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn gateway_key_rotation_keeps_an_established_tunnel() {
    if prerequisites_missing() {
        return;
    }
    let pair = NetnsPair::create('r');
    let k1 = generate_private_key().unwrap();
    let k2 = generate_private_key().unwrap();
    let cvm_key = generate_private_key().unwrap();
    let cvm_pub = public_key_b64(&cvm_key);
    let (k1_pub, k2_pub) = (public_key_b64(&k1), public_key_b64(&k2));

    let peer = WgPeer {
        public_key: cvm_pub.clone(),
        ip: Ipv4Addr::new(10, 0, 0, 2),
    };
    let gw = Dev::start(&pair.gw, move || {
        Ok((
            DeviceConfig {
                ifname: "wg-rgw".into(),
                private_key: k1,
                listen: "0.0.0.0:51820".parse().unwrap(),
                address: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
                mtu: 1420,
                routes: Vec::new(),
            },
            Vec::new(),
        ))
    });
    gw.run(move |d| d.set_peers(&[peer]).map(|()| String::new()).map_err(|e| e.to_string()));
    let resp1 = response(&k1_pub);
    let cvm = Dev::start(&pair.cvm, move || {
        let t = ClientTunnel::from_response(&resp1, cvm_key, "wg-rcvm").map_err(|e| e.to_string())?;
        Ok((t.device, t.peers))
    });
    in_netns(&pair.cvm, || drop(echo_server("10.0.0.2:7002".parse().unwrap())))
        .join()
        .unwrap();

    // The long-lived connection, opened from the gateway side through the tunnel.
    let mut conn = in_netns(&pair.gw, || {
        let to: SocketAddr = "10.0.0.2:7002".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect through tunnel: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
    .join()
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    ping(&mut conn, 1);

    // 1. Rotate: the gateway announces k2, the session made with k1 carries on.
    let announced = gw.run(move |d| {
        d.rotate_key(k2);
        Ok(d.public_key())
    });
    assert_eq!(announced, k2_pub);
    assert_eq!(gw.run(|d| Ok(d.peers_on_previous_key().join(","))), cvm_pub);
    ping(&mut conn, 2);

    // 2. The CVM re-registers, learns k2 and handshakes with it; the gateway follows.
    let resp2 = response(&k2_pub);
    cvm.run(move |d| {
        let t = ClientTunnel::from_response(&resp2, cvm_key, "wg-rcvm").map_err(|e| e.to_string())?;
        d.set_peer_configs(&t.peers).map_err(|e| e.to_string())?;
        d.initiate_handshakes();
        Ok(String::new())
    });
    ping(&mut conn, 3);
    wait_until("the CVM's peer moved to the new key", || {
        gw.run(|d| Ok(d.peers_on_previous_key().join(","))).is_empty()
    });
    ping(&mut conn, 4);

    // 3. Retire k1: nothing uses it any more, the connection is unaffected.
    gw.run(|d| {
        d.retire_previous_key();
        Ok(String::new())
    });
    for i in 5..10 {
        ping(&mut conn, i);
    }
    let hs = gw.run(move |d| {
        let h = d.latest_handshakes();
        Ok(h.get(&cvm_pub)
            .map(|t| format!("{:?}", t.elapsed().unwrap_or_default()))
            .unwrap_or_default())
    });
    assert!(!hs.is_empty(), "gateway has a handshake with the CVM under the new key");

    // A CVM still holding only the retired key cannot get a session any more.
    let stale_key = generate_private_key().unwrap();
    let stale_pub = public_key_b64(&stale_key);
    let stale_peer = WgPeer {
        public_key: stale_pub,
        ip: Ipv4Addr::new(10, 0, 0, 3),
    };
    let cvm_peer = WgPeer {
        public_key: public_key_b64(&cvm_key),
        ip: Ipv4Addr::new(10, 0, 0, 2),
    };
    gw.run(move |d| {
        d.set_peers(&[cvm_peer, stale_peer])
            .map(|()| String::new())
            .map_err(|e| e.to_string())
    });
    let old = response(&k1_pub);
    let stale = Dev::start(&pair.cvm, move || {
        let mut t = ClientTunnel::from_response(&old, stale_key, "wg-rstale").map_err(|e| e.to_string())?;
        t.device.listen = "0.0.0.0:9183".parse().unwrap();
        t.device.address = Cidr::v4(Ipv4Addr::new(10, 0, 0, 3), 32);
        // No route: 10.0.0.1 must stay reachable through the real CVM's interface.
        t.device.routes.clear();
        Ok((t.device, t.peers))
    });
    std::thread::sleep(Duration::from_secs(2));
    let stale_hs = stale.run(|d| Ok(d.latest_handshakes().len().to_string()));
    assert_eq!(stale_hs, "0", "no handshake with a retired key");
    ping(&mut conn, 10);
}
