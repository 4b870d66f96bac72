//! Payloads that drive our virtio-pci devices on the real /dev/kvm: they enumerate PCI through 0xCF8/0xCFC,
//! find the devices by vendor/device ID, walk the virtio capabilities, set up split virtqueues in their own
//! memory and poll the used rings (no interrupts). Results come back over serial and the debug-exit status.
//! Skipped when /dev/kvm is absent; `DSTACK_REQUIRE_KVM=1` turns the skip into a failure.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use common::virtio_guest::*;
use common::*;
use dstack_host_vmm::{DiskConfig, VmExit, VsockConfig};

const OK: u8 = 0x50;

fn expect_ok(b: &Booted) {
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(v) if v == u32::from(OK)),
        "exit: {:?}\nserial: {}",
        b.report.exit,
        String::from_utf8_lossy(&b.serial)
    );
}

#[test]
fn virtio_rng_fills_guest_buffer() {
    let Some(hv) = kvm_or_skip("virtio_rng_fills_guest_buffer") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    let mut f = Fails::default();
    let q = Vq {
        index: 0,
        base: QUEUES,
        vars: VARS,
    };
    find_device(&mut a, &mut f, 0x1044, 1);
    map_capabilities(&mut a, VARS);
    init_device(&mut a, &mut f, VARS, &[q], 2);
    write_desc(&mut a, &q, 0, BUFS, 16, F_WRITE);
    a.xor(r12d, r12d).unwrap();
    publish_r12(&mut a, &q, 0);
    wait_used(&mut a, &mut f, &q, r12d, 3);
    check_used_len(&mut a, &mut f, &q, 0, 16, 4);
    a.mov(rsi, BUFS).unwrap();
    a.mov(ecx, 16).unwrap();
    emit_write_rsi(&mut a);
    emit_exit(&mut a, OK);
    f.emit(&mut a);
    let mut cfg = config(write_elf(dir.path(), &assemble(a)));
    cfg.devices.rng = true;
    let b = boot_config(&hv, dir.path(), &cfg);
    expect_ok(&b);
    assert_eq!(b.serial.len(), 16);
    assert!(
        b.serial.iter().any(|&x| x != 0),
        "16 random bytes are all zero with probability 2^-128"
    );
    assert_eq!(b.report.unknown_count, 0, "{:?}", b.report.unknown);
}

/// Writes sector 5 with a pattern, flushes, reads it back and compares inside the guest; the host checks the
/// backing file.
#[test]
fn virtio_blk_write_flush_read_back() {
    let Some(hv) = kvm_or_skip("virtio_blk_write_flush_read_back") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("data.img");
    std::fs::write(&disk, vec![0xeeu8; 64 * 512]).unwrap();
    let hdr = BUFS;
    let status = BUFS + 0x100;
    let wbuf = BUFS + 0x1000;
    let rbuf = BUFS + 0x2000;
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
    // Pattern: byte i = i * 7 + 3.
    let mut fill = a.create_label();
    a.mov(rdi, wbuf).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut fill).unwrap();
    a.lea(eax, dword_ptr(rcx * 8 + 3)).unwrap();
    a.sub(eax, ecx).unwrap();
    a.mov(byte_ptr(rdi + rcx), al).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 512).unwrap();
    a.jb(fill).unwrap();
    a.xor(r12d, r12d).unwrap();
    // Request header: type, reserved, sector.
    let request = |a: &mut CodeAssembler, f: &mut Fails, ty: u32, data: Option<(u64, u16)>, code: u8| {
        a.mov(rdi, hdr).unwrap();
        a.mov(dword_ptr(rdi), ty).unwrap();
        a.mov(dword_ptr(rdi + 4), 0u32).unwrap();
        a.mov(qword_ptr(rdi + 8), 5i32).unwrap();
        a.mov(rdi, status).unwrap();
        a.mov(byte_ptr(rdi), 0xffu32).unwrap();
        write_desc(a, &q, 0, hdr, 16, F_NEXT);
        let mut next = 1;
        if let Some((buf, flags)) = data {
            write_desc(a, &q, 1, buf, 512, flags | F_NEXT);
            next = 2;
        }
        write_desc(a, &q, next, status, 1, F_WRITE);
        publish_r12(a, &q, 0);
        wait_used(a, f, &q, r12d, code);
        let fail = f.at(a, code + 1);
        a.mov(rdi, status).unwrap();
        a.cmp(byte_ptr(rdi), 0u32).unwrap();
        a.jne(fail).unwrap();
    };
    request(&mut a, &mut f, 1, Some((wbuf, 0)), 0x10); // OUT
    request(&mut a, &mut f, 4, None, 0x20); // FLUSH
    request(&mut a, &mut f, 0, Some((rbuf, F_WRITE)), 0x30); // IN
    check_used_len(&mut a, &mut f, &q, 2, 513, 0x40);
    // Compare the two buffers.
    let differ = f.at(&mut a, 0x41);
    let mut cmp = a.create_label();
    a.xor(ecx, ecx).unwrap();
    a.mov(rsi, wbuf).unwrap();
    a.mov(rdi, rbuf).unwrap();
    a.set_label(&mut cmp).unwrap();
    a.mov(al, byte_ptr(rsi + rcx)).unwrap();
    a.cmp(al, byte_ptr(rdi + rcx)).unwrap();
    a.jne(differ).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 512).unwrap();
    a.jb(cmp).unwrap();
    emit_print(&mut a, b"blk ok\n");
    emit_exit(&mut a, OK);
    f.emit(&mut a);
    let mut cfg = config(write_elf(dir.path(), &assemble(a)));
    cfg.devices.disks.push(DiskConfig {
        path: disk.clone(),
        read_only: false,
    });
    let b = boot_config(&hv, dir.path(), &cfg);
    expect_ok(&b);
    let img = std::fs::read(&disk).unwrap();
    let want: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(&img[5 * 512..6 * 512], &want[..]);
    assert!(
        img[..5 * 512].iter().chain(&img[6 * 512..]).all(|&x| x == 0xee),
        "other sectors untouched"
    );
}

/// The guest connects to host port 1234 (→ unix socket `<uds>_1234`), sends a line, and prints the reply it
/// receives on its RX queue.
#[test]
fn virtio_vsock_guest_to_host_echo() {
    let Some(hv) = kvm_or_skip("virtio_vsock_guest_to_host_echo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 15];
        s.read_exact(&mut buf).unwrap();
        let mut reply = b"pong:".to_vec();
        reply.extend_from_slice(&buf);
        s.write_all(&reply).unwrap();
        buf
    });

    let rx = Vq {
        index: 0,
        base: QUEUES,
        vars: VARS,
    };
    let tx = Vq {
        index: 1,
        base: QUEUES + 0x1000,
        vars: VARS,
    };
    let pkt = BUFS; // TX packet
    let rxbuf = BUFS + 0x1_0000; // 4 RX buffers of 4 KiB
    let mut a = asm();
    let mut f = Fails::default();
    find_device(&mut a, &mut f, 0x1053, 1);
    map_capabilities(&mut a, VARS);
    init_device(&mut a, &mut f, VARS, &[rx, tx], 2);
    // Four RX buffers, one descriptor each (indices 0..4, not chained).
    a.xor(r12d, r12d).unwrap();
    for i in 0..4u16 {
        write_desc(&mut a, &rx, i, rxbuf + 0x1000 * u64::from(i), 0x1000, F_WRITE);
        a.mov(rdi, rx.desc() + 16 * u64::from(i)).unwrap();
        a.mov(word_ptr(rdi + 12), u32::from(F_WRITE)).unwrap();
        publish_r12(&mut a, &rx, i);
    }
    // TX header: src_cid 3, dst_cid 2, src_port 5000, dst_port 1234, type STREAM, buf_alloc 64 KiB.
    let header = |a: &mut CodeAssembler, op: u32, len: u32| {
        a.mov(rdi, pkt).unwrap();
        a.mov(qword_ptr(rdi), 3i32).unwrap();
        a.mov(qword_ptr(rdi + 8), 2i32).unwrap();
        a.mov(dword_ptr(rdi + 16), 5000u32).unwrap();
        a.mov(dword_ptr(rdi + 20), 1234u32).unwrap();
        a.mov(dword_ptr(rdi + 24), len).unwrap();
        a.mov(word_ptr(rdi + 28), 1u32).unwrap();
        a.mov(word_ptr(rdi + 30), op).unwrap();
        a.mov(dword_ptr(rdi + 32), 0u32).unwrap();
        a.mov(dword_ptr(rdi + 36), 65536u32).unwrap();
        a.mov(dword_ptr(rdi + 40), 0u32).unwrap();
    };
    a.xor(r13d, r13d).unwrap();
    let send = |a: &mut CodeAssembler, f: &mut Fails, len: u32, code: u8| {
        write_desc(a, &tx, 0, pkt, 44 + len, 0);
        a.xchg(r12d, r13d).unwrap();
        publish_r12(a, &tx, 0);
        wait_used(a, f, &tx, r12d, code);
        a.xchg(r12d, r13d).unwrap();
    };
    header(&mut a, 1, 0); // REQUEST
    send(&mut a, &mut f, 0, 0x10);
    // RX entry 0 must be the RESPONSE.
    a.mov(r9d, 1).unwrap();
    wait_used(&mut a, &mut f, &rx, r9d, 0x20);
    let not_response = f.at(&mut a, 0x21);
    a.mov(rdi, rxbuf).unwrap();
    a.cmp(word_ptr(rdi + 30), 2u32).unwrap();
    a.jne(not_response).unwrap();
    // RW with 15 bytes of payload.
    header(&mut a, 5, 15);
    let msg = b"ping from guest";
    for (i, chunk) in msg.chunks(1).enumerate() {
        a.mov(byte_ptr(rdi + 44 + i as i32), u32::from(chunk[0])).unwrap();
    }
    send(&mut a, &mut f, 15, 0x30);
    // RX entry 1: the host's reply, printed to serial.
    a.mov(r9d, 2).unwrap();
    wait_used(&mut a, &mut f, &rx, r9d, 0x40);
    let not_rw = f.at(&mut a, 0x41);
    a.mov(rbx, rx.used() + 4 + 8).unwrap();
    a.mov(ebx, dword_ptr(rbx)).unwrap(); // descriptor id of the second used entry
    a.shl(rbx, 12).unwrap();
    a.mov(rax, rxbuf).unwrap();
    a.add(rbx, rax).unwrap();
    a.cmp(word_ptr(rbx + 30), 5u32).unwrap();
    a.jne(not_rw).unwrap();
    a.mov(ecx, dword_ptr(rbx + 24)).unwrap();
    a.lea(rsi, qword_ptr(rbx + 44)).unwrap();
    emit_write_rsi(&mut a);
    emit_exit(&mut a, OK);
    f.emit(&mut a);

    let mut cfg = config(write_elf(dir.path(), &assemble(a)));
    cfg.devices.vsock = Some(VsockConfig { cid: 3, uds_path: uds });
    let b = boot_config(&hv, dir.path(), &cfg);
    expect_ok(&b);
    assert_eq!(&host.join().unwrap(), msg);
    assert_eq!(String::from_utf8_lossy(&b.serial), "pong:ping from guest");
}
