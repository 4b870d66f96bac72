//! `dstack-demo` (run by `cargo xtask demo`): the whole stack with the example app, then a report.
//!
//! Starts the local registry with the demo app image, the KMS and the VM manager; deploys the demo app
//! with an encrypted env var; waits with progress output until it answers; verifies the CVM from outside;
//! prints URLs, identities, the verdict and the boot phase timings; then keeps running until Ctrl-C and
//! stops everything cleanly.

use std::time::{Duration, Instant};

use anyhow::Context;
use dstack_e2e::stack::{AppSpec, free_port, http_get};
use dstack_e2e::{Inputs, KmsOptions, Stack, verify_cvm};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,dstack_e2e=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let inputs = Inputs::from_env().context("demo inputs (run it through `cargo xtask demo`)")?;
    let measurements = inputs.image_dir.join("measurements.json");
    let dir = std::env::var_os("DSTACK_DEMO_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("dstack-demo"));
    // A fresh run directory each time: the CVM's disk and the KMS keys of a previous demo are not reused.
    let _ = std::fs::remove_dir_all(&dir);
    println!("==> work directory {}", dir.display());
    let t0 = Instant::now();
    let stack = Stack::start(&dir, inputs, KmsOptions::default()).await?;
    println!(
        "==> registry http://127.0.0.1:{} holds {}\n==> KMS {} (dev policy, simulated quotes accepted under the pinned root {})",
        stack.registry_port,
        stack.app_image,
        stack.kms_url(),
        stack.sim_root().display()
    );
    println!("==> VM manager: backend tcg — QEMU software emulation with the SIMULATED TDX module (no TDX here)");
    let port = free_port()?;
    let mut app = AppSpec::demo(&stack.app_image, "Hello from inside a (simulated) TDX CVM!", port);
    app.vcpus = 1;
    app.memory_mb = 2048;
    let id = stack.deploy(&app).await?;
    println!(
        "==> deployed app {:?} as VM {id}; GREETING is encrypted to the KMS's per-app key",
        app.name
    );
    let t_boot = Instant::now();
    stack
        .wait_app(&id, port, Duration::from_secs(600), |p| {
            println!("    [{:>6.1}s] {p}", t_boot.elapsed().as_secs_f64())
        })
        .await?;
    let boot = t_boot.elapsed();
    println!("==> app answering at http://127.0.0.1:{port}/ after {boot:.1?}");
    let (_, info) = http_get(port, "/info").map_err(anyhow::Error::msg)?;
    println!("==> identity (from the guest agent inside the CVM): {info}");

    let verdict = verify_cvm(port, &measurements, &stack.sim_root(), &app.app_compose()).map_err(anyhow::Error::msg)?;
    println!("==> verification from outside (fresh nonce, quote, event log, published measurements):");
    print!("{}", verdict.report());
    println!(
        "==> verdict: {}",
        if verdict.ok() {
            "VERIFIED (simulated TEE: valid for development only)"
        } else {
            "NOT VERIFIED"
        }
    );

    let vm = stack.info(&id).await?;
    println!("==> boot phases (guest-reported, under software emulation):");
    if let Some(first) = vm.events.first() {
        for e in &vm.events {
            let dt = e.timestamp.saturating_sub(first.timestamp) as f64 / 1000.0;
            let body = if e.body.len() > 60 { &e.body[..60] } else { &e.body };
            println!("    +{dt:>6.2}s {:<16} {body}", e.event);
        }
    }
    println!("==> total from start: {:.1?}. Ctrl-C stops everything.", t0.elapsed());
    if !verdict.ok() {
        anyhow::bail!("verification failed");
    }
    if std::env::var_os("DSTACK_DEMO_EXIT").is_none() {
        tokio::signal::ctrl_c().await?;
    }
    println!("==> stopping");
    drop(stack);
    Ok(())
}
