//! CPUID for a guest vCPU: what KVM supports, with per-vCPU identity and topology filled in
//! and host details the guest should not rely on removed.
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        filter_entry(entry, index, count);
    }
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            entry.ebx =
                (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        // No thermal sensors or power management to offer, and no PMU is virtualized.
        LEAF_THERMAL_POWER | LEAF_PERFMON => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        // Extended topology: EDX is this CPU's x2APIC id, whatever the subleaf.
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => entry.edx = u32::from(index),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(1, 0, [0x00a0_0f11, 0xff80_0800, 0x7ed8_320b, 0x178b_fbff]),
            entry(6, 0, [4, 0, 1, 0]),
            entry(0xa, 0, [0x0700_0001, 0, 0, 0]),
            entry(0xb, 0, [1, 1, 0x100, 0x55]),
            entry(0xb, 1, [4, 8, 0x201, 0x55]),
            entry(0x8000_0001, 0, [0, 0, 0x75c2_37ff, 0x2fd3_fbff]),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_count_per_vcpu() {
        let mut c = sample();
        filter(&mut c, 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "brand/clflush bits kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_eq!(find(&c, 0xb, 1).edx, 3);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_pmu() {
        let mut c = sample();
        filter(&mut c, 0, 1);
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        let pm = find(&c, 0xa, 0);
        assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (0, 0, 0, 0));
        assert_eq!(find(&c, 6, 0).eax, 0);
        // Leaves we do not touch are passed through.
        assert_eq!(find(&c, 0x8000_0001, 0).ecx, 0x75c2_37ff);
        assert_eq!(find(&c, 0, 0).ebx, 0x6874_7541);
    }
}
