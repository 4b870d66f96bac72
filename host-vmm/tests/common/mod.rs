//! Shared helpers for tests and the benchmark: assemble 64-bit payloads with iced-x86, write them as kernel
//! images, and boot them on /dev/kvm.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dstack_host_vmm::devices::serial::SerialSink;
use dstack_host_vmm::hypervisor::kvm::KvmHypervisor;
use dstack_host_vmm::payload::{PAYLOAD_LOAD_ADDR, elf64};
use dstack_host_vmm::{RunReport, VmConfig, Vmm};
pub use iced_x86::code_asm::*;

pub mod net_guest;
pub mod virtio_guest;

pub const COM1: u32 = 0x3f8;
pub const DEBUG_EXIT: u32 = 0xf4;

/// Returns a KVM handle, or None (test skipped) when /dev/kvm is absent. With `DSTACK_REQUIRE_KVM=1` a
/// missing or unusable /dev/kvm fails the test instead.
pub fn kvm_or_skip(test: &str) -> Option<KvmHypervisor> {
    let required = std::env::var("DSTACK_REQUIRE_KVM").is_ok_and(|v| v == "1");
    if !KvmHypervisor::is_available() {
        assert!(!required, "{test}: DSTACK_REQUIRE_KVM=1 but /dev/kvm does not exist");
        eprintln!("SKIPPED {test}: /dev/kvm is absent (set DSTACK_REQUIRE_KVM=1 to make this a failure)");
        return None;
    }
    match KvmHypervisor::new() {
        Ok(hv) => Some(hv),
        Err(e) => {
            assert!(
                !required,
                "{test}: DSTACK_REQUIRE_KVM=1 but opening /dev/kvm failed: {e}"
            );
            eprintln!("SKIPPED {test}: cannot open /dev/kvm: {e}");
            None
        }
    }
}

/// A fresh 64-bit assembler.
pub fn asm() -> CodeAssembler {
    CodeAssembler::new(64).expect("64-bit assembler")
}

/// Emits code that writes the `len` bytes at `[rsi]` to COM1 (clobbers rsi, rcx, rdx, rax).
pub fn emit_write_rsi(a: &mut CodeAssembler) {
    let mut lp = a.create_label();
    let mut done = a.create_label();
    a.mov(edx, COM1).unwrap();
    a.test(rcx, rcx).unwrap();
    a.jz(done).unwrap();
    a.set_label(&mut lp).unwrap();
    a.mov(al, byte_ptr(rsi)).unwrap();
    a.out(dx, al).unwrap();
    a.inc(rsi).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(lp).unwrap();
    a.set_label(&mut done).unwrap();
}

/// Emits code that writes a constant string to COM1 (the string is placed inline and jumped over).
pub fn emit_print(a: &mut CodeAssembler, s: &[u8]) {
    let mut data = a.create_label();
    let mut after = a.create_label();
    a.jmp(after).unwrap();
    a.set_label(&mut data).unwrap();
    a.db(s).unwrap();
    a.set_label(&mut after).unwrap();
    a.lea(rsi, ptr(data)).unwrap();
    a.mov(rcx, s.len() as u64).unwrap();
    emit_write_rsi(a);
}

/// Emits `out DEBUG_EXIT, al` with `al = status`, then a spin loop in case the VMM does not stop us.
pub fn emit_exit(a: &mut CodeAssembler, status: u8) {
    a.mov(al, status as u32).unwrap();
    emit_exit_al(a);
}

/// Emits `out DEBUG_EXIT, al` with the current `al`.
pub fn emit_exit_al(a: &mut CodeAssembler) {
    a.mov(edx, DEBUG_EXIT).unwrap();
    a.out(dx, al).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
}

/// Assembles for the payload load address.
pub fn assemble(mut a: CodeAssembler) -> Vec<u8> {
    a.assemble(PAYLOAD_LOAD_ADDR).expect("assemble payload")
}

/// Writes `code` as an ELF payload into `dir`.
pub fn write_elf(dir: &Path, code: &[u8]) -> PathBuf {
    let p = dir.join("payload.elf");
    std::fs::write(&p, elf64(PAYLOAD_LOAD_ADDR, code)).unwrap();
    p
}

/// A VM manager image `<dir>/images/<name>` whose payload prints `text` and then halts forever: it never
/// exits on its own and ignores every device (what stop and kill tests need).
pub fn halting_image(dir: &Path, name: &str, text: &[u8]) {
    let img = dir.join("images").join(name);
    std::fs::create_dir_all(&img).unwrap();
    let mut a = asm();
    emit_print(&mut a, text);
    // emit_print may leave a label pending on the next instruction; give it one before ours.
    a.nop().unwrap();
    let mut lp = a.create_label();
    a.set_label(&mut lp).unwrap();
    a.hlt().unwrap();
    a.jmp(lp).unwrap();
    write_elf(&img, &assemble(a));
    std::fs::write(
        img.join("metadata.json"),
        r#"{"kernel":"payload.elf","initrd":"","cmdline":"console=ttyS0","version":"p","is_dev":true}"#,
    )
    .unwrap();
}

/// Result of one payload boot.
pub struct Booted {
    pub report: RunReport,
    pub serial: Vec<u8>,
    pub serial_log: Vec<u8>,
}

/// The VM shape tests use unless they say otherwise: 1 vCPU, 64 MiB, 20 s timeout.
pub fn config(kernel: PathBuf) -> VmConfig {
    VmConfig {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        memory_mib: 64,
        timeout: Some(Duration::from_secs(20)),
        acpi: false,
        devices: Default::default(),
    }
}

/// Boots `kernel` with the default shape.
pub fn boot(hv: &KvmHypervisor, dir: &Path, kernel: PathBuf) -> Booted {
    boot_config(hv, dir, &config(kernel))
}

/// Boots on KVM; serial goes to a log file in `dir` and a capture buffer.
pub fn boot_config(hv: &KvmHypervisor, dir: &Path, config: &VmConfig) -> Booted {
    let log_path = dir.join("serial.log");
    let capture = Arc::new(Mutex::new(Vec::new()));
    let sink = SerialSink {
        log: Some(std::io::LineWriter::new(std::fs::File::create(&log_path).unwrap())),
        stdout: false,
        capture: Some(capture.clone()),
    };
    let vmm = Vmm::new(hv, config, sink).expect("VM setup");
    let report = vmm.run().expect("VM run");
    let serial = capture.lock().unwrap().clone();
    let serial_log = std::fs::read(&log_path).unwrap();
    Booted {
        report,
        serial,
        serial_log,
    }
}
