//! Per-vCPU CPUID from `KVM_GET_SUPPORTED_CPUID`: topology (1 socket, N cores, 1 thread each), APIC IDs,
//! the hypervisor bit, and leaves we do not virtualize (PMU) removed.

use crate::hypervisor::{CPUID_FLAG_SIGNIFICANT_INDEX, CpuIdEntry};

/// CPUID.1:ECX bit 31 — running under a hypervisor.
pub const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28 — more than one logical processor per package.
pub const CPUID1_EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` items (ceil(log2(n)), 0 for n <= 1).
fn id_bits(n: u32) -> u32 {
    if n <= 1 { 0 } else { 32 - (n - 1).leading_zeros() }
}

/// CPUID entries for vCPU `vcpu_id` of `vcpu_count`.
pub fn filter_cpuid(supported: &[CpuIdEntry], vcpu_id: u32, vcpu_count: u32) -> Vec<CpuIdEntry> {
    let core_bits = id_bits(vcpu_count);
    let mut out = Vec::with_capacity(supported.len());
    for e in supported {
        let mut e = *e;
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors per package, [15:8] CLFLUSH size (8 qwords).
                e.ebx = (vcpu_id << 24) | ((vcpu_count.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= CPUID1_ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    e.edx |= CPUID1_EDX_HTT;
                } else {
                    e.edx &= !CPUID1_EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: EAX[31:26] = cores per package - 1, [25:14] = threads sharing
                // this cache - 1 (each cache is per core, L3 shared by the package).
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { vcpu_count.max(1) - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((vcpu_count.max(1) - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            6 => {
                // No thermal/power management or hardware P-state feedback in a VM.
                e.eax &= !(1 << 1); // turbo boost visible to OS: hide
                e.ecx &= !(1 << 3); // energy/performance bias
            }
            0xa => {
                // No architectural PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: subleaf 0 = SMT level (1 thread), subleaf 1 = core level; EDX = x2APIC ID.
                e.flags |= CPUID_FLAG_SIGNIFICANT_INDEX;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = vcpu_count;
                        e.ecx = (2 << 8) | 1;
                    }
                    idx => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = idx & 0xff;
                    }
                }
                e.edx = vcpu_id;
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            eax: 0x1234_5678,
            ebx: 0x0808_0842,
            ecx: 0x7ffa_3203,
            edx: 0x178b_fbff,
            flags: 0,
        }
    }

    #[test]
    fn leaf1_topology_and_hypervisor_bit() {
        let out = filter_cpuid(&[entry(1, 0)], 3, 4);
        let l1 = out[0];
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical count");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "clflush");
        assert_ne!(l1.ecx & CPUID1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & CPUID1_EDX_HTT, 0);
        let single = filter_cpuid(&[entry(1, 0)], 0, 1)[0];
        assert_eq!(single.edx & CPUID1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology() {
        let out = filter_cpuid(&[entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)], 2, 3);
        assert_eq!((out[0].eax, out[0].ebx, out[0].ecx, out[0].edx), (0, 1, 0x100, 2));
        assert_eq!((out[1].eax, out[1].ebx, out[1].ecx, out[1].edx), (2, 3, 0x201, 2));
        assert_eq!((out[2].ebx, out[2].ecx >> 8), (0, 0));
        assert!(out.iter().all(|e| e.flags & CPUID_FLAG_SIGNIFICANT_INDEX != 0));
    }

    #[test]
    fn pmu_hidden_and_other_leaves_untouched() {
        let out = filter_cpuid(&[entry(0xa, 0), entry(0x8000_0001, 0)], 0, 1);
        assert_eq!((out[0].eax, out[0].ebx, out[0].ecx, out[0].edx), (0, 0, 0, 0));
        assert_eq!(out[1], entry(0x8000_0001, 0));
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)],
            [0, 1, 2, 2, 3]
        );
    }
}
