//! `cargo xtask bench`: runs every benchmark of the workspace in release mode, one after the other, with the
//! same inputs as the tests, and lets each print its own numbers. Last, the end-to-end demo reports the
//! CVM's boot phases (under the `tcg` backend where there is no usable hardware virtualization).
//! A failing benchmark is reported and the others still run; the exit status says whether all ran.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{cache, guest_image, setup};

/// (what it measures, cargo arguments).
const BENCHES: &[(&str, &[&str])] = &[
    (
        "quote parse + verify, CCEL replay, MRTD (measurements)",
        &["bench", "-p", "dstack-measurements", "--bench", "measure_bench"],
    ),
    (
        "simulated quote generation (sim-tdx)",
        &["run", "--release", "-p", "dstack-sim-tdx", "--example", "bench_quote"],
    ),
    (
        "key derivation (keys)",
        &["run", "--release", "-p", "dstack-keys", "--example", "bench_keys"],
    ),
    (
        "RA-TLS mutual handshake with full verification (ra-tls)",
        &[
            "run",
            "--release",
            "-p",
            "dstack-ra-tls",
            "--example",
            "bench_handshake",
        ],
    ),
    (
        "TLS passthrough vs nginx and haproxy, loopback (gateway-appliance)",
        &["run", "--release", "-p", "dstack-gateway", "--example", "bench_proxy"],
    ),
    (
        "WireGuard tunnel: boringtun vs wireguard-go in namespaces (gateway-appliance)",
        &["run", "--release", "-p", "dstack-gateway", "--example", "bench_wg"],
    ),
    (
        "KMS GetAppKey end to end, dev and on-chain policy (kms-appliance)",
        &["run", "--release", "-p", "dstack-kms", "--example", "bench_get_app_key"],
    ),
    (
        "VMM setup time and RSS on /dev/kvm (host-vmm)",
        &["run", "--release", "-p", "dstack-host-vmm", "--example", "setup_bench"],
    ),
    (
        "virtio-blk throughput (host-vmm)",
        &["run", "--release", "-p", "dstack-host-vmm", "--example", "blk_bench"],
    ),
    (
        "virtio-net frames (host-vmm)",
        &["run", "--release", "-p", "dstack-host-vmm", "--example", "net_bench"],
    ),
];

pub fn run(args: &[String]) -> Result<i32> {
    if let Some(a) = args.first() {
        anyhow::bail!("bench takes no arguments (got {a:?})");
    }
    let root = setup::workspace_root();
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => dir.into(),
        None => cache::subdir("target")?,
    };
    let mut env = setup::install_test_dependencies().context("installing benchmark inputs")?;
    let image = guest_image::ensure(&root, &target_dir).context("preparing the guest image")?;
    env.push(("DSTACK_E2E_IMAGE".into(), image.dir.display().to_string()));
    env.push(("DSTACK_DEMO_APP_BIN".into(), image.demo_app.display().to_string()));
    env.push(("DSTACK_DEMO_EXIT".into(), "1".into()));
    let cargo = || {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(&root)
            .env("CARGO_TARGET_DIR", &target_dir)
            .envs(env.iter().map(|(k, v)| (k, v)));
        c
    };
    // setup_bench spawns the release dstack-vmm-run next to it.
    let built = cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "dstack-host-vmm",
            "--bin",
            "dstack-vmm-run",
        ])
        .status()?;
    let mut failed = Vec::new();
    if !built.success() {
        failed.push("build dstack-vmm-run");
    }
    let demo: (&str, &[&str]) = (
        "end to end: CVM boot phases and app answering (tests/ dstack-demo)",
        &[
            "run",
            "--release",
            "--locked",
            "-p",
            "dstack-e2e",
            "--bin",
            "dstack-demo",
        ],
    );
    for (what, args) in BENCHES.iter().copied().chain(std::iter::once(demo)) {
        println!("\n===== {what}\n      cargo {}", args.join(" "));
        let ok = cargo().args(args).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            println!("===== FAILED: {what}");
            failed.push(what);
        }
    }
    if failed.is_empty() {
        println!("\nxtask bench: all {} benchmarks ran", BENCHES.len() + 1);
        Ok(0)
    } else {
        println!("\nxtask bench: {} failed: {}", failed.len(), failed.join("; "));
        Ok(1)
    }
}
