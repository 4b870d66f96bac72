//! Foundry's anvil as a test fixture (npm `@foundry-rs/anvil-linux-amd64`).
//!
//! Environment: `DSTACK_TEST_ANVIL` = path of the anvil binary (e.g.
//! `/var/cache/dstack-rs/npm-anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil`). Unset: [`anvil`]
//! prints a loud SKIP and returns `None`, unless `DSTACK_REQUIRE_FIXTURES=1`, where it panics.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dstack_kms::chain::{EthRpc, Wallet};
use dstack_kms::onchain::Admin;

/// Anvil's first two well-known development keys (public, test-only).
pub const DEV_KEY_0: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
pub const DEV_KEY_1: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

/// A running anvil, killed on drop.
pub struct Anvil {
    child: Child,
    pub url: String,
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn anvil() -> Option<Anvil> {
    let Some(bin) = std::env::var_os("DSTACK_TEST_ANVIL") else {
        assert!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref() != Ok("1"),
            "DSTACK_TEST_ANVIL is not set but DSTACK_REQUIRE_FIXTURES=1"
        );
        eprintln!("!!! SKIP: DSTACK_TEST_ANVIL (path of Foundry's anvil) is not set; on-chain tests did not run !!!");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--silent"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.to_string_lossy()));
    let anvil = Anvil {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let rpc = EthRpc::new(&anvil.url, Duration::from_secs(2)).unwrap();
    let start = Instant::now();
    loop {
        match rpc.chain_id().await {
            Ok(id) => {
                assert_eq!(id, 31337, "anvil's default chain id");
                return Some(anvil);
            }
            Err(e) if start.elapsed() > Duration::from_secs(30) => panic!("anvil did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub fn admin(anvil: &Anvil, key: &str) -> Admin {
    Admin {
        rpc: EthRpc::new(&anvil.url, Duration::from_secs(10)).unwrap(),
        wallet: Wallet::from_hex(key).unwrap(),
    }
}
