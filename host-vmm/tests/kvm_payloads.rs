//! Purpose-built 64-bit payloads booted on the real /dev/kvm (PVM on our CI machines). Each payload is
//! entered in long mode by our boot setup, talks to our devices and ends through the debug-exit port.
//! Skipped when /dev/kvm is absent; `DSTACK_REQUIRE_KVM=1` turns the skip into a failure.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dstack_host_vmm::VmExit;
use dstack_host_vmm::payload::{BZIMAGE_VERSION, PAYLOAD_LOAD_ADDR, bzimage};

#[test]
fn hello_serial_and_debug_exit() {
    let Some(hv) = kvm_or_skip("hello_serial_and_debug_exit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_print(&mut a, b"hello from the payload\n");
    emit_exit(&mut a, 42);
    let kernel = write_elf(dir.path(), &assemble(a));
    let b = boot(&hv, dir.path(), kernel);
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(42)),
        "exit: {:?}",
        b.report.exit
    );
    assert_eq!(b.report.exit.exit_code(), 42);
    assert_eq!(b.serial_log, b"hello from the payload\n");
    assert_eq!(b.serial, b.serial_log);
    assert_eq!(
        b.report.unknown_count, 0,
        "unexpected unknown accesses: {:?}",
        b.report.unknown
    );
    assert!(b.report.timing.first_run_ns >= b.report.timing.setup_done_ns);
}

/// The payload checks the entry state our setup promises, from inside the guest, and reports one bit each.
#[test]
fn long_mode_entry_state_seen_by_guest() {
    let Some(hv) = kvm_or_skip("long_mode_entry_state_seen_by_guest") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    a.xor(ebx, ebx).unwrap();
    // bit 0: CR3 is our PML4 (0x9000)
    a.mov(rax, cr3).unwrap();
    a.cmp(rax, 0x9000).unwrap();
    a.sete(cl).unwrap();
    a.or(bl, cl).unwrap();
    // bit 1: CS = 0x08
    a.mov(ax, cs).unwrap();
    a.cmp(ax, 0x08).unwrap();
    a.sete(cl).unwrap();
    a.shl(cl, 1).unwrap();
    a.or(bl, cl).unwrap();
    // bit 2: SS = 0x10
    a.mov(ax, ss).unwrap();
    a.cmp(ax, 0x10).unwrap();
    a.sete(cl).unwrap();
    a.shl(cl, 2).unwrap();
    a.or(bl, cl).unwrap();
    // bit 3: RSP = boot stack (0x8ff0)
    a.cmp(rsp, 0x8ff0).unwrap();
    a.sete(cl).unwrap();
    a.shl(cl, 3).unwrap();
    a.or(bl, cl).unwrap();
    // bit 4: RSI = zero page (0x7000)
    a.cmp(rsi, 0x7000).unwrap();
    a.sete(cl).unwrap();
    a.shl(cl, 4).unwrap();
    a.or(bl, cl).unwrap();
    // bit 5: CR4.PAE
    a.mov(rax, cr4).unwrap();
    a.shr(eax, 5).unwrap();
    a.and(al, 1).unwrap();
    a.shl(al, 5).unwrap();
    a.or(bl, al).unwrap();
    // bit 6: the stack works
    a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
    a.push(rax).unwrap();
    a.xor(eax, eax).unwrap();
    a.pop(rdx).unwrap();
    a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
    a.cmp(rdx, rax).unwrap();
    a.sete(cl).unwrap();
    a.shl(cl, 6).unwrap();
    a.or(bl, cl).unwrap();
    a.mov(al, bl).unwrap();
    emit_exit_al(&mut a);
    let kernel = write_elf(dir.path(), &assemble(a));
    let b = boot(&hv, dir.path(), kernel);
    match b.report.exit {
        VmExit::DebugExit(v) => assert_eq!(v, 0x7f, "entry-state bits (cr3,cs,ss,rsp,rsi,pae,stack): {v:#09b}"),
        other => panic!("unexpected exit {other:?}"),
    }
}

/// The payload reads the command line and initrd through the zero page and echoes them, and reports the
/// e820 entry count as its status.
#[test]
fn zero_page_cmdline_and_initrd() {
    let Some(hv) = kvm_or_skip("zero_page_cmdline_and_initrd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    a.mov(rbx, rsi).unwrap();
    a.mov(esi, dword_ptr(rbx + 0x228)).unwrap(); // cmd_line_ptr
    a.mov(ecx, dword_ptr(rbx + 0x238)).unwrap(); // cmdline_size
    emit_write_rsi(&mut a);
    emit_print(&mut a, b"|");
    a.mov(esi, dword_ptr(rbx + 0x218)).unwrap(); // ramdisk_image
    a.mov(ecx, dword_ptr(rbx + 0x21c)).unwrap(); // ramdisk_size
    emit_write_rsi(&mut a);
    a.mov(al, byte_ptr(rbx + 0x1e8)).unwrap(); // e820_entries
    emit_exit_al(&mut a);
    let kernel = write_elf(dir.path(), &assemble(a));
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"initrd payload bytes").unwrap();
    let mut cfg = config(kernel);
    cfg.initrd = Some(initrd);
    cfg.cmdline = "console=ttyS0 dstack.test=1".into();
    let b = boot_config(&hv, dir.path(), &cfg);
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(3)),
        "exit: {:?}",
        b.report.exit
    );
    assert_eq!(
        String::from_utf8_lossy(&b.serial_log),
        "console=ttyS0 dstack.test=1|initrd payload bytes"
    );
}

/// A bzImage (setup header + protected-mode part) is entered at code32_start + 0x200 and gets its setup
/// header copied into the zero page.
#[test]
fn bzimage_64bit_entry() {
    let Some(hv) = kvm_or_skip("bzimage_64bit_entry") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    a.mov(rbx, rsi).unwrap();
    emit_print(&mut a, b"bzImage entry\n");
    a.mov(al, byte_ptr(rbx + 0x206)).unwrap(); // setup header version (low byte)
    emit_exit_al(&mut a);
    let code = a.assemble(PAYLOAD_LOAD_ADDR + 0x200).unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, bzimage(&code)).unwrap();
    let b = boot(&hv, dir.path(), kernel);
    match b.report.exit {
        VmExit::DebugExit(v) => assert_eq!(v, u32::from(BZIMAGE_VERSION & 0xff)),
        other => panic!("unexpected exit {other:?}"),
    }
    assert_eq!(b.serial_log, b"bzImage entry\n");
}

/// I/O to ports no device claims: reads float high (0xff), the VM keeps running, and the report lists them.
#[test]
fn unknown_port_io_is_reported_and_survived() {
    let Some(hv) = kvm_or_skip("unknown_port_io_is_reported_and_survived") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    a.in_(al, 0x99).unwrap();
    a.mov(bl, al).unwrap();
    a.mov(al, 0x5a).unwrap();
    a.out(0x9a, al).unwrap();
    emit_print(&mut a, b"still alive\n");
    a.mov(al, bl).unwrap();
    emit_exit_al(&mut a);
    let kernel = write_elf(dir.path(), &assemble(a));
    let b = boot(&hv, dir.path(), kernel);
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(0xff)),
        "exit: {:?}",
        b.report.exit
    );
    assert_eq!(b.serial_log, b"still alive\n");
    assert_eq!(b.report.unknown_count, 2);
    let u = &b.report.unknown;
    assert_eq!(
        (u[0].mmio, u[0].write, u[0].addr, u[0].size, u[0].value),
        (false, false, 0x99, 1, None)
    );
    assert_eq!(
        (u[1].mmio, u[1].write, u[1].addr, u[1].size, u[1].value),
        (false, true, 0x9a, 1, Some(0x5a))
    );
}

/// i8042 command 0xFE resets the machine: the VMM stops the VM cleanly with status 0.
#[test]
fn i8042_reset_stops_vm() {
    let Some(hv) = kvm_or_skip("i8042_reset_stops_vm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_print(&mut a, b"rebooting\n");
    a.mov(al, 0xfe).unwrap();
    a.out(0x64, al).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    let kernel = write_elf(dir.path(), &assemble(a));
    let b = boot(&hv, dir.path(), kernel);
    assert!(matches!(b.report.exit, VmExit::Reset), "exit: {:?}", b.report.exit);
    assert_eq!(b.report.exit.exit_code(), 0);
    assert_eq!(b.serial_log, b"rebooting\n");
}

/// `ud2` with an IDT whose only entry is not present escalates to a triple fault; the diagnostics name the
/// faulting RIP and show the instruction bytes read from guest memory.
#[test]
fn triple_fault_diagnostics() {
    let Some(hv) = kvm_or_skip("triple_fault_diagnostics") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_print(&mut a, b"about to fault\n");
    a.mov(r12, 0x1122_3344_5566_7788u64).unwrap();
    a.ud2().unwrap();
    let code = assemble(a);
    let ud2_addr = PAYLOAD_LOAD_ADDR + code.len() as u64 - 2;
    let kernel = write_elf(dir.path(), &code);
    let b = boot(&hv, dir.path(), kernel);
    assert_eq!(b.serial_log, b"about to fault\n");
    let d = match &b.report.exit {
        VmExit::TripleFault(d) => d,
        other => panic!("expected a triple fault, got {other:?}"),
    };
    assert_eq!(b.report.exit.exit_code(), 71);
    let regs = d.regs.expect("registers");
    assert_eq!(regs.r12, 0x1122_3344_5566_7788);
    assert_eq!(regs.rip, ud2_addr, "RIP at the faulting instruction");
    assert_eq!(d.rip_gpa, Some(ud2_addr));
    assert_eq!(d.code.get(..2), Some(&[0x0f, 0x0b][..]), "ud2 bytes");
    let text = d.to_string();
    assert!(text.contains("KVM_EXIT_SHUTDOWN") && text.contains("0f 0b"), "{text}");
}

/// Jumping into the MMIO hole (no RAM behind it) makes KVM fail to fetch/emulate: internal-error
/// diagnostics with the RIP and a note that it is not RAM.
#[test]
fn internal_error_diagnostics() {
    let Some(hv) = kvm_or_skip("internal_error_diagnostics") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_print(&mut a, b"jumping into the hole\n");
    a.mov(rax, 0xd000_0000u64).unwrap();
    a.jmp(rax).unwrap();
    let kernel = write_elf(dir.path(), &assemble(a));
    let b = boot(&hv, dir.path(), kernel);
    assert_eq!(b.serial_log, b"jumping into the hole\n");
    let d = match &b.report.exit {
        VmExit::Crashed(d) | VmExit::TripleFault(d) => d,
        other => panic!("expected a crash, got {other:?}"),
    };
    eprintln!("{d}");
    assert!(matches!(b.report.exit, VmExit::Crashed(_)), "{d}");
    assert!(d.reason.contains("KVM_EXIT_INTERNAL_ERROR"), "{d}");
    assert_eq!(d.regs.map(|r| r.rip), Some(0xd000_0000));
    assert!(d.code.is_empty());
    assert!(d.to_string().contains("is not guest RAM"), "{d}");
}

/// With several vCPUs the APs sit in wait-for-SIPI inside KVM_RUN; ending the VM must kick them out.
#[test]
fn multi_vcpu_shutdown_kicks_parked_aps() {
    let Some(hv) = kvm_or_skip("multi_vcpu_shutdown_kicks_parked_aps") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    emit_print(&mut a, b"bsp\n");
    emit_exit(&mut a, 7);
    let kernel = write_elf(dir.path(), &assemble(a));
    let mut cfg = config(kernel);
    cfg.vcpus = 4;
    let started = Instant::now();
    let b = boot_config(&hv, dir.path(), &cfg);
    assert!(
        matches!(b.report.exit, VmExit::DebugExit(7)),
        "exit: {:?}",
        b.report.exit
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A payload that spins forever is stopped by the run timeout (the BSP is kicked out of KVM_RUN).
#[test]
fn timeout_stops_spinning_guest() {
    let Some(hv) = kvm_or_skip("timeout_stops_spinning_guest") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.jmp(spin).unwrap();
    let kernel = write_elf(dir.path(), &assemble(a));
    let mut cfg = config(kernel);
    cfg.timeout = Some(Duration::from_millis(300));
    let started = Instant::now();
    let b = boot_config(&hv, dir.path(), &cfg);
    assert!(matches!(b.report.exit, VmExit::Timeout), "exit: {:?}", b.report.exit);
    assert_eq!(b.report.exit.exit_code(), 124);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "took {took:?}"
    );
}

/// With ACPI on, the guest finds "RSD PTR " at the zero page's acpi_rsdp_addr, and powering off through the
/// FADT's sleep control register (SLP_TYP=5 | SLP_EN) stops the VM as a power-off.
#[test]
fn acpi_rsdp_visible_and_s5_powers_off() {
    let Some(hv) = kvm_or_skip("acpi_rsdp_visible_and_s5_powers_off") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = asm();
    a.mov(rsi, qword_ptr(rsi + 0x70)).unwrap(); // acpi_rsdp_addr
    a.mov(ecx, 8).unwrap();
    emit_write_rsi(&mut a);
    a.mov(al, (5 << 2) | 0x20).unwrap();
    a.mov(edx, 0x3c0).unwrap();
    a.out(dx, al).unwrap();
    emit_exit(&mut a, 1); // only reached if the power-off did not stop us
    let kernel = write_elf(dir.path(), &assemble(a));
    let mut cfg = config(kernel);
    cfg.acpi = true;
    let b = boot_config(&hv, dir.path(), &cfg);
    assert!(matches!(b.report.exit, VmExit::PowerOff), "exit: {:?}", b.report.exit);
    assert_eq!(b.serial_log, b"RSD PTR ");
}
