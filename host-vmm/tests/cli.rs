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
