//! Benchmark: virtio-blk throughput seen by a guest payload on /dev/kvm — sequential 4 KiB requests, one in
//! flight (the payload polls the used ring), over a 64 MiB raw image: first all writes (+ one flush), then
//! all reads, each in its own VM. Prints MB/s and VM exits per request (notifications go through ioeventfds,
//! so ideally only the payload's start and end exit).
//!
//! Run: `cargo run --release -p dstack-host-vmm --example blk_bench`

#[path = "../tests/common/mod.rs"]
mod common;

use common::virtio_guest::*;
use common::*;
use dstack_host_vmm::{DiskConfig, VmExit};

const DISK_MIB: u64 = 64;
const CHUNK: u32 = 4096;
const REQUESTS: u32 = (DISK_MIB << 20) as u32 / CHUNK;

fn payload(write: bool) -> Vec<u8> {
    let hdr = BUFS;
    let status = BUFS + 0x100;
    let data = BUFS + 0x1000;
    let q = Vq {
        index: 0,
        base: QUEUES,
        vars: VARS,
    };
    let mut a = asm();
    let mut f = Fails::default();
    find_device(&mut a, &mut f, 0x1042, 1);
    map_capabilities(&mut a, VARS);
    init_device(&mut a, &mut f, VARS, &[q], 2);
    write_desc(&mut a, &q, 0, hdr, 16, F_NEXT);
    write_desc(&mut a, &q, 1, data, CHUNK, F_NEXT | if write { 0 } else { F_WRITE });
    write_desc(&mut a, &q, 2, status, 1, F_WRITE);
    a.mov(rdi, hdr).unwrap();
    a.mov(dword_ptr(rdi), if write { 1u32 } else { 0 }).unwrap();
    a.xor(r12d, r12d).unwrap();
    a.xor(r13d, r13d).unwrap();
    let bad_status = f.at(&mut a, 4);
    let mut lp = a.create_label();
    a.set_label(&mut lp).unwrap();
    a.mov(rdi, hdr).unwrap();
    a.mov(qword_ptr(rdi + 8), r13).unwrap();
    publish_r12(&mut a, &q, 0);
    wait_used(&mut a, &mut f, &q, r12d, 3);
    a.mov(rdi, status).unwrap();
    a.cmp(byte_ptr(rdi), 0u32).unwrap();
    a.jne(bad_status).unwrap();
    a.add(r13, i32::try_from(CHUNK / 512).unwrap()).unwrap();
    a.cmp(r12d, REQUESTS).unwrap();
    a.jb(lp).unwrap();
    if write {
        // One flush at the end, so the number includes getting the data to the file's storage.
        a.mov(rdi, hdr).unwrap();
        a.mov(dword_ptr(rdi), 4u32).unwrap();
        write_desc(&mut a, &q, 1, status, 1, F_WRITE);
        publish_r12(&mut a, &q, 0);
        wait_used(&mut a, &mut f, &q, r12d, 5);
    }
    emit_exit(&mut a, 0x50);
    f.emit(&mut a);
    assemble(a)
}

fn main() {
    let Some(hv) = kvm_or_skip("blk_bench") else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("bench.img");
    std::fs::write(&disk, vec![0u8; (DISK_MIB << 20) as usize]).unwrap();
    println!("virtio-blk, {REQUESTS} sequential {CHUNK}-byte requests ({DISK_MIB} MiB), queue depth 1:");
    for (name, write) in [("write (+flush)", true), ("read", false)] {
        let mut cfg = config(write_elf(dir.path(), &payload(write)));
        cfg.timeout = Some(std::time::Duration::from_secs(300));
        cfg.devices.disks.push(DiskConfig {
            path: disk.clone(),
            read_only: !write,
        });
        let b = boot_config(&hv, dir.path(), &cfg);
        assert!(
            matches!(b.report.exit, VmExit::DebugExit(0x50)),
            "{name}: {:?}",
            b.report.exit
        );
        let t = b.report.timing;
        let secs = (t.end_ns - t.first_run_ns) as f64 / 1e9;
        println!(
            "  {name:<15} {:8.1} MB/s  ({:.3} s, {:.1} µs/request, {:.2} VM exits/request)",
            (DISK_MIB << 20) as f64 / secs / 1e6,
            secs,
            secs * 1e6 / f64::from(REQUESTS),
            b.report.userspace_exits as f64 / f64::from(REQUESTS)
        );
    }
}
