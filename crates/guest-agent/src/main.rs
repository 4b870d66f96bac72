//! `dstack-guest-agent`: the dstack-compatible guest agent. In a CVM, guest-init embeds the library; this
//! binary's `--simulate` mode runs it on a host with an in-process simulated TDX module (never TDX):
//!
//! ```text
//! dstack-guest-agent --simulate --socket ./dstack.sock [--tappd-socket ./tappd.sock] [--state-dir ./sim]
//! ```
//!
//! On start it prints one JSON line (`SimulationInfo`: simulator root pin, KMS keys, identities) on stdout.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use dstack_guest_agent::simulate::{DEFAULT_APP_COMPOSE, simulated_agent};
use dstack_guest_agent::{AgentSockets, serve_agent};

#[derive(Parser, Debug)]
#[command(version, about = "dstack-compatible guest agent (host simulation mode)")]
struct Args {
    /// Run on a host with a simulated TDX module and a generated app identity.
    #[arg(long)]
    simulate: bool,
    /// The dstack API socket (DstackGuest at `/`).
    #[arg(long)]
    socket: PathBuf,
    /// The legacy tappd socket (Tappd at `/prpc`).
    #[arg(long)]
    tappd_socket: Option<PathBuf>,
    /// State directory of the simulated module (its signing key is reused across runs).
    #[arg(long, default_value = "./dstack-sim")]
    state_dir: PathBuf,
    /// app-compose.json to use instead of a built-in one.
    #[arg(long)]
    app_compose: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.simulate {
        bail!("only --simulate is available standalone; in a CVM the agent runs inside guest-init");
    }
    let compose = match &args.app_compose {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => DEFAULT_APP_COMPOSE.to_owned(),
    };
    let (agent, info) = simulated_agent(&args.state_dir, &compose).await?;
    let sockets = AgentSockets {
        dstack: args.socket.clone(),
        tappd: args.tappd_socket.clone(),
    };
    let mut line = serde_json::to_value(&info)?;
    line["socket"] = serde_json::json!(args.socket);
    line["tappd_socket"] = serde_json::json!(args.tappd_socket);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // Bind first so the printed line means "ready".
    let server = tokio::spawn(async move { serve_agent(Arc::new(agent), &sockets, shutdown).await });
    for _ in 0..200 {
        if args.socket.exists() && args.tappd_socket.as_ref().is_none_or(|p| p.exists()) {
            break;
        }
        if server.is_finished() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if !server.is_finished() {
        println!("{line}");
    }
    server.await.context("agent task")??;
    Ok(())
}
