//! Boot-sequence and run-loop tests against the recording fake hypervisor.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::arch::x86_64::layout::{PML4_ADDR, ZERO_PAGE_ADDR};
use crate::hypervisor::fake::{Call, FakeHypervisor, ScriptedExit};
use crate::hypervisor::{CpuIdEntry, SystemEventKind};
use crate::payload::{PAYLOAD_LOAD_ADDR, elf64};

/// A CPUID table shaped like KVM_GET_SUPPORTED_CPUID's (values arbitrary but distinct).
fn supported() -> Vec<CpuIdEntry> {
    vec![
        CpuIdEntry {
            function: 0,
            eax: 0xd,
            ebx: 0x756e_6547,
            ecx: 0x6c65_746e,
            edx: 0x4965_6e69,
            ..Default::default()
        },
        CpuIdEntry {
            function: 1,
            eax: 0x806f8,
            ebx: 0x0008_0800,
            ecx: 0x7ffa_3223,
            edx: 0x0f8b_fbff,
            ..Default::default()
        },
        CpuIdEntry {
            function: 0xb,
            index: 0,
            flags: 1,
            ..Default::default()
        },
        CpuIdEntry {
            function: 0xb,
            index: 1,
            flags: 1,
            ..Default::default()
        },
    ]
}

struct Setup {
    _dir: tempfile::TempDir,
    hv: FakeHypervisor,
    config: VmConfig,
    capture: Arc<Mutex<Vec<u8>>>,
}

/// A payload whose bytes we can recognize in diagnostics.
const CODE: [u8; 4] = [0x0f, 0x0b, 0xeb, 0xfe];

fn setup(vcpus: u32, memory_mib: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("k.elf");
    std::fs::write(&kernel, elf64(PAYLOAD_LOAD_ADDR, &CODE)).unwrap();
    let config = VmConfig {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        vcpus,
        memory_mib,
        timeout: Some(Duration::from_secs(10)),
        acpi: false,
        devices: Default::default(),
    };
    Setup {
        _dir: dir,
        hv: FakeHypervisor::new(supported()),
        config,
        capture: Arc::default(),
    }
}

impl Setup {
    fn build(&self) -> Vmm {
        let sink = SerialSink {
            log: None,
            stdout: false,
            capture: Some(self.capture.clone()),
        };
        Vmm::new(&self.hv, &self.config, sink).unwrap()
    }
}

#[test]
fn boot_sequence_order_and_values() {
    let s = setup(2, 128);
    let vmm = s.build();
    assert_eq!(vmm.entry(), PAYLOAD_LOAD_ADDR);
    let calls = s.hv.calls();
    // VM-level setup happens before any vCPU exists, in this order.
    let vm_calls: Vec<&Call> = calls.iter().take(7).collect();
    assert_eq!(
        vm_calls,
        vec![
            &Call::CreateVm,
            &Call::SetUserMemoryRegion {
                slot: 0,
                guest_phys_addr: 0,
                size: 128 << 20
            },
            &Call::SetTssAddress(0xfffb_d000),
            &Call::CreateIrqChip,
            &Call::CreatePit,
            &Call::RegisterIrqfd { gsi: 4 },
            &Call::SupportedCpuid,
        ]
    );
    let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
    assert!(pos(&Call::CreateVcpu(0)) < pos(&Call::CreateVcpu(1)));

    // BSP registers: 64-bit boot protocol.
    let regs = calls
        .iter()
        .find_map(|c| if let Call::SetRegs(0, r) = c { Some(*r) } else { None })
        .unwrap();
    assert_eq!(
        (regs.rip, regs.rsi, regs.rsp, regs.rflags),
        (PAYLOAD_LOAD_ADDR, ZERO_PAGE_ADDR, 0x8ff0, 2)
    );
    let sregs = calls
        .iter()
        .find_map(|c| if let Call::SetSregs(0, s) = c { Some(**s) } else { None })
        .unwrap();
    assert_eq!(sregs.cr3, PML4_ADDR);
    assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001);
    assert_eq!(sregs.efer & 0x500, 0x500);
    assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 8));
    // The AP gets no entry registers (it waits for SIPI) but does get CPUID, MSRs, FPU and LINT setup.
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::SetRegs(1, _) | Call::SetSregs(1, _)))
    );
    for id in 0..2 {
        let cpuid = calls.iter().find_map(|c| {
            if let Call::SetCpuid(i, e) = c {
                (*i == id).then_some(e)
            } else {
                None
            }
        });
        let leaf1 = cpuid.unwrap().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, id, "APIC ID of vCPU {id}");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2);
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::SetMsrs(i, m) if *i == id && m.len() == 11))
        );
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::SetFpu(i, f) if *i == id && f.fcw == 0x37f))
        );
        let lapic = calls.iter().find_map(|c| {
            if let Call::SetLapic(i, l) = c {
                (*i == id).then_some(l)
            } else {
                None
            }
        });
        let lapic = lapic.unwrap();
        assert_eq!((lapic.read(0x350) >> 8) & 7, 7, "LINT0 ExtINT");
        assert_eq!((lapic.read(0x360) >> 8) & 7, 4, "LINT1 NMI");
    }
    // Guest memory holds the payload at its load address and the MP table in the EBDA.
    let mut code = [0u8; 4];
    vmm.memory()
        .read_slice(&mut code, GuestAddress(PAYLOAD_LOAD_ADDR))
        .unwrap();
    assert_eq!(code, CODE);
    let mut sig = [0u8; 4];
    vmm.memory().read_slice(&mut sig, GuestAddress(0x9fc00)).unwrap();
    assert_eq!(&sig, b"_MP_");
}

#[test]
fn memory_above_hole_gets_second_slot() {
    let s = setup(1, 3072 + 512);
    let _vmm = s.build();
    let regions: Vec<Call> =
        s.hv.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::SetUserMemoryRegion { .. }))
            .collect();
    assert_eq!(
        regions,
        vec![
            Call::SetUserMemoryRegion {
                slot: 0,
                guest_phys_addr: 0,
                size: 0xC000_0000
            },
            Call::SetUserMemoryRegion {
                slot: 1,
                guest_phys_addr: 1 << 32,
                size: 512 << 20
            },
        ]
    );
}

#[test]
fn rejects_bad_vcpu_counts() {
    let mut s = setup(0, 64);
    let sink = SerialSink::default();
    assert!(matches!(
        Vmm::new(&s.hv, &s.config, sink),
        Err(VmmError::BadVcpus { got: 0, .. })
    ));
    s.config.vcpus = MAX_VCPUS + 1;
    assert!(matches!(
        Vmm::new(&s.hv, &s.config, SerialSink::default()),
        Err(VmmError::BadVcpus { .. })
    ));
}

#[test]
fn run_loop_dispatches_io_and_stops_on_debug_exit() {
    let s = setup(2, 64);
    let vmm = s.build();
    s.hv.script(
        0,
        [
            ScriptedExit::IoOut {
                port: 0x3f8,
                data: b"h".to_vec(),
            },
            ScriptedExit::IoOut {
                port: 0x3f8,
                data: b"i".to_vec(),
            },
            ScriptedExit::IoIn { port: 0x99, len: 1 },
            ScriptedExit::IoIn { port: 0x3fd, len: 1 },
            ScriptedExit::MmioWrite {
                addr: 0xd000_0000,
                data: vec![1, 2, 3, 4],
            },
            ScriptedExit::Interrupted,
            ScriptedExit::IoOut {
                port: 0xf4,
                data: vec![9],
            },
        ],
    );
    s.hv.script(1, [ScriptedExit::Parked]);
    let report = vmm.run().unwrap();
    assert!(matches!(report.exit, VmExit::DebugExit(9)), "{:?}", report.exit);
    assert_eq!(*s.capture.lock().unwrap(), b"hi");
    assert_eq!(report.unknown_count, 2);
    assert_eq!((report.unknown[0].addr, report.unknown[0].write), (0x99, false));
    assert_eq!(
        (report.unknown[1].mmio, report.unknown[1].addr, report.unknown[1].value),
        (true, 0xd000_0000, Some(0x0403_0201))
    );
    assert_eq!(report.userspace_exits, 6, "Interrupted is not a userspace exit");
    let calls = s.hv.calls();
    let in_results: Vec<&Call> = calls.iter().filter(|c| matches!(c, Call::IoInResult { .. })).collect();
    // Absent port floats high; the UART's LSR reports an empty transmitter.
    assert_eq!(
        in_results[0],
        &Call::IoInResult {
            vcpu: 0,
            port: 0x99,
            data: vec![0xff]
        }
    );
    assert!(matches!(in_results[1], Call::IoInResult { port: 0x3fd, data, .. } if data[0] & 0x60 == 0x60));
    assert!(report.timing.first_run_ns > 0 && report.timing.first_exit_ns >= report.timing.first_run_ns);
}

#[test]
fn system_events_map_to_exits() {
    for (event, want) in [(SystemEventKind::Shutdown, 0), (SystemEventKind::Reset, 0)] {
        let s = setup(1, 64);
        let vmm = s.build();
        s.hv.script(0, [ScriptedExit::SystemEvent(event)]);
        let report = vmm.run().unwrap();
        assert_eq!(report.exit.exit_code(), want);
        assert!(matches!(report.exit, VmExit::PowerOff | VmExit::Reset));
    }
}

#[test]
fn internal_error_collects_diagnostics() {
    let s = setup(1, 64);
    let vmm = s.build();
    s.hv.script(
        0,
        [ScriptedExit::InternalError {
            suberror: 1,
            data: vec![0x11, 0x22],
        }],
    );
    let report = vmm.run().unwrap();
    let VmExit::Crashed(d) = &report.exit else {
        panic!("{:?}", report.exit)
    };
    assert!(d.reason.contains("suberror 1 (emulation failure)"), "{}", d.reason);
    assert!(d.reason.contains("[11, 22]"), "{}", d.reason);
    // The fake returns the registers the VMM set: RIP = entry, and the code there is our payload.
    assert_eq!(d.regs.unwrap().rip, PAYLOAD_LOAD_ADDR);
    assert_eq!(d.rip_gpa, Some(PAYLOAD_LOAD_ADDR));
    assert_eq!(d.code.get(..4), Some(&CODE[..]));
    assert_eq!(report.exit.exit_code(), 70);
}

#[test]
fn shutdown_is_triple_fault_and_fail_entry_is_crash() {
    let s = setup(1, 64);
    let vmm = s.build();
    s.hv.script(0, [ScriptedExit::Shutdown]);
    assert!(matches!(vmm.run().unwrap().exit, VmExit::TripleFault(_)));

    let s = setup(1, 64);
    let vmm = s.build();
    s.hv.script(0, [ScriptedExit::FailEntry { reason: 0x21 }]);
    let exit = vmm.run().unwrap().exit;
    let VmExit::Crashed(d) = exit else { panic!("{exit:?}") };
    assert!(
        d.reason.contains("KVM_EXIT_FAIL_ENTRY") && d.reason.contains("0x21"),
        "{}",
        d.reason
    );
}

#[test]
fn script_exhaustion_is_a_crash_not_a_hang() {
    let s = setup(1, 64);
    let vmm = s.build();
    let exit = vmm.run().unwrap().exit;
    let VmExit::Crashed(d) = exit else { panic!("{exit:?}") };
    assert!(d.reason.contains("ran past the end of its script"));
}

#[test]
fn timeout_with_parked_vcpus() {
    let mut s = setup(2, 64);
    s.config.timeout = Some(Duration::from_millis(50));
    let vmm = s.build();
    s.hv.script(0, [ScriptedExit::Parked]);
    s.hv.script(1, [ScriptedExit::Parked]);
    assert!(matches!(vmm.run().unwrap().exit, VmExit::Timeout));
}

#[test]
fn i8042_reset_via_port() {
    let s = setup(1, 64);
    let vmm = s.build();
    s.hv.script(
        0,
        [ScriptedExit::IoOut {
            port: 0x64,
            data: vec![0xfe],
        }],
    );
    assert!(matches!(vmm.run().unwrap().exit, VmExit::Reset));
}

#[test]
fn acpi_tables_written_and_announced_only_when_enabled() {
    let mut s = setup(2, 64);
    let vmm = s.build();
    let mut sig = [0u8; 8];
    vmm.memory().read_slice(&mut sig, GuestAddress(0xe0000)).unwrap();
    assert_eq!(sig, [0; 8], "no ACPI by default");
    assert!(vmm.power_button().is_none());
    s.config.acpi = true;
    let vmm = s.build();
    // The fixed-hardware model: the PM1 registers and SCI behind it are the power button's.
    let want = acpi::build_for(&acpi::AcpiShape { vcpus: 2, pci: None }, acpi::PmModel::FixedHardware).unwrap();
    assert!(vmm.power_button().is_some());
    let mut got = vec![0u8; want.bytes.len()];
    vmm.memory().read_slice(&mut got, GuestAddress(want.base)).unwrap();
    assert_eq!(got, want.bytes);
    let rsdp_ptr: u64 = vmm.memory().read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x70)).unwrap();
    assert_eq!(rsdp_ptr, 0xe0000);
}
