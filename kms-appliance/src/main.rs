//! `dstack-kms`: the KMS appliance. `dstack-kms --config kms.toml` (see `dstack_kms::config` for the fields);
//! `dstack-kms admin …` manages the on-chain policy contracts (see `dstack_kms::admin`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dstack_kms::{Kms, KmsConfig};

#[derive(Parser, Debug)]
#[command(version, about = "dstack-compatible KMS: attested key release")]
struct Args {
    /// Configuration file (kms.toml). Without it the documented defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Deploy and edit the on-chain policy contracts (KmsRegistry, AppAuth).
    Admin(dstack_kms::admin::AdminArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    if let Some(Command::Admin(admin)) = &args.command {
        let out = dstack_kms::admin::run(admin).await.context("admin command failed")?;
        println!("{out}");
        return Ok(());
    }
    let config = match &args.config {
        Some(path) => KmsConfig::load(path)?,
        None => KmsConfig::default(),
    };
    let kms = Kms::new(config).context("starting the KMS")?;
    tokio::select! {
        r = kms.run() => r.context("KMS stopped")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
    }
    Ok(())
}
