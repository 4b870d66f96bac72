//! Benchmark: virtio-net frames through our device on /dev/kvm, between a polling guest payload and a host
//! peer on the passt-style unix socket (4-byte big-endian length + frame). Two modes per frame size:
//! - `tx`: the guest sends N frames back to back (one descriptor, waiting for each to be used); the peer
//!   reads them. Measures guest → host frames/s.
//! - `echo`: the guest sends a frame and waits for the peer's echo before the next one (round trips/s).
//!
//! Times are taken on the host peer from the first to the last frame. Prints frames/s and MB/s.
//! Run: `cargo run --release -p dstack-host-vmm --example net_bench`

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::net_guest::*;
use common::virtio_guest::Fails;
use common::*;
use dstack_host_vmm::VmExit;
use dstack_host_vmm::vmm::{NetBackendConfig, NetConfig};

const FRAMES: u32 = 20_000;

fn payload(size: u32, echo: bool) -> Vec<u8> {
    let mut a = asm();
    let mut f = Fails::default();
    setup(&mut a, &mut f);
    tx_eth_header(&mut a, [2, 0, 0, 0, 0, 1], 0x88b5);
    fill_pattern(&mut a, size, 0);
    a.mov(r14d, FRAMES).unwrap();
    let mut lp = a.create_label();
    a.set_label(&mut lp).unwrap();
    send(&mut a, &mut f, size, 0x10);
    if echo {
        recv(&mut a, &mut f, 0x20);
        let bad = f.at(&mut a, 0x30);
        a.cmp(r8d, HDR + size).unwrap();
        a.jne(bad).unwrap();
        repost(&mut a);
    }
    a.dec(r14d).unwrap();
    a.jnz(lp).unwrap();
    emit_exit(&mut a, 0x50);
    f.emit(&mut a);
    assemble(a)
}

fn run(hv: &dstack_host_vmm::hypervisor::kvm::KvmHypervisor, size: u32, echo: bool) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut first = None;
        let mut buf = vec![0u8; 70_000];
        for _ in 0..FRAMES {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let n = u32::from_be_bytes(len) as usize;
            s.read_exact(&mut buf[..n]).unwrap();
            first.get_or_insert_with(Instant::now);
            if echo {
                s.write_all(&len).unwrap();
                s.write_all(&buf[..n]).unwrap();
            }
        }
        first.map(|t| t.elapsed()).unwrap_or_default()
    });
    let mut cfg = config(write_elf(dir.path(), &payload(size, echo)));
    cfg.timeout = Some(Duration::from_secs(120));
    cfg.devices.net = Some(NetConfig {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        mtu: None,
        backend: NetBackendConfig::Passt { socket },
    });
    let b = boot_config(hv, dir.path(), &cfg);
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(0x50)),
        "exit {:?}",
        b.report.exit
    );
    let t = peer.join().unwrap().as_secs_f64();
    let rate = f64::from(FRAMES) / t;
    let mode = if echo { "echo round trips" } else { "tx frames" };
    println!(
        "net {mode:>16}, {size:>4}-byte frames: {rate:>9.0}/s, {:>7.1} MB/s ({FRAMES} in {:.3} s, {:.1} exits/frame)",
        rate * f64::from(size) / 1e6,
        t,
        b.report.userspace_exits as f64 / f64::from(FRAMES)
    );
}

fn main() {
    let Some(hv) = kvm_or_skip("net_bench") else {
        return;
    };
    for size in [64, 1514] {
        run(&hv, size, false);
        run(&hv, size, true);
    }
}
