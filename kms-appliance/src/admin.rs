//! `dstack-kms admin …`: deploys the on-chain policy contracts and edits their allow-lists.
//!
//! The signing key (hex secp256k1 secret) comes from `--private-key-file` or the environment variable
//! `DSTACK_KMS_ADMIN_KEY`; never from the command line (it would show in `ps`). Examples:
//!
//! ```text
//! dstack-kms admin --rpc-url http://127.0.0.1:8545 deploy
//! dstack-kms admin --kms-contract 0x… add-os-image 0x<sha256>
//! dstack-kms admin --kms-contract 0x… register-app --compose-hash 0x… --allow-any-device --require-tcb-up-to-date
//! dstack-kms admin --kms-contract 0x… add-compose-hash --app 0x<app id> 0x<hash>
//! ```

use std::path::PathBuf;
use std::time::Duration;

use alloy_primitives::{Address, B256};
use clap::{Args, Subcommand};

use crate::chain::{ChainError, EthRpc, Wallet};
use crate::onchain::{Admin, Change, NewApp};

/// The environment variable holding the admin's private key (hex) when no file is given.
pub const KEY_ENV: &str = "DSTACK_KMS_ADMIN_KEY";

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Ethereum JSON-RPC endpoint (http://).
    #[arg(long, default_value = "http://127.0.0.1:8545")]
    pub rpc_url: String,
    /// File holding the signer's private key (hex). Default: the DSTACK_KMS_ADMIN_KEY environment variable.
    #[arg(long)]
    pub private_key_file: Option<PathBuf>,
    /// The KmsRegistry address (every command but `deploy`).
    #[arg(long)]
    pub kms_contract: Option<Address>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Deploys a KmsRegistry; prints its address.
    Deploy {
        /// Owner (default: the signer).
        #[arg(long)]
        owner: Option<Address>,
    },
    /// Deploys an app's AppAuth and registers it; prints the app id (its address).
    RegisterApp {
        #[arg(long)]
        owner: Option<Address>,
        #[arg(long)]
        allow_any_device: bool,
        #[arg(long)]
        require_tcb_up_to_date: bool,
        #[arg(long)]
        device: Option<B256>,
        #[arg(long)]
        compose_hash: Option<B256>,
    },
    /// Registers an already deployed IAppAuth contract.
    RegisterExistingApp {
        app: Address,
    },
    DeregisterApp {
        app: Address,
    },
    SetGatewayAppId {
        app_id: String,
    },
    AddOsImage {
        hash: B256,
    },
    RemoveOsImage {
        hash: B256,
    },
    AddKmsMr {
        mr_aggregated: B256,
    },
    RemoveKmsMr {
        mr_aggregated: B256,
    },
    AddKmsDevice {
        device: B256,
    },
    RemoveKmsDevice {
        device: B256,
    },
    AddComposeHash {
        #[arg(long)]
        app: Address,
        hash: B256,
    },
    RemoveComposeHash {
        #[arg(long)]
        app: Address,
        hash: B256,
    },
    AddDevice {
        #[arg(long)]
        app: Address,
        device: B256,
    },
    RemoveDevice {
        #[arg(long)]
        app: Address,
        device: B256,
    },
    SetAllowAnyDevice {
        #[arg(long)]
        app: Address,
        #[arg(action = clap::ArgAction::Set)]
        allow: bool,
    },
    SetRequireTcbUpToDate {
        #[arg(long)]
        app: Address,
        #[arg(action = clap::ArgAction::Set)]
        require: bool,
    },
    /// Revokes one instance of an app (its keys are refused with "Instance revoked").
    RevokeInstance {
        #[arg(long)]
        app: Address,
        instance: Address,
    },
    RestoreInstance {
        #[arg(long)]
        app: Address,
        instance: Address,
    },
}

impl AdminCommand {
    /// The registry/app change this command makes, for the commands that are one transaction.
    fn change(&self) -> Option<Change> {
        use AdminCommand as C;
        Some(match self {
            C::Deploy { .. } | C::RegisterApp { .. } => return None,
            C::RegisterExistingApp { app } => Change::RegisterApp(*app),
            C::DeregisterApp { app } => Change::DeregisterApp(*app),
            C::SetGatewayAppId { app_id } => Change::SetGatewayAppId(app_id.clone()),
            C::AddOsImage { hash } => Change::AddOsImage(*hash),
            C::RemoveOsImage { hash } => Change::RemoveOsImage(*hash),
            C::AddKmsMr { mr_aggregated } => Change::AddKmsMr(*mr_aggregated),
            C::RemoveKmsMr { mr_aggregated } => Change::RemoveKmsMr(*mr_aggregated),
            C::AddKmsDevice { device } => Change::AddKmsDevice(*device),
            C::RemoveKmsDevice { device } => Change::RemoveKmsDevice(*device),
            C::AddComposeHash { app, hash } => Change::AddComposeHash { app: *app, hash: *hash },
            C::RemoveComposeHash { app, hash } => Change::RemoveComposeHash { app: *app, hash: *hash },
            C::AddDevice { app, device } => Change::AddDevice {
                app: *app,
                device: *device,
            },
            C::RemoveDevice { app, device } => Change::RemoveDevice {
                app: *app,
                device: *device,
            },
            C::SetAllowAnyDevice { app, allow } => Change::SetAllowAnyDevice {
                app: *app,
                allow: *allow,
            },
            C::SetRequireTcbUpToDate { app, require } => Change::SetRequireTcbUpToDate {
                app: *app,
                require: *require,
            },
            C::RevokeInstance { app, instance } => Change::RevokeInstance {
                app: *app,
                instance: *instance,
            },
            C::RestoreInstance { app, instance } => Change::RestoreInstance {
                app: *app,
                instance: *instance,
            },
        })
    }
}

/// Reads the signer's key from `file` or [`KEY_ENV`].
pub fn load_wallet(file: Option<&std::path::Path>) -> Result<Wallet, ChainError> {
    let secret = zeroize::Zeroizing::new(match file {
        Some(p) => std::fs::read_to_string(p).map_err(|e| ChainError::Key(format!("reading {}: {e}", p.display())))?,
        None => {
            std::env::var(KEY_ENV).map_err(|_| ChainError::Key(format!("give --private-key-file or set {KEY_ENV}")))?
        }
    });
    Wallet::from_hex(&secret)
}

/// Runs one admin command; returns what to print (an address or a transaction hash).
pub async fn run(args: &AdminArgs) -> Result<String, ChainError> {
    let admin = Admin {
        rpc: EthRpc::new(&args.rpc_url, Duration::from_secs(30))?,
        wallet: load_wallet(args.private_key_file.as_deref())?,
    };
    let registry = || {
        args.kms_contract
            .ok_or_else(|| ChainError::Invalid("--kms-contract is required for this command".into()))
    };
    match &args.command {
        AdminCommand::Deploy { owner } => Ok(admin.deploy_registry(*owner).await?.to_string()),
        AdminCommand::RegisterApp {
            owner,
            allow_any_device,
            require_tcb_up_to_date,
            device,
            compose_hash,
        } => {
            let app = NewApp {
                owner: *owner,
                allow_any_device: *allow_any_device,
                require_tcb_up_to_date: *require_tcb_up_to_date,
                device_id: device.unwrap_or_default(),
                compose_hash: compose_hash.unwrap_or_default(),
            };
            Ok(admin.register_new_app(registry()?, &app).await?.to_string())
        }
        other => {
            let change = other
                .change()
                .ok_or_else(|| ChainError::Invalid("not a single-transaction command".into()))?;
            Ok(admin.apply(registry()?, &change).await?.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        admin: AdminArgs,
    }

    #[test]
    fn commands_parse_into_changes() {
        let app = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
        let hash = format!("0x{}", "ab".repeat(32));
        let cli = Cli::try_parse_from(["x", "--kms-contract", app, "add-compose-hash", "--app", app, &hash]).unwrap();
        assert_eq!(
            cli.admin.command.change(),
            Some(Change::AddComposeHash {
                app: app.parse().unwrap(),
                hash: hash.parse().unwrap()
            })
        );
        let cli = Cli::try_parse_from(["x", "set-allow-any-device", "--app", app, "false"]).unwrap();
        assert!(matches!(
            cli.admin.command.change(),
            Some(Change::SetAllowAnyDevice { allow: false, .. })
        ));
        assert!(
            Cli::try_parse_from(["x", "add-os-image", "0x1234"]).is_err(),
            "short hash accepted"
        );
        assert!(
            Cli::try_parse_from(["x", "deploy"])
                .unwrap()
                .admin
                .command
                .change()
                .is_none()
        );
    }
}
