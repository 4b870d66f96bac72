//! Installs what the tests need, idempotently: host packages via apt, Debian fixtures from other suites via a
//! private apt state, and Python packages in a private virtualenv. Returns the environment the tests read.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use dstack_apt::PrivateApt;

use crate::{cache, proc};

/// Host (bookworm) packages the test suite uses.
const HOST_PACKAGES: &[&str] = &["ca-certificates", "dpkg-dev"];

/// Debian packages from other suites used as test fixtures: (suite, package, file inside it, env var).
const DEBIAN_FIXTURES: &[(&str, &str, &str, &str)] =
    &[("trixie", "ovmf", "usr/share/ovmf/OVMF.fd", "DSTACK_TEST_OVMF")];

/// Python packages (PyPI) installed into the test virtualenv: the real dstack SDK for interop tests.
const PYTHON_PACKAGES: &[&str] = &["dstack-sdk==0.5.4", "eth-hash[pycryptodome]"];

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

    let python = ensure_python_venv(PYTHON_PACKAGES)?;
    env.push(("DSTACK_TEST_PYTHON".into(), python.display().to_string()));

    // Fixture-dependent tests skip loudly when run by hand without fixtures; under xtask they must not skip.
    env.push(("DSTACK_REQUIRE_FIXTURES".into(), "1".into()));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        // CI machines have /dev/kvm: tests that need it must run, not skip.
        env.push(("DSTACK_REQUIRE_KVM".into(), "1".into()));
    }
    Ok(env)
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

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
