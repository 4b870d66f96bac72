//! `dstack-measure`: verifier CLI over the measurements library.
//!
//! Exit codes: 0 success; 1 a well-formed input failed a check (signature, replay, diff);
//! 2 malformed input or usage error (one line naming what and where).

mod cmds;
mod input;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Error classes mapped to exit codes.
#[derive(Debug)]
pub enum CliError {
    /// Malformed input / usage (exit 2).
    Input(String),
    /// A check failed on well-formed input (exit 1).
    Failed(String),
}

impl CliError {
    pub fn input(e: impl std::fmt::Display) -> Self {
        CliError::Input(e.to_string())
    }
}

pub type CliResult = Result<(), CliError>;

#[derive(Parser, Debug)]
#[command(
    name = "dstack-measure",
    version,
    about = "Parse/verify TDX quotes, replay event logs, predict and diff measurements"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Parse a quote (raw binary or hex text, with or without 0x).
    Quote {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify a quote's signature chain offline against collateral at a given time.
    Verify {
        quote: PathBuf,
        /// dcap-qvl collateral JSON (needed for real Intel quotes).
        #[arg(long)]
        collateral: Option<PathBuf>,
        /// Verification time, UNIX seconds (default: now).
        #[arg(long)]
        now: Option<u64>,
        /// Accept simulated quotes (status "Simulated") signed under a pinned root.
        #[arg(long)]
        allow_simulated: bool,
        /// Pinned simulator root: a PEM/DER certificate file or 64 hex chars (SPKI SHA-256).
        #[arg(long = "simulated-root")]
        simulated_roots: Vec<String>,
        /// Accept TDs with the DEBUG attribute.
        #[arg(long)]
        allow_debug: bool,
        #[arg(long)]
        json: bool,
    },
    /// Replay an event log (raw CCEL area, JSON array, or JSON {quote, event_log}).
    Replay {
        log: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Compute MRTD from a TDVF/OVMF firmware image.
    Mrtd {
        firmware: PathBuf,
        /// QEMU 8.x order: per section all page adds, then all extends.
        #[arg(long)]
        two_pass: bool,
        #[arg(long)]
        json: bool,
    },
    /// Predict MRTD/RTMR0-2 for an image directory and VM shape (OVMF direct boot by our VMM).
    Image {
        dir: PathBuf,
        #[arg(long)]
        vcpus: u32,
        /// Memory size: bytes, or with a K/M/G/T suffix (binary; `2G`, `2048M`, `2GiB`).
        #[arg(long)]
        memory: String,
        #[arg(long)]
        json: bool,
    },
    /// Compare measurements.json with an attestation, register by register.
    Diff {
        measurements: PathBuf,
        attestation: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let res = match cli.cmd {
        Cmd::Quote { file, json } => cmds::quote(&file, json),
        Cmd::Verify {
            quote,
            collateral,
            now,
            allow_simulated,
            simulated_roots,
            allow_debug,
            json,
        } => cmds::verify(cmds::VerifyArgs {
            quote,
            collateral,
            now,
            allow_simulated,
            simulated_roots,
            allow_debug,
            json,
        }),
        Cmd::Replay { log, json } => cmds::replay(&log, json),
        Cmd::Mrtd {
            firmware,
            two_pass,
            json,
        } => cmds::mrtd(&firmware, two_pass, json),
        Cmd::Image {
            dir,
            vcpus,
            memory,
            json,
        } => cmds::image(&dir, vcpus, &memory, json),
        Cmd::Diff {
            measurements,
            attestation,
            json,
        } => cmds::diff(&measurements, &attestation, json),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Input(msg)) => {
            eprintln!("error: {}", one_line(&msg));
            ExitCode::from(2)
        }
        Err(CliError::Failed(msg)) => {
            eprintln!("error: {}", one_line(&msg));
            ExitCode::from(1)
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
