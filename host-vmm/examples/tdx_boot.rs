//! Boots an image as an Intel TDX guest with `dstack_host_vmm::tdx::run::boot_td` and prints the serial
//! console — the first hardware check on a TDX host (host-vmm/docs/tdx-host.md). On a host without TDX it
//! stops with the capability error.
//!
//! `cargo run --release -p dstack-host-vmm --example tdx_boot -- IMAGE_DIR [VCPUS] [MEMORY_MB] [QGS_SOCKET]`
//! where IMAGE_DIR holds `ovmf.fd`, `bzImage`, `initramfs.cpio.gz` and `metadata.json` (its `cmdline`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dstack_host_vmm::devices::serial::SerialSink;
use dstack_host_vmm::hypervisor::kvm::KvmHypervisor;
use dstack_host_vmm::tdx::TdxConfig;
use dstack_host_vmm::tdx::fw_cfg::DirectBoot;
use dstack_host_vmm::tdx::quote::{QgsClient, QuoteService};
use dstack_host_vmm::tdx::run::boot_td;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .context("usage: tdx_boot IMAGE_DIR [VCPUS] [MEMORY_MB] [QGS_SOCKET]")?,
    );
    let vcpus: u32 = args.get(1).map_or(Ok(1), |v| v.parse())?;
    let memory_mb: u64 = args.get(2).map_or(Ok(2048), |v| v.parse())?;
    let qgs: Option<Arc<dyn QuoteService>> = args.get(3).map(|p| {
        Arc::new(QgsClient {
            socket: PathBuf::from(p),
        }) as Arc<dyn QuoteService>
    });
    let read = |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("reading {name}"));
    let (firmware, kernel, initrd) = (read("ovmf.fd")?, read("bzImage")?, read("initramfs.cpio.gz")?);
    let metadata: serde_json::Value = serde_json::from_slice(&read("metadata.json")?)?;
    let cmdline = metadata["cmdline"].as_str().context("metadata.json has no cmdline")?;

    let hv = KvmHypervisor::new()?;
    let cfg = TdxConfig::new(&firmware, memory_mb << 20, vcpus);
    let boot = DirectBoot {
        kernel: &kernel,
        initrd: &initrd,
        cmdline,
    };
    let sink = SerialSink {
        stdout: true,
        ..Default::default()
    };
    let outcome = boot_td(
        &hv,
        &cfg,
        &boot,
        &Default::default(),
        sink,
        qgs,
        None,
        Some(Duration::from_secs(600)),
    )?;
    eprintln!("TD stopped: {outcome:?}");
    std::process::exit(outcome.exit_code());
}
