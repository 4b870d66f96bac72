//! The `dstack-vmm-run` binary end to end on /dev/kvm: exit status, serial log and timing output.

mod common;

use std::process::Command;

use common::*;

#[test]
fn binary_boots_payload_and_exits_with_guest_status() {
    if kvm_or_skip("binary_boots_payload_and_exits_with_guest_status").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_print(&mut a, b"from the binary\n");
    emit_exit(&mut a, 5);
    let kernel = write_elf(dir.path(), &assemble(a));
    let log = dir.path().join("serial.log");
    let out = Command::new(env!("CARGO_BIN_EXE_dstack-vmm-run"))
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--vcpus",
            "2",
            "--memory-mib",
            "32",
            "--print-timing",
            "--serial-stdout",
        ])
        .arg("--serial-log")
        .arg(&log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stderr: {stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), b"from the binary\n");
    assert_eq!(out.stdout, b"from the binary\n");
    assert!(stderr.contains("timing: process start → first KVM_RUN"), "{stderr}");
    assert!(stderr.contains("rss: total_kib="), "{stderr}");
    assert!(stderr.contains("vm: debug exit with status 0x5"), "{stderr}");
}

#[test]
fn binary_reports_bad_kernel_clearly() {
    if kvm_or_skip("binary_reports_bad_kernel_clearly").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("not-a-kernel");
    std::fs::write(&kernel, b"MZ this is not a kernel").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dstack-vmm-run"))
        .arg("--kernel")
        .arg(&kernel)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("neither an ELF vmlinux nor a bzImage"), "{stderr}");
}

#[test]
fn binary_rejects_bad_device_flags_before_touching_kvm() {
    for (args, want) in [
        (&["--disk", "/tmp/x.img,rx"][..], "unknown option \"rx\""),
        (&["--vsock", "three,/tmp/s"][..], "CID \"three\" is not a number"),
        (&["--vsock", "3"][..], "expected CID,UDS_PATH"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dstack-vmm-run"))
            .args(["--kernel", "/nonexistent"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn binary_boots_with_disk_vsock_and_rng() {
    if kvm_or_skip("binary_boots_with_disk_vsock_and_rng").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    // Count the virtio functions on bus 0 (vendor 0x1af4) and exit with that count.
    let mut lp = a.create_label();
    let mut skip = a.create_label();
    a.xor(ebx, ebx).unwrap();
    a.mov(esi, 0x8000_0000u32).unwrap();
    a.set_label(&mut lp).unwrap();
    a.mov(eax, esi).unwrap();
    a.mov(edx, 0xcf8).unwrap();
    a.out(dx, eax).unwrap();
    a.mov(edx, 0xcfc).unwrap();
    a.in_(eax, dx).unwrap();
    a.cmp(ax, 0x1af4).unwrap();
    a.jne(skip).unwrap();
    a.inc(ebx).unwrap();
    a.set_label(&mut skip).unwrap();
    a.add(esi, 1 << 11).unwrap();
    a.cmp(esi, 0x8000_0000u32 | (32 << 11)).unwrap();
    a.jb(lp).unwrap();
    a.mov(eax, ebx).unwrap();
    emit_exit_al(&mut a);
    let kernel = write_elf(dir.path(), &assemble(a));
    let disk = dir.path().join("a.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dstack-vmm-run"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--disk")
        .arg(format!("{},ro", disk.display()))
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("5,{}", dir.path().join("v.sock").display()))
        .args(["--rng", "--acpi"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "two disks + vsock + rng: {stderr}");
}
