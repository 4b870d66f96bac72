//! `dstack-guest-agent`: the dstack-compatible guest agent. In a CVM, guest-init embeds the library; this
//! binary's `--simulate` mode runs it on a host with an in-process simulated TDX module (never TDX):
//!
//! ```text
//! dstack-guest-agent --simulate --socket ./dstack.sock [--tappd-socket ./tappd.sock] [--state-dir ./sim]
//!                    [--compose app-compose.json]
//! ```
//!
//! Without `--state-dir` the simulated module gets a fresh signer in a temporary directory. When the sockets
//! accept connections it prints one JSON line (`SimulationInfo`: simulator root pin, KMS keys, identities) on
//! stdout. `guest-init agent --simulate …` runs the same code ([`run_simulator_blocking`]).

use std::path::PathBuf;

use clap::Parser;
use dstack_guest_agent::simulate::{SimulateOptions, run_simulator_blocking};

#[derive(Parser, Debug)]
#[command(version, about = "dstack-compatible guest agent (host simulation mode)")]
struct Args {
    /// Run on a host with a simulated TDX module and a generated app identity (required).
    #[arg(long)]
    simulate: bool,
    /// The dstack API socket (DstackGuest at `/`).
    #[arg(long)]
    socket: PathBuf,
    /// The legacy tappd socket (Tappd at `/prpc`).
    #[arg(long)]
    tappd_socket: Option<PathBuf>,
    /// State directory of the simulated module (its signing key is reused across runs); default: a fresh
    /// temporary one.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// app-compose.json to use instead of a built-in one.
    #[arg(long, visible_alias = "app-compose")]
    compose: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.simulate {
        anyhow::bail!("only --simulate is available standalone; in a CVM the agent runs inside guest-init");
    }
    run_simulator_blocking(&SimulateOptions {
        socket: args.socket,
        tappd_socket: args.tappd_socket,
        state_dir: args.state_dir,
        app_compose: args.compose,
    })?;
    Ok(())
}
