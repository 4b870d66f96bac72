//! `SysInfo` and `NetworkInfo` from the guest's own files under a root (`/` in a CVM; a fixture tree in
//! tests): `/etc/os-release`, `/proc/{sys/kernel/osrelease,cpuinfo,meminfo,loadavg,uptime,mounts,net/dev,
//! net/route}`, `/etc/resolv.conf`. Missing files give empty fields, never errors; malformed lines are skipped.

use std::net::Ipv4Addr;
use std::path::Path;

use dstack_rpc::guest_api::{DiskInfo, Gateway, Interface, IpAddress, NetworkInformation, SystemInfo};

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap_or_default()
}

/// `NAME` and `VERSION` (falling back to `VERSION_ID`) of an os-release file.
pub fn os_release(text: &str) -> (String, String) {
    let mut name = String::new();
    let mut version = String::new();
    let mut version_id = String::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim() {
            "NAME" => name = v,
            "VERSION" => version = v,
            "VERSION_ID" => version_id = v,
            _ => {}
        }
    }
    if version.is_empty() {
        version = version_id;
    }
    (name, version)
}

/// `/proc/meminfo` values in bytes, by field name (`MemTotal`, …).
pub fn meminfo(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, rest) = l.split_once(':')?;
            if k.trim() != field {
                return None;
            }
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
        .unwrap_or(0)
}

/// The three load averages in hundredths (`1.25` → 125).
pub fn loadavg(text: &str) -> [u32; 3] {
    let mut out = [0u32; 3];
    for (o, f) in out.iter_mut().zip(text.split_whitespace()) {
        *o = f
            .parse::<f64>()
            .map(|v| (v * 100.0).round().clamp(0.0, u32::MAX as f64) as u32)
            .unwrap_or(0);
    }
    out
}

/// `SystemInfo` from the files under `root`, with disk usage of the block-device mounts.
pub fn system_info(root: &Path) -> SystemInfo {
    let (os_name, os_version) = os_release(&read(root, "etc/os-release"));
    let cpuinfo = read(root, "proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let num_cpus = cpuinfo
        .lines()
        .filter(|l| l.split_once(':').is_some_and(|(k, _)| k.trim() == "processor"))
        .count() as u32;
    let mem = read(root, "proc/meminfo");
    let total_memory = meminfo(&mem, "MemTotal");
    let available_memory = meminfo(&mem, "MemAvailable");
    let free_memory = meminfo(&mem, "MemFree");
    let total_swap = meminfo(&mem, "SwapTotal");
    let free_swap = meminfo(&mem, "SwapFree");
    let [one, five, fifteen] = loadavg(&read(root, "proc/loadavg"));
    let uptime = read(root, "proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |s| s as u64);
    SystemInfo {
        os_name,
        os_version,
        kernel_version: read(root, "proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_model,
        num_cpus,
        total_memory,
        available_memory,
        used_memory: total_memory.saturating_sub(available_memory),
        free_memory,
        total_swap,
        used_swap: total_swap.saturating_sub(free_swap),
        free_swap,
        uptime,
        loadavg_one: one,
        loadavg_five: five,
        loadavg_fifteen: fifteen,
        disks: disks(root, &read(root, "proc/mounts")),
    }
}

/// Mounts of block devices (`/dev/...`), each device once, with `statvfs` sizes of the mount point (under
/// `root`).
fn disks(root: &Path, mounts: &str) -> Vec<DiskInfo> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(mount)) = (f.next(), f.next()) else {
            continue;
        };
        if !dev.starts_with("/dev/") || !seen.insert(dev.to_owned()) {
            continue;
        }
        // /proc/mounts escapes spaces as \040.
        let mount = mount.replace("\\040", " ");
        let (total_size, free_size) = statvfs(&root.join(mount.trim_start_matches('/'))).unwrap_or((0, 0));
        out.push(DiskInfo {
            name: dev.trim_start_matches("/dev/").to_owned(),
            mount_point: mount,
            total_size,
            free_size,
        });
    }
    out
}

/// (total, available) bytes of the filesystem at `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; all-zero is valid and the kernel fills it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a live statvfs buffer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

/// Interface counters from `/proc/net/dev` (name, rx bytes, rx errors, tx bytes, tx errors).
pub fn net_dev(text: &str) -> Vec<Interface> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            // Receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes packets errs …
            if v.len() < 16 {
                return None;
            }
            Some(Interface {
                name: name.trim().to_owned(),
                addresses: Vec::new(),
                rx_bytes: v[0],
                rx_errors: v[2],
                tx_bytes: v[8],
                tx_errors: v[10],
            })
        })
        .collect()
}

/// Default-route gateways from `/proc/net/route` (destination 0; addresses are little-endian hex).
pub fn default_gateways(text: &str) -> Vec<Gateway> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, gw) = (f.get(1)?, f.get(2)?);
            if *dest != "00000000" {
                return None;
            }
            let v = u32::from_str_radix(gw, 16).ok()?;
            Some(Gateway {
                address: Ipv4Addr::from(v.to_le_bytes()).to_string(),
            })
        })
        .collect()
}

/// `nameserver` lines of resolv.conf.
pub fn dns_servers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "nameserver").then(|| f.next().map(str::to_owned))?
        })
        .collect()
}

/// IPv4/IPv6 addresses of this network namespace's interfaces (`getifaddrs`), by interface name.
fn addresses() -> Vec<(String, IpAddress)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says how to read it.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let (addr, prefix) = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses (and netmasks) are sockaddr_in.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: as above, the netmask of an AF_INET address is a sockaddr_in.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                    u32::from_be(m.sin_addr.s_addr).count_ones()
                };
                (ip.to_string(), prefix)
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses (and netmasks) are sockaddr_in6.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: as above.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                    m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum()
                };
                (ip.to_string(), prefix)
            }
            _ => continue,
        };
        out.push((name, IpAddress { address: addr, prefix }));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// `NetworkInformation`: counters from `root`'s `/proc/net/dev`, addresses of this namespace, default
/// gateways, DNS servers; `wg_info` is the WireGuard interface list (names only) when one exists.
pub fn network_info(root: &Path) -> NetworkInformation {
    let mut interfaces = net_dev(&read(root, "proc/net/dev"));
    for (name, addr) in addresses() {
        if let Some(i) = interfaces.iter_mut().find(|i| i.name == name) {
            i.addresses.push(addr);
        }
    }
    let wg: Vec<&str> = interfaces
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| root.join("sys/class/net").join(n).join("wireguard").exists() || n.starts_with("wg"))
        .collect();
    NetworkInformation {
        dns_servers: dns_servers(&read(root, "etc/resolv.conf")),
        gateways: default_gateways(&read(root, "proc/net/route")),
        wg_info: wg.join("\n"),
        interfaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(
            os_release("PRETTY_NAME=\"x\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\n"),
            ("Debian GNU/Linux".into(), "13".into())
        );
        let mem = "MemTotal:        2048000 kB\nMemFree:          100 kB\nMemAvailable:    1024000 kB\n";
        assert_eq!(meminfo(mem, "MemTotal"), 2048000 * 1024);
        assert_eq!(meminfo(mem, "SwapTotal"), 0);
        assert_eq!(loadavg("0.25 1.50 10.00 1/100 42\n"), [25, 150, 1000]);
        // /proc/net/route stores addresses little-endian: 0102000A = 10.0.2.1.
        let route = "Iface\tDestination\tGateway \tFlags\n\
                     eth0\t00000000\t0102000A\t0003\neth0\t0002000A\t00000000\t0001\n";
        assert_eq!(
            default_gateways(route),
            [Gateway {
                address: "10.0.2.1".into()
            }]
        );
        assert_eq!(
            dns_servers("# c\nnameserver 10.0.2.3\nsearch x\nnameserver ::1\n"),
            ["10.0.2.3", "::1"]
        );
        let dev = "Inter-|   Receive   |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|\
                   bytes packets errs drop fifo colls carrier compressed\n\
                   eth0: 1000 10 1 0 0 0 0 0 2000 20 2 0 0 0 0 0\n  lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n";
        let i = net_dev(dev);
        assert_eq!(i.len(), 2);
        assert_eq!(
            (
                i[0].name.as_str(),
                i[0].rx_bytes,
                i[0].rx_errors,
                i[0].tx_bytes,
                i[0].tx_errors
            ),
            ("eth0", 1000, 1, 2000, 2)
        );
    }

    #[test]
    fn system_info_from_a_fixture_tree() {
        let root = tempfile::tempdir().unwrap();
        let w = |p: &str, t: &str| {
            let path = root.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, t).unwrap();
        };
        w("etc/os-release", "NAME=\"Debian GNU/Linux\"\nVERSION=\"13 (trixie)\"\n");
        w("proc/sys/kernel/osrelease", "6.12.0-1-amd64\n");
        w(
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: QEMU CPU\n\nprocessor\t: 1\nmodel name\t: QEMU CPU\n",
        );
        w(
            "proc/meminfo",
            "MemTotal: 1000 kB\nMemFree: 200 kB\nMemAvailable: 600 kB\nSwapTotal: 100 kB\nSwapFree: 40 kB\n",
        );
        w("proc/loadavg", "0.50 0.25 0.10 1/80 99\n");
        w("proc/uptime", "123.45 200.00\n");
        w(
            "proc/mounts",
            "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\n/dev/vda /again ext4 rw 0 0\n",
        );
        let s = system_info(root.path());
        assert_eq!(
            (s.os_name.as_str(), s.os_version.as_str()),
            ("Debian GNU/Linux", "13 (trixie)")
        );
        assert_eq!(
            (s.kernel_version.as_str(), s.cpu_model.as_str(), s.num_cpus),
            ("6.12.0-1-amd64", "QEMU CPU", 2)
        );
        assert_eq!(
            (s.total_memory, s.available_memory, s.used_memory),
            (1_024_000, 614_400, 409_600)
        );
        assert_eq!((s.total_swap, s.used_swap, s.free_swap), (102_400, 61_440, 40_960));
        assert_eq!(
            (s.uptime, s.loadavg_one, s.loadavg_five, s.loadavg_fifteen),
            (123, 50, 25, 10)
        );
        assert_eq!(s.disks.len(), 1, "each device once, no pseudo filesystems");
        assert_eq!(
            (s.disks[0].name.as_str(), s.disks[0].mount_point.as_str()),
            ("vda", "/")
        );
        assert!(s.disks[0].total_size > 0, "statvfs of the fixture root");
    }

    #[test]
    fn live_network_info_has_loopback() {
        // The real /proc of this namespace: loopback is always listed, with 127.0.0.1 when it is up.
        let n = network_info(Path::new("/"));
        let lo = n
            .interfaces
            .iter()
            .find(|i| i.name == "lo")
            .expect("lo in /proc/net/dev");
        if !lo.addresses.is_empty() {
            assert!(
                lo.addresses.iter().any(|a| a.address == "127.0.0.1" && a.prefix == 8),
                "{lo:?}"
            );
        }
    }
}
