//! `dstack-vmm-run --tdx …`: the command line the manager's `tdx` backend starts, parsed here (not in the
//! binary) so the manager tests can feed the exact argument list the backend planned to the same parser and
//! launch code, against the recording fake.
//!
//! The flags are the `kvm` backend's plus `--tdx`, `--firmware` (the TDVF image, the image's `ovmf.fd`),
//! `--qgs-socket` and `--mrconfigid`. Virtio devices (`--disk`, `--net`, `--vsock`, `--rng`) are attached as
//! virtio-pci devices on the TD's shared memory ([`super::devices`]); `--control-socket` serves the TD's ACPI
//! power button like the `kvm` VMM's. [`TdRunArgs::unattached_devices`] (options a TD would ignore, which the
//! binary warns about) is empty now.

use std::fs::OpenOptions;
use std::io::LineWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use super::fw_cfg::DirectBoot;
use super::launch::TdxConfig;
use super::quote::{DEFAULT_QGS_SOCKET, QgsClient, QuoteService};
use super::run::{BootError, boot_td};
use crate::devices::serial::SerialSink;
use crate::hypervisor::tdx::TdxHypervisor;
use crate::vcpu::VmExit;
use crate::virtio::net::parse_mac;
use crate::vmm::{DeviceConfig, DiskConfig, NetBackendConfig, NetConfig, VsockConfig};

/// The `kvm` path's default MAC (`dstack-vmm-run --mac`).
pub const DEFAULT_MAC: &str = "52:54:00:12:34:56";

/// The arguments of `dstack-vmm-run --tdx`.
#[derive(Parser, Debug, Clone)]
#[command(name = "dstack-vmm-run --tdx", about = "Boot one Intel TDX guest (TD) on /dev/kvm")]
pub struct TdRunArgs {
    /// Selects this mode.
    #[arg(long)]
    pub tdx: bool,
    /// TDVF firmware (OVMF with TDX metadata), mapped to end at 4 GiB and measured into MRTD.
    #[arg(long)]
    pub firmware: PathBuf,
    /// bzImage, handed to OVMF through fw_cfg (measured into RTMR1 by the firmware).
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u64,
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    #[arg(long)]
    pub serial_stdout: bool,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Intel QGS unix socket for GetQuote (`none`: guests get QGS_UNAVAILABLE).
    #[arg(long, default_value = DEFAULT_QGS_SOCKET)]
    pub qgs_socket: String,
    /// MRCONFIGID (48 bytes, 96 hex digits) for KVM_TDX_INIT_VM; it appears verbatim in every quote. The
    /// manager binds the app configuration here (`tdx::mr_config`); default all zero (unbound).
    #[arg(long, value_name = "HEX")]
    pub mrconfigid: Option<String>,
    /// Accepted for command-line compatibility; a TD always gets the ACPI tables from fw_cfg.
    #[arg(long)]
    pub acpi: bool,
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<String>,
    #[arg(long, value_name = "CID,UDS_PATH")]
    pub vsock: Option<String>,
    #[arg(long)]
    pub net: Option<String>,
    #[arg(long)]
    pub mac: Option<String>,
    #[arg(long)]
    pub rng: bool,
    #[arg(long)]
    pub mtu: Option<u16>,
    /// Control socket: `power-button` presses the TD's ACPI power button (`crate::control`).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    #[arg(long)]
    pub print_timing: bool,
}

/// Why `--tdx` could not start.
#[derive(Debug, thiserror::Error)]
pub enum TdCliError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {value}: {why}")]
    BadArg {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
}

fn bad(flag: &'static str, value: &str, why: impl Into<String>) -> TdCliError {
    TdCliError::BadArg {
        flag,
        value: value.into(),
        why: why.into(),
    }
}

/// `PATH` or `PATH,ro` / `PATH,rw` (as the `kvm` path's `--disk`).
pub fn parse_disk(spec: &str) -> Result<DiskConfig, TdCliError> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => {
            return Err(bad(
                "--disk",
                spec,
                format!("unknown option {opt:?} (expected ro or rw)"),
            ));
        }
        None => (spec, false),
    };
    if path.is_empty() {
        return Err(bad("--disk", spec, "empty path"));
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

/// `CID,UDS_PATH`.
pub fn parse_vsock(spec: &str) -> Result<VsockConfig, TdCliError> {
    let (cid, path) = spec
        .split_once(',')
        .ok_or_else(|| bad("--vsock", spec, "expected CID,UDS_PATH"))?;
    let cid: u64 = cid
        .parse()
        .map_err(|_| bad("--vsock", spec, format!("CID {cid:?} is not a number")))?;
    if path.is_empty() {
        return Err(bad("--vsock", spec, "empty socket path"));
    }
    Ok(VsockConfig {
        cid,
        uds_path: PathBuf::from(path),
    })
}

/// `passt:SOCKET` or `tap:IFNAME[,bridge=BR]`.
pub fn parse_net(spec: &str, mac: &str, mtu: Option<u16>) -> Result<NetConfig, TdCliError> {
    let backend = if let Some(socket) = spec.strip_prefix("passt:") {
        if socket.is_empty() {
            return Err(bad("--net", spec, "empty socket path"));
        }
        NetBackendConfig::Passt {
            socket: PathBuf::from(socket),
        }
    } else if let Some(rest) = spec.strip_prefix("tap:") {
        let (ifname, bridge) = match rest.split_once(',') {
            Some((i, opt)) => {
                let b = opt
                    .strip_prefix("bridge=")
                    .ok_or_else(|| bad("--net", spec, format!("unknown option {opt:?} (expected bridge=NAME)")))?;
                (i, Some(b.to_owned()))
            }
            None => (rest, None),
        };
        if ifname.is_empty() {
            return Err(bad("--net", spec, "empty interface name"));
        }
        NetBackendConfig::Tap {
            ifname: ifname.to_owned(),
            bridge,
        }
    } else {
        return Err(bad("--net", spec, "expected passt:SOCKET or tap:IFNAME[,bridge=BR]"));
    };
    Ok(NetConfig {
        mac: parse_mac(mac).map_err(|e| bad("--mac", mac, e.to_string()))?,
        mtu,
        backend,
    })
}

/// 96 hex digits → the 48-byte MRCONFIGID.
pub fn parse_mrconfigid(hex_str: &str) -> Result<[u8; 48], TdCliError> {
    let bytes = hex::decode(hex_str).map_err(|e| bad("--mrconfigid", hex_str, e.to_string()))?;
    <[u8; 48]>::try_from(bytes.as_slice())
        .map_err(|_| bad("--mrconfigid", hex_str, format!("{} bytes, expected 48", bytes.len())))
}

impl TdRunArgs {
    /// Options on the command line a TD does not get yet: none since the control socket is served.
    pub fn unattached_devices(&self) -> Vec<String> {
        Vec::new()
    }

    /// The virtio devices the flags ask for.
    pub fn device_config(&self) -> Result<DeviceConfig, TdCliError> {
        let mac = self.mac.as_deref().unwrap_or(DEFAULT_MAC);
        Ok(DeviceConfig {
            disks: self.disks.iter().map(|d| parse_disk(d)).collect::<Result<_, _>>()?,
            net: self.net.as_deref().map(|n| parse_net(n, mac, self.mtu)).transpose()?,
            vsock: self.vsock.as_deref().map(parse_vsock).transpose()?,
            rng: self.rng,
        })
    }

    fn qgs(&self) -> Option<Arc<dyn QuoteService>> {
        (self.qgs_socket != "none").then(|| {
            Arc::new(QgsClient {
                socket: PathBuf::from(&self.qgs_socket),
            }) as Arc<dyn QuoteService>
        })
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TdCliError> {
    std::fs::read(path).map_err(|source| TdCliError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Boots the TD `args` describe on `hv` and runs it to the end (`capture`: also collect serial output, for
/// tests).
pub fn run(
    hv: &dyn TdxHypervisor,
    args: &TdRunArgs,
    capture: Option<Arc<std::sync::Mutex<Vec<u8>>>>,
) -> Result<VmExit, TdCliError> {
    let devices = args.device_config()?;
    let mrconfigid = args.mrconfigid.as_deref().map(parse_mrconfigid).transpose()?;
    let firmware = read("firmware", &args.firmware)?;
    let kernel = read("kernel", &args.kernel)?;
    let initrd = match &args.initrd {
        Some(p) => read("initrd", p)?,
        None => Vec::new(),
    };
    let log = match &args.serial_log {
        Some(p) => Some(LineWriter::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| TdCliError::Read {
                    what: "serial log",
                    path: p.clone(),
                    source,
                })?,
        )),
        None => None,
    };
    let sink = SerialSink {
        log,
        stdout: args.serial_stdout,
        capture,
    };
    let mut cfg = TdxConfig::new(&firmware, args.memory_mib << 20, args.vcpus);
    if let Some(id) = mrconfigid {
        cfg.mrconfigid = id;
    }
    let boot = DirectBoot {
        kernel: &kernel,
        initrd: &initrd,
        cmdline: &args.cmdline,
    };
    Ok(boot_td(
        hv,
        &cfg,
        &boot,
        &devices,
        sink,
        args.qgs(),
        args.control_socket.as_deref(),
        args.timeout_ms.map(Duration::from_millis),
    )?)
}
