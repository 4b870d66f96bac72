//! `dstack-vmm-cli`: operator CLI for the dstack VM manager (`dstack-vmm`).
//!
//! ```text
//! dstack-vmm-cli --url unix:./vmm.sock deploy --name web --image dstack-0.1 --compose docker-compose.yaml \
//!     --env-file .env --kms-url https://kms:8000 --kms-signer 02… --port tcp:8080:80
//! dstack-vmm-cli list | info ID | logs ID -f | stop ID [--force] | start ID | remove ID
//! dstack-vmm-cli upgrade ID --compose docker-compose.yaml [--env-file .env] [--restart]
//! dstack-vmm-cli resize ID --vcpu 2 --memory 4096 --disk 40
//! ```

use clap::Parser;
use dstack_host_vmm::cli::{Cli, run};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
