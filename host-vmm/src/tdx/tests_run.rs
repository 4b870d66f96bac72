//! Running-TD tests against the recording fake: the TD exits (GetQuote, MapGPA / memory-fault conversions,
//! IOAPIC EOIs), the shared-memory gate device models use, and `boot_td` with the userspace IOAPIC.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::exits::{TdExit, TdExitContext, handle};
use super::quote::{STATUS_QGS_UNAVAILABLE, TDVMCALL_INVALID_OPERAND, TDVMCALL_SUCCESS};
use super::shared_mem::{SharedMemError, TdMemory};
use super::tests::{fake_tdx_host, synthetic_tdvf};
use super::{LaunchedTd, TdxConfig, launch};
use crate::devices::ioapic::{Ioapic, MsiMessage, MsiSink};
use crate::hypervisor::fake::{Call, FakeHypervisor, ScriptedExit, TdxCall};
use crate::hypervisor::tdx::{MapGpaRange, MemoryFault, TdxVmcall};
use crate::hypervisor::{IrqRoute, VcpuExit};

fn launched() -> (FakeHypervisor, LaunchedTd) {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    let td = launch(&hv, &TdxConfig::new(&fw, 256 << 20, 1)).unwrap();
    (hv, td)
}

/// Runs vCPU 0 for `n` scripted exits, serving each with [`handle`].
fn serve(td: &mut LaunchedTd, mem: &TdMemory, ioapic: Option<&Mutex<Ioapic>>, n: usize) -> Vec<TdExit> {
    let vm = td.vm.clone();
    let ctx = TdExitContext {
        vm: vm.as_ref(),
        mem,
        qgs: None,
        ioapic,
    };
    (0..n)
        .map(|_| {
            let vcpu = &mut td.vcpus[0];
            let reason = match vcpu.run().unwrap() {
                VcpuExit::Other { reason, .. } => reason,
                other => panic!("unexpected exit {other:?}"),
            };
            handle(reason, vcpu.as_mut(), &ctx).unwrap()
        })
        .collect()
}

fn tdx_calls_since(hv: &FakeHypervisor, before: usize) -> Vec<TdxCall> {
    hv.calls()[before..]
        .iter()
        .filter_map(|c| match c {
            Call::Tdx(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn get_quote_needs_a_shared_buffer_and_conversions_update_attributes() {
    let (hv, mut td) = launched();
    let mem = TdMemory::new(td.shared_memory.clone());
    // The guest's GetQuote buffer (two pages) with a 1 KiB TDREPORT, written where the guest would put it.
    let mut request = Vec::new();
    request.extend_from_slice(&1u64.to_le_bytes());
    request.extend_from_slice(&0u64.to_le_bytes());
    request.extend_from_slice(&1024u32.to_le_bytes());
    request.extend_from_slice(&0u32.to_le_bytes());
    request.extend_from_slice(&[0x42; 1024]);
    let get_quote = ScriptedExit::TdxVmcall(TdxVmcall {
        nr: 0x10002,
        data: [0x10_0000, 0x2000, 0, 0, 0],
    });
    hv.script(
        0,
        [
            // Still private: refused without touching the buffer.
            get_quote.clone(),
            // MapGPA of the two pages to shared (KVM already stripped the shared GPA bit).
            ScriptedExit::MapGpa(MapGpaRange {
                gpa: 0x10_0000,
                pages: 2,
                private: false,
            }),
            get_quote,
            // An implicit conversion of another page.
            ScriptedExit::MemoryFault(MemoryFault {
                gpa: 0x20_0000,
                size: 0x1000,
                private: false,
            }),
            ScriptedExit::TdxVmcall(TdxVmcall {
                nr: 0x10004,
                data: [32, 0, 0, 0, 0],
            }),
        ],
    );
    let before = hv.calls().len();
    let results = serve(&mut td, &mem, None, 2);
    mem.write(0x10_0000, &request).unwrap();
    let results: Vec<TdExit> = results.into_iter().chain(serve(&mut td, &mem, None, 3)).collect();
    assert_eq!(
        results,
        [
            TdExit::GetQuote {
                ret: TDVMCALL_INVALID_OPERAND
            },
            TdExit::Converted {
                gpa: 0x10_0000,
                size: 0x2000,
                private: false
            },
            TdExit::GetQuote { ret: TDVMCALL_SUCCESS },
            TdExit::Converted {
                gpa: 0x20_0000,
                size: 0x1000,
                private: false
            },
            TdExit::UnservedVmcall { nr: 0x10004 },
        ]
    );
    // No QGS configured: the guest sees QGS_UNAVAILABLE in the buffer's status.
    let mut status = [0u8; 8];
    mem.read(0x10_0008, &mut status).unwrap();
    assert_eq!(u64::from_le_bytes(status), STATUS_QGS_UNAVAILABLE);
    assert_eq!(
        tdx_calls_since(&hv, before),
        [
            TdxCall::VmcallRet {
                vcpu: 0,
                ret: TDVMCALL_INVALID_OPERAND
            },
            TdxCall::SetMemoryAttributes {
                address: 0x10_0000,
                size: 0x2000,
                attributes: 0
            },
            TdxCall::HypercallRet { vcpu: 0, ret: 0 },
            TdxCall::VmcallRet {
                vcpu: 0,
                ret: TDVMCALL_SUCCESS
            },
            TdxCall::SetMemoryAttributes {
                address: 0x20_0000,
                size: 0x1000,
                attributes: 0
            },
        ]
    );
    let vcpu = &mut td.vcpus[0];
    let vm = td.vm.clone();
    let ctx = TdExitContext {
        vm: vm.as_ref(),
        mem: &mem,
        qgs: None,
        ioapic: None,
    };
    assert_eq!(handle(2, vcpu.as_mut(), &ctx).unwrap(), TdExit::NotTdx);
}

#[test]
fn devices_reach_only_memory_the_guest_shared() {
    let (hv, mut td) = launched();
    let mem = TdMemory::new(td.shared_memory.clone());
    // A bounce buffer at 1 MiB + 64 KiB, 4 pages.
    let (gpa, len) = (0x11_0000u64, 0x4000u64);
    let mut buf = [0u8; 16];
    // Private from launch: a device may neither read nor write it.
    assert!(matches!(mem.read(gpa, &mut buf), Err(SharedMemError::Private { .. })));
    assert!(matches!(mem.write(gpa, b"x"), Err(SharedMemError::Private { .. })));
    hv.script(
        0,
        [
            ScriptedExit::MapGpa(MapGpaRange {
                gpa,
                pages: 4,
                private: false,
            }),
            // The guest takes the last page back (implicit conversion).
            ScriptedExit::MemoryFault(MemoryFault {
                gpa: gpa + 0x3000,
                size: 0x1000,
                private: true,
            }),
            // Malformed MapGPA requests are refused to the guest, not fatal: outside RAM, and overflowing.
            ScriptedExit::MapGpa(MapGpaRange {
                gpa: 0xf000_0000,
                pages: 1,
                private: false,
            }),
            ScriptedExit::MapGpa(MapGpaRange {
                gpa,
                pages: u64::MAX / 2,
                private: false,
            }),
        ],
    );
    let before = hv.calls().len();
    let results = serve(&mut td, &mem, None, 1);
    assert_eq!(
        results,
        [TdExit::Converted {
            gpa,
            size: len,
            private: false
        }]
    );
    // Shared now: the device writes a response and reads it back, across the page boundary.
    let payload: Vec<u8> = (0..0x1800u32).map(|i| (i * 13) as u8).collect();
    mem.write(gpa + 0x800, &payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    mem.read(gpa + 0x800, &mut back).unwrap();
    assert_eq!(back, payload);
    // The guest sees the same bytes in the shared mapping KVM maps for shared GPAs.
    let mut raw = vec![0u8; payload.len()];
    td.shared_memory
        .read_slice(&mut raw, GuestAddress(gpa + 0x800))
        .unwrap();
    assert_eq!(raw, payload);
    mem.write(gpa + 0x3000, &[0xee; 0x1000]).unwrap();

    let results = serve(&mut td, &mem, None, 3);
    assert_eq!(
        results,
        [
            TdExit::Converted {
                gpa: gpa + 0x3000,
                size: 0x1000,
                private: true
            },
            TdExit::RefusedMapGpa {
                gpa: 0xf000_0000,
                pages: 1
            },
            TdExit::RefusedMapGpa {
                gpa,
                pages: u64::MAX / 2
            },
        ]
    );
    // The first three pages stay shared; the last is private again, refused to devices (also a read crossing
    // into it), and its shared backing
    // was discarded (no stale copy of what the device wrote).
    assert!(mem.is_shared(gpa, 0x3000));
    assert!(matches!(
        mem.read(gpa + 0x2ff8, &mut buf),
        Err(SharedMemError::Private { .. })
    ));
    td.shared_memory
        .read_slice(&mut raw[..16], GuestAddress(gpa + 0x3000))
        .unwrap();
    assert_eq!(&raw[..16], &[0u8; 16]);
    assert_eq!(
        tdx_calls_since(&hv, before),
        [
            TdxCall::SetMemoryAttributes {
                address: gpa,
                size: len,
                attributes: 0
            },
            TdxCall::HypercallRet { vcpu: 0, ret: 0 },
            TdxCall::SetMemoryAttributes {
                address: gpa + 0x3000,
                size: 0x1000,
                attributes: crate::hypervisor::tdx::MEMORY_ATTRIBUTE_PRIVATE
            },
            TdxCall::HypercallRet {
                vcpu: 0,
                ret: libc::EINVAL as u64
            },
            TdxCall::HypercallRet {
                vcpu: 0,
                ret: libc::EINVAL as u64
            },
        ]
    );
}

/// Records what the IOAPIC sends.
#[derive(Default)]
struct Sent(Mutex<Vec<MsiMessage>>);

impl MsiSink for Sent {
    fn send_msi(&self, msg: MsiMessage) -> Result<(), String> {
        self.0.lock().unwrap().push(msg);
        Ok(())
    }
    fn update_routes(&self, _: &[IrqRoute]) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn ioapic_eoi_exits_clear_remote_irr() {
    use crate::devices::BusDevice;

    let (hv, mut td) = launched();
    let mem = TdMemory::new(td.shared_memory.clone());
    let sent = Arc::new(Sent::default());
    let ioapic = Mutex::new(Ioapic::new(1, sent.clone()));
    {
        let mut io = ioapic.lock().unwrap();
        // Pin 9 (ACPI SCI): level-triggered vector 0x39.
        io.write(0x00, &0x22u32.to_le_bytes());
        io.write(0x10, &0x0000_8039u32.to_le_bytes());
        io.set_irq(9, true);
        assert!(io.entry(9).unwrap().remote_irr());
    }
    hv.script(0, [ScriptedExit::IoapicEoi(0x39)]);
    assert_eq!(serve(&mut td, &mem, Some(&ioapic), 1), [TdExit::Eoi { vector: 0x39 }]);
    // The line is still asserted: the EOI redelivered it.
    assert_eq!(sent.0.lock().unwrap().len(), 2);
}

#[test]
fn boot_td_runs_firmware_io_td_exits_and_serial_interrupts() {
    use super::fw_cfg::DirectBoot;
    use super::run::boot_td;
    use crate::devices::serial::SerialSink;
    use crate::hypervisor::SystemEventKind;
    use crate::vcpu::VmExit;

    let fw = synthetic_tdvf();
    let mut kernel = vec![0u8; 0x3000];
    kernel[0x1f1] = 3;
    kernel[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    kernel[0x211] = 0x01;
    let hv = fake_tdx_host();
    hv.script(
        0,
        [
            // OVMF-style fw_cfg probe: select the signature, read 4 bytes.
            ScriptedExit::IoOut {
                port: 0x510,
                data: vec![0, 0],
            },
            ScriptedExit::IoIn { port: 0x511, len: 4 },
            // Linux programs IOAPIC pin 4 (COM1): IOREGSEL = 0x18, IOWIN = vector 0x24, edge, unmasked.
            ScriptedExit::MmioWrite {
                addr: 0xfec0_0000,
                data: 0x18u32.to_le_bytes().to_vec(),
            },
            ScriptedExit::MmioWrite {
                addr: 0xfec0_0010,
                data: 0x24u32.to_le_bytes().to_vec(),
            },
            // The IOAPIC version register reads through the MMIO bus.
            ScriptedExit::MmioWrite {
                addr: 0xfec0_0000,
                data: 0x01u32.to_le_bytes().to_vec(),
            },
            ScriptedExit::MmioRead {
                addr: 0xfec0_0010,
                len: 4,
            },
            // The 8250 driver enables the THR-empty interrupt (IER = 2), then writes.
            ScriptedExit::IoOut {
                port: 0x3f9,
                data: vec![0x02],
            },
            ScriptedExit::IoOut {
                port: 0x3f8,
                data: b"h".to_vec(),
            },
            ScriptedExit::IoOut {
                port: 0x3f8,
                data: b"i".to_vec(),
            },
            // A GetQuote on a private buffer is refused, and the TD keeps running.
            ScriptedExit::TdxVmcall(TdxVmcall {
                nr: 0x10002,
                data: [0x10_0000, 0x1000, 0, 0, 0],
            }),
            ScriptedExit::SystemEvent(SystemEventKind::Shutdown),
        ],
    );
    let capture = Arc::new(Mutex::new(Vec::new()));
    let sink = SerialSink {
        capture: Some(capture.clone()),
        ..Default::default()
    };
    let boot = DirectBoot {
        kernel: &kernel,
        initrd: b"",
        cmdline: "console=ttyS0",
    };
    let cfg = TdxConfig::new(&fw, 256 << 20, 1);
    let outcome = boot_td(
        &hv,
        &cfg,
        &boot,
        &Default::default(),
        sink,
        None,
        None,
        Some(std::time::Duration::from_secs(20)),
    )
    .unwrap();
    assert!(matches!(outcome, VmExit::PowerOff), "{outcome:?}");
    assert_eq!(capture.lock().unwrap().as_slice(), b"hi");
    let calls = hv.calls();
    assert!(calls.contains(&Call::IoInResult {
        vcpu: 0,
        port: 0x511,
        data: b"QEMU".to_vec()
    }));
    assert!(calls.contains(&Call::Tdx(TdxCall::VmcallRet {
        vcpu: 0,
        ret: TDVMCALL_INVALID_OPERAND
    })));
    assert!(calls.contains(&Call::Tdx(TdxCall::Finalize)));
    // Programming pin 4 mirrored the table into the GSI routes (GSI 4 → MSI vector 0x24 to APIC 0)…
    assert!(calls.contains(&Call::SetGsiRouting(vec![IrqRoute::Msi {
        gsi: 4,
        address_lo: 0xfee0_0000,
        address_hi: 0,
        data: 0x24
    }])));
    // …and the UART's interrupts arrived as KVM_SIGNAL_MSI with that message.
    let msis: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, Call::Tdx(TdxCall::SignalMsi { .. })))
        .collect();
    assert!(!msis.is_empty(), "no MSI delivered");
    assert!(msis.iter().all(|c| **c
        == Call::Tdx(TdxCall::SignalMsi {
            address: 0xfee0_0000,
            data: 0x24
        })));
}
