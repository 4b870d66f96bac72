//! Backends turn a VM's shape into the processes that run it. Guest-visible devices are the same on all:
//! virtio-pci block disks in the order rootfs (ro, if the image has one), data disk (rw), host-shared image
//! (ro, an erofs built from `shared/`), a vsock device whose host side is `<workdir>/vsock.sock`
//! (connections to host port P arrive at `vsock.sock_P`), virtio-rng, and a serial console to `serial.log`.
//!
//! * `kvm`: our `dstack-vmm-run` on /dev/kvm, with user-mode networking by `passt` (a supervised process
//!   beside the VMM, serving `<workdir>/passt.sock`; port mappings become passt `-t`/`-u` forwards).
//! * `tcg`: QEMU software emulation, vsock over vhost-user served by `vhost-device-vsock` (same host-side
//!   socket interface). Emulation: for development and CI only.
//! * `tdx`: `kvm`'s command line with `dstack-vmm-run --tdx` (real Intel TDX guests): [`TdxBackend`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use dstack_rpc::vmm::PortMapping;
use serde::Deserialize;

use super::bridge::TapPort;
use super::state::Workdir;
use super::supervisor::ProcSpec;
pub use super::tdx_backend::TdxBackend;
use crate::virtio::net::passt::{PortForward, passt_args, runas_for_current_user};

/// Errors preparing a launch.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("image {name}: {reason}")]
    Image { name: String, reason: String },
    #[error("preparing {what}: {reason}")]
    Prepare { what: String, reason: String },
    #[error("backend {backend}: {reason}")]
    Unsupported { backend: &'static str, reason: String },
}

/// `metadata.json` of an image directory (dstack's `ImageInfo` fields; unknown fields such as our `build`
/// record are ignored here). Optional `mrtd`/`rtmr0..2` (hex) seed the simulated TDX module.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct ImageMetadata {
    pub bios: String,
    pub kernel: String,
    pub cmdline: String,
    pub initrd: String,
    pub rootfs: Option<String>,
    pub rootfs_hash: Option<String>,
    pub version: String,
    pub is_dev: bool,
    pub mrtd: Option<String>,
    pub rtmr0: Option<String>,
    pub rtmr1: Option<String>,
    pub rtmr2: Option<String>,
}

/// An image directory with its parsed metadata.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub dir: PathBuf,
    pub metadata: ImageMetadata,
}

/// Only plain file names inside the image directory are accepted (no `../`).
fn image_file(dir: &Path, image: &str, field: &str, value: &str) -> Result<PathBuf, BackendError> {
    if value.is_empty() || value.contains('/') || value == ".." || value == "." {
        return Err(BackendError::Image {
            name: image.to_owned(),
            reason: format!("metadata.json {field}: {value:?} is not a file name in the image directory"),
        });
    }
    Ok(dir.join(value))
}

impl Image {
    /// Loads `<images>/<name>/metadata.json`.
    pub fn load(images: &Path, name: &str) -> Result<Self, BackendError> {
        let bad = |reason: String| BackendError::Image {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(bad("not a valid image name".into()));
        }
        let dir = images.join(name);
        let raw = std::fs::read(dir.join("metadata.json"))
            .map_err(|e| bad(format!("reading {}: {e}", dir.join("metadata.json").display())))?;
        let metadata: ImageMetadata = serde_json::from_slice(&raw).map_err(|e| bad(format!("metadata.json: {e}")))?;
        image_file(&dir, name, "kernel", &metadata.kernel)?;
        Ok(Image {
            name: name.to_owned(),
            dir,
            metadata,
        })
    }
    pub fn kernel(&self) -> Result<PathBuf, BackendError> {
        image_file(&self.dir, &self.name, "kernel", &self.metadata.kernel)
    }
    pub fn initrd(&self) -> Result<Option<PathBuf>, BackendError> {
        if self.metadata.initrd.is_empty() {
            return Ok(None);
        }
        image_file(&self.dir, &self.name, "initrd", &self.metadata.initrd).map(Some)
    }
    pub fn rootfs(&self) -> Result<Option<PathBuf>, BackendError> {
        match &self.metadata.rootfs {
            Some(r) if !r.is_empty() => image_file(&self.dir, &self.name, "rootfs", r).map(Some),
            _ => Ok(None),
        }
    }
}

/// Everything a backend needs for one VM start.
#[derive(Debug, Clone)]
pub struct LaunchInput<'a> {
    pub workdir: &'a Workdir,
    pub image: &'a Image,
    pub vcpu: u32,
    pub memory_mb: u32,
    pub disk_size_gb: u32,
    pub cid: u32,
    pub ports: &'a [PortMapping],
    /// Host address for mappings that leave it empty.
    pub default_host_address: &'a str,
    /// Bridge networking: the VM's tap (created by the manager), instead of user-mode networking.
    pub tap: Option<&'a TapPort>,
}

/// The VM's MAC (derived from its id, stable across restarts; DHCP leases follow it).
fn vm_mac(input: &LaunchInput<'_>) -> String {
    let id = input
        .workdir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    super::api::mac_for(&id)
}

/// Port mappings are a user-networking feature: refused with a tap.
fn no_ports_on_bridge(backend: &'static str, input: &LaunchInput<'_>) -> Result<(), BackendError> {
    if input.tap.is_some() && !input.ports.is_empty() {
        return Err(BackendError::Unsupported {
            backend,
            reason: "port mapping is only available with user networking, not bridge".into(),
        });
    }
    Ok(())
}

/// One disk in guest order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The kernel command line a VM of `image` boots with: the image's own (measured, and naming the data and
/// host-shared disks in our disk order), or for images whose command line names no disks, the image's
/// plus the two device parameters. The simulated TDX module predicts RTMR2 from this same string.
pub fn effective_cmdline(image: &Image) -> Result<String, BackendError> {
    let mut cmdline = image.metadata.cmdline.trim().to_owned();
    let names = |p: &str| cmdline.split_whitespace().any(|w| w.starts_with(p));
    if !names("dstack.data_device=") && !names("dstack.host_shared=") {
        let first = if image.rootfs()?.is_some() { b'b' } else { b'a' };
        let dev = |i: u8| format!("/dev/vd{}", char::from(first + i));
        cmdline.push_str(&format!(" dstack.data_device={} dstack.host_shared={}", dev(0), dev(1)));
    }
    Ok(cmdline)
}

/// The disks (rootfs if any, data disk, host-shared config, in this order) and the kernel command line
/// both backends use.
pub fn disks_and_cmdline(input: &LaunchInput<'_>) -> Result<(Vec<Disk>, String), BackendError> {
    let mut disks = Vec::new();
    if let Some(rootfs) = input.image.rootfs()? {
        disks.push(Disk {
            path: rootfs,
            read_only: true,
        });
    }
    disks.push(Disk {
        path: input.workdir.data_disk(),
        read_only: false,
    });
    disks.push(Disk {
        path: shared_image_path(input.workdir),
        read_only: true,
    });
    Ok((disks, effective_cmdline(input.image)?))
}

/// The read-only erofs image of `shared/` given to the guest as a disk.
pub fn shared_image_path(wd: &Workdir) -> PathBuf {
    wd.path().join("shared.img")
}

/// Runs a VM.
pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// True for software emulation (reported everywhere; never combined with TDX).
    fn is_emulation(&self) -> bool;
    /// Creates disks and other files a start needs.
    fn prepare(&self, input: &LaunchInput<'_>) -> Result<(), BackendError>;
    /// The processes to start, in order (the last one is the VM itself).
    fn plan(&self, input: &LaunchInput<'_>) -> Result<Vec<ProcSpec>, BackendError>;
}

/// Shared preparation of real backends: sparse data disk and the erofs host-shared image.
pub fn prepare_disks(input: &LaunchInput<'_>, mkfs_erofs: &Path) -> Result<(), BackendError> {
    let wd = input.workdir;
    wd.ensure_data_disk(input.disk_size_gb)
        .map_err(|e| BackendError::Prepare {
            what: "data disk".into(),
            reason: e.to_string(),
        })?;
    let img = shared_image_path(wd);
    let _ = std::fs::remove_file(&img);
    let out = std::process::Command::new(mkfs_erofs)
        .arg("--quiet")
        .arg(&img)
        .arg(wd.shared())
        .output()
        .map_err(|e| BackendError::Prepare {
            what: "host-shared image".into(),
            reason: format!("running {}: {e}", mkfs_erofs.display()),
        })?;
    if !out.status.success() {
        return Err(BackendError::Prepare {
            what: "host-shared image".into(),
            reason: format!(
                "{} failed: {}",
                mkfs_erofs.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

fn vm_spec(input: &LaunchInput<'_>, program: PathBuf, args: Vec<String>) -> ProcSpec {
    let wd = input.workdir;
    ProcSpec {
        name: "vm".into(),
        program,
        args,
        cwd: wd.path().to_owned(),
        stdout: wd.stdout_log(),
        stderr: wd.stderr_log(),
        ready_path: None,
    }
}

/// `kvm`: our VMM.
#[derive(Debug, Clone)]
pub struct KvmBackend {
    pub vmm_run: PathBuf,
    pub mkfs_erofs: PathBuf,
    /// User-mode networking; None gives VMs no network device (and refuses port mappings).
    pub passt: Option<PasstNet>,
}

/// How the `kvm` backend runs passt: the binary and the guest subnet (the `tcg` backend's `net`/`dhcp_start`
/// semantics: the guest gets `dhcp_start`, the gateway is the subnet's `.2`, which passt maps to the host).
#[derive(Debug, Clone)]
pub struct PasstNet {
    pub program: PathBuf,
    pub net: String,
    pub dhcp_start: String,
}

/// The `kvm` VMM's control socket (ACPI power button for `ShutdownVm`; see `crate::control`).
pub fn control_socket_path(wd: &Workdir) -> PathBuf {
    wd.path().join("vmm-control.sock")
}

/// passt's socket in the VM's work directory.
pub fn passt_socket_path(wd: &Workdir) -> PathBuf {
    wd.path().join("passt.sock")
}

/// `-a ADDR -n PREFIX -g GATEWAY` for passt from `net` (`a.b.c.d/len`) and `dhcp_start`.
fn passt_addressing(p: &PasstNet) -> Result<Vec<String>, BackendError> {
    let bad = |reason: String| BackendError::Prepare {
        what: "passt networking".into(),
        reason,
    };
    let (base, len) = p
        .net
        .split_once('/')
        .ok_or_else(|| bad(format!("net {:?} is not a.b.c.d/len", p.net)))?;
    let base: Ipv4Addr = base.parse().map_err(|_| bad(format!("net {:?}: bad address", p.net)))?;
    let len: u32 = len
        .parse()
        .ok()
        .filter(|l| (8..=30).contains(l))
        .ok_or_else(|| bad(format!("net {:?}: prefix length must be 8..=30", p.net)))?;
    let mask = u32::MAX << (32 - len);
    let network = u32::from(base) & mask;
    let addr: Ipv4Addr = p
        .dhcp_start
        .parse()
        .map_err(|_| bad(format!("dhcp_start {:?}: bad address", p.dhcp_start)))?;
    let gateway = Ipv4Addr::from(network | 2);
    let host = u32::from(addr) & !mask;
    if u32::from(addr) & mask != network || addr == gateway || host == 0 || host == !mask {
        return Err(bad(format!(
            "dhcp_start {addr} is not a host address in {} other than the gateway {gateway}",
            p.net
        )));
    }
    Ok(vec![
        "-a".into(),
        addr.to_string(),
        "-n".into(),
        len.to_string(),
        "-g".into(),
        gateway.to_string(),
    ])
}

/// The VM's port mappings as passt forwards (empty host address: `default_host_address`).
fn port_forwards(input: &LaunchInput<'_>) -> Result<Vec<PortForward>, BackendError> {
    input
        .ports
        .iter()
        .map(|p| {
            let addr = if p.host_address.is_empty() {
                input.default_host_address
            } else {
                &p.host_address
            };
            PortForward::parse(&p.protocol, addr, p.host_port, p.vm_port).map_err(|e| BackendError::Prepare {
                what: "port mapping".into(),
                reason: e.to_string(),
            })
        })
        .collect()
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }
    fn is_emulation(&self) -> bool {
        false
    }
    fn prepare(&self, input: &LaunchInput<'_>) -> Result<(), BackendError> {
        prepare_disks(input, &self.mkfs_erofs)
    }
    fn plan(&self, input: &LaunchInput<'_>) -> Result<Vec<ProcSpec>, BackendError> {
        let wd = input.workdir;
        let mut procs = Vec::new();
        let mut net_args = Vec::new();
        no_ports_on_bridge("kvm", input)?;
        match &self.passt {
            _ if input.tap.is_some() => {
                if let Some(tap) = input.tap {
                    net_args = vec![
                        "--net".into(),
                        format!("tap:{}", tap.ifname),
                        "--mac".into(),
                        vm_mac(input),
                    ];
                }
            }
            None if !input.ports.is_empty() => {
                return Err(BackendError::Unsupported {
                    backend: "kvm",
                    reason: "port mapping needs user networking, and no passt is configured".into(),
                });
            }
            None => {}
            Some(p) => {
                let socket = passt_socket_path(wd);
                let _ = std::fs::remove_file(&socket);
                // passt logs to its own size-capped file; stdout/stderr only catch early failures.
                let out = wd.path().join("passt.out");
                let mut args = passt_args(
                    &socket,
                    &port_forwards(input)?,
                    Some(&wd.path().join("passt.log")),
                    runas_for_current_user().as_deref(),
                );
                args.extend(passt_addressing(p)?);
                procs.push(ProcSpec {
                    name: "passt".into(),
                    program: p.program.clone(),
                    args,
                    cwd: wd.path().to_owned(),
                    stdout: out.clone(),
                    stderr: out,
                    ready_path: Some(socket.clone()),
                });
                net_args = vec![
                    "--net".into(),
                    format!("passt:{}", socket.display()),
                    "--mac".into(),
                    vm_mac(input),
                ];
            }
        }
        let (disks, cmdline) = disks_and_cmdline(input)?;
        let mut args = vec!["--kernel".into(), input.image.kernel()?.display().to_string()];
        if let Some(initrd) = input.image.initrd()? {
            args.extend(["--initrd".into(), initrd.display().to_string()]);
        }
        args.extend([
            "--cmdline".into(),
            cmdline,
            "--vcpus".into(),
            input.vcpu.to_string(),
            "--memory-mib".into(),
            input.memory_mb.to_string(),
            "--serial-log".into(),
            wd.serial_log().display().to_string(),
            "--acpi".into(),
            "--control-socket".into(),
            control_socket_path(wd).display().to_string(),
        ]);
        for d in &disks {
            let mode = if d.read_only { "ro" } else { "rw" };
            args.extend(["--disk".into(), format!("{},{mode}", d.path.display())]);
        }
        args.extend(net_args);
        args.extend([
            "--vsock".into(),
            format!("{},{}", input.cid, wd.vsock_uds().display()),
            "--rng".into(),
        ]);
        procs.push(vm_spec(input, self.vmm_run.clone(), args));
        Ok(procs)
    }
}

/// `tcg`: QEMU software emulation + vhost-device-vsock.
#[derive(Debug, Clone)]
pub struct TcgBackend {
    pub qemu: PathBuf,
    pub vhost_vsock: PathBuf,
    pub mkfs_erofs: PathBuf,
    pub net: String,
    pub dhcp_start: String,
}

/// QEMU option values are comma-separated; a comma in a path would be read as a new option.
fn qemu_path(p: &Path) -> Result<String, BackendError> {
    let s = p.display().to_string();
    if s.contains(',') {
        return Err(BackendError::Prepare {
            what: "QEMU command line".into(),
            reason: format!("path {s:?} contains a comma"),
        });
    }
    Ok(s)
}

impl Backend for TcgBackend {
    fn name(&self) -> &'static str {
        "tcg"
    }
    fn is_emulation(&self) -> bool {
        true
    }
    fn prepare(&self, input: &LaunchInput<'_>) -> Result<(), BackendError> {
        prepare_disks(input, &self.mkfs_erofs)
    }
    fn plan(&self, input: &LaunchInput<'_>) -> Result<Vec<ProcSpec>, BackendError> {
        let wd = input.workdir;
        no_ports_on_bridge("tcg", input)?;
        let (disks, cmdline) = disks_and_cmdline(input)?;
        let vhost_sock = wd.vhost_user_sock();
        let _ = std::fs::remove_file(&vhost_sock);
        let vhost = ProcSpec {
            name: "vhost-vsock".into(),
            program: self.vhost_vsock.clone(),
            args: vec![
                "--vm".into(),
                format!(
                    "guest-cid={},socket={},uds-path={}",
                    input.cid,
                    qemu_path(&vhost_sock)?,
                    qemu_path(&wd.vsock_uds())?
                ),
            ],
            cwd: wd.path().to_owned(),
            stdout: wd.path().join("vhost-vsock.log"),
            stderr: wd.path().join("vhost-vsock.log"),
            ready_path: Some(vhost_sock.clone()),
        };
        let mem = format!("{}M", input.memory_mb);
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            // One vCPU: on the 2-core CI machines TCG guests ran slower with two (DESIGN.md §10).
            "-smp".into(),
            "1".into(),
            "-m".into(),
            mem,
            "-nographic".into(),
            "-nodefaults".into(),
            // QMP: ShutdownVm presses the ACPI power button through it (`manager::shutdown`).
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qemu_path(&super::qmp::socket_path(wd))?),
            // append=on: log rotation truncates the file, and writers must then continue at its start.
            "-chardev".into(),
            format!("file,id=ser0,path={},append=on", qemu_path(&wd.serial_log())?),
            "-serial".into(),
            "chardev:ser0".into(),
            "-kernel".into(),
            qemu_path(&input.image.kernel()?)?,
        ];
        if let Some(initrd) = input.image.initrd()? {
            args.extend(["-initrd".into(), qemu_path(&initrd)?]);
        }
        args.extend(["-append".into(), cmdline]);
        for (i, d) in disks.iter().enumerate() {
            let ro = if d.read_only { ",readonly=on" } else { "" };
            args.extend([
                "-drive".into(),
                format!("file={},format=raw,if=none,id=hd{i}{ro}", qemu_path(&d.path)?),
                "-device".into(),
                format!("virtio-blk-pci,drive=hd{i}"),
            ]);
        }
        let mut netdev = format!(
            "user,id=net0,net={},dhcpstart={},restrict=no",
            self.net, self.dhcp_start
        );
        for p in input.ports {
            let addr = if p.host_address.is_empty() {
                input.default_host_address
            } else {
                &p.host_address
            };
            netdev.push_str(&format!(
                ",hostfwd={}:{addr}:{}-:{}",
                p.protocol, p.host_port, p.vm_port
            ));
        }
        let mut nic = "virtio-net-pci,netdev=net0".to_owned();
        if let Some(tap) = input.tap {
            // The manager created the tap and attached it to the bridge: no helper scripts.
            netdev = format!("tap,id=net0,ifname={},script=no,downscript=no", tap.ifname);
            nic.push_str(&format!(",mac={}", vm_mac(input)));
        }
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            nic,
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", qemu_path(&vhost_sock)?),
            "-device".into(),
            "vhost-user-vsock-pci,chardev=vsock0".into(),
            "-device".into(),
            "virtio-rng-pci".into(),
        ]);
        Ok(vec![vhost, vm_spec(input, self.qemu.clone(), args)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, rootfs: bool) -> Image {
        Image {
            name: "img".into(),
            dir: dir.join("img"),
            metadata: ImageMetadata {
                kernel: "bzImage".into(),
                initrd: "initramfs.cpio.gz".into(),
                cmdline: "console=ttyS0 panic=1".into(),
                rootfs: rootfs.then(|| "rootfs.erofs.verity".into()),
                ..Default::default()
            },
        }
    }

    fn input<'a>(wd: &'a Workdir, img: &'a Image, ports: &'a [PortMapping]) -> LaunchInput<'a> {
        LaunchInput {
            workdir: wd,
            image: img,
            vcpu: 1,
            memory_mb: 2048,
            disk_size_gb: 4,
            cid: 1001,
            ports,
            default_host_address: "127.0.0.1",
            tap: None,
        }
    }

    fn kvm(passt: bool) -> KvmBackend {
        KvmBackend {
            vmm_run: "/bin/dstack-vmm-run".into(),
            mkfs_erofs: "mkfs.erofs".into(),
            passt: passt.then(|| PasstNet {
                program: "/usr/bin/passt".into(),
                net: "10.0.2.0/24".into(),
                dhcp_start: "10.0.2.10".into(),
            }),
        }
    }

    /// passt's `--runas` part of the expected command line (present only when the tests run as root).
    fn runas() -> String {
        runas_for_current_user()
            .map(|r| format!(" --runas {r}"))
            .unwrap_or_default()
    }

    #[test]
    fn effective_cmdline_keeps_an_image_that_names_its_disks() {
        let dir = Path::new("/r");
        let mut img = image(dir, true);
        assert_eq!(
            effective_cmdline(&img).unwrap(),
            "console=ttyS0 panic=1 dstack.data_device=/dev/vdb dstack.host_shared=/dev/vdc"
        );
        assert_eq!(
            effective_cmdline(&image(dir, false)).unwrap(),
            "console=ttyS0 panic=1 dstack.data_device=/dev/vda dstack.host_shared=/dev/vdb"
        );
        // image-build writes the device parameters into the measured command line: used verbatim.
        img.metadata.cmdline = "console=ttyS0 dstack.data_device=/dev/vdb dstack.host_shared=/dev/vdc".into();
        assert_eq!(effective_cmdline(&img).unwrap(), img.metadata.cmdline);
    }

    #[test]
    fn kvm_command_line() {
        let wd = Workdir::new(Path::new("/r"), "v");
        let img = image(Path::new("/i"), true);
        let plan = kvm(false).plan(&input(&wd, &img, &[])).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].program, PathBuf::from("/bin/dstack-vmm-run"));
        assert_eq!(
            plan[0].args.join(" "),
            "--kernel /i/img/bzImage --initrd /i/img/initramfs.cpio.gz --cmdline console=ttyS0 panic=1 \
             dstack.data_device=/dev/vdb dstack.host_shared=/dev/vdc --vcpus 1 --memory-mib 2048 \
             --serial-log /r/v/serial.log --acpi --control-socket /r/v/vmm-control.sock --disk /i/img/rootfs.erofs.verity,ro --disk /r/v/hda.img,rw \
             --disk /r/v/shared.img,ro --vsock 1001,/r/v/vsock.sock --rng"
        );
        assert_eq!(plan[0].stdout, PathBuf::from("/r/v/stdout.log"));
    }

    #[test]
    fn tcg_command_line() {
        let wd = Workdir::new(Path::new("/r"), "v");
        let img = image(Path::new("/i"), false);
        let ports = [PortMapping {
            protocol: "tcp".into(),
            host_port: 8080,
            vm_port: 80,
            host_address: String::new(),
        }];
        let plan = TcgBackend {
            qemu: "qemu-system-x86_64".into(),
            vhost_vsock: "vhost-device-vsock".into(),
            mkfs_erofs: "mkfs.erofs".into(),
            net: "10.0.2.0/24".into(),
            dhcp_start: "10.0.2.10".into(),
        }
        .plan(&input(&wd, &img, &ports))
        .unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(
            plan[0].args,
            [
                "--vm",
                "guest-cid=1001,socket=/r/v/vhost-vsock.sock,uds-path=/r/v/vsock.sock"
            ]
        );
        assert_eq!(plan[0].ready_path, Some(PathBuf::from("/r/v/vhost-vsock.sock")));
        assert_eq!(
            plan[1].command_line(),
            "qemu-system-x86_64 -accel tcg -machine q35,memory-backend=mem \
             -object memory-backend-memfd,id=mem,size=2048M,share=on -smp 1 -m 2048M -nographic -nodefaults \
             -qmp unix:/r/v/qmp.sock,server=on,wait=off \
             -chardev file,id=ser0,path=/r/v/serial.log,append=on -serial chardev:ser0 -kernel /i/img/bzImage -initrd /i/img/initramfs.cpio.gz \
             -append console=ttyS0 panic=1 dstack.data_device=/dev/vda dstack.host_shared=/dev/vdb \
             -drive file=/r/v/hda.img,format=raw,if=none,id=hd0 -device virtio-blk-pci,drive=hd0 \
             -drive file=/r/v/shared.img,format=raw,if=none,id=hd1,readonly=on -device virtio-blk-pci,drive=hd1 \
             -netdev user,id=net0,net=10.0.2.0/24,dhcpstart=10.0.2.10,restrict=no,hostfwd=tcp:127.0.0.1:8080-:80 \
             -device virtio-net-pci,netdev=net0 -chardev socket,id=vsock0,path=/r/v/vhost-vsock.sock \
             -device vhost-user-vsock-pci,chardev=vsock0 -device virtio-rng-pci"
        );
    }

    #[test]
    fn bridge_mode_uses_the_managers_tap_on_both_backends() {
        let wd = Workdir::new(Path::new("/r"), "v");
        let img = image(Path::new("/i"), false);
        let tap = TapPort {
            ifname: "dstap1001".into(),
            bridge: "dstackbr0".into(),
        };
        let mac = crate::manager::api::mac_for("v");
        let mut inp = input(&wd, &img, &[]);
        inp.tap = Some(&tap);
        // kvm: no passt process even when passt is configured; the VMM opens the tap.
        let plan = kvm(true).plan(&inp).unwrap();
        assert_eq!(plan.len(), 1);
        assert!(
            plan[0]
                .args
                .join(" ")
                .contains(&format!("--net tap:dstap1001 --mac {mac} --vsock")),
            "{:?}",
            plan[0].args
        );
        let tcg = TcgBackend {
            qemu: "qemu-system-x86_64".into(),
            vhost_vsock: "vhost-device-vsock".into(),
            mkfs_erofs: "mkfs.erofs".into(),
            net: "10.0.2.0/24".into(),
            dhcp_start: "10.0.2.10".into(),
        };
        let line = tcg.plan(&inp).unwrap()[1].command_line();
        assert!(
            line.contains(&format!(
                "-netdev tap,id=net0,ifname=dstap1001,script=no,downscript=no -device virtio-net-pci,netdev=net0,mac={mac}"
            )),
            "{line}"
        );
        // Port mappings need user networking.
        let ports = [PortMapping {
            protocol: "tcp".into(),
            host_port: 8080,
            vm_port: 80,
            host_address: String::new(),
        }];
        let mut inp = input(&wd, &img, &ports);
        inp.tap = Some(&tap);
        for e in [kvm(true).plan(&inp).unwrap_err(), tcg.plan(&inp).unwrap_err()] {
            assert!(e.to_string().contains("only available with user networking"), "{e}");
        }
    }

    #[test]
    fn image_paths_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        std::fs::write(dir.path().join("img/metadata.json"), r#"{"kernel":"../../etc/passwd"}"#).unwrap();
        let e = Image::load(dir.path(), "img").unwrap_err().to_string();
        assert!(e.contains("kernel"), "{e}");
        assert!(Image::load(dir.path(), "../img").is_err());
    }

    #[test]
    fn kvm_starts_passt_with_port_mappings() {
        let wd = Workdir::new(Path::new("/r"), "v");
        let img = image(Path::new("/i"), false);
        let ports = [
            PortMapping {
                protocol: "tcp".into(),
                host_port: 8080,
                vm_port: 80,
                host_address: String::new(),
            },
            PortMapping {
                protocol: "udp".into(),
                host_port: 5353,
                vm_port: 53,
                host_address: "0.0.0.0".into(),
            },
        ];
        let plan = kvm(true).plan(&input(&wd, &img, &ports)).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].name, "passt");
        assert_eq!(
            plan[0].command_line(),
            format!(
                "/usr/bin/passt -f -1 --socket /r/v/passt.sock --log-file /r/v/passt.log{} \
                 -t 127.0.0.1/8080:80 -u 0.0.0.0/5353:53 -a 10.0.2.10 -n 24 -g 10.0.2.2",
                runas()
            )
        );
        assert_eq!(plan[0].ready_path, Some(PathBuf::from("/r/v/passt.sock")));
        assert_eq!(plan[0].stderr, PathBuf::from("/r/v/passt.out"));
        // The VMM connects to passt's socket; the MAC is the one the API reports for the VM.
        let vm_args = plan[1].args.join(" ");
        assert!(
            vm_args.contains(&format!(
                "--disk /r/v/shared.img,ro --net passt:/r/v/passt.sock --mac {} --vsock 1001,/r/v/vsock.sock",
                crate::manager::api::mac_for("v")
            )),
            "{vm_args}"
        );
    }

    #[test]
    fn kvm_port_mapping_errors_are_clear() {
        let wd = Workdir::new(Path::new("/r"), "v");
        let img = image(Path::new("/i"), false);
        let ports = [PortMapping {
            protocol: "tcp".into(),
            host_port: 8080,
            vm_port: 80,
            host_address: String::new(),
        }];
        let e = kvm(false).plan(&input(&wd, &img, &ports)).unwrap_err();
        assert!(e.to_string().contains("no passt"), "{e}");
        let bad = [PortMapping {
            protocol: "sctp".into(),
            ..ports[0].clone()
        }];
        let e = kvm(true).plan(&input(&wd, &img, &bad)).unwrap_err();
        assert!(e.to_string().contains("tcp or udp"), "{e}");
        let mut b = kvm(true);
        if let Some(p) = b.passt.as_mut() {
            p.dhcp_start = "10.0.3.10".into();
        }
        let e = b.plan(&input(&wd, &img, &[])).unwrap_err();
        assert!(e.to_string().contains("dhcp_start"), "{e}");
    }
}
