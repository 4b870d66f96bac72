//! `net::configure` against a real DHCP server: Debian's dnsmasq in one network namespace, our client in
//! another, joined by a veth pair. Needs root, iproute2 (`ip`) and dnsmasq (`apt-get install -y
//! dnsmasq-base`); the binary is taken from `DSTACK_DNSMASQ` (default: `dnsmasq` on PATH or
//! /usr/sbin/dnsmasq). Missing prerequisites skip loudly; `DSTACK_REQUIRE_FIXTURES=1` makes them fail.
//! Namespaces and the dnsmasq process are removed on every exit path (a Drop guard).

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use guest_init::net::{self, NetError, NetReport};

fn skip(why: &str) -> bool {
    assert!(
        std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() != Ok("1"),
        "net_dhcp prerequisite missing (DSTACK_REQUIRE_FIXTURES=1): {why}"
    );
    eprintln!("SKIP net_dhcp: {why}");
    true
}

fn dnsmasq_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DSTACK_DNSMASQ") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&format!("{path}:/usr/sbin:/sbin"))
        .map(|d| d.join("dnsmasq"))
        .find(|p| p.is_file())
}

/// Root and iproute2, needed by every test here.
fn can_make_namespaces() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return !skip("needs root for network namespaces");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return !skip("iproute2 `ip` not found");
    }
    true
}

fn prerequisites() -> Option<PathBuf> {
    if !can_make_namespaces() {
        return None;
    }
    let Some(d) = dnsmasq_path() else {
        skip("dnsmasq not found (apt-get install -y dnsmasq-base, or set DSTACK_DNSMASQ)");
        return None;
    };
    Some(d)
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces (server, client) joined by veth `dgs<id>` (server side, 10.77.0.1/24) ↔ `eth0`
/// (client side, unconfigured), plus an optional dnsmasq. Dropping it tears everything down.
struct Lab {
    server_ns: String,
    client_ns: String,
    host_if: String,
    dnsmasq: Option<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let lab = Lab {
            server_ns: format!("dgn-s{id}"),
            client_ns: format!("dgn-c{id}"),
            host_if: format!("dgs{id}"),
            dnsmasq: None,
            dir: tempfile::tempdir().unwrap(),
        };
        // Constructed before the first command so a failing step still cleans up what exists.
        ip(&["netns", "add", &lab.server_ns]);
        ip(&["netns", "add", &lab.client_ns]);
        let host_if = lab.host_if.clone();
        ip(&[
            "-n",
            &lab.server_ns,
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &lab.client_ns,
        ]);
        ip(&["-n", &lab.server_ns, "addr", "add", "10.77.0.1/24", "dev", &host_if]);
        ip(&["-n", &lab.server_ns, "link", "set", &host_if, "up"]);
        lab
    }

    fn start_dnsmasq(&mut self, bin: &Path, router: &str) {
        let host_if = &self.host_if;
        let log = std::fs::File::create(self.dir.path().join("dnsmasq.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns])
            .arg(bin)
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0", // no DNS service, DHCP only
                "--user=root",
                "--bind-interfaces",
                &format!("--interface={host_if}"),
                "--dhcp-authoritative",
                "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,1h",
                &format!("--dhcp-option=option:router,{router}"),
                "--dhcp-option=option:dns-server,10.77.0.53,10.77.0.54",
                "--dhcp-option=option:domain-name,lab.internal",
                "--dhcp-option=option:mtu,1400",
                "--log-dhcp",
                "--no-ping", // skip the 3 s ICMP conflict probe before each offer
            ])
            .arg(format!("--dhcp-leasefile={}", self.dir.path().join("leases").display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dnsmasq");
        self.dnsmasq = Some(child);
    }

    fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// Runs `net::configure` on a thread that has joined the client namespace.
    fn configure(&self, timeout: Duration) -> Result<NetReport, NetError> {
        let root = self.dir.path().join("root");
        in_ns(&self.client_ns, move || net::configure(&root, timeout))
    }
}

/// Runs `f` on a thread that has joined network namespace `ns` (setns is per thread).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            // `ip netns exec` execs dnsmasq in place, so this pid is dnsmasq itself.
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn dhcp_lease_from_dnsmasq_is_applied() {
    let Some(dnsmasq) = prerequisites() else { return };
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut lab = Lab::new();
    lab.start_dnsmasq(&dnsmasq, "10.77.0.1");
    let report = match lab.configure(Duration::from_secs(30)) {
        Ok(r) => r,
        Err(e) => panic!("configure failed: {e}\n--- dnsmasq log ---\n{}", lab.dnsmasq_log()),
    };
    eprintln!("{report:?}\n--- dnsmasq log ---\n{}", lab.dnsmasq_log());
    assert_eq!(report.interface, "eth0");
    let addr = u32::from(report.address);
    assert!(
        (u32::from(Ipv4Addr::new(10, 77, 0, 50))..=u32::from(Ipv4Addr::new(10, 77, 0, 60))).contains(&addr),
        "{} outside the dnsmasq range",
        report.address
    );
    assert_eq!(report.prefix_len, 24);
    assert_eq!(report.gateway, Some(Ipv4Addr::new(10, 77, 0, 1)));
    assert_eq!(report.dns, [Ipv4Addr::new(10, 77, 0, 53), Ipv4Addr::new(10, 77, 0, 54)]);
    assert_eq!(report.domain.as_deref(), Some("lab.internal"));
    assert_eq!(report.mtu, Some(1400));
    assert_eq!(report.server, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(report.lease_secs, 3600);
    assert!(report.elapsed < Duration::from_secs(30));

    // What the kernel now has, read back with iproute2 (an independent netlink client).
    let cns = lab.client_ns.clone();
    let addrs = ip(&["-n", &cns, "-4", "-o", "addr", "show"]);
    assert!(
        addrs.contains(&format!("eth0    inet {}/24", report.address)),
        "{addrs}"
    );
    assert!(addrs.contains("lo    inet 127.0.0.1/8"), "{addrs}");
    let routes = ip(&["-n", &cns, "-4", "route", "show"]);
    assert!(
        routes.contains(&format!(
            "default via 10.77.0.1 dev eth0 proto dhcp src {}",
            report.address
        )),
        "{routes}"
    );
    let link = ip(&["-n", &cns, "-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
    // Traffic flows: a TCP connection from the client to an address behind the gateway (192.0.2.1 on the
    // server's loopback) uses the installed default route; the server answers via the on-link route.
    ip(&["-n", &lab.server_ns, "link", "set", "lo", "up"]);
    ip(&["-n", &lab.server_ns, "addr", "add", "192.0.2.1/32", "dev", "lo"]);
    let listener = in_ns(&lab.server_ns, || std::net::TcpListener::bind("192.0.2.1:0").unwrap());
    let target = listener.local_addr().unwrap();
    let local = in_ns(&cns, move || {
        let s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect via gateway");
        s.local_addr().unwrap()
    });
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer, local);
    assert_eq!(peer.ip(), std::net::IpAddr::V4(report.address));

    let resolv = std::fs::read_to_string(lab.dir.path().join("root/etc/resolv.conf")).unwrap();
    let lines: Vec<&str> = resolv.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        ["search lab.internal", "nameserver 10.77.0.53", "nameserver 10.77.0.54"]
    );

    // dnsmasq recorded the lease for our MAC.
    let leases = std::fs::read_to_string(lab.dir.path().join("leases")).unwrap_or_default();
    assert!(
        leases.contains(&report.mac) && leases.contains(&report.address.to_string()),
        "{leases}"
    );

    // Running again (e.g. after a restart of the boot step) is idempotent.
    let again = lab.configure(Duration::from_secs(30)).unwrap();
    assert_eq!(again.address, report.address);
}

#[test]
fn no_dhcp_server_times_out_cleanly() {
    if !can_make_namespaces() {
        return;
    }
    let lab = Lab::new();
    let started = std::time::Instant::now();
    let err = lab.configure(Duration::from_secs(3)).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, NetError::Dhcp { .. }), "{err}");
    assert!(err.to_string().contains("no DHCP lease"), "{err}");
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // Loopback was still brought up.
    let addrs = ip(&["-n", &lab.client_ns, "-4", "-o", "addr", "show", "lo"]);
    assert!(addrs.contains("127.0.0.1/8"), "{addrs}");
}

#[test]
fn gateway_outside_the_subnet_gets_an_on_link_route() {
    let Some(dnsmasq) = prerequisites() else { return };
    let mut lab = Lab::new();
    lab.start_dnsmasq(&dnsmasq, "10.88.0.1");
    let report = match lab.configure(Duration::from_secs(30)) {
        Ok(r) => r,
        Err(e) => panic!("configure failed: {e}\n--- dnsmasq log ---\n{}", lab.dnsmasq_log()),
    };
    assert_eq!(report.gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));
    let routes = ip(&["-n", &lab.client_ns, "-4", "route", "show"]);
    let src = report.address;
    assert!(
        routes.contains(&format!("default via 10.88.0.1 dev eth0 proto dhcp src {src}")),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("10.88.0.1 dev eth0 proto dhcp scope link src {src}")),
        "{routes}"
    );
}
