//! TD parameters derived from what the host offers: TD attributes, XFAM and the CPUID given to
//! `KVM_TDX_INIT_VM` (only configurable leaves, each register masked by the configurable bits — the same
//! filtering QEMU applies, because KVM rejects leaves the TDX module does not list as configurable).

use crate::hypervisor::CpuIdEntry;
use crate::hypervisor::tdx::TdxCapabilities;

/// TD attribute bit 0: DEBUG (the host can read TD state; never for production).
pub const ATTR_DEBUG: u64 = 1;
/// TD attribute bit 28: SEPT_VE_DISABLE (EPT violations on pending pages do not become #VE in the guest);
/// what production TDs use (`td_attributes` 0x10000000 in the quote).
pub const ATTR_SEPT_VE_DISABLE: u64 = 1 << 28;
/// XFAM bits 0 (x87) and 1 (SSE) are architecturally required by TDX.
pub const XFAM_REQUIRED: u64 = 0x3;
/// Guest physical address widths KVM accepts for a TD (CPUID 0x80000008 EAX[23:16] in `KVM_TDX_INIT_VM`):
/// 48 (4-level EPT, always available; the shared bit is GPA bit 47) or 52 (5-level EPT hosts only).
pub const GPAW_48: u8 = 48;
pub const GPAW_52: u8 = 52;
/// CPUID.1:ECX bit 21, x2APIC: TDX guests always run in x2APIC mode and `KVM_TDX_INIT_VCPU` fails unless the
/// vCPU's CPUID (`KVM_SET_CPUID2`) advertises it.
pub const CPUID1_ECX_X2APIC: u32 = 1 << 21;

/// Why the requested parameters cannot be used on this host.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ParamsError {
    #[error("TD attributes {requested:#x}: bits {missing:#x} are not supported by this TDX module")]
    Attributes { requested: u64, missing: u64 },
    #[error("XFAM {requested:#x}: bits {missing:#x} are not supported by this TDX module")]
    Xfam { requested: u64, missing: u64 },
    #[error("XFAM {0:#x} lacks x87/SSE (bits 0 and 1), which TDX requires")]
    XfamIncomplete(u64),
    #[error("guest physical address width {0}: KVM accepts 48 or 52")]
    Gpaw(u8),
    #[error("the TDX module does not list CPUID leaf 0x80000008 as configurable; KVM needs it to set the GPAW")]
    NoGpawLeaf,
}

/// Checks `requested` TD attributes against the capabilities.
pub fn check_attributes(requested: u64, caps: &TdxCapabilities) -> Result<u64, ParamsError> {
    let missing = requested & !caps.supported_attrs;
    if missing != 0 {
        return Err(ParamsError::Attributes { requested, missing });
    }
    Ok(requested)
}

fn leaf(cpuid: &[CpuIdEntry], function: u32, index: u32) -> Option<&CpuIdEntry> {
    cpuid.iter().find(|e| e.function == function && e.index == index)
}

/// The XFAM to request: `explicit` if given, otherwise every XSAVE feature the host's KVM supports (CPUID
/// 0xD.0 EDX:EAX for XCR0 bits, 0xD.1 EDX:ECX for IA32_XSS bits) that the TDX module allows.
pub fn choose_xfam(
    explicit: Option<u64>,
    host_cpuid: &[CpuIdEntry],
    caps: &TdxCapabilities,
) -> Result<u64, ParamsError> {
    let xfam = match explicit {
        Some(x) => {
            let missing = x & !caps.supported_xfam;
            if missing != 0 {
                return Err(ParamsError::Xfam { requested: x, missing });
            }
            x
        }
        None => {
            let xcr0 = leaf(host_cpuid, 0xd, 0).map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
            let xss = leaf(host_cpuid, 0xd, 1).map_or(0, |e| u64::from(e.ecx) | (u64::from(e.edx) << 32));
            (xcr0 | xss) & caps.supported_xfam
        }
    };
    if xfam & XFAM_REQUIRED != XFAM_REQUIRED {
        return Err(ParamsError::XfamIncomplete(xfam));
    }
    Ok(xfam)
}

/// The CPUID for `KVM_TDX_INIT_VM`: entries of `wanted` whose leaf/subleaf the capabilities list as
/// configurable, with every register ANDed with the configurable mask; other entries are dropped (the TDX
/// module fixes or virtualizes those itself, and KVM rejects them). Leaf 0x80000008 carries the guest physical
/// address width in EAX[23:16] — KVM's interface for choosing the TD's GPAW and EPT levels — so it is always
/// present, with `gpaw` there.
pub fn filter_cpuid(wanted: &[CpuIdEntry], caps: &TdxCapabilities, gpaw: u8) -> Result<Vec<CpuIdEntry>, ParamsError> {
    if gpaw != GPAW_48 && gpaw != GPAW_52 {
        return Err(ParamsError::Gpaw(gpaw));
    }
    if leaf(&caps.cpuid, 0x8000_0008, 0).is_none() {
        return Err(ParamsError::NoGpawLeaf);
    }
    let mut out: Vec<CpuIdEntry> = wanted
        .iter()
        .filter_map(|e| {
            let conf = leaf(&caps.cpuid, e.function, e.index)?;
            let out = CpuIdEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax & conf.eax,
                ebx: e.ebx & conf.ebx,
                ecx: e.ecx & conf.ecx,
                edx: e.edx & conf.edx,
            };
            Some(out)
        })
        .collect();
    if leaf(&out, 0x8000_0008, 0).is_none() {
        out.push(CpuIdEntry {
            function: 0x8000_0008,
            ..Default::default()
        });
    }
    for e in out.iter_mut().filter(|e| e.function == 0x8000_0008 && e.index == 0) {
        e.eax = (e.eax & !0x00ff_0000) | (u32::from(gpaw) << 16);
    }
    Ok(out)
}

/// The CPUID for `KVM_SET_CPUID2` on a TD vCPU: what the TDX module presents (`KVM_TDX_GET_CPUID`) with the
/// x2APIC bit guaranteed, plus KVM's paravirtual leaves from the host (the guest reaches those through
/// TDVMCALL<CPUID>, which KVM answers from this table).
pub fn vcpu_cpuid(td_cpuid: &[CpuIdEntry], host_cpuid: &[CpuIdEntry]) -> Vec<CpuIdEntry> {
    let mut out = td_cpuid.to_vec();
    match out.iter_mut().find(|e| e.function == 1) {
        Some(e) => e.ecx |= CPUID1_ECX_X2APIC,
        None => out.push(CpuIdEntry {
            function: 1,
            ecx: CPUID1_ECX_X2APIC,
            ..Default::default()
        }),
    }
    out.extend(
        host_cpuid
            .iter()
            .filter(|e| (0x4000_0000..=0x4000_00ff).contains(&e.function))
            .copied(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn caps() -> TdxCapabilities {
        TdxCapabilities {
            supported_attrs: ATTR_DEBUG | ATTR_SEPT_VE_DISABLE,
            supported_xfam: 0x0006_02e7,
            cpuid: vec![
                e(1, 0, [0, 0, 0x0000_ff00, 0x0f00_0000]),
                e(7, 0, [0, 0xffff_ffff, 0, 0]),
                // As KVM reports it: EAX[23:16] (GPAW) configurable.
                e(0x8000_0008, 0, [0x00ff_00ff, 0, 0, 0]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_keeps_only_configurable_bits_and_leaves() {
        let wanted = [
            e(0, 0, [0xd, 1, 2, 3]),
            e(1, 0, [0x806f8, 0x1234, 0xfffa_3203, 0x1f8b_fbff]),
            e(7, 0, [0, 0xf1bf_07ab, 0x1b40_5f4e, 0]),
            e(7, 1, [0x1c30, 0, 0, 0]),
            e(0x8000_0008, 0, [0x0030_3934, 0, 0, 0]),
        ];
        let got = filter_cpuid(&wanted, &caps(), GPAW_48).unwrap();
        assert_eq!(
            got,
            vec![
                e(1, 0, [0, 0, 0x0000_3200, 0x0f00_0000]),
                e(7, 0, [0, 0xf1bf_07ab, 0, 0]),
                // 0x3934 & 0xff = 0x34 (52 physical bits); GPAW 48 = 0x30 in EAX[23:16].
                e(0x8000_0008, 0, [0x0030_0034, 0, 0, 0]),
            ]
        );
        // Without 0x80000008 in the wanted set it is added, carrying the GPAW.
        let got = filter_cpuid(&wanted[..2], &caps(), GPAW_52).unwrap();
        assert_eq!(got.last(), Some(&e(0x8000_0008, 0, [0x0034_0000, 0, 0, 0])));
        assert_eq!(filter_cpuid(&wanted, &caps(), 40), Err(ParamsError::Gpaw(40)));
        let mut no_leaf = caps();
        no_leaf.cpuid.truncate(2);
        assert_eq!(filter_cpuid(&wanted, &no_leaf, GPAW_48), Err(ParamsError::NoGpawLeaf));
    }

    #[test]
    fn vcpu_cpuid_forces_x2apic_and_adds_kvm_leaves() {
        let td = [e(0, 0, [0xd, 0, 0, 0]), e(1, 0, [0x806f8, 0, 0x3200, 0])];
        let host = [e(1, 0, [1, 1, 1, 1]), e(0x4000_0000, 0, [0x4000_0001, 0, 0, 0])];
        let got = vcpu_cpuid(&td, &host);
        assert_eq!(
            got,
            [
                e(0, 0, [0xd, 0, 0, 0]),
                e(1, 0, [0x806f8, 0, 0x3200 | CPUID1_ECX_X2APIC, 0]),
                e(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            ]
        );
    }

    #[test]
    fn xfam_from_host_xsave_leaves_masked_by_module() {
        let host = [e(0xd, 0, [0x0000_02e7, 0, 0, 0]), e(0xd, 1, [0, 0, 0x0000_1900, 0])];
        // XCR0 0x2e7 | XSS 0x1900 (bits 8, 11, 12) = 0x1be7; the module's mask 0x602e7 keeps 0x2e7.
        assert_eq!(choose_xfam(None, &host, &caps()), Ok(0x2e7));
        assert_eq!(choose_xfam(Some(0x3), &host, &caps()), Ok(0x3));
        assert_eq!(
            choose_xfam(Some(0x1_0003), &host, &caps()),
            Err(ParamsError::Xfam {
                requested: 0x1_0003,
                missing: 0x1_0000
            })
        );
        assert_eq!(choose_xfam(None, &[], &caps()), Err(ParamsError::XfamIncomplete(0)));
    }

    #[test]
    fn attributes_must_be_supported() {
        assert_eq!(
            check_attributes(ATTR_SEPT_VE_DISABLE, &caps()),
            Ok(ATTR_SEPT_VE_DISABLE)
        );
        assert_eq!(
            check_attributes(ATTR_SEPT_VE_DISABLE | (1 << 30), &caps()),
            Err(ParamsError::Attributes {
                requested: ATTR_SEPT_VE_DISABLE | (1 << 30),
                missing: 1 << 30
            })
        );
    }
}
