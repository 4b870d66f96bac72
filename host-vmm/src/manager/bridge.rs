//! Bridge networking (`[cvm.networking.bridge]`): the manager creates and owns a Linux bridge on a configured
//! subnet, gives every bridge-mode VM a persistent tap attached to it (`dstap<cid>`, created before the VM
//! process starts and deleted after it ends), and runs dnsmasq bound to the bridge as the subnet's DHCP server
//! (leases in `<run_path>/.bridge/<name>/`). VMs are isolated from each other unless configured otherwise
//! (bridge ports `isolated on`: isolated ports only reach non-isolated ones, i.e. the host), and traffic from
//! the subnet is optionally masqueraded out of the host (nftables).
//!
//! Both backends use the same tap: `kvm` through our virtio-net tap backend (`--net tap:<ifname>`), `tcg`
//! through QEMU's `-netdev tap,ifname=…,script=no,downscript=no`.
//!
//! Links are configured with iproute2 (`ip`), so every failure carries the tool's own message; creating
//! links needs root (CAP_NET_ADMIN), which the errors say.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use super::config::BridgeConfig;
use super::supervisor::{Limits, ProcSpec, Process};

/// Errors setting up the bridge or a VM's tap.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("[cvm.networking.bridge] {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("bridge networking: `{command}` failed: {reason}{hint}")]
    Command {
        command: String,
        reason: String,
        hint: &'static str,
    },
    #[error("bridge networking: starting dnsmasq: {0}")]
    Dnsmasq(String),
    #[error("bridge networking: {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

const ROOT_HINT: &str = " (bridge networking needs root or CAP_NET_ADMIN)";

fn config_err(field: &'static str, reason: impl Into<String>) -> BridgeError {
    BridgeError::Config {
        field,
        reason: reason.into(),
    }
}

/// The checked form of a [`BridgeConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePlan {
    pub name: String,
    /// The host's address on the bridge (the VMs' gateway).
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub dhcp_start: Ipv4Addr,
    pub dhcp_end: Ipv4Addr,
    pub lease_secs: u32,
    pub isolate_vms: bool,
    pub nat: bool,
    pub nat_uplink: String,
    pub dnsmasq: PathBuf,
    pub ip: PathBuf,
    pub nft: PathBuf,
}

/// A Linux interface name: 1..=15 bytes of `[A-Za-z0-9_.-]` (stricter than the kernel, which also takes
/// other bytes; these names end up on command lines).
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl BridgePlan {
    pub fn from_config(c: &BridgeConfig) -> Result<Self, BridgeError> {
        if !valid_ifname(&c.name) {
            return Err(config_err(
                "name",
                format!("{:?} is not a valid interface name", c.name),
            ));
        }
        let (addr, prefix) = c
            .address
            .split_once('/')
            .ok_or_else(|| config_err("address", format!("{:?} is not a.b.c.d/len", c.address)))?;
        let address: Ipv4Addr = addr
            .parse()
            .map_err(|_| config_err("address", format!("{addr:?} is not an IPv4 address")))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=29).contains(p))
            .ok_or_else(|| config_err("address", format!("prefix length {prefix:?} must be 8..=29")))?;
        let mask = u32::MAX << (32 - u32::from(prefix));
        let network = u32::from(address) & mask;
        let broadcast = network | !mask;
        let host = |a: Ipv4Addr| {
            let v = u32::from(a);
            v & mask == network && v != network && v != broadcast
        };
        if !host(address) {
            return Err(config_err(
                "address",
                format!("{address} is the network or broadcast address of /{prefix}"),
            ));
        }
        let (dhcp_start, dhcp_end) = match &c.dhcp_range {
            Some([a, b]) => {
                let parse = |s: &str| {
                    s.parse::<Ipv4Addr>()
                        .map_err(|_| config_err("dhcp_range", format!("{s:?} is not an IPv4 address")))
                };
                (parse(a)?, parse(b)?)
            }
            None => {
                // .10 (or the first host after the gateway in small subnets) to the last host but one.
                let size = !mask;
                let start = if size > 20 { network + 10 } else { network + 2 };
                (Ipv4Addr::from(start), Ipv4Addr::from(broadcast - 1))
            }
        };
        if !host(dhcp_start) || !host(dhcp_end) || u32::from(dhcp_start) > u32::from(dhcp_end) {
            return Err(config_err(
                "dhcp_range",
                format!(
                    "{dhcp_start}..{dhcp_end} is not a range of host addresses in {}",
                    c.address
                ),
            ));
        }
        if (u32::from(dhcp_start)..=u32::from(dhcp_end)).contains(&u32::from(address)) {
            return Err(config_err(
                "dhcp_range",
                format!("{dhcp_start}..{dhcp_end} contains the bridge's own address {address}"),
            ));
        }
        if c.lease_secs < 120 {
            return Err(config_err("lease_secs", "must be ≥ 120 (dnsmasq's minimum)"));
        }
        if !c.nat_uplink.is_empty() && !valid_ifname(&c.nat_uplink) {
            return Err(config_err(
                "nat_uplink",
                format!("{:?} is not a valid interface name", c.nat_uplink),
            ));
        }
        Ok(BridgePlan {
            name: c.name.clone(),
            address,
            prefix,
            dhcp_start,
            dhcp_end,
            lease_secs: c.lease_secs,
            isolate_vms: c.isolate_vms,
            nat: c.nat,
            nat_uplink: c.nat_uplink.clone(),
            dnsmasq: c.dnsmasq_path.clone(),
            ip: c.ip_path.clone(),
            nft: c.nft_path.clone(),
        })
    }

    /// A locally administered MAC derived from the bridge name (`02:` + the first 5 bytes of its SHA-256).
    pub fn bridge_mac(&self) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("dstack-bridge:{}", self.name).as_bytes());
        format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3], h[4])
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }

    /// The subnet as `a.b.c.d/len`.
    pub fn subnet(&self) -> String {
        let net = u32::from(self.address) & u32::from(self.netmask());
        format!("{}/{}", Ipv4Addr::from(net), self.prefix)
    }

    /// dnsmasq as a DHCP-only server (DNS off: `--port=0`) on the bridge, in the foreground, with its
    /// leases, pid file and log in `dir`.
    pub fn dnsmasq_args(&self, dir: &Path) -> Vec<String> {
        vec![
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--port=0".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--interface={}", self.name),
            "--except-interface=lo".into(),
            format!(
                "--dhcp-range={},{},{},{}",
                self.dhcp_start,
                self.dhcp_end,
                self.netmask(),
                self.lease_secs
            ),
            format!("--dhcp-option=option:router,{}", self.address),
            "--dhcp-authoritative".into(),
            format!("--dhcp-leasefile={}", dir.join("dnsmasq.leases").display()),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            "--log-facility=-".into(),
            "--log-dhcp".into(),
        ]
    }

    /// The nftables table for NAT: masquerade the subnet's traffic leaving through another interface.
    pub fn nat_ruleset(&self) -> String {
        let table = self.nft_table();
        let out = if self.nat_uplink.is_empty() {
            format!("oifname != \"{}\"", self.name)
        } else {
            format!("oifname \"{}\"", self.nat_uplink)
        };
        format!(
            "table ip {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {subnet} ip daddr != {subnet} {out} masquerade\n  }}\n}}\n",
            subnet = self.subnet()
        )
    }

    /// `dstack_<bridge name>` with characters nft identifiers do not take replaced.
    pub fn nft_table(&self) -> String {
        let name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
            .collect();
        format!("dstack_{name}")
    }
}

/// The tap of the VM with guest CID `cid` (unique per manager; ≤ 15 bytes for any u32).
pub fn tap_name(cid: u32) -> String {
    format!("dstap{cid}")
}

/// A VM's port on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPort {
    pub ifname: String,
    pub bridge: String,
}

/// One line of the dnsmasq lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub hostname: String,
}

/// Parses dnsmasq's lease file (`<expiry> <mac> <ip> <hostname|*> <client-id|*>` per line); malformed lines
/// are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _expiry = f.next()?;
            let mac = f.next()?.to_ascii_lowercase();
            let ip = f.next()?.parse().ok()?;
            let hostname = f.next().filter(|h| *h != "*").unwrap_or_default().to_owned();
            Some(Lease { mac, ip, hostname })
        })
        .collect()
}

/// Runs a tool, mapping a failure to [`BridgeError::Command`] with its stderr.
fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, BridgeError> {
    use std::io::Write;
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let fail = |reason: String, hint| BridgeError::Command {
        command: command.clone(),
        reason,
        hint,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string(), ""))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| fail(e.to_string(), ""))?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().map_err(|e| fail(e.to_string(), ""))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let permission = stderr.contains("Operation not permitted") || stderr.contains("Permission denied");
        return Err(fail(
            if stderr.is_empty() {
                out.status.to_string()
            } else {
                stderr
            },
            if permission { ROOT_HINT } else { "" },
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The running bridge: configured links, optional NAT table and the dnsmasq process.
pub struct BridgeNet {
    plan: BridgePlan,
    dir: PathBuf,
    dnsmasq: Mutex<Option<Process>>,
}

impl BridgeNet {
    /// Creates (or reuses) the bridge, sets its address, brings it up, installs NAT if configured and
    /// (re)starts dnsmasq with state in `state_dir` (a dnsmasq left by an earlier daemon is replaced; the
    /// lease file is kept, so VMs keep their addresses).
    pub fn setup(cfg: &BridgeConfig, state_dir: &Path) -> Result<Self, BridgeError> {
        let plan = BridgePlan::from_config(cfg)?;
        let dir = state_dir.join(&plan.name);
        std::fs::create_dir_all(&dir).map_err(|source| BridgeError::Io {
            path: dir.clone(),
            source,
        })?;
        let ip = |args: &[&str]| run(&plan.ip, args, None);
        if ip(&["link", "show", "dev", &plan.name]).is_err() {
            // A fixed MAC: otherwise the bridge takes its ports' lowest one, which changes as VMs come and
            // go (and guests' ARP caches go stale).
            let mac = plan.bridge_mac();
            ip(&["link", "add", "name", &plan.name, "address", &mac, "type", "bridge"])?;
        }
        let cidr = format!("{}/{}", plan.address, plan.prefix);
        ip(&["addr", "replace", &cidr, "dev", &plan.name])?;
        ip(&["link", "set", "dev", &plan.name, "up"])?;
        if plan.nat {
            let _ = run(&plan.nft, &["delete", "table", "ip", &plan.nft_table()], None);
            run(&plan.nft, &["-f", "-"], Some(&plan.nat_ruleset()))?;
            std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").map_err(|source| BridgeError::Io {
                path: "/proc/sys/net/ipv4/ip_forward".into(),
                source,
            })?;
        }
        let net = BridgeNet {
            plan,
            dir,
            dnsmasq: Mutex::new(None),
        };
        net.stop_stale_dnsmasq();
        net.start_dnsmasq()?;
        info!(
            "bridge {} up at {}/{} (DHCP {}..{}, VMs {}, NAT {})",
            net.plan.name,
            net.plan.address,
            net.plan.prefix,
            net.plan.dhcp_start,
            net.plan.dhcp_end,
            if net.plan.isolate_vms { "isolated" } else { "connected" },
            if net.plan.nat { "on" } else { "off" }
        );
        Ok(net)
    }

    pub fn plan(&self) -> &BridgePlan {
        &self.plan
    }

    /// Where dnsmasq keeps its leases.
    pub fn lease_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.leases")
    }

    /// Current leases (empty if the file is not there yet).
    pub fn leases(&self) -> Vec<Lease> {
        std::fs::read_to_string(self.lease_file())
            .map(|t| parse_leases(&t))
            .unwrap_or_default()
    }

    /// A dnsmasq from an earlier daemon (pid file) holds the DHCP socket: stop it, if it is still dnsmasq.
    fn stop_stale_dnsmasq(&self) {
        let pid_file = self.dir.join("dnsmasq.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| *p > 1)
        else {
            return;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "dnsmasq" {
            // SAFETY: kill(2) with a pid read from our own pid file whose process is a dnsmasq.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..50 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(pid_file);
    }

    fn start_dnsmasq(&self) -> Result<(), BridgeError> {
        let log = self.dir.join("dnsmasq.log");
        let spec = ProcSpec {
            name: "dnsmasq".into(),
            program: self.plan.dnsmasq.clone(),
            args: self.plan.dnsmasq_args(&self.dir),
            cwd: self.dir.clone(),
            stdout: log.clone(),
            stderr: log.clone(),
            ready_path: Some(self.dir.join("dnsmasq.pid")),
        };
        let _ = std::fs::remove_file(self.dir.join("dnsmasq.pid"));
        let proc = Process::spawn(&spec, Limits { nofile: 1024 }).map_err(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail = tail.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
            BridgeError::Dnsmasq(format!("{e}; log {}: {tail}", log.display()))
        })?;
        *self.dnsmasq.lock().unwrap_or_else(|p| p.into_inner()) = Some(proc);
        Ok(())
    }

    /// Restarts dnsmasq if it died (called from the manager's monitor tick).
    pub fn check(&self) {
        let dead = {
            let mut g = self.dnsmasq.lock().unwrap_or_else(|p| p.into_inner());
            match g.as_mut().and_then(Process::poll_exit) {
                Some(exit) => {
                    warn!("bridge {}: dnsmasq exited ({exit}); restarting it", self.plan.name);
                    *g = None;
                    true
                }
                None => false,
            }
        };
        if dead && let Err(e) = self.start_dnsmasq() {
            warn!("{e}");
        }
    }

    /// Creates the persistent tap of the VM with CID `cid`, attached to the bridge (isolated if configured)
    /// and up. An old tap of that name (a crashed VM) is replaced.
    pub fn add_port(&self, cid: u32) -> Result<TapPort, BridgeError> {
        let ifname = tap_name(cid);
        let ip = |args: &[&str]| run(&self.plan.ip, args, None);
        let _ = ip(&["link", "del", "dev", &ifname]);
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() }.to_string();
        ip(&["tuntap", "add", "dev", &ifname, "mode", "tap", "vnet_hdr", "user", &uid])?;
        let rest = (|| {
            ip(&["link", "set", "dev", &ifname, "master", &self.plan.name])?;
            if self.plan.isolate_vms {
                ip(&["link", "set", "dev", &ifname, "type", "bridge_slave", "isolated", "on"])?;
            }
            ip(&["link", "set", "dev", &ifname, "up"])
        })();
        if let Err(e) = rest {
            let _ = ip(&["link", "del", "dev", &ifname]);
            return Err(e);
        }
        Ok(TapPort {
            ifname,
            bridge: self.plan.name.clone(),
        })
    }

    /// Deletes a VM's tap (gone already is fine).
    pub fn remove_port(&self, ifname: &str) {
        if !valid_ifname(ifname) {
            return;
        }
        if let Err(e) = run(&self.plan.ip, &["link", "del", "dev", ifname], None)
            && !e.to_string().contains("Cannot find device")
        {
            warn!("removing tap {ifname}: {e}");
        }
    }

    /// Stops dnsmasq and removes the NAT table; the bridge itself stays (taps of VMs left running for a
    /// re-adopting daemon stay attached).
    pub fn shutdown(&self) {
        if let Some(mut p) = self.dnsmasq.lock().unwrap_or_else(|p| p.into_inner()).take() {
            p.stop(Duration::from_secs(2));
        }
        if self.plan.nat {
            let _ = run(&self.plan.nft, &["delete", "table", "ip", &self.plan.nft_table()], None);
        }
    }
}

impl Drop for BridgeNet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(toml_text: &str) -> Result<BridgePlan, BridgeError> {
        let c: BridgeConfig = toml::from_str(toml_text).unwrap();
        BridgePlan::from_config(&c)
    }

    #[test]
    fn defaults_and_derived_range() {
        let p = plan("").unwrap();
        assert_eq!(p.name, "dstackbr0");
        assert_eq!((p.address, p.prefix), (Ipv4Addr::new(10, 88, 0, 1), 24));
        assert_eq!(
            (p.dhcp_start, p.dhcp_end),
            (Ipv4Addr::new(10, 88, 0, 10), Ipv4Addr::new(10, 88, 0, 254))
        );
        assert_eq!(p.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(p.subnet(), "10.88.0.0/24");
        assert!(p.isolate_vms && !p.nat);
        // A /29 has 6 hosts: .1 is the bridge, DHCP hands out .2–.6.
        let p = plan("address = \"192.168.9.1/29\"").unwrap();
        assert_eq!(
            (p.dhcp_start, p.dhcp_end),
            (Ipv4Addr::new(192, 168, 9, 2), Ipv4Addr::new(192, 168, 9, 6))
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (text, needle) in [
            ("name = \"br 0\"", "name"),
            ("name = \"abcdefghijklmnop\"", "name"),
            ("address = \"10.88.0.1\"", "a.b.c.d/len"),
            ("address = \"10.88.0.0/24\"", "network or broadcast"),
            ("address = \"10.88.0.1/31\"", "8..=29"),
            ("dhcp_range = [\"10.88.0.1\", \"10.88.0.9\"]", "own address"),
            ("dhcp_range = [\"10.88.1.10\", \"10.88.1.20\"]", "dhcp_range"),
            ("dhcp_range = [\"10.88.0.20\", \"10.88.0.10\"]", "dhcp_range"),
            ("lease_secs = 10", "lease_secs"),
            ("nat_uplink = \"eth0;\"", "nat_uplink"),
        ] {
            let e = plan(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn dnsmasq_command_line() {
        let p = plan("dhcp_range = [\"10.88.0.100\", \"10.88.0.199\"]\nlease_secs = 600").unwrap();
        let args = p.dnsmasq_args(Path::new("/run/.bridge/dstackbr0"));
        for want in [
            "--interface=dstackbr0",
            "--port=0",
            "--bind-interfaces",
            "--dhcp-range=10.88.0.100,10.88.0.199,255.255.255.0,600",
            "--dhcp-option=option:router,10.88.0.1",
            "--dhcp-leasefile=/run/.bridge/dstackbr0/dnsmasq.leases",
            "--pid-file=/run/.bridge/dstackbr0/dnsmasq.pid",
            "--keep-in-foreground",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
        }
    }

    #[test]
    fn nat_rules() {
        let p = plan("name = \"br-x.1\"\nnat = true").unwrap();
        assert_eq!(p.nft_table(), "dstack_br_x_1");
        let r = p.nat_ruleset();
        assert!(r.contains("table ip dstack_br_x_1"), "{r}");
        assert!(
            r.contains("ip saddr 10.88.0.0/24 ip daddr != 10.88.0.0/24 oifname != \"br-x.1\" masquerade"),
            "{r}"
        );
        let p = plan("nat = true\nnat_uplink = \"eth0\"").unwrap();
        assert!(p.nat_ruleset().contains("oifname \"eth0\" masquerade"));
    }

    #[test]
    fn bridge_mac_is_stable_local_unicast() {
        let a = plan("").unwrap().bridge_mac();
        assert_eq!(a, plan("").unwrap().bridge_mac());
        assert!(a.starts_with("02:") && a.len() == 17, "{a}");
        assert_ne!(a, plan("name = \"other\"").unwrap().bridge_mac());
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Failures name the command and the tool's message; permission errors say root is needed.
    #[test]
    fn setup_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BridgeConfig {
            ip_path: script(
                dir.path(),
                "ip",
                "echo 'RTNETLINK answers: Operation not permitted' >&2; exit 2",
            ),
            ..Default::default()
        };
        let e = BridgeNet::setup(&cfg, dir.path()).err().unwrap().to_string();
        assert!(e.contains("Operation not permitted") && e.contains("needs root"), "{e}");
        assert!(e.contains("link add name dstackbr0"), "{e}");
        // The links work but dnsmasq dies at once: its log tail is in the error.
        let cfg = BridgeConfig {
            ip_path: "/bin/true".into(),
            dnsmasq_path: script(
                dir.path(),
                "dnsmasq",
                "echo 'dnsmasq: failed to bind DHCP server socket' >&2; exit 2",
            ),
            ..Default::default()
        };
        let e = BridgeNet::setup(&cfg, dir.path()).err().unwrap().to_string();
        assert!(e.contains("starting dnsmasq") && e.contains("failed to bind"), "{e}");
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert_eq!(tap_name(1000), "dstap1000");
        assert!(valid_ifname(&tap_name(u32::MAX)));
    }

    #[test]
    fn lease_file_lines() {
        let l = parse_leases(
            "1700000000 02:AB:cd:00:11:22 10.88.0.57 guest 01:02:ab:cd:00:11:22\n\
             1700000001 02:00:00:00:00:01 10.88.0.58 * *\nbroken line\n",
        );
        assert_eq!(
            l,
            [
                Lease {
                    mac: "02:ab:cd:00:11:22".into(),
                    ip: Ipv4Addr::new(10, 88, 0, 57),
                    hostname: "guest".into()
                },
                Lease {
                    mac: "02:00:00:00:00:01".into(),
                    ip: Ipv4Addr::new(10, 88, 0, 58),
                    hostname: String::new()
                },
            ]
        );
    }
}
