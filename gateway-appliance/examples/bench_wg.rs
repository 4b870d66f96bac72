//! WireGuard tunnel cost: added round-trip time and TCP throughput through our boringtun data plane
//! (gateway `WgDevice` ↔ guest `ClientTunnel`) vs wireguard-go at both ends, each between two
//! network namespaces joined by a veth pair (the veth alone is the baseline).
//!
//! Needs root, `/dev/net/tun` and iproute2; the Debian packages `wireguard-go` and
//! `wireguard-tools` are installed with apt-get when missing. Namespaces, interfaces and
//! wireguard-go processes are removed at the end, also on failure. Only namespace-local addresses
//! are used. Runs in about ten seconds.

#[allow(dead_code)]
#[path = "../tests/common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dstack_gateway::config::Cidr;
use dstack_gateway::registration::{WgBackend, WgPeer};
use dstack_gateway::wg::client::ClientTunnel;
use dstack_gateway::wg::{DeviceConfig, WgDevice, generate_private_key, public_key_b64};
use dstack_rpc::gateway::{RegisterCvmResponse, WireGuardConfig, WireGuardPeer};
use netns::{Child, DeviceThread, NetnsPair, in_netns, run};

const PINGS: usize = 1000;
const BULK: usize = 48 << 20;

type Res<T> = Result<T, String>;

fn main() {
    if let Err(e) = bench() {
        eprintln!("bench_wg: {e}");
        std::process::exit(1);
    }
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    p50_us: f64,
    p99_us: f64,
    mbs: f64,
}

/// A server that answers each 1-byte ping, or, after `B`, swallows bytes until EOF and acks.
fn server(addr: SocketAddr) -> Res<()> {
    let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() {
                    if b[0] == b'B' {
                        let mut buf = vec![0u8; 256 * 1024];
                        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                        let _ = s.write_all(b"k");
                        return;
                    }
                    if s.write_all(&b).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

fn connect(to: SocketAddr) -> Res<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(s) => {
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if Instant::now() > deadline => return Err(format!("connect {to}: {e}")),
            // The first packets may wait for the handshake.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// From inside `ns`: ping percentiles, then one-way bulk throughput to `to`.
fn measure(ns: &str, to: &str) -> Res<Figures> {
    let to: SocketAddr = to.parse().map_err(|e| format!("{to}: {e}"))?;
    in_netns(ns, move || -> Res<Figures> {
        let mut s = connect(to)?;
        let mut rtt = Vec::with_capacity(PINGS);
        let mut b = [0u8; 1];
        for i in 0..PINGS + 50 {
            let t = Instant::now();
            s.write_all(b"p").map_err(|e| e.to_string())?;
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            if i >= 50 {
                rtt.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        rtt.sort_by(f64::total_cmp);
        let chunk = vec![0xa5u8; 256 * 1024];
        let t = Instant::now();
        s.write_all(b"B").map_err(|e| e.to_string())?;
        for _ in 0..BULK / chunk.len() {
            s.write_all(&chunk).map_err(|e| format!("bulk: {e}"))?;
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        s.read_exact(&mut b).map_err(|e| format!("bulk ack: {e}"))?;
        let secs = t.elapsed().as_secs_f64();
        let pct = |q: f64| {
            rtt.get(((rtt.len() - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Ok(Figures {
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            mbs: BULK as f64 / secs / 1e6,
        })
    })
    .join()
    .map_err(|_| "measuring thread panicked".to_owned())?
}

fn serve_in(ns: &str, addr: &str) -> Res<()> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    in_netns(ns, move || server(addr))
        .join()
        .map_err(|_| "server thread panicked".to_owned())?
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_packages(pkgs: &[&str]) -> Res<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench_wg: installing {missing:?}");
    let ok = |c: &mut Command| c.stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    let _ = ok(Command::new("apt-get").args(["-q", "update"]));
    if !ok(Command::new("apt-get")
        .args(["-q", "-y", "--no-install-recommends", "install"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    {
        return Err(format!("apt-get install {} failed", missing.join(" ")));
    }
    Ok(())
}

fn b64(k: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Ours at both ends: the gateway's device and the guest's client built from a registration answer.
fn boringtun(pair: &NetnsPair) -> Res<(Figures, DeviceThread, DeviceThread)> {
    let gw_key = generate_private_key().map_err(|e| e.to_string())?;
    let cvm_key = generate_private_key().map_err(|e| e.to_string())?;
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
                listen: "0.0.0.0:51820".parse().map_err(|e| format!("{e}"))?,
                address: Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24),
                mtu: 1420,
                routes: Vec::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
            dev.set_peers(&peers).map_err(|e| e.to_string())?;
            Ok(dev)
        })
    })?;
    serve_in(&pair.gw, "10.0.0.1:7000")?;
    let resp = RegisterCvmResponse {
        wg: Some(WireGuardConfig {
            client_ip: "10.0.0.2".into(),
            servers: vec![WireGuardPeer {
                pk: gw_pub,
                ip: "10.0.0.1".into(),
                endpoint: "192.168.77.1:51820".into(),
            }],
        }),
        ..Default::default()
    };
    let cvm = DeviceThread::start(&pair.cvm, move || {
        Box::pin(async move {
            let t = ClientTunnel::from_response(&resp, cvm_key, "wg-cvm").map_err(|e| e.to_string())?;
            t.start().await.map_err(|e| e.to_string())
        })
    })?;
    Ok((measure(&pair.cvm, "10.0.0.1:7000")?, gw, cvm))
}

/// wireguard-go at both ends, configured with `wg setconf`.
fn wireguard_go(pair: &NetnsPair, dir: &std::path::Path) -> Res<(Figures, Vec<Child>)> {
    let keys = [
        generate_private_key().map_err(|e| e.to_string())?,
        generate_private_key().map_err(|e| e.to_string())?,
    ];
    let id = std::process::id();
    let mut procs = Vec::new();
    let sides = [
        (&pair.gw, format!("dgb{id}g"), 0usize, "10.0.0.1", "10.0.0.2", None),
        (
            &pair.cvm,
            format!("dgb{id}c"),
            1,
            "10.0.0.2",
            "10.0.0.1",
            Some("192.168.77.1:51820"),
        ),
    ];
    for (ns, ifname, me, ip, peer_ip, endpoint) in &sides {
        let sock = std::path::PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        procs.push(Child(
            Command::new("ip")
                .args(["netns", "exec", ns.as_str(), "wireguard-go", "-f", ifname])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("wireguard-go: {e}"))?,
            sock.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                return Err(format!("wireguard-go did not create {}", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let other = keys.get(1 - me).ok_or("key")?;
        let mut conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {}\n\n[Peer]\nPublicKey = {}\nAllowedIPs = {peer_ip}/32\n",
            b64(keys.get(*me).ok_or("key")?),
            if *me == 0 { 51820 } else { 9182 },
            public_key_b64(other),
        );
        if let Some(e) = endpoint {
            conf.push_str(&format!("Endpoint = {e}\n"));
        }
        let path = dir.join(format!("{ifname}.conf"));
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let p = path.display().to_string();
        run(&["ip", "netns", "exec", ns, "wg", "setconf", ifname, &p])?;
        run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname])?;
        run(&["ip", "-n", ns, "link", "set", ifname, "mtu", "1420", "up"])?;
    }
    serve_in(&pair.gw, "10.0.0.1:7000")?;
    Ok((measure(&pair.cvm, "10.0.0.1:7000")?, procs))
}

fn bench() -> Res<()> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        println!("bench_wg: skipped: needs root and /dev/net/tun (network namespaces, tun devices)");
        return Ok(());
    }
    ensure_packages(&["iproute2", "wireguard-go", "wireguard-tools"])?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;

    let pair = NetnsPair::create('b');
    serve_in(&pair.gw, "192.168.77.1:7100")?;
    let veth = measure(&pair.cvm, "192.168.77.1:7100")?;
    let (ours, gw, cvm) = boringtun(&pair)?;
    drop((gw, cvm, pair));

    let pair = NetnsPair::create('g');
    let go = wireguard_go(&pair, dir.path());
    // Stop wireguard-go before deleting its namespaces.
    let go = go.map(|(f, procs)| {
        drop(procs);
        f
    });
    drop(pair);
    let go = go.inspect_err(|e| println!("wireguard-go: skipped: {e}")).ok();

    println!(
        "WireGuard between two namespaces over veth (TCP, {PINGS} 1-byte pings, {} MiB one way):",
        BULK >> 20
    );
    let line = |name: &str, f: Figures| {
        println!(
            "  {name:<22} rtt p50 {:>6.1} µs p99 {:>7.1} µs | {:>7.0} MB/s",
            f.p50_us, f.p99_us, f.mbs
        );
    };
    line("veth only", veth);
    line("boringtun (ours)", ours);
    if let Some(g) = go {
        line("wireguard-go", g);
    }
    let added = |f: Figures| (f.p50_us - veth.p50_us, f.p99_us - veth.p99_us);
    let (o50, o99) = added(ours);
    println!(
        "  added rtt, ours: p50 +{o50:.1} µs, p99 +{o99:.1} µs (target ≤ 300 µs: {})",
        if o50 <= 300.0 { "met" } else { "MISSED" }
    );
    if let Some(g) = go {
        let (g50, g99) = added(g);
        println!("  added rtt, wireguard-go: p50 +{g50:.1} µs, p99 +{g99:.1} µs");
        println!(
            "  ratios ours / wireguard-go: throughput {:.2}×, added p50 rtt {:.2}× (< 1 = ours faster)",
            ours.mbs / g.mbs,
            o50.max(0.1) / g50.max(0.1)
        );
    }
    println!("bench_wg: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
