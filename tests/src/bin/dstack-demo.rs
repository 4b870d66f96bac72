//! `dstack-demo` (run by `cargo xtask demo`): the whole stack with the example app, then a report.
//!
//! Starts the local registry with the demo app image, pebble, the KMS and the VM manager; deploys the gateway
//! appliance as a CVM (packaged for this run, its attestation verified: RA-TLS chain to the KMS root, quote,
//! published measurements, compose hash); deploys the demo app with an encrypted env var; waits with progress
//! output until it answers, on its host port and through the gateway CVM over HTTPS; verifies the app CVM
//! from outside; prints URLs, identities, the verdicts and the boot phase timings; then keeps running until
//! Ctrl-C and stops everything cleanly.
//!
//! `DSTACK_DEMO_HOST_GATEWAY=1` runs the gateway in-process on the host instead (simulated identity, KMS
//! without OS image verification; needs root and /dev/net/tun): the previous mode, kept as a fallback.

use std::time::{Duration, Instant};

use anyhow::Context;
use dstack_e2e::stack::{AppSpec, free_port, http_get};
use dstack_e2e::{GatewayCvmInputs, Inputs, KmsOptions, Stack, verify_cvm};

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
    println!(
        "==> VM manager: backend tcg — QEMU software emulation with the SIMULATED TDX module (no TDX here);\n    every CVM below runs under it"
    );
    let host_gateway = std::env::var_os("DSTACK_DEMO_HOST_GATEWAY").is_some_and(|v| v == "1");
    let stack = if host_gateway {
        // The gateway needs pebble, root and /dev/net/tun; without them the demo runs without it, and says so.
        let missing = dstack_e2e::pebble::binaries().err().map(|e| e.to_string()).or_else(|| {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            (!root || !std::path::Path::new("/dev/net/tun").exists())
                .then(|| "the host gateway's WireGuard device needs root and /dev/net/tun".to_owned())
        });
        match missing {
            None => {
                // Its simulated identity has no OS image for the KMS to check (see dstack_e2e::gateway).
                let options = KmsOptions {
                    verify_image: false,
                    ..KmsOptions::default()
                };
                Stack::start_with_gateway(&dir, inputs, options).await?
            }
            Some(why) => {
                println!("==> WITHOUT the gateway: {why}");
                Stack::start(&dir, inputs, KmsOptions::default()).await?
            }
        }
    } else {
        match GatewayCvmInputs::from_env() {
            Ok(gw) => {
                println!("==> gateway appliance: packaging, then booting it as a CVM (KMS verifies OS images)");
                let t = Instant::now();
                let stack = Stack::start_with_gateway_cvm(&dir, inputs, KmsOptions::default(), gw, |p| {
                    println!("    gateway {p}")
                })
                .await?;
                println!("==> stack with the gateway CVM up after {:.1?}", t.elapsed());
                stack
            }
            Err(e) => {
                println!("==> WITHOUT the gateway: {e}");
                Stack::start(&dir, inputs, KmsOptions::default()).await?
            }
        }
    };
    println!(
        "==> registry http://127.0.0.1:{} holds {}\n==> KMS {} (dev policy, simulated quotes accepted under the pinned root {}; \
         OS image verification {})",
        stack.registry_port,
        stack.app_image,
        stack.kms_url(),
        stack.sim_root().display(),
        if stack.kms_options.verify_image { "on" } else { "off" }
    );
    if let Some(gw) = &stack.gateway_cvm {
        println!(
            "==> gateway CVM {} (appliance image {}): app id {}, compose hash {}\n    RegisterCvm 127.0.0.1:{} \
             (guests: {}), proxy 127.0.0.1:{} for *.{}, WireGuard UDP 127.0.0.1:{} (guests: 10.0.2.2:{})\n    \
             RPC answering {:.1?} after CreateVm, proxy listening after {:.1?}",
            gw.vm_id,
            gw.package.image,
            gw.package.app_id,
            gw.package.compose_hash,
            gw.ports.rpc,
            gw.ports.guest_url(),
            gw.ports.proxy,
            dstack_e2e::gateway::BASE_DOMAIN,
            gw.ports.wg,
            gw.ports.wg,
            gw.timings.rpc_up,
            gw.timings.proxy_up
        );
        println!("==> gateway CVM attestation (its RPC certificate chain, quote, event log, published values):");
        print!("{}", gw.attestation.report());
        anyhow::ensure!(gw.attestation.ok(), "the gateway CVM's attestation did not verify");
    }
    if let Some(gw) = &stack.gateway {
        println!(
            "==> host gateway: RegisterCvm https://127.0.0.1:{} (guests: {}), WireGuard UDP {}, proxy 127.0.0.1:{} for \
             *.{}; certificate from pebble; its RPC certificate from the KMS for the (simulated) gateway app {}; KMS \
             OS image verification is off in this mode",
            gw.ports.rpc,
            gw.ports.guest_url(),
            gw.ports.wg,
            gw.ports.proxy,
            dstack_e2e::gateway::BASE_DOMAIN,
            hex::encode(gw.app_id)
        );
    }
    let port = free_port()?;
    let mut app = AppSpec::demo(&stack.app_image, "Hello from inside a (simulated) TDX CVM!", port);
    app.vcpus = 1;
    app.memory_mb = 2048;
    app.gateway = stack.has_gateway();
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
    if stack.has_gateway() {
        let app_id = serde_json::from_str::<serde_json::Value>(&info)?["app_id"]
            .as_str()
            .context("app_id in /info")?
            .to_owned();
        let t = Instant::now();
        let port = dstack_e2e::stack::APP_PORT;
        loop {
            let last = match stack.gateway_get(&app_id, port, "/").await {
                Ok((200, _)) => break,
                Ok((s, _)) => format!("HTTP {s}"),
                Err(e) => e,
            };
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "no answer through the gateway: {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (url, curl) = stack.gateway_url(&app_id, port).context("gateway URL")?;
        let kind = if stack.gateway_cvm.is_some() {
            "gateway CVM"
        } else {
            "host gateway"
        };
        println!(
            "==> app answering through the {kind} over HTTPS at {url} ({:.1?} after it answered on its port)",
            t.elapsed()
        );
        println!("    try: {curl}");
    }

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
