//! Installs what the tests need, idempotently: host packages via apt, Debian fixtures from other suites via a
//! private apt state, and Python packages in a private virtualenv. Returns the environment the tests read.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use dstack_apt::PrivateApt;

use crate::{cache, proc};

/// Host (bookworm) packages the test suite uses.
const HOST_PACKAGES: &[&str] = &[
    "ca-certificates",
    "dpkg-dev",
    // measurements: independent Authenticode digests
    "osslsigncode",
    // image-build: TCG boot tests, rootfs, erofs, dm-verity, static test init
    "qemu-system-x86",
    "mmdebstrap",
    "erofs-utils",
    "cryptsetup-bin",
    "libc6-dev",
    // guest-init: LUKS and ext4 on loop devices
    "e2fsprogs",
    "util-linux",
    // gateway: real local ACME server; WireGuard interop peer; network namespaces
    "pebble",
    "wireguard-go",
    "wireguard-tools",
    "iproute2",
    // guest-init: DHCP server for the network test; end to end and crates/oci: the local OCI registry
    "dnsmasq-base",
    "docker-registry",
    // host-vmm: user-mode networking backend of the kvm VMM; the dashboard test's headless browser
    "passt",
    "chromium",
];

/// What `cargo xtask demo` needs on the host: the guest image build and the `tcg` backend, the registry.
pub const DEMO_PACKAGES: &[&str] = &[
    "ca-certificates",
    "dpkg-dev",
    "qemu-system-x86",
    "mmdebstrap",
    "erofs-utils",
    "cryptsetup-bin",
    "libc6-dev",
    "e2fsprogs",
    "util-linux",
    "docker-registry",
];

/// Debian packages from other suites used as test fixtures: (suite, package, file inside it, env var).
const DEBIAN_FIXTURES: &[(&str, &str, &str, &str)] = &[
    ("trixie", "ovmf", "usr/share/ovmf/OVMF.fd", "DSTACK_TEST_OVMF"),
    // host-vmm's TDX struct layouts are checked against the uapi headers of the guest kernel's version.
    (
        "trixie-backports",
        "linux-libc-dev",
        "usr/include",
        "DSTACK_TEST_LINUX_UAPI",
    ),
];

/// Python packages (PyPI) installed into the test virtualenv: the real dstack SDK for interop tests.
const PYTHON_PACKAGES: &[&str] = &["dstack-sdk==0.5.4", "eth-hash[pycryptodome]"];

/// npm packages installed into the test node_modules: the real dstack JS SDK and its peer dependencies.
const NPM_PACKAGES: &[&str] = &[
    "@phala/dstack-sdk@0.5.8",
    "@noble/curves@^1.8.1",
    "@noble/hashes@^1.6.1",
];

/// The Solidity compiler (solc-js) the KMS contracts' committed artifacts were built with.
const SOLC_JS: &str = "solc@0.8.28";
/// Foundry's anvil, shipped as an npm package: a real local Ethereum node for the on-chain policy tests.
const ANVIL: &str = "@foundry-rs/anvil-linux-amd64@1.7.1";

/// rust-vmm's userspace vhost-user vsock backend, used by the `tcg` VM backend.
pub const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";

/// Environment variables handed to the test processes.
pub type TestEnv = Vec<(String, String)>;

pub fn install_test_dependencies() -> Result<TestEnv> {
    let mut env = TestEnv::new();
    ensure_apt_packages(HOST_PACKAGES)?;

    for (suite, package, file, var) in DEBIAN_FIXTURES {
        let apt = PrivateApt::new(suite, &cache::subdir("apt")?)?;
        let root = apt
            .unpack(package)
            .with_context(|| format!("fetching fixture {package} from {suite}"))?;
        let path = root.join(file);
        if !path.exists() {
            bail!("{package} from {suite} has no {file}");
        }
        env.push((var.to_string(), path.display().to_string()));
    }

    let pe_digests = pe_digest_fixture().context("preparing Authenticode reference digests")?;
    env.push(("DSTACK_TEST_PE_DIGESTS".into(), pe_digests.display().to_string()));

    let kernel = locked_kernel().context("fetching the locked guest kernel")?;
    env.push(("DSTACK_TEST_KERNEL".into(), kernel.display().to_string()));

    let vhost = ensure_cargo_tool("vhost-device-vsock", VHOST_DEVICE_VSOCK_VERSION)?;
    env.push(("VHOST_DEVICE_VSOCK".into(), vhost.display().to_string()));

    let python = ensure_python_venv(PYTHON_PACKAGES)?;
    env.push(("DSTACK_TEST_PYTHON".into(), python.display().to_string()));

    let node_modules = ensure_npm_packages("npm", NPM_PACKAGES)?;
    env.push(("DSTACK_TEST_NODE_MODULES".into(), node_modules.display().to_string()));

    // KMS on-chain policy: solc-js recompiles the committed contract artifacts; anvil is a real local chain.
    let solc = ensure_npm_packages("npm-solc", &[SOLC_JS])?;
    env.push(("DSTACK_TEST_SOLC_JS".into(), solc.join("solc").display().to_string()));
    let anvil = ensure_npm_packages("npm-anvil", &[ANVIL])?;
    env.push((
        "DSTACK_TEST_ANVIL".into(),
        anvil
            .join("@foundry-rs/anvil-linux-amd64/bin/anvil")
            .display()
            .to_string(),
    ));

    // The gateway's interop test drives Debian's wireguard-go and wg as the CVM side.
    env.push(("DSTACK_WG_TOOLS_DIR".into(), "/usr/bin".into()));

    // Fixture-dependent tests skip loudly when run by hand without fixtures; under xtask they must not skip.
    env.push(("DSTACK_REQUIRE_FIXTURES".into(), "1".into()));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        // CI machines have /dev/kvm: tests that need it must run, not skip.
        env.push(("DSTACK_REQUIRE_KVM".into(), "1".into()));
    }
    Ok(env)
}

/// Real EFI binaries (Debian's systemd-boot) with their Authenticode SHA-384 computed by `osslsigncode`, an
/// independent implementation, as `<hex digest> <path>` lines for the measurements crate's cross-check.
fn pe_digest_fixture() -> Result<PathBuf> {
    let root = PrivateApt::new("bookworm", &cache::subdir("apt")?)?.unpack("systemd-boot-efi")?;
    let efi_dir = root.join("usr/lib/systemd/boot/efi");
    let list = cache::subdir("fixtures")?.join("pe-digests.txt");
    let mut lines = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&efi_dir)
        .with_context(|| format!("reading {}", efi_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".efi") || name.ends_with(".efi.stub")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no EFI binaries in {}", efi_dir.display());
    }
    let fixtures = cache::subdir("fixtures")?;
    let der = fixtures.join("authenticode.der");
    for original in files {
        // osslsigncode hashes a file as it would sign it: padded with zeros to a multiple of 8 bytes. Hash
        // padded copies so both tools see the same bytes (firmware hashes the file as it is).
        let mut bytes = std::fs::read(&original)?;
        bytes.resize(bytes.len().next_multiple_of(8), 0);
        let file = fixtures.join(original.file_name().context("EFI file name")?);
        std::fs::write(&file, bytes)?;
        let _ = std::fs::remove_file(&der);
        proc::output(
            Command::new("osslsigncode")
                .args(["extract-data", "-h", "sha384", "-in"])
                .arg(&file)
                .arg("-out")
                .arg(&der),
        )?;
        let digest = last_sha384_octet_string(&std::fs::read(&der)?)
            .with_context(|| format!("no SHA-384 digest in osslsigncode output for {}", file.display()))?;
        lines.push_str(&format!("{} {}\n", hex_lower(&digest), file.display()));
    }
    std::fs::write(&list, lines)?;
    Ok(list)
}

/// The message digest of an Authenticode `SpcIndirectDataContent`: the 48-byte OCTET STRING that follows the
/// `AlgorithmIdentifier { sha384, NULL }` (DER `06 09 60 86 48 01 65 03 04 02 02 05 00 04 30`).
fn last_sha384_octet_string(der: &[u8]) -> Option<[u8; 48]> {
    const PREFIX: [u8; 15] = [
        0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30,
    ];
    let start = der.windows(PREFIX.len()).rposition(|w| w == PREFIX)? + PREFIX.len();
    der.get(start..start + 48)?.try_into().ok()
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs missing host packages with apt-get (root only); `apt-get update` runs only when something is missing.
pub fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them with: sudo apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {missing:?}");
    proc::output(Command::new("apt-get").args(["-q", "update"]))?;
    proc::run(
        Command::new("apt-get")
            .args(["-q", "-y", "--no-install-recommends", "install"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_root() -> bool {
    proc::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

/// A virtualenv in the cache with `packages` installed; returns its python.
fn ensure_python_venv(packages: &[&str]) -> Result<PathBuf> {
    let venv = cache::root()?.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        if !proc::succeeds(Command::new("python3").args(["-m", "venv", "--help"])) {
            ensure_apt_packages(&["python3-venv"])?;
        }
        proc::output(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let stamp = venv.join(".dstack-packages");
    let wanted = packages.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    eprintln!("xtask: pip install {packages:?}");
    proc::output(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(packages),
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(python)
}

/// A node_modules directory in the cache with `packages` installed; installs Node.js from Debian if missing.
fn ensure_npm_packages(cache_name: &str, packages: &[&str]) -> Result<PathBuf> {
    if !proc::succeeds(Command::new("npm").arg("--version")) {
        ensure_apt_packages(&["nodejs", "npm"])?;
    }
    let dir = cache::subdir(cache_name)?;
    let stamp = dir.join(".dstack-packages");
    let wanted = packages.join("\n");
    let modules = dir.join("node_modules");
    if modules.is_dir() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(modules);
    }
    if !dir.join("package.json").exists() {
        std::fs::write(dir.join("package.json"), "{\"private\": true}\n")?;
    }
    eprintln!("xtask: npm install {packages:?}");
    proc::output(
        Command::new("npm")
            .current_dir(&dir)
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .args(packages),
    )?;
    std::fs::write(&stamp, wanted)?;
    Ok(modules)
}

/// The guest kernel pinned in image-build's lock (`deb kernel <suite> <package> <version> …` lines), unpacked
/// from Debian; returns the path of its `vmlinuz`. Debian ships it in `linux-binary-*` (7.x) or
/// `linux-image-*` (older), next to the modules under `usr/lib/modules/<release>/`.
fn locked_kernel() -> Result<PathBuf> {
    let lock_path = workspace_root().join("image-build/debian.lock");
    let lock = std::fs::read_to_string(&lock_path).with_context(|| format!("reading {}", lock_path.display()))?;
    let candidates: Vec<(String, String, String)> = lock
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter_map(|f| match f.as_slice() {
            ["deb", "kernel", suite, package, version, ..]
                if (package.starts_with("linux-binary-") || package.starts_with("linux-image-"))
                    && package.contains('.') =>
            {
                Some((suite.to_string(), package.to_string(), version.to_string()))
            }
            _ => None,
        })
        .collect();
    for (suite, package, version) in &candidates {
        let root = PrivateApt::new(suite, &cache::subdir("apt")?)?.unpack(&format!("{package}={version}"))?;
        if let Some(vmlinuz) = find_vmlinuz(&root)? {
            return Ok(vmlinuz);
        }
    }
    bail!(
        "no vmlinuz in the kernel packages of {}: {candidates:?}",
        lock_path.display()
    )
}

fn find_vmlinuz(root: &Path) -> Result<Option<PathBuf>> {
    for dir in [root.join("usr/lib/modules"), root.join("boot")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if path.join("vmlinuz").is_file() {
                return Ok(Some(path.join("vmlinuz")));
            }
            if name.starts_with("vmlinuz-") && path.is_file() {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// A binary crate installed with `cargo install --locked` into the cache; returns the binary's path.
pub fn ensure_cargo_tool(name: &str, version: &str) -> Result<PathBuf> {
    let root = cache::subdir(&format!("tools/{name}-{version}"))?;
    let bin = root.join("bin").join(name);
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("xtask: cargo install {name} {version}");
    proc::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "--quiet", "--locked", "--version", version, "--root"])
            .arg(&root)
            .arg(name)
            .env("CARGO_TARGET_DIR", cache::subdir("tools/target")?),
    )?;
    Ok(bin)
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
