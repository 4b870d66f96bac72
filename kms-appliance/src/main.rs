//! `dstack-kms`: the KMS appliance. `dstack-kms --config kms.toml` (see `dstack_kms::config` for the fields).

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
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
