//! Guest networking without external programs: loopback, the first Ethernet interface via DHCPv4 (raw
//! `AF_PACKET` socket until the address is set), addresses and routes via rtnetlink, and
//! `/etc/resolv.conf`. The host network (QEMU slirp, passt) is untrusted: DHCP replies are parsed
//! strictly and only change this guest's own addressing; everything that matters for security runs over
//! RA-TLS on top.
//!
//! The lease is installed without a kernel lifetime and is not renewed: slirp leases for 24 h and passt
//! for ever, and both hand out the same address again. A renewal loop belongs here if a real DHCP server
//! with short leases ever sits in front of the CVM.

pub mod client;
pub mod dhcp;
pub mod netlink;
pub mod packet;
pub mod rawsock;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client::{ClientError, ClientParams, Lease};
use netlink::{Link, Netlink, NetlinkError};

/// `ARPHRD_ETHER` / `ARPHRD_LOOPBACK` (`<linux/if_arp.h>`).
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
/// glibc reads at most this many `nameserver` lines.
const MAX_NAMESERVERS: usize = 3;

/// Errors configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] NetlinkError),
    #[error("no Ethernet interface appeared within {waited:?} (links seen: {seen})")]
    NoInterface { waited: Duration, seen: String },
    #[error("interface {0:?} not found or not Ethernet")]
    InterfaceNotFound(String),
    #[error("{iface}: opening the DHCP packet socket: {source}")]
    Socket {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{iface}: {source}")]
    Dhcp {
        iface: String,
        #[source]
        source: ClientError,
    },
    #[error("{iface}: applying the lease ({step}): {source}")]
    Apply {
        iface: String,
        step: &'static str,
        #[source]
        source: NetlinkError,
    },
    #[error("writing {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetReport {
    pub interface: String,
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub mtu: Option<u16>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    pub elapsed: Duration,
}

/// Options for [`configure_with`].
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Root under which `etc/resolv.conf` is written.
    pub root: PathBuf,
    /// Overall budget: waiting for the NIC, the link and the DHCP exchange.
    pub timeout: Duration,
    /// A specific interface; default: the Ethernet interface with the lowest index.
    pub interface: Option<String>,
    /// How long to wait for the interface to appear (within `timeout`). virtio-net probes synchronously
    /// when its module loads, so a short wait suffices and a VM without a NIC fails fast.
    pub nic_wait: Duration,
}

/// Default [`NetOptions::nic_wait`].
pub const DEFAULT_NIC_WAIT: Duration = Duration::from_secs(5);

/// Configures loopback and the first Ethernet interface by DHCP, writing `<root>/etc/resolv.conf`.
pub fn configure(root: &Path, timeout: Duration) -> Result<NetReport, NetError> {
    configure_with(&NetOptions {
        root: root.to_owned(),
        timeout,
        interface: None,
        nic_wait: DEFAULT_NIC_WAIT,
    })
}

/// Interfaces DHCP should consider: Ethernet, and not one of the virtual kinds our own stack creates.
pub fn is_candidate(link: &Link) -> bool {
    const SKIP: [&str; 4] = ["lo", "docker", "veth", "wg"];
    link.hw_type == ARPHRD_ETHER && !SKIP.iter().any(|p| link.name.starts_with(p))
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Brings `lo` up with 127.0.0.1/8.
pub fn loopback_up(nl: &mut Netlink) -> Result<(), NetError> {
    let links = nl.links()?;
    let lo = links
        .iter()
        .find(|l| l.hw_type == ARPHRD_LOOPBACK || l.name == "lo")
        .ok_or_else(|| NetError::InterfaceNotFound("lo".into()))?;
    nl.set_link_up(lo.index, None)
        .map_err(|source| apply_err("lo", "link up", source))?;
    nl.add_address(lo.index, Ipv4Addr::LOCALHOST, 8, None)
        .map_err(|source| apply_err("lo", "127.0.0.1/8", source))?;
    Ok(())
}

fn apply_err(iface: &str, step: &'static str, source: NetlinkError) -> NetError {
    NetError::Apply {
        iface: iface.to_owned(),
        step,
        source,
    }
}

/// Waits (virtio_net may still be probing after its module loaded) for the interface to use.
fn wait_for_interface(nl: &mut Netlink, want: Option<&str>, deadline: Instant) -> Result<Link, NetError> {
    let started = Instant::now();
    loop {
        let links = nl.links()?;
        let found = match want {
            Some(name) => links.iter().find(|l| l.name == name && l.hw_type == ARPHRD_ETHER),
            None => links.iter().filter(|l| is_candidate(l)).min_by_key(|l| l.index),
        };
        if let Some(l) = found {
            return Ok(l.clone());
        }
        if Instant::now() >= deadline {
            return Err(match want {
                Some(name) => NetError::InterfaceNotFound(name.to_owned()),
                None => NetError::NoInterface {
                    waited: started.elapsed(),
                    seen: links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "),
                },
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits briefly for the link to be operational so the first DISCOVER is not dropped (DHCP retransmits
/// anyway, but only after a second). `IFF_RUNNING`, not `IFF_LOWER_UP`: carrier is reported at once, but
/// the kernel's link watcher sets the operational state and activates the transmit queue up to a second
/// later, and until then packets are silently discarded.
fn wait_for_carrier(nl: &mut Netlink, index: u32, deadline: Instant) -> Result<(), NetError> {
    let until = deadline.min(Instant::now() + Duration::from_secs(3));
    while Instant::now() < until {
        if nl
            .links()?
            .iter()
            .any(|l| l.index == index && l.flags & libc::IFF_RUNNING as u32 != 0)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Installs the lease: MTU, address, then the default route (with an on-link host route to the gateway
/// when the gateway lies outside the subnet, as with /32 leases).
pub fn apply_lease(nl: &mut Netlink, link: &Link, lease: &Lease) -> Result<(), NetError> {
    let name = link.name.as_str();
    if let Some(mtu) = lease.mtu
        && link.mtu != Some(u32::from(mtu))
    {
        nl.set_link_up(link.index, Some(u32::from(mtu)))
            .map_err(|e| apply_err(name, "MTU", e))?;
    }
    let broadcast = lease.broadcast.or_else(|| {
        (lease.prefix_len < 31).then(|| {
            let host_bits = u32::MAX.checked_shr(u32::from(lease.prefix_len)).unwrap_or(0);
            Ipv4Addr::from(u32::from(lease.address) | host_bits)
        })
    });
    nl.add_address(link.index, lease.address, lease.prefix_len, broadcast)
        .map_err(|e| apply_err(name, "address", e))?;
    if let Some(gw) = lease.gateway {
        if !same_subnet(gw, lease.address, lease.prefix_len) {
            nl.add_route(gw, 32, None, link.index, Some(lease.address))
                .map_err(|e| apply_err(name, "on-link route to the gateway", e))?;
        }
        nl.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(gw), link.index, Some(lease.address))
            .map_err(|e| apply_err(name, "default route", e))?;
    }
    Ok(())
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

/// The resolv.conf text for a lease (names were validated by the DHCP decoder: no spaces or newlines).
pub fn resolv_conf(iface: &str, lease: &Lease) -> String {
    let mut s = format!(
        "# Written by guest-init from the DHCP lease on {iface} (server {}).\n",
        lease.server_id
    );
    if let Some(d) = &lease.domain {
        s.push_str(&format!("search {d}\n"));
    }
    for ns in lease.dns.iter().take(MAX_NAMESERVERS) {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s
}

/// Atomically replaces `<root>/etc/resolv.conf`. When that is a symlink (a read-only root usually points
/// it into /run), the link's target is replaced instead, resolved under `root` (one level).
pub fn write_resolv_conf(root: &Path, text: &str) -> Result<PathBuf, NetError> {
    let etc = root.join("etc");
    let mut path = etc.join("resolv.conf");
    if let Ok(target) = std::fs::read_link(&path) {
        path = match target.strip_prefix("/") {
            Ok(rel) => root.join(rel),
            Err(_) => etc.join(target),
        };
    }
    let err = |source| NetError::ResolvConf {
        path: path.clone(),
        source,
    };
    let dir = path.parent().unwrap_or(&etc).to_owned();
    let tmp = dir.join(".resolv.conf.guest-init");
    std::fs::create_dir_all(&dir).map_err(err)?;
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

/// [`configure`] with all options.
pub fn configure_with(opts: &NetOptions) -> Result<NetReport, NetError> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut nl = Netlink::open()?;
    loopback_up(&mut nl)?;
    let nic_deadline = deadline.min(started + opts.nic_wait);
    let link = wait_for_interface(&mut nl, opts.interface.as_deref(), nic_deadline)?;
    let name = link.name.clone();
    let mac = link
        .mac
        .ok_or_else(|| NetError::InterfaceNotFound(format!("{name} (no MAC address)")))?;
    nl.set_link_up(link.index, None)
        .map_err(|e| apply_err(&name, "link up", e))?;
    wait_for_carrier(&mut nl, link.index, deadline)?;
    tracing::info!("net: DHCP on {name} ({})", mac_string(&mac));
    let mut sock = rawsock::RawDhcpSocket::open(link.index).map_err(|source| NetError::Socket {
        iface: name.clone(),
        source,
    })?;
    let params = ClientParams {
        mac,
        mtu: link.mtu.unwrap_or(1500),
        deadline,
    };
    let lease = client::acquire(&mut sock, &params).map_err(|source| NetError::Dhcp {
        iface: name.clone(),
        source,
    })?;
    drop(sock);
    apply_lease(&mut nl, &link, &lease)?;
    if !lease.dns.is_empty() {
        write_resolv_conf(&opts.root, &resolv_conf(&name, &lease))?;
    }
    let report = NetReport {
        interface: name,
        mac: mac_string(&mac),
        address: lease.address,
        prefix_len: lease.prefix_len,
        gateway: lease.gateway,
        dns: lease.dns.clone(),
        domain: lease.domain.clone(),
        hostname: lease.hostname.clone(),
        mtu: lease.mtu,
        server: lease.server_id,
        lease_secs: lease.lease_secs,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        "net: {} {}/{} gw {:?} dns {:?} in {:?}",
        report.interface,
        report.address,
        report.prefix_len,
        report.gateway,
        report.dns,
        report.elapsed
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: vec![
                Ipv4Addr::new(10, 0, 2, 3),
                Ipv4Addr::new(1, 1, 1, 1),
                Ipv4Addr::new(8, 8, 8, 8),
                Ipv4Addr::new(9, 9, 9, 9),
            ],
            domain: Some("example.internal".into()),
            hostname: None,
            mtu: None,
            broadcast: None,
            server_id: Ipv4Addr::new(10, 0, 2, 2),
            lease_secs: 86400,
            renewal_secs: 43200,
            rebinding_secs: 75600,
        }
    }

    #[test]
    fn resolv_conf_lists_at_most_three_servers() {
        let text = resolv_conf("eth0", &lease());
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[1..],
            [
                "search example.internal",
                "nameserver 10.0.2.3",
                "nameserver 1.1.1.1",
                "nameserver 8.8.8.8"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let p = write_resolv_conf(dir.path(), &text).unwrap();
        assert_eq!(std::fs::read_to_string(p).unwrap(), text);
    }

    #[test]
    fn resolv_conf_symlink_target_is_replaced() {
        for target in ["../run/resolv.conf", "/run/resolv.conf"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("etc")).unwrap();
            let link = dir.path().join("etc/resolv.conf");
            std::os::unix::fs::symlink(target, &link).unwrap();
            let p = write_resolv_conf(dir.path(), "nameserver 10.0.2.3\n").unwrap();
            assert_eq!(std::fs::read_to_string(&p).unwrap(), "nameserver 10.0.2.3\n");
            assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
            let via_root = std::fs::read_to_string(dir.path().join("run/resolv.conf")).unwrap();
            assert_eq!(via_root, "nameserver 10.0.2.3\n");
        }
    }

    #[test]
    fn subnet_and_candidate_rules() {
        assert!(same_subnet(Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 2, 15), 24));
        assert!(!same_subnet(
            Ipv4Addr::new(10, 0, 3, 2),
            Ipv4Addr::new(10, 0, 2, 15),
            24
        ));
        assert!(!same_subnet(
            Ipv4Addr::new(10, 0, 2, 1),
            Ipv4Addr::new(10, 0, 2, 15),
            32
        ));
        let link = |name: &str, hw_type| Link {
            index: 2,
            name: name.into(),
            hw_type,
            flags: 0,
            mac: None,
            mtu: None,
        };
        assert!(is_candidate(&link("eth0", 1)));
        assert!(is_candidate(&link("enp0s3", 1)));
        for skip in ["lo", "docker0", "veth12ab", "wg0"] {
            assert!(!is_candidate(&link(skip, 1)), "{skip}");
        }
        assert!(!is_candidate(&link("sit0", 776)));
        assert_eq!(mac_string(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]), "52:54:00:12:34:56");
    }
}
