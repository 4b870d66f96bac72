//! Benchmark: VMM setup time (process start → first guest instruction) and VMM RSS beyond guest RAM.
//!
//! Spawns `dstack-vmm-run` (next to this example in the target dir, or `$DSTACK_VMM_RUN`) with a payload
//! whose first instruction exits through the debug port, and reads the child's `CLOCK_BOOTTIME` timestamps:
//! spawn → first `KVM_RUN` and spawn → first exit (the first guest instruction has run by then).
//! Also measures the same in-process (`Vmm::new` → first exit), which excludes exec and dynamic loading.
//! Targets: setup ≤ 20 ms, RSS beyond guest RAM ≤ 10 MiB.
//!
//! Run: `cargo build --release -p dstack-host-vmm && cargo run --release -p dstack-host-vmm --example setup_bench`

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use dstack_host_vmm::devices::serial::SerialSink;
use dstack_host_vmm::timing::boottime_ns;
use dstack_host_vmm::{VmExit, Vmm};

const RUNS: usize = 20;

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = v[v.len() / 2];
    println!(
        "{name:<44} min {:7.2}  median {:7.2}  max {:7.2}",
        v[0],
        median,
        v[v.len() - 1]
    );
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn main() {
    let Some(hv) = kvm_or_skip("setup_bench") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_exit(&mut a, 0);
    let kernel = write_elf(dir.path(), &assemble(a));
    let memory_mib = 256;

    // In-process: Vmm::new start → first exit.
    let mut setup = Vec::new();
    let mut to_first_exit = Vec::new();
    for _ in 0..RUNS {
        let mut cfg = config(kernel.clone());
        cfg.memory_mib = memory_mib;
        let vmm = Vmm::new(&hv, &cfg, SerialSink::default()).unwrap();
        let r = vmm.run().unwrap();
        assert!(matches!(r.exit, VmExit::DebugExit(0)), "{:?}", r.exit);
        let t = r.timing;
        setup.push((t.setup_done_ns - t.setup_start_ns) as f64 / 1e6);
        to_first_exit.push((t.first_exit_ns - t.setup_start_ns) as f64 / 1e6);
    }
    println!("in-process, {RUNS} runs, {memory_mib} MiB, 1 vCPU (ms):");
    stats("  Vmm::new (setup)", setup);
    stats("  Vmm::new start → first guest exit", to_first_exit);

    // Out of process: spawn → first KVM_RUN / first exit, and RSS.
    let bin = std::env::var_os("DSTACK_VMM_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().and_then(|p| p.parent()).unwrap().join("dstack-vmm-run")
        });
    if !bin.exists() {
        println!(
            "{} not found: build it first (cargo build [--release] -p dstack-host-vmm)",
            bin.display()
        );
        return;
    }
    let mut to_run = Vec::new();
    let mut to_exit = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..RUNS {
        let spawn_ns = boottime_ns();
        let out = Command::new(&bin)
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory-mib", &memory_mib.to_string(), "--print-timing"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let raw = stderr
            .lines()
            .find(|l| l.starts_with("timing-raw:"))
            .expect("timing-raw line");
        let first_run = field(raw, "first_run_ns").unwrap();
        let first_exit = field(raw, "first_exit_ns").unwrap();
        to_run.push((first_run - spawn_ns) as f64 / 1e6);
        to_exit.push((first_exit - spawn_ns) as f64 / 1e6);
        let rss_line = stderr.lines().find(|l| l.starts_with("rss:")).expect("rss line");
        rss.push(field(rss_line, "vmm_kib").unwrap() as f64 / 1024.0);
    }
    println!("{} ({RUNS} runs, {memory_mib} MiB, 1 vCPU):", bin.display());
    stats("  spawn → first KVM_RUN (ms)", to_run);
    stats("  spawn → first guest exit (ms) [target ≤ 20]", to_exit);
    stats("  RSS beyond guest RAM (MiB) [target ≤ 10]", rss);
}
