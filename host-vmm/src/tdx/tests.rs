//! TD launch tests without TDX hardware: against the recording fake (synthetic TDVF firmware, and Debian's OVMF
//! when available) and against the real `/dev/kvm` of a host without TDX.
//!
//! Inputs (environment):
//! - `DSTACK_TEST_OVMF`: trixie's `ovmf` package `/usr/share/ovmf/OVMF.fd` (the unified image; `OVMF_CODE_4M.fd`
//!   alone has no TDVF metadata). Unset: skipped loudly, or a failure under `DSTACK_REQUIRE_FIXTURES=1`.
//! - `DSTACK_TEST_KERNEL` (optional, with the OVMF): a Debian `vmlinuz`, to run the full RTMR prediction and
//!   compare its TD HOB and "ACPI DATA" events with the HOB and fw_cfg files the VMM gives the firmware, and
//!   replay RTMR0 from the predicted log.
//! - `DSTACK_REQUIRE_KVM=1`: the real-KVM test fails instead of skipping when `/dev/kvm` is missing.

use dstack_measurements::mrtd::{ATTR_MR_EXTEND, ATTR_PAGE_AUG, PageOrder, compute_mrtd, parse_tdvf};
use dstack_measurements::predict::hob::{self, SECTION_TD_HOB, SECTION_TEMP_MEM};
use sha2::{Digest, Sha384};

use super::params::{ATTR_DEBUG, ATTR_SEPT_VE_DISABLE};
use super::{TdxConfig, TdxError, launch};
use crate::hypervisor::CpuIdEntry;
use crate::hypervisor::fake::{Call, FakeHypervisor, FakeTdxHost, TdxCall};
use crate::hypervisor::tdx::{MEMORY_ATTRIBUTE_PRIVATE, TdxCapabilities, TdxHypervisor};

const FOUR_GIB: u64 = 1 << 32;
/// SHA-256 of `/usr/share/ovmf/OVMF.fd` from Debian trixie's `ovmf 2025.02-8+deb13u1`, and its MRTD.
const TRIXIE_OVMF_SHA256: &str = "14954040cc754ade0c625ac3470ea46d4c14318b5b1396de4ef77090203d76db";
const TRIXIE_OVMF_MRTD: &str =
    "bdc6fb145880f06f30c8b346b8dce2a99d9351b56892df22f80fcf6574caa9f9c31df8e8576d53b4d0cd1c3f28910e11";

fn e(function: u32, index: u32, regs: [u32; 4]) -> CpuIdEntry {
    CpuIdEntry {
        function,
        index,
        flags: 0,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
    }
}

/// A fake TDX host: KVM supports the default, SW-protected and TDX VM types; the module allows DEBUG and
/// SEPT_VE_DISABLE, XFAM 0x602e7, and lets userspace configure a few bits of leaves 1 and 7.
pub(crate) fn fake_tdx_host() -> FakeHypervisor {
    let host_cpuid = vec![
        e(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
        e(1, 0, [0x806f8, 0x0001_0800, 0xfffa_3203, 0x1f8b_fbff]),
        e(7, 0, [2, 0xf1bf_07ab, 0x1b40_5f4e, 0xbc18_4410]),
        e(0xd, 0, [0x2e7, 0x2b00, 0x2b00, 0]),
        e(0xd, 1, [0x1f, 0, 0x1900, 0]),
        e(0x4000_0000, 0, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]),
        e(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
    ];
    let caps = TdxCapabilities {
        supported_attrs: ATTR_DEBUG | ATTR_SEPT_VE_DISABLE,
        supported_xfam: 0x0006_02e7,
        cpuid: vec![
            e(1, 0, [0, 0, 0x0000_ff00, 0x0f00_0000]),
            e(7, 0, [0, 0xffff_ffff, 0, 0]),
            // KVM reports EAX[23:16] (the GPAW) of 0x80000008 as configurable.
            e(0x8000_0008, 0, [0x00ff_00ff, 0, 0, 0]),
        ],
        ..Default::default()
    };
    FakeHypervisor::with_tdx(
        host_cpuid,
        FakeTdxHost {
            vm_types: (1 << 0) | (1 << 1) | (1 << 5),
            caps,
            max_vcpus: 8,
            vcpu_cpuid: vec![e(1, 0, [0x806f8, 0, 0x3200, 0x0f00_0000])],
        },
    )
}

/// A 64 KiB TDVF image found through the legacy pointer at `len - 0x20`: CFV (4 pages, not measured) at the
/// bottom, BFV (8 pages, MR_EXTEND) at the top, TD_HOB and TEMP_MEM in low RAM, and a PAGE_AUG section.
pub(crate) fn synthetic_tdvf() -> Vec<u8> {
    const LEN: usize = 0x1_0000;
    let mut fw: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
    let base = FOUR_GIB - LEN as u64;
    // (data_offset, raw_size, gpa, size, type, attributes)
    let sections: [(u32, u32, u64, u64, u32, u32); 5] = [
        (0x8000, 0x8000, base + 0x8000, 0x8000, 0, ATTR_MR_EXTEND),
        (0, 0x4000, base, 0x4000, 1, 0),
        (0, 0, 0x80_9000, 0x2000, SECTION_TD_HOB, 0),
        (0, 0, 0x80_0000, 0x6000, SECTION_TEMP_MEM, 0),
        (0, 0, 0x90_0000, 0x1000, 4, ATTR_PAGE_AUG),
    ];
    let desc = 0x4000;
    let mut d = Vec::new();
    d.extend_from_slice(b"TDVF");
    d.extend_from_slice(&(16 + 32 * sections.len() as u32).to_le_bytes());
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    for (off, raw, gpa, size, t, attr) in sections {
        d.extend_from_slice(&off.to_le_bytes());
        d.extend_from_slice(&raw.to_le_bytes());
        d.extend_from_slice(&gpa.to_le_bytes());
        d.extend_from_slice(&size.to_le_bytes());
        d.extend_from_slice(&t.to_le_bytes());
        d.extend_from_slice(&attr.to_le_bytes());
    }
    fw[desc..desc + d.len()].copy_from_slice(&d);
    fw[LEN - 0x20..LEN - 0x1c].copy_from_slice(&((LEN - desc) as u32).to_le_bytes());
    fw
}

/// MRTD recomputed from the recorded `KVM_TDX_INIT_MEM_REGION` calls with the TDX module's semantics: per page
/// a TDH.MEM.PAGE.ADD record (128 bytes, "MEM.PAGE.ADD", GPA at 16..24) and, for measured regions, per 256-byte
/// chunk a TDH.MR.EXTEND record ("MR.EXTEND", chunk GPA) followed by the chunk's bytes.
fn mrtd_from_calls(calls: &[Call]) -> [u8; 48] {
    fn record(tag: &[u8], gpa: u64) -> [u8; 128] {
        let mut r = [0u8; 128];
        r[..tag.len()].copy_from_slice(tag);
        r[16..24].copy_from_slice(&gpa.to_le_bytes());
        r
    }
    let mut h = Sha384::new();
    for call in calls {
        if let Call::Tdx(TdxCall::InitMemRegion {
            gpa,
            nr_pages,
            measure,
            source,
            ..
        }) = call
        {
            for page in 0..*nr_pages {
                let page_gpa = gpa + page * 4096;
                h.update(record(b"MEM.PAGE.ADD", page_gpa));
                if *measure {
                    for chunk in 0..16u64 {
                        h.update(record(b"MR.EXTEND", page_gpa + chunk * 256));
                        let at = (page * 4096 + chunk * 256) as usize;
                        h.update(&source.0[at..at + 256]);
                    }
                }
            }
        }
    }
    h.finalize().into()
}

fn tdx_calls(calls: &[Call]) -> Vec<&TdxCall> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Tdx(t) => Some(t),
            _ => None,
        })
        .collect()
}

/// A compact name per call, for checking the order.
fn kind(c: &Call) -> String {
    match c {
        Call::Tdx(t) => {
            let s = format!("{t:?}");
            s.split([' ', '(', '{']).next().unwrap_or_default().to_owned()
        }
        Call::CreateVcpu(id) => format!("CreateVcpu{id}"),
        Call::SetCpuid(id, _) => format!("SetCpuid{id}"),
        other => format!("{other:?}"),
    }
}

fn mem_regions(calls: &[Call]) -> Vec<(u64, u64, bool, &[u8])> {
    tdx_calls(calls)
        .into_iter()
        .filter_map(|c| match c {
            TdxCall::InitMemRegion {
                gpa,
                nr_pages,
                measure,
                source,
                ..
            } => Some((*gpa, *nr_pages, *measure, source.0.as_slice())),
            _ => None,
        })
        .collect()
}

#[test]
fn synthetic_firmware_launch_sequence_and_mrtd() {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    let mut cfg = TdxConfig::new(&fw, 256 << 20, 2);
    cfg.mrconfigid = std::array::from_fn(|i| i as u8);
    cfg.mrowner = [0xaa; 48];
    let td = launch(&hv, &cfg).expect("launch against the fake");
    let calls = hv.calls();

    let kinds: Vec<String> = calls.iter().map(kind).collect();
    let expected = [
        "SupportedVmTypes",
        "SupportedCpuid",
        "CreateTdxVm",
        "CheckExtension",
        "CheckExtension",
        "CheckExtension",
        "CheckExtension",
        "EnableSplitIrqchip",
        "EnableExitHypercall",
        "Capabilities",
        "InitVm",
        "CreateGuestMemfd",
        "SetPrivateMemoryRegion",
        "SetMemoryAttributes",
        "SetPrivateMemoryRegion",
        "SetMemoryAttributes",
        "CreateVcpu0",
        "GetCpuid",
        "SetCpuid0",
        "InitVcpu",
        "CreateVcpu1",
        "GetCpuid",
        "SetCpuid1",
        "InitVcpu",
        "InitMemRegion",
        "InitMemRegion",
        "InitMemRegion",
        "InitMemRegion",
        "Finalize",
    ];
    assert_eq!(kinds, expected);

    let tdx = tdx_calls(&calls);
    assert!(tdx.contains(&&TdxCall::EnableSplitIrqchip { ioapic_pins: 24 }));
    // MapGPA (hypercall 12, KVM_HC_MAP_GPA_RANGE) is forwarded to the VMM.
    assert!(tdx.contains(&&TdxCall::EnableExitHypercall { mask: 1 << 12 }));
    // RAM slot then the firmware slot right below 4 GiB, one guest_memfd with consecutive offsets, all private.
    let regions: Vec<_> = tdx
        .iter()
        .filter_map(|c| match c {
            TdxCall::SetPrivateMemoryRegion {
                slot,
                guest_phys_addr,
                size,
                guest_memfd_offset,
            } => Some((*slot, *guest_phys_addr, *size, *guest_memfd_offset)),
            _ => None,
        })
        .collect();
    assert_eq!(
        regions,
        [(0, 0, 256 << 20, 0), (1, FOUR_GIB - 0x1_0000, 0x1_0000, 256 << 20)]
    );
    assert!(tdx.contains(&&TdxCall::CreateGuestMemfd {
        size: (256 << 20) + 0x1_0000
    }));
    assert!(tdx.contains(&&TdxCall::SetMemoryAttributes {
        address: FOUR_GIB - 0x1_0000,
        size: 0x1_0000,
        attributes: MEMORY_ATTRIBUTE_PRIVATE
    }));

    // INIT_VM: production attributes, XFAM = host XSAVE features ∩ module mask, CPUID filtered, owner fields.
    let init = tdx
        .iter()
        .find_map(|c| match c {
            TdxCall::InitVm(p) => Some(p.as_ref().clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(init.attributes, ATTR_SEPT_VE_DISABLE);
    assert_eq!(init.xfam, 0x2e7);
    assert_eq!(init.mrconfigid, cfg.mrconfigid);
    assert_eq!(init.mrowner, [0xaa; 48]);
    assert_eq!(init.mrownerconfig, [0; 48]);
    assert_eq!(
        init.cpuid,
        [
            e(1, 0, [0, 0, 0x3200, 0x0f00_0000]),
            e(7, 0, [0, 0xf1bf_07ab, 0, 0]),
            // Absent from the host's list: added to carry GPAW 48.
            e(0x8000_0008, 0, [0x0030_0000, 0, 0, 0]),
        ]
    );
    assert_eq!(init, td.init_vm);

    // vCPUs start with RCX = the TD HOB (the TD_HOB section) and get the module's CPUID plus KVM's leaves.
    for id in 0..2 {
        assert!(tdx.contains(&&TdxCall::InitVcpu {
            vcpu: id,
            rcx: 0x80_9000
        }));
        let set = calls
            .iter()
            .find_map(|c| match c {
                Call::SetCpuid(v, entries) if *v == id => Some(entries.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(
            set[0],
            e(1, 0, [0x806f8, 0, 0x3200 | (1 << 21), 0x0f00_0000]),
            "x2APIC forced"
        );
        assert_eq!(set[1].function, 0x4000_0000);
    }

    // One INIT_MEM_REGION per non-PAGE_AUG section, in metadata order, measured iff MR_EXTEND, on vCPU 0.
    let mem = mem_regions(&calls);
    let summary: Vec<(u64, u64, bool)> = mem.iter().map(|m| (m.0, m.1, m.2)).collect();
    assert_eq!(
        summary,
        [
            (FOUR_GIB - 0x8000, 8, true),
            (FOUR_GIB - 0x1_0000, 4, false),
            (0x80_9000, 2, false),
            (0x80_0000, 6, false),
        ]
    );
    assert_eq!(mem[0].3, &fw[0x8000..]);
    assert_eq!(mem[1].3, &fw[..0x4000]);
    assert!(mem[3].3.iter().all(|&b| b == 0), "TEMP_MEM starts zeroed");
    let hob = hob::build(&parse_tdvf(&fw).unwrap(), 256 << 20).unwrap();
    assert_eq!(&mem[2].3[..hob.bytes.len()], hob.bytes.as_slice());
    assert!(mem[2].3[hob.bytes.len()..].iter().all(|&b| b == 0));
    assert_eq!(td.hob, hob);

    assert_eq!(
        mrtd_from_calls(&calls),
        compute_mrtd(&fw, PageOrder::SinglePass).unwrap()
    );
}

#[test]
fn memory_above_the_hole_gets_its_own_slot() {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    launch(&hv, &TdxConfig::new(&fw, 4 << 30, 1)).unwrap();
    let regions: Vec<(u32, u64, u64, u64)> = tdx_calls(&hv.calls())
        .into_iter()
        .filter_map(|c| match c {
            TdxCall::SetPrivateMemoryRegion {
                slot,
                guest_phys_addr,
                size,
                guest_memfd_offset,
            } => Some((*slot, *guest_phys_addr, *size, *guest_memfd_offset)),
            _ => None,
        })
        .collect();
    let low = 3u64 << 30;
    assert_eq!(
        regions,
        [
            (0, 0, low, 0),
            (1, FOUR_GIB - 0x1_0000, 0x1_0000, low),
            (2, FOUR_GIB, 1 << 30, low + 0x1_0000),
        ]
    );
}

#[test]
fn host_without_tdx_fails_before_creating_a_vm() {
    let fw = synthetic_tdvf();
    let hv = FakeHypervisor::new(Vec::new());
    let err = launch(&hv, &TdxConfig::new(&fw, 256 << 20, 1)).unwrap_err();
    assert!(matches!(err, TdxError::HostLacksTdx { types: 1 }), "{err}");
    assert!(err.to_string().contains("KVM_X86_TDX_VM"));
    assert_eq!(hv.calls(), [Call::Tdx(TdxCall::SupportedVmTypes)]);
}

#[test]
fn rejects_unsupported_parameters_and_bad_sections() {
    let fw = synthetic_tdvf();
    let hv = fake_tdx_host();
    let mut cfg = TdxConfig::new(&fw, 256 << 20, 1);
    cfg.attributes |= 1 << 30;
    let err = launch(&hv, &cfg).unwrap_err();
    assert!(err.to_string().contains("bits 0x40000000"), "{err}");
    assert!(!tdx_calls(&hv.calls()).iter().any(|c| matches!(c, TdxCall::InitVm(_))));

    let hv = fake_tdx_host();
    let cfg = TdxConfig::new(&fw, 256 << 20, 9);
    assert!(launch(&hv, &cfg).unwrap_err().to_string().contains("supports 8"));

    // Measured PAGE_AUG section (byte 28 of the 5th entry = attributes).
    let mut bad = fw.clone();
    let attr_at = 0x4000 + 16 + 4 * 32 + 28;
    bad[attr_at..attr_at + 4].copy_from_slice(&(ATTR_PAGE_AUG | ATTR_MR_EXTEND).to_le_bytes());
    let err = launch(&fake_tdx_host(), &TdxConfig::new(&bad, 256 << 20, 1)).unwrap_err();
    assert!(matches!(err, TdxError::Section { addr: 0x90_0000, .. }), "{err}");

    // Less memory than the predictor models (64 MiB) is refused up front.
    let err = launch(&fake_tdx_host(), &TdxConfig::new(&fw, 1 << 20, 1)).unwrap_err();
    assert!(matches!(err, TdxError::Config(_)), "{err}");
}

fn fixture(var: &str) -> Option<Vec<u8>> {
    match std::env::var(var) {
        Ok(path) => Some(std::fs::read(&path).unwrap_or_else(|e| panic!("{var}={path}: {e}"))),
        Err(_) => None,
    }
}

#[test]
fn debian_ovmf_launch_reproduces_predicted_mrtd_and_hob() {
    let Some(fw) = fixture("DSTACK_TEST_OVMF") else {
        assert_ne!(
            std::env::var("DSTACK_REQUIRE_FIXTURES").as_deref(),
            Ok("1"),
            "DSTACK_TEST_OVMF unset but DSTACK_REQUIRE_FIXTURES=1"
        );
        eprintln!(
            "SKIP debian_ovmf_launch_reproduces_predicted_mrtd_and_hob: set DSTACK_TEST_OVMF to trixie's OVMF.fd"
        );
        return;
    };
    let memory = 2u64 << 30;
    let hv = fake_tdx_host();
    let mut cfg = TdxConfig::new(&fw, memory, 1);
    cfg.mrconfigid[0] = 1;
    launch(&hv, &cfg).expect("launching Debian's OVMF against the fake");
    let calls = hv.calls();
    let tdvf = parse_tdvf(&fw).unwrap();

    // Every section in metadata order, measured iff MR_EXTEND; Debian's OVMF has a measured BFV and an
    // unmeasured CFV in the firmware range, and TD_HOB / TEMP_MEM in low RAM.
    let mem = mem_regions(&calls);
    let want: Vec<(u64, u64, bool)> = tdvf
        .sections
        .iter()
        .filter(|s| s.attributes & ATTR_PAGE_AUG == 0)
        .map(|s| {
            (
                s.memory_address,
                s.memory_data_size / 4096,
                s.attributes & ATTR_MR_EXTEND != 0,
            )
        })
        .collect();
    let got: Vec<(u64, u64, bool)> = mem.iter().map(|m| (m.0, m.1, m.2)).collect();
    assert_eq!(got, want);
    assert!(got.iter().any(|g| g.2) && got.iter().any(|g| !g.2));
    let fw_base = FOUR_GIB - fw.len() as u64;
    for (s, m) in tdvf
        .sections
        .iter()
        .filter(|s| s.attributes & ATTR_PAGE_AUG == 0)
        .zip(&mem)
    {
        if s.raw_data_size > 0 {
            let at = s.data_offset as usize;
            assert_eq!(&m.3[..s.raw_data_size as usize], &fw[at..at + s.raw_data_size as usize]);
            // Firmware volumes sit where the image is mapped: file offset = GPA - base.
            assert_eq!(s.memory_address - fw_base, u64::from(s.data_offset));
        }
    }

    // MRTD from what KVM was asked to add and measure == the predictor's (= `dstack-measure mrtd`).
    let mrtd = mrtd_from_calls(&calls);
    assert_eq!(mrtd, compute_mrtd(&fw, PageOrder::SinglePass).unwrap());
    // For trixie's ovmf 2025.02-8+deb13u1 OVMF.fd, a separate Python hashlib implementation (locating the
    // descriptor by scanning for "TDVF") computed the same value.
    if hex::encode(sha2::Sha256::digest(&fw)) == TRIXIE_OVMF_SHA256 {
        assert_eq!(hex::encode(mrtd), TRIXIE_OVMF_MRTD);
    }

    // The TD HOB the firmware receives is the one RTMR0's prediction hashes.
    let hob = hob::build(&tdvf, memory).unwrap();
    let hob_section = tdvf.sections.iter().find(|s| s.section_type == SECTION_TD_HOB).unwrap();
    let given = mem.iter().find(|m| m.0 == hob_section.memory_address).unwrap().3;
    assert_eq!(&given[..hob.bytes.len()], hob.bytes.as_slice());
    assert!(tdx_calls(&calls).contains(&&TdxCall::InitVcpu {
        vcpu: 0,
        rcx: hob_section.memory_address
    }));
    let Some(kernel) = fixture("DSTACK_TEST_KERNEL") else {
        eprintln!("SKIP (part) RTMR0 TD HOB event check: set DSTACK_TEST_KERNEL to a Debian vmlinuz");
        return;
    };
    let inputs = dstack_measurements::predict::BootInputs {
        firmware: &fw,
        kernel: &kernel,
        initrd: b"initrd",
        cmdline: "console=ttyS0",
    };
    let shape = dstack_measurements::predict::VmShape {
        vcpus: 1,
        memory_bytes: memory,
    };
    let prediction = dstack_measurements::predict::predict(&inputs, &shape).unwrap();
    let hob_event = &prediction.events[0];
    assert_eq!(
        hob_event.event_type, 0x8000_000b,
        "first RTMR0 event is the TD HOB (EV_EFI_HANDOFF_TABLES2)"
    );
    // OVMF hashes the HOB list without its 8-byte END_OF_HOB_LIST terminator.
    let measured = &given[..hob.bytes.len() - 8];
    assert_eq!(hob_event.digest, Sha384::digest(measured).to_vec());

    // The ACPI files the VMM serves, read through the fw_cfg ports as OVMF's QemuFwCfgLib does (select, then
    // byte reads), hash to the predicted "ACPI DATA" events, in the order loader, rsdp, tables.
    use crate::devices::BusDevice;
    let boot = super::fw_cfg::DirectBoot {
        kernel: &kernel,
        initrd: b"initrd",
        cmdline: "console=ttyS0",
    };
    let mut fw_cfg = super::fw_cfg::for_direct_boot(&boot, &shape).unwrap();
    let mut served = Vec::new();
    for name in ["etc/table-loader", "etc/acpi/rsdp", "etc/acpi/tables"] {
        let key = fw_cfg.file_key(name).unwrap();
        let len = fw_cfg.item(key).unwrap().len();
        fw_cfg.write(0, &key.to_le_bytes());
        let mut bytes = vec![0u8; len];
        for b in &mut bytes {
            let mut one = [0u8];
            fw_cfg.read(1, &mut one);
            *b = one[0];
        }
        served.push(bytes);
    }
    assert_eq!(
        &served[2][..4],
        b"FACS",
        "fixed-hardware tables: the FACS leads the tables file"
    );
    let acpi_events: Vec<_> = prediction.events.iter().filter(|e| e.event_type == 0xa).collect();
    assert_eq!(acpi_events.len(), 3);
    for (ev, file) in acpi_events.iter().zip(&served) {
        assert_eq!(ev.event_payload, b"ACPI DATA");
        assert_eq!(ev.digest, Sha384::digest(file).to_vec());
    }
    // RTMR0 replays from the predicted log (extend written out here: RTMR = SHA-384(RTMR || digest)).
    let mut rtmr0 = [0u8; 48];
    for ev in prediction.events.iter().filter(|e| e.imr == 0) {
        let mut h = Sha384::new();
        h.update(rtmr0);
        h.update(&ev.digest);
        rtmr0 = h.finalize().into();
    }
    assert_eq!(rtmr0, prediction.rtmr[0]);
}

#[test]
fn real_kvm_without_tdx_reports_a_clear_error() {
    use crate::hypervisor::kvm::KvmHypervisor;
    if !KvmHypervisor::is_available() {
        assert_ne!(
            std::env::var("DSTACK_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "/dev/kvm missing but DSTACK_REQUIRE_KVM=1"
        );
        eprintln!("SKIP real_kvm_without_tdx_reports_a_clear_error: no /dev/kvm");
        return;
    }
    let hv = KvmHypervisor::new().unwrap();
    let types = hv.supported_vm_types().unwrap();
    let fw = synthetic_tdvf();
    match launch(&hv, &TdxConfig::new(&fw, 256 << 20, 1)) {
        Err(TdxError::HostLacksTdx { types: reported }) => {
            assert_eq!(reported, types);
            assert_eq!(types & (1 << 5), 0);
            // Every KVM host supports the default VM type when it reports VM types at all.
            assert!(types == 0 || types & 1 == 1, "{types:#x}");
            let msg = TdxError::HostLacksTdx { types }.to_string();
            assert!(msg.contains("KVM_X86_TDX_VM") && msg.contains("6.16"), "{msg}");
            eprintln!("real KVM: {msg}");
        }
        // A TDX host gets past the capability check (and then needs the real firmware to go further).
        other => assert_ne!(types & (1 << 5), 0, "unexpected result on a non-TDX host: {other:?}"),
    }
}
