//! Backends turn a VM's shape into the processes that run it. Guest-visible devices are the same on all:
//! virtio-pci block disks in the order rootfs (ro, if the image has one), data disk (rw), host-shared image
//! (ro, an erofs built from `shared/`), a vsock device whose host side is `<workdir>/vsock.sock`
//! (connections to host port P arrive at `vsock.sock_P`), virtio-rng, and a serial console to `serial.log`.
//!
//! * `kvm`: our `dstack-vmm-run` on /dev/kvm.
//! * `tcg`: QEMU software emulation, vsock over vhost-user served by `vhost-device-vsock` (same host-side
//!   socket interface). Emulation: for development and CI only.

use std::path::{Path, PathBuf};

use dstack_rpc::vmm::PortMapping;
use serde::Deserialize;

use super::state::Workdir;
use super::supervisor::ProcSpec;

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
        if !input.ports.is_empty() {
            return Err(BackendError::Unsupported {
                backend: "kvm",
                reason: "port mapping needs user networking, which dstack-vmm-run does not expose yet".into(),
            });
        }
        let (disks, cmdline) = disks_and_cmdline(input)?;
        let wd = input.workdir;
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
        ]);
        for d in &disks {
            let mode = if d.read_only { "ro" } else { "rw" };
            args.extend(["--disk".into(), format!("{},{mode}", d.path.display())]);
        }
        args.extend([
            "--vsock".into(),
            format!("{},{}", input.cid, wd.vsock_uds().display()),
            "--rng".into(),
        ]);
        Ok(vec![vm_spec(input, self.vmm_run.clone(), args)])
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
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
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
        }
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
        let plan = KvmBackend {
            vmm_run: "/bin/dstack-vmm-run".into(),
            mkfs_erofs: "mkfs.erofs".into(),
        }
        .plan(&input(&wd, &img, &[]))
        .unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].program, PathBuf::from("/bin/dstack-vmm-run"));
        assert_eq!(
            plan[0].args.join(" "),
            "--kernel /i/img/bzImage --initrd /i/img/initramfs.cpio.gz --cmdline console=ttyS0 panic=1 \
             dstack.data_device=/dev/vdb dstack.host_shared=/dev/vdc --vcpus 1 --memory-mib 2048 \
             --serial-log /r/v/serial.log --acpi --disk /i/img/rootfs.erofs.verity,ro --disk /r/v/hda.img,rw \
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
    fn image_paths_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        std::fs::write(dir.path().join("img/metadata.json"), r#"{"kernel":"../../etc/passwd"}"#).unwrap();
        let e = Image::load(dir.path(), "img").unwrap_err().to_string();
        assert!(e.contains("kernel"), "{e}");
        assert!(Image::load(dir.path(), "../img").is_err());
    }

    #[test]
    fn kvm_refuses_port_mapping_clearly() {
        let wd = Workdir::new(Path::new("/r"), "v");
        let img = image(Path::new("/i"), false);
        let ports = [PortMapping::default()];
        let e = KvmBackend {
            vmm_run: "x".into(),
            mkfs_erofs: "y".into(),
        }
        .plan(&input(&wd, &img, &ports))
        .unwrap_err();
        assert!(e.to_string().contains("port mapping"), "{e}");
    }
}
