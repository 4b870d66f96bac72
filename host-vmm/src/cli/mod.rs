//! `dstack-vmm-cli`: the operator CLI for the VM manager, speaking its `Vmm` pRPC API (the same wire format
//! as dstack's `vmm-cli.py`) over a unix socket or `http(s)://` with a bearer token.
//!
//! - [`compose`] — `app-compose.json`, `.env` files, port mappings.
//! - [`kms`] — the env public key from the KMS, its signature, encryption.
//! - [`commands`] — the subcommands and progress output.

pub mod commands;
pub mod compose;
pub mod kms;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use dstack_rpc::Client;
use dstack_rpc::vmm::VmmClient;

/// Errors shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Input(String),
    #[error("reading {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("VM manager at {url}: {message}")]
    Api { url: String, message: String },
    #[error("KMS: {0}")]
    Kms(String),
    #[error("env encryption: {0}")]
    Env(#[from] dstack_keys::EnvError),
    #[error("{0}")]
    Failed(String),
}

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "dstack-vmm-cli",
    about = "Operate the dstack VM manager (deploy, list, logs, lifecycle)"
)]
pub struct Cli {
    /// Manager endpoint: `unix:/path/vmm.sock` or `http(s)://host:port`.
    #[arg(long, env = "DSTACK_VMM_URL", default_value = "unix:./vmm.sock", global = true)]
    pub url: String,
    /// Bearer token for TCP endpoints.
    #[arg(long, env = "DSTACK_VMM_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate to verify an `https://` manager.
    #[arg(long, global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Do not verify an `https://` manager's certificate.
    #[arg(long, global = true)]
    pub insecure: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a VM from a docker-compose file (builds app-compose.json, encrypts --env-file for the KMS).
    Deploy(DeployArgs),
    /// List VMs.
    #[command(alias = "lsvm", alias = "ls")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one VM (configuration, boot progress, events).
    Info {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a VM's console log.
    Logs {
        id: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        /// serial, stdout or stderr.
        #[arg(long, default_value = "serial")]
        source: String,
    },
    /// Stop a VM: graceful power-off (ShutdownVm), or immediately with --force (StopVm).
    Stop {
        id: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Start a stopped VM and follow its boot.
    Start {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove a VM and its data.
    #[command(alias = "rm")]
    Remove { id: String },
    /// Replace a stopped VM's docker-compose file (and env); the rest of app-compose.json is kept.
    Upgrade(UpgradeArgs),
    /// Change a stopped VM's vCPUs, memory, disk or image.
    Resize {
        id: String,
        #[arg(long)]
        vcpu: Option<u32>,
        /// Memory in MB.
        #[arg(long)]
        memory: Option<u32>,
        /// Data disk in GB (grow only).
        #[arg(long)]
        disk: Option<u32>,
        #[arg(long)]
        image: Option<String>,
    },
}

/// Waiting for the guest to boot after create/start.
#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// Return at once instead of following boot progress.
    #[arg(long)]
    pub detach: bool,
    /// Give up following boot progress after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// KMS options shared by deploy and upgrade.
#[derive(Args, Debug, Clone)]
pub struct KmsArgs {
    /// KMS URL(s) for the guest (and for fetching the env key; the first is used). Default: the manager's.
    #[arg(long = "kms-url")]
    pub kms_urls: Vec<String>,
    /// Trusted KMS signer public key(s) (compressed secp256k1, hex); the env key must be signed by one.
    #[arg(long = "kms-signer")]
    pub kms_signers: Vec<String>,
    /// `KEY=VALUE` file to encrypt for the app (needs KMS).
    #[arg(long)]
    pub env_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// VM and app name.
    #[arg(long)]
    pub name: String,
    /// Guest image name (see the manager's image directory).
    #[arg(long)]
    pub image: String,
    /// docker-compose.yaml of the app.
    #[arg(long)]
    pub compose: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub vcpu: u32,
    /// Memory in MB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Data disk in GB.
    #[arg(long, default_value_t = 20)]
    pub disk: u32,
    /// Port mapping `tcp:HOST_PORT:VM_PORT` or `tcp:ADDR:HOST_PORT:VM_PORT` (repeatable).
    #[arg(long = "port")]
    pub ports: Vec<String>,
    #[command(flatten)]
    pub keys: KmsArgs,
    /// Gateway URL(s) for the guest.
    #[arg(long = "gateway-url")]
    pub gateway_urls: Vec<String>,
    /// Use the KMS for keys (default: when a KMS URL is known).
    #[arg(long = "kms", overrides_with = "no_kms")]
    pub kms_enabled: bool,
    /// Do not use the KMS even if one is configured.
    #[arg(long = "no-kms")]
    pub no_kms: bool,
    /// Register with the gateway.
    #[arg(long)]
    pub gateway: bool,
    /// Make the app's container logs public (app-compose `public_logs`).
    #[arg(long)]
    pub public_logs: bool,
    /// Make system info public (app-compose `public_sysinfo`).
    #[arg(long)]
    pub public_sysinfo: bool,
    /// No per-instance id (app-compose `no_instance_id`).
    #[arg(long)]
    pub no_instance_id: bool,
    /// Require secure time before starting (app-compose `secure_time`).
    #[arg(long)]
    pub secure_time: bool,
    /// Pinned app id (hex, 40 digits); default sha256(app-compose.json)[..20].
    #[arg(long)]
    pub app_id: Option<String>,
    /// Create without starting.
    #[arg(long)]
    pub stopped: bool,
    /// Write the generated app-compose.json here as well.
    #[arg(long)]
    pub output_compose: Option<PathBuf>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    pub id: String,
    /// New docker-compose.yaml.
    #[arg(long)]
    pub compose: PathBuf,
    #[command(flatten)]
    pub keys: KmsArgs,
    /// Shut the VM down first if it runs, and start it again afterwards.
    #[arg(long)]
    pub restart: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// A connection to the manager: the base HTTP client and the typed `Vmm` client under `/prpc`.
pub struct Conn {
    pub url: String,
    pub http: Client,
    pub vmm: VmmClient<Client>,
}

impl Conn {
    pub fn new(cli: &Cli) -> Result<Self, CliError> {
        let api = |message: String| CliError::Api {
            url: cli.url.clone(),
            message,
        };
        let mut http = Client::new(&cli.url).map_err(|e| api(e.to_string()))?;
        http = http.with_path_prefix("");
        if cli.url.starts_with("https://") {
            http = http.with_tls(manager_tls(cli)?);
        }
        if let Some(t) = &cli.token {
            http = http.with_bearer_token(t).map_err(|e| api(e.to_string()))?;
        }
        let vmm = VmmClient::new(http.clone().with_path_prefix("/prpc"));
        Ok(Conn {
            url: cli.url.clone(),
            http,
            vmm,
        })
    }

    /// Wraps an API error with the endpoint.
    pub fn err(&self, e: impl std::fmt::Display) -> CliError {
        CliError::Api {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }
}

fn manager_tls(cli: &Cli) -> Result<Arc<rustls::ClientConfig>, CliError> {
    if cli.insecure {
        return kms::unverified_tls();
    }
    let Some(ca) = &cli.ca_cert else {
        return Err(CliError::Input(
            "an https:// manager needs --ca-cert <PEM> (or --insecure to skip verification)".into(),
        ));
    };
    let pem = std::fs::read(ca).map_err(|source| CliError::File {
        path: ca.display().to_string(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| CliError::Input(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| CliError::Input(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Input(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Reads a UTF-8 file.
pub fn read_text(path: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::File {
        path: path.display().to_string(),
        source,
    })
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let conn = Conn::new(&cli)?;
    commands::run(&conn, cli.command).await
}
