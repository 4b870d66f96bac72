//! `dstack-sim-tdx`: runs the simulated TDX module of one VM standalone (for tests and manual runs; the host
//! VMM normally embeds the library).
//!
//! ```text
//! dstack-sim-tdx --state-dir ./sim --init init.json --listen unix:./sim-tdx.sock
//! ```
//!
//! `init.json` is an [`dstack_sim_tdx::InitialState`]. On start it prints the root certificate path and its
//! SPKI SHA-256 pin (what verifiers pass as the simulated root) as one JSON line on stdout.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use dstack_sim_tdx::{InitialState, SimTdx, root_cert_path, router};

#[derive(Parser, Debug)]
#[command(version, about = "Simulated TDX module for one VM (never real TDX)")]
struct Args {
    /// Directory for the simulated attestation keys (created 0700) and the exported root certificate.
    #[arg(long)]
    state_dir: PathBuf,
    /// JSON file with the initial measurements and boot event log.
    #[arg(long)]
    init: PathBuf,
    /// `unix:/path/to.sock` or `vsock:<cid>:<port>`.
    #[arg(long)]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let init_bytes = std::fs::read(&args.init).with_context(|| format!("reading {}", args.init.display()))?;
    let init = InitialState::from_json(&init_bytes)?;
    let sim = Arc::new(SimTdx::open(&init, &args.state_dir)?);
    println!(
        "{}",
        serde_json::json!({
            "simulated": true,
            "root_cert": root_cert_path(&args.state_dir),
            "root_spki_sha256": hex::encode(sim.root_spki_sha256()),
            "listen": args.listen,
        })
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if let Some(path) = args.listen.strip_prefix("unix:") {
        dstack_sim_tdx::serve_unix(sim, PathBuf::from(path), shutdown).await?;
    } else if let Some(addr) = args.listen.strip_prefix("vsock:") {
        let (cid, port) = addr.split_once(':').context("expected vsock:<cid>:<port>")?;
        let listener = dstack_rpc::vsock::VsockListener::bind(cid.parse()?, port.parse()?)?;
        dstack_rpc::serve(listener, router(sim), shutdown).await?;
    } else {
        bail!("--listen must be unix:<path> or vsock:<cid>:<port>");
    }
    Ok(())
}
