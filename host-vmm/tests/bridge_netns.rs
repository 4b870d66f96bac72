//! Bridge networking end to end, inside a network namespace this test creates: the manager (fake backend, a
//! `sleep` as the VM) in bridge mode creates the bridge, one tap per VM (isolated ports) and runs dnsmasq.
//! Each "guest" is a tap in its own namespace whose frames a pump thread copies to and from the VM's tap
//! (standing in for the VMM's virtio-net), so a real DHCP client (busybox `udhcpc`) gets an address from the
//! manager's dnsmasq through the VM's tap and the bridge, and isolation is checked with ping.
//!
//! `kvm_payload_arps_the_bridge`: our VMM on /dev/kvm with a payload guest whose virtio-net device is backed
//! by the manager's tap (`NetBackendConfig::Tap`, what `--net tap:` gives the `kvm` backend) asks for the
//! bridge address's MAC and gets the host bridge's answer. Also skipped without /dev/kvm.
//!
//! Needs root (network namespaces, taps), `/dev/net/tun`, iproute2 `ip`, `dnsmasq` (Debian `dnsmasq-base`,
//! path override `DSTACK_TEST_DNSMASQ`) and busybox (`DSTACK_TEST_BUSYBOX`, for `udhcpc` and `ping`); skipped
//! with the reason otherwise (`DSTACK_REQUIRE_FIXTURES=1` turns skips into failures).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dstack_host_vmm::manager::{Manager, VmmConfig};
use dstack_host_vmm::virtio::net::NetBackend;
use dstack_host_vmm::virtio::net::tap::TapBackend;
use dstack_host_vmm::vmm::{NetBackendConfig, NetConfig};
use dstack_rpc::vmm::{NetworkingConfig, PortMapping, VmConfiguration};

mod common;
#[path = "support/fake.rs"]
mod fake;

const COMPOSE: &str = r#"{"manifest_version":2,"name":"demo","runner":"docker-compose","docker_compose_file":"services: {}\n","kms_enabled":false,"gateway_enabled":false,"local_key_provider_enabled":false,"public_logs":true,"public_sysinfo":true,"allowed_envs":[],"no_instance_id":false,"secure_time":false}"#;

fn skip(reason: &str) -> bool {
    if std::env::var("DSTACK_REQUIRE_FIXTURES").is_ok_and(|v| v == "1") {
        panic!("required fixture missing: {reason}");
    }
    eprintln!("SKIP: {reason}");
    true
}

fn tool(env: &str, default: &str) -> Option<PathBuf> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into());
    Command::new(&p).arg("--help").output().ok().map(|_| p)
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("{args:?}: {}", text.trim()));
    }
    Ok(text)
}

/// Network namespaces deleted on drop.
struct Netns(Vec<String>);

impl Netns {
    fn add(&mut self, name: String) -> String {
        run(&["ip", "netns", "add", &name]).unwrap();
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]).unwrap();
        self.0.push(name.clone());
        name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: `f` is an open namespace file; setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Copies frames between the VM's tap (opened in the host namespace) and a guest tap (opened in the guest
/// namespace) until `stop` is set: what the VMM's virtio-net does for a real guest.
fn pump(vm_tap: TapBackend, guest_tap: TapBackend, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut ends = [vm_tap, guest_tap];
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            let mut fds = ends.each_ref().map(|t| libc::pollfd {
                fd: t.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: poll on two fds we own, with an array of the right length.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
            for from in 0..2 {
                while let Ok(Some(n)) = ends[from].recv(&mut buf) {
                    let _ = ends[1 - from].send(&buf[..n]);
                }
            }
        }
    })
}

fn vm(name: &str, mode: &str) -> VmConfiguration {
    VmConfiguration {
        name: name.into(),
        image: "test-img".into(),
        compose_file: COMPOSE.into(),
        vcpu: 1,
        memory: 256,
        disk_size: 1,
        networking: Some(NetworkingConfig {
            mode: mode.into(),
            bridge_name: String::new(),
        }),
        ..Default::default()
    }
}

fn config(dir: &Path, dnsmasq: &Path, nat: bool) -> VmmConfig {
    let img = dir.join("images/test-img");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::write(
        img.join("metadata.json"),
        r#"{"kernel":"bzImage","cmdline":"console=ttyS0","initrd":"initramfs.cpio.gz","version":"0.1.0"}"#,
    )
    .unwrap();
    VmmConfig::parse(&format!(
        "[image]\npath = \"{}\"\n[cvm]\nrun_path = \"{}\"\ncid_start = 1000\ncid_pool_size = 4\n\
         [cvm.auto_restart]\nenabled = false\n\
         [cvm.networking]\nmode = \"bridge\"\n[cvm.networking.bridge]\nname = \"dtbr0\"\n\
         address = \"10.77.0.1/24\"\ndhcp_range = [\"10.77.0.100\", \"10.77.0.150\"]\nlease_secs = 600\n\
         dnsmasq_path = \"{}\"\nnat = {nat}\n",
        dir.join("images").display(),
        dir.join("run").display(),
        dnsmasq.display()
    ))
    .unwrap()
}

/// `udhcpc` in `ns` on `ifname`: the leased address it reports.
fn dhcp(busybox: &Path, ns: &str, ifname: &str) -> Result<String, String> {
    let bb = busybox.display().to_string();
    let out = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        &bb,
        "udhcpc",
        "-f",
        "-q",
        "-n",
        "-t",
        "8",
        "-T",
        "1",
        "-i",
        ifname,
        "-s",
        "/bin/true",
    ])?;
    let ip = out
        .split("lease of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| format!("no lease in udhcpc output: {out}"))?;
    Ok(ip.to_owned())
}

/// dnsmasq and busybox when every prerequisite is there; None (skipped, reason printed) otherwise.
fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root (network namespaces, taps, bridges)");
        return None;
    }
    if TapBackend::available().is_err() {
        skip("/dev/net/tun cannot be opened");
        return None;
    }
    if run(&["ip", "-V"]).is_err() {
        skip("iproute2 `ip` not found");
        return None;
    }
    let Some(dnsmasq) = tool("DSTACK_TEST_DNSMASQ", "dnsmasq") else {
        skip("dnsmasq not found (Debian dnsmasq-base; or set DSTACK_TEST_DNSMASQ)");
        return None;
    };
    let Some(busybox) = tool("DSTACK_TEST_BUSYBOX", "busybox") else {
        skip("busybox not found (udhcpc, ping; or set DSTACK_TEST_BUSYBOX)");
        return None;
    };
    Some((dnsmasq, busybox))
}

#[test]
fn bridge_mode_taps_dhcp_and_isolation() {
    let Some((dnsmasq, busybox)) = prerequisites() else {
        return;
    };
    let pid = std::process::id();
    let mut spaces = Netns(Vec::new());
    let host = spaces.add(format!("dvh{pid}"));
    let guests = [spaces.add(format!("dva{pid}")), spaces.add(format!("dvb{pid}"))];
    let outside = spaces.add(format!("dvo{pid}"));
    // The host's "uplink": a veth to a namespace with no route back to the VM subnet, so only masqueraded
    // traffic gets answers.
    run(&[
        "ip", "-n", &host, "link", "add", "uplink0", "type", "veth", "peer", "name", "wan0", "netns", &outside,
    ])
    .unwrap();
    for (ns, dev, addr) in [
        (&host, "uplink0", "192.168.99.1/24"),
        (&outside, "wan0", "192.168.99.2/24"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]).unwrap();
        run(&["ip", "-n", ns, "link", "set", dev, "up"]).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dnsmasq, true);

    // Everything that creates links or processes runs on this thread, inside the host namespace (threads
    // and children inherit it; the runtime is current-thread, so blocking work stays here too).
    let host2 = host.clone();
    let result = std::thread::spawn(move || {
        enter(&host2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mgr = Manager::open(cfg, Box::new(fake::FakeBackend)).unwrap();
        // Port mappings are a user-networking feature.
        let mut with_ports = vm("p", "bridge");
        with_ports.ports = vec![PortMapping {
            protocol: "tcp".into(),
            host_port: 8080,
            vm_port: 80,
            host_address: String::new(),
        }];
        let e = mgr.create(with_ports).unwrap_err().to_string();
        assert!(e.contains("only available with user networking"), "{e}");
        let ids = [mgr.create(vm("a", "bridge")).unwrap(), mgr.create(vm("b", "")).unwrap()];
        (mgr, ids, rt)
    })
    .join();
    let (mgr, ids, rt) = result.expect("manager setup in the namespace");
    let _guard = rt.enter();
    let snaps: Vec<_> = ids.iter().map(|id| mgr.snapshot(id).unwrap()).collect();
    let taps: Vec<String> = snaps.iter().map(|s| format!("dstap{}", s.manifest.cid)).collect();

    // The bridge with its address, the taps as isolated ports of it, and dnsmasq serving the bridge.
    let br = run(&["ip", "-n", &host, "addr", "show", "dev", "dtbr0"]).unwrap();
    assert!(br.contains("10.77.0.1/24"), "{br}");
    for tap in &taps {
        let link = run(&["ip", "-n", &host, "-d", "link", "show", "dev", tap]).unwrap();
        assert!(link.contains("master dtbr0"), "{link}");
        assert!(link.contains("isolated on"), "{link}");
        assert!(link.contains("tap"), "{link}");
    }
    let leases_file = dir.path().join("run/.bridge/dtbr0/dnsmasq.leases");
    let dnsmasq_pid: i32 = std::fs::read_to_string(dir.path().join("run/.bridge/dtbr0/dnsmasq.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{dnsmasq_pid}")).exists());

    // Guest ends: a tap per guest namespace with the VM's MAC, pumped to the VM's tap.
    let stop = Arc::new(AtomicBool::new(false));
    let mut pumps = Vec::new();
    for ((ns, tap), snap) in guests.iter().zip(&taps).zip(&snaps) {
        let (ns2, tap2, host2) = (ns.clone(), tap.clone(), host.clone());
        let vm_tap = std::thread::spawn(move || {
            enter(&host2);
            TapBackend::open(&tap2, None).unwrap()
        })
        .join()
        .unwrap();
        let guest_tap = std::thread::spawn(move || {
            enter(&ns2);
            TapBackend::open("gtap", None).unwrap()
        })
        .join()
        .unwrap();
        let mac = interface_mac(&mgr, &snap.manifest.id);
        run(&["ip", "-n", ns, "link", "set", "dev", "gtap", "address", &mac]).unwrap();
        pumps.push(pump(vm_tap, guest_tap, stop.clone()));
    }

    // DHCP through tap + bridge + the manager's dnsmasq; the lease file records the VM's MAC.
    let mut addrs = Vec::new();
    for (ns, snap) in guests.iter().zip(&snaps) {
        let ip = dhcp(&busybox, ns, "gtap").unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.path().join("run/.bridge/dtbr0/dnsmasq.log")).unwrap_or_default();
            panic!("{e}\ndnsmasq log:\n{log}")
        });
        let octets: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
        assert_eq!(&octets[..3], [10, 77, 0], "{ip}");
        assert!((100..=150).contains(&octets[3]), "{ip} outside the configured range");
        let mac = interface_mac(&mgr, &snap.manifest.id);
        let leases = std::fs::read_to_string(&leases_file).unwrap();
        assert!(leases.contains(&format!("{mac} {ip}")), "{leases}");
        run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "gtap"]).unwrap();
        addrs.push(ip);
    }
    assert_ne!(addrs[0], addrs[1]);
    let bb = busybox.display().to_string();
    let ping = |ns: &str, to: &str| run(&["ip", "netns", "exec", ns, &bb, "ping", "-c", "1", "-W", "2", to]);
    // The host (gateway) is reachable, the other VM is not: the ports are isolated.
    ping(&guests[0], "10.77.0.1").unwrap();
    ping(&guests[1], "10.77.0.1").unwrap();
    assert!(
        ping(&guests[0], &addrs[1]).is_err(),
        "VM a reached VM b across isolated ports"
    );
    // NAT: the manager's nftables table masquerades the subnet out of the host.
    let table = run(&[
        "ip",
        "netns",
        "exec",
        &host,
        "nft",
        "list",
        "table",
        "ip",
        "dstack_dtbr0",
    ])
    .unwrap();
    assert!(table.contains("masquerade"), "{table}");
    run(&["ip", "-n", &guests[0], "route", "add", "default", "via", "10.77.0.1"]).unwrap();
    ping(&guests[0], "192.168.99.2").unwrap();

    stop.store(true, Ordering::SeqCst);
    for p in pumps {
        p.join().unwrap();
    }
    // Stopping a VM deletes its tap; dropping the manager stops dnsmasq.
    let host2 = host.clone();
    let ids2 = ids.clone();
    let mgr2 = mgr.clone();
    std::thread::spawn(move || {
        enter(&host2);
        for id in &ids2 {
            mgr2.remove(id).unwrap();
        }
    })
    .join()
    .unwrap();
    for tap in &taps {
        assert!(
            run(&["ip", "-n", &host, "link", "show", "dev", tap]).is_err(),
            "{tap} left behind"
        );
    }
    // Dropped inside the namespace: the NAT table is removed with `nft` in the dropping thread's namespace.
    let host2 = host.clone();
    std::thread::spawn(move || {
        enter(&host2);
        drop(mgr);
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        run(&[
            "ip",
            "netns",
            "exec",
            &host,
            "nft",
            "list",
            "table",
            "ip",
            "dstack_dtbr0"
        ])
        .is_err(),
        "NAT table left behind"
    );
    assert!(
        !Path::new(&format!("/proc/{dnsmasq_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{dnsmasq_pid}/stat")).is_ok_and(|s| s.contains(") Z ")),
        "dnsmasq still running after the manager is gone"
    );
}

/// The MAC the manager reports for a VM's interface (the one DHCP sees).
fn interface_mac(_mgr: &Arc<Manager>, id: &str) -> String {
    use sha2::Digest;
    // Independent of the manager's helper: the documented derivation (02 + first 5 bytes of SHA-256(id)).
    let h = sha2::Sha256::digest(id.as_bytes());
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3], h[4])
}

const OK: u8 = 0x50;
const GUEST_IP: [u8; 4] = [10, 77, 0, 50];
const BRIDGE_IP: [u8; 4] = [10, 77, 0, 1];

/// A payload that sends "who has 10.77.0.1? tell 10.77.0.50" and prints the ARP reply it receives.
fn arp_payload(dir: &Path) -> PathBuf {
    use common::net_guest::*;
    use common::virtio_guest::Fails;
    use common::*;
    let mut a = asm();
    let mut f = Fails::default();
    setup(&mut a, &mut f);
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
    a.mov(dword_ptr(rdi + 38), u32::from_le_bytes(BRIDGE_IP)).unwrap();
    send(&mut a, &mut f, 42, 0x10);
    let mut found = a.create_label();
    for k in 0..6u8 {
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
    write_elf(dir, &assemble(a))
}

#[test]
fn kvm_payload_arps_the_bridge() {
    let Some((dnsmasq, _busybox)) = prerequisites() else {
        return;
    };
    let pid = std::process::id();
    let mut spaces = Netns(Vec::new());
    let host = spaces.add(format!("dvk{pid}"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dnsmasq, false);
    let (host2, dir2) = (host.clone(), dir.path().to_owned());
    let outcome = std::thread::spawn(move || {
        enter(&host2);
        let hv = common::kvm_or_skip("kvm_payload_arps_the_bridge")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let mgr = Manager::open(cfg, Box::new(fake::FakeBackend)).unwrap();
        let id = mgr.create(vm("k", "bridge")).unwrap();
        let tap = format!("dstap{}", mgr.snapshot(&id).unwrap().manifest.cid);
        let mac = interface_mac(&mgr, &id);
        let mut mac_bytes = [0u8; 6];
        for (b, h) in mac_bytes.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(h, 16).unwrap();
        }
        let mut vm_cfg = common::config(arp_payload(&dir2));
        vm_cfg.devices.net = Some(NetConfig {
            mac: mac_bytes,
            mtu: None,
            backend: NetBackendConfig::Tap {
                ifname: tap,
                bridge: None,
            },
        });
        let booted = common::boot_config(&hv, &dir2, &vm_cfg);
        mgr.remove(&id).unwrap();
        Some((booted, mac_bytes))
    })
    .join()
    .unwrap();
    let Some((b, mac)) = outcome else { return };
    assert!(
        matches!(b.report.exit, dstack_host_vmm::VmExit::DebugExit(v) if v == u32::from(OK)),
        "exit: {:?}\nserial: {:?}",
        b.report.exit,
        String::from_utf8_lossy(&b.serial)
    );
    // The manager gives its bridge a fixed MAC, which stays when the last port goes.
    let link = run(&["ip", "-n", &host, "link", "show", "dev", "dtbr0"]).unwrap();
    let bridge_mac: Vec<u8> = link
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let eth = &b.serial[12..];
    assert_eq!(&eth[..6], &mac, "addressed to the VM's MAC");
    assert_eq!(&eth[12..14], &[0x08, 0x06], "ARP");
    assert_eq!(&eth[14..22], &[0, 1, 8, 0, 6, 4, 0, 2], "Ethernet/IPv4 reply");
    assert_eq!(&eth[22..28], &bridge_mac[..], "the host bridge answered");
    assert_eq!(&eth[28..32], &BRIDGE_IP);
    assert_eq!(&eth[32..38], &mac);
    assert_eq!(&eth[38..42], &GUEST_IP);
}
