//! `dstack-vmm`: the VM manager daemon. Serves dstack's `Vmm` pRPC API at `/prpc` on a unix socket (and
//! optionally on TCP with bearer tokens), so dstack's `vmm-cli.py --url unix:./vmm.sock` works against it.
//!
//! ```text
//! dstack-vmm --config vmm.toml
//! ```
//! On SIGINT/SIGTERM the daemon exits and leaves VMs running; the next start re-adopts them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use dstack_host_vmm::manager::backend::PasstNet;
use dstack_host_vmm::manager::{self, Backend, BackendKind, KvmBackend, Manager, TcgBackend, VmmConfig};

#[derive(Parser, Debug)]
#[command(name = "dstack-vmm", about = "dstack VM manager daemon")]
struct Args {
    /// vmm.toml (absent: built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn backend(cfg: &VmmConfig) -> anyhow::Result<Box<dyn Backend>> {
    let c = &cfg.cvm;
    Ok(match c.backend {
        BackendKind::Kvm => Box::new(kvm_backend(cfg)),
        BackendKind::Tcg => {
            tracing::warn!("backend tcg: VMs run under QEMU software emulation (development/CI only, never TDX)");
            Box::new(TcgBackend {
                qemu: c.qemu_path.clone(),
                vhost_vsock: c.vhost_vsock_path.clone(),
                mkfs_erofs: c.mkfs_erofs_path.clone(),
                net: c.networking.net.clone(),
                dhcp_start: c.networking.dhcp_start.clone(),
            })
        }
        BackendKind::Tdx => {
            use dstack_host_vmm::hypervisor::kvm::KvmHypervisor;
            use dstack_host_vmm::manager::TdxBackend;
            let qgs = cfg.cvm.tdx.qgs_socket.clone();
            let mut b = match KvmHypervisor::new() {
                Ok(hv) => TdxBackend::probe(&hv, kvm_backend(cfg), qgs),
                Err(e) => TdxBackend::unavailable(
                    kvm_backend(cfg),
                    qgs,
                    format!("this host cannot run TDX guests: opening /dev/kvm: {e}"),
                ),
            };
            b.use_mrconfigid = cfg.cvm.tdx.use_mrconfigid;
            if let Err(e) = b.available() {
                tracing::error!("backend tdx: VMs cannot start on this host: {e}");
            }
            Box::new(b)
        }
    })
}

/// The `kvm` backend's command line (also the base of `tdx`'s).
fn kvm_backend(cfg: &VmmConfig) -> KvmBackend {
    let c = &cfg.cvm;
    KvmBackend {
        vmm_run: c.vmm_run_path.clone().unwrap_or_else(|| sibling("dstack-vmm-run")),
        mkfs_erofs: c.mkfs_erofs_path.clone(),
        passt: (!c.passt_path.as_os_str().is_empty()).then(|| PasstNet {
            program: c.passt_path.clone(),
            net: c.networking.net.clone(),
            dhcp_start: c.networking.dhcp_start.clone(),
        }),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = match &args.config {
        Some(p) => VmmConfig::load(p)?,
        None => VmmConfig::default(),
    };
    let backend = backend(&cfg)?;
    let mgr: Arc<Manager> = Manager::open(cfg.clone(), backend).context("loading VM state")?;
    let monitor = mgr.spawn_monitor();
    let front = manager::dashboard::frontend(mgr.clone());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let path = cfg
        .address
        .strip_prefix("unix:")
        .context("address must be unix:<path>")?;
    let listener = dstack_rpc::bind_unix(path, 0o600).with_context(|| format!("binding {path}"))?;
    tracing::info!(
        "serving /prpc, /guest, /logs and the dashboard on unix:{path} (backend {})",
        mgr.backend().name()
    );
    let mut servers = vec![tokio::spawn(manager::dashboard::serve(
        listener,
        front.clone(),
        wait_stop(stop_rx.clone()),
    ))];
    if let Some(addr) = &cfg.tcp_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!("serving /prpc on tcp:{addr} (bearer-token auth)");
        servers.push(tokio::spawn(manager::dashboard::serve(
            listener,
            front,
            wait_stop(stop_rx),
        )));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; VMs keep running and are re-adopted on the next start");
    let _ = stop_tx.send(true);
    mgr.detach();
    monitor.abort();
    for s in servers {
        s.await??;
    }
    Ok(())
}
