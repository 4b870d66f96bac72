//! Boots one VM and exits with the guest's status (see `VmExit::exit_code`).

use std::fs::OpenOptions;
use std::io::LineWriter;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dstack_host_vmm::devices::serial::SerialSink;
use dstack_host_vmm::hypervisor::kvm::KvmHypervisor;
use dstack_host_vmm::timing::{boottime_ns, process_start_ns};
use dstack_host_vmm::virtio::net::parse_mac;
use dstack_host_vmm::vmm::{NetBackendConfig, NetConfig};
use dstack_host_vmm::{DeviceConfig, DiskConfig, RunReport, VmConfig, VmExit, Vmm, VsockConfig};

#[derive(Parser, Debug)]
#[command(name = "dstack-vmm-run", about = "Boot one VM on /dev/kvm")]
struct Args {
    /// Kernel: bzImage or ELF vmlinux (entered through the 64-bit boot protocol).
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Guest serial output is appended to this file.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Also copy guest serial output to stdout.
    #[arg(long)]
    serial_stdout: bool,
    /// Stop the VM after this many milliseconds (exit status 124).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Provide ACPI tables (RSDP/XSDT/FADT/DSDT/MADT) in addition to the MP table.
    #[arg(long)]
    acpi: bool,
    /// A virtio-blk disk backed by a raw image: `path` or `path,ro` (repeatable; in order on the PCI bus).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// A virtio-vsock device: guest CID and the host-side unix socket (`CONNECT <port>\n` there; guest
    /// connections to port P go to `<uds_path>_P`).
    #[arg(long, value_name = "CID,UDS_PATH")]
    vsock: Option<String>,
    /// A virtio-net device: `passt:<socket>` (connect to a running passt's unix socket) or
    /// `tap:<ifname>[,bridge=<name>]` (open/create the tap and attach it to an existing bridge).
    #[arg(long, value_name = "passt:SOCKET|tap:IFNAME[,bridge=BR]")]
    net: Option<String>,
    /// MAC address of the virtio-net device.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    mac: String,
    /// Maximum MTU offered to the guest driver (VIRTIO_NET_F_MTU); default: not offered.
    #[arg(long)]
    mtu: Option<u16>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Serve the control socket here (`power-button` presses the ACPI power button; see `control`).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Print setup timing (process start → first KVM_RUN) and RSS to stderr.
    #[arg(long)]
    print_timing: bool,
}

fn print_timing(main_ns: u64, report: &RunReport) {
    let t = &report.timing;
    let ms = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / 1e6;
    let start = process_start_ns();
    if let Some(start) = start {
        eprintln!(
            "timing: process start → first KVM_RUN {:.2} ms (process start has clock-tick resolution)",
            ms(start, t.first_run_ns)
        );
    }
    eprintln!(
        "timing: main → setup start {:.2} ms, setup {:.2} ms, main → first KVM_RUN {:.2} ms, first KVM_RUN → \
         first exit {:.2} ms, run {:.2} ms",
        ms(main_ns, t.setup_start_ns),
        ms(t.setup_start_ns, t.setup_done_ns),
        ms(main_ns, t.first_run_ns),
        ms(t.first_run_ns, t.first_exit_ns),
        ms(t.first_run_ns, t.end_ns),
    );
    eprintln!(
        "timing-raw: process_start_ns={} main_ns={} setup_start_ns={} setup_done_ns={} first_run_ns={} \
         first_exit_ns={} end_ns={}",
        start.unwrap_or(0),
        main_ns,
        t.setup_start_ns,
        t.setup_done_ns,
        t.first_run_ns,
        t.first_exit_ns,
        t.end_ns
    );
    if let Some(rss) = report.rss {
        eprintln!(
            "rss: total_kib={} guest_kib={} vmm_kib={}",
            rss.total_kib,
            rss.guest_kib,
            rss.vmm_kib()
        );
    }
    eprintln!(
        "exits: userspace={} unknown_io={}",
        report.userspace_exits, report.unknown_count
    );
}

fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => anyhow::bail!("--disk {spec}: unknown option {opt:?} (expected ro or rw)"),
        None => (spec, false),
    };
    anyhow::ensure!(!path.is_empty(), "--disk {spec}: empty path");
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

fn parse_vsock(spec: &str) -> anyhow::Result<VsockConfig> {
    let (cid, path) = spec
        .split_once(',')
        .with_context(|| format!("--vsock {spec}: expected CID,UDS_PATH"))?;
    let cid: u64 = cid
        .parse()
        .with_context(|| format!("--vsock {spec}: CID {cid:?} is not a number"))?;
    anyhow::ensure!(!path.is_empty(), "--vsock {spec}: empty socket path");
    Ok(VsockConfig {
        cid,
        uds_path: PathBuf::from(path),
    })
}

fn parse_net(spec: &str, mac: &str, mtu: Option<u16>) -> anyhow::Result<NetConfig> {
    let backend = if let Some(socket) = spec.strip_prefix("passt:") {
        anyhow::ensure!(!socket.is_empty(), "--net {spec}: empty socket path");
        NetBackendConfig::Passt {
            socket: PathBuf::from(socket),
        }
    } else if let Some(rest) = spec.strip_prefix("tap:") {
        let (ifname, bridge) = match rest.split_once(',') {
            Some((i, opt)) => {
                let b = opt
                    .strip_prefix("bridge=")
                    .with_context(|| format!("--net {spec}: unknown option {opt:?} (expected bridge=NAME)"))?;
                (i, Some(b.to_owned()))
            }
            None => (rest, None),
        };
        anyhow::ensure!(!ifname.is_empty(), "--net {spec}: empty interface name");
        NetBackendConfig::Tap {
            ifname: ifname.to_owned(),
            bridge,
        }
    } else {
        anyhow::bail!("--net {spec}: expected passt:SOCKET or tap:IFNAME[,bridge=BR]");
    };
    Ok(NetConfig {
        mac: parse_mac(mac).with_context(|| format!("--mac {mac}"))?,
        mtu,
        backend,
    })
}

fn main() -> anyhow::Result<()> {
    let main_ns = boottime_ns();
    // `--tdx`: an Intel TDX guest, with its own argument set (`dstack_host_vmm::tdx::cli`).
    if std::env::args().any(|a| a == "--tdx") {
        return run_tdx();
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();

    let log = match &args.serial_log {
        Some(p) => Some(LineWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening serial log {}", p.display()))?,
        )),
        None => None,
    };
    let sink = SerialSink {
        log,
        stdout: args.serial_stdout,
        capture: None,
    };
    let devices = DeviceConfig {
        disks: args
            .disks
            .iter()
            .map(|d| parse_disk(d))
            .collect::<anyhow::Result<_>>()?,
        net: args
            .net
            .as_deref()
            .map(|n| parse_net(n, &args.mac, args.mtu))
            .transpose()?,
        vsock: args.vsock.as_deref().map(parse_vsock).transpose()?,
        rng: args.rng,
    };
    let config = VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        timeout: args.timeout_ms.map(Duration::from_millis),
        acpi: args.acpi,
        devices,
    };
    let hv = KvmHypervisor::new().context("opening /dev/kvm")?;
    let vmm = Vmm::new(&hv, &config, sink).context("setting up the VM")?;
    if let Some(path) = &args.control_socket {
        dstack_host_vmm::control::serve(path, vmm.power_button())
            .with_context(|| format!("control socket {}", path.display()))?;
    }
    let report = vmm.run().context("running the VM")?;
    if args.print_timing {
        print_timing(main_ns, &report);
    }
    match &report.exit {
        VmExit::DebugExit(v) => eprintln!("vm: debug exit with status {v:#x}"),
        VmExit::Reset => eprintln!("vm: guest requested reset; stopped"),
        VmExit::PowerOff => eprintln!("vm: guest powered off"),
        VmExit::TripleFault(d) => eprintln!("vm: triple fault\n{d}"),
        VmExit::Crashed(d) => eprintln!("vm: crashed\n{d}"),
        VmExit::Timeout => eprintln!("vm: timed out"),
    }
    std::process::exit(report.exit.exit_code());
}

/// `dstack-vmm-run --tdx …`: boots a TD and exits with the guest's status.
fn run_tdx() -> anyhow::Result<()> {
    use dstack_host_vmm::tdx::cli::{TdRunArgs, run};
    let args = TdRunArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let unattached = args.unattached_devices();
    if !unattached.is_empty() {
        tracing::warn!(
            "TD: not supported for TDs yet (docs/tdx-host.md); ignoring {}",
            unattached.join(" ")
        );
    }
    let hv = KvmHypervisor::new().context("opening /dev/kvm")?;
    let exit = run(&hv, &args, None).context("running the TD")?;
    eprintln!("td: {exit:?}");
    std::process::exit(exit.exit_code());
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn net_specs() {
        let n = parse_net("passt:/r/v/passt.sock", "02:00:00:00:00:07", None).unwrap();
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 7]);
        assert!(matches!(n.backend, NetBackendConfig::Passt { socket } if socket == Path::new("/r/v/passt.sock")));
        let n = parse_net("tap:tap0,bridge=br0", "52:54:00:12:34:56", Some(1500)).unwrap();
        assert_eq!(n.mtu, Some(1500));
        assert!(
            matches!(n.backend, NetBackendConfig::Tap { ifname, bridge } if ifname == "tap0" && bridge.as_deref() == Some("br0"))
        );
        let n = parse_net("tap:tap1", "52:54:00:12:34:56", None).unwrap();
        assert!(matches!(n.backend, NetBackendConfig::Tap { bridge: None, .. }));
        for (spec, mac, needle) in [
            ("slirp", "52:54:00:12:34:56", "expected passt"),
            ("passt:", "52:54:00:12:34:56", "empty socket"),
            ("tap:tap0,mtu=9000", "52:54:00:12:34:56", "unknown option"),
            ("tap:", "52:54:00:12:34:56", "empty interface"),
            ("passt:/s", "ff:ff:ff:ff:ff:ff", "--mac"),
        ] {
            let e = format!("{:#}", parse_net(spec, mac, None).unwrap_err());
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
