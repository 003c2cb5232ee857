//! Per-vCPU CPUID: what KVM supports, with the topology rewritten to describe `vcpus`
//! single-threaded cores in one socket and the hypervisor bit set.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_CMP_LEGACY: u32 = 1 << 1;

/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits of the APIC ID needed to number `vcpus` cores.
fn core_id_bits(vcpus: u8) -> u32 {
    u32::from(vcpus.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `vcpus`.
pub fn filter(cpuid: &mut CpuId, cpu_id: u8, vcpus: u8) {
    let apic_id = u32::from(cpu_id);
    let count = u32::from(vcpus);
    let core_bits = core_id_bits(vcpus);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // APIC ID, logical processors per package, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (apic_id << 24) | ((count.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 in bits 31:26; caches are not shared between threads.
                e.eax = (e.eax & 0x3ff) | ((count - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = (LEVEL_TYPE_INVALID << 8) | e.index;
                    }
                }
            }
            LEAF_EXT_FEATURES => {
                if count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDR_SIZES => {
                // AMD: number of cores - 1 and APIC ID size.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            _ => {}
        }
    }
    ensure_topology_levels(cpuid, apic_id, count, core_bits);
}

/// KVM lists leaf 0xB with however many subleaves the host has; make sure the SMT and core
/// levels both exist so the guest never sees a partial topology.
fn ensure_topology_levels(cpuid: &mut CpuId, apic_id: u32, count: u32, core_bits: u32) {
    let has_leaf = cpuid.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY);
    if !has_leaf {
        return;
    }
    for index in 0..3u32 {
        let present = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == LEAF_TOPOLOGY && e.index == index);
        if present {
            continue;
        }
        let (eax, ebx, level) = match index {
            0 => (0, 1, LEVEL_TYPE_SMT),
            1 => (core_bits, count, LEVEL_TYPE_CORE),
            _ => (0, 0, LEVEL_TYPE_INVALID),
        };
        let entry = kvm_cpuid_entry2 {
            function: LEAF_TOPOLOGY,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (level << 8) | index,
            edx: apic_id,
            ..Default::default()
        };
        // A full table only loses this subleaf; the guest then counts CPUs from ACPI.
        let _ = cpuid.push(entry);
    }
}

/// The feature words a guest relies on: (leaf, subleaf, register name).
const FEATURE_WORDS: &[(u32, u32, &str)] = &[
    (LEAF_FEATURES, 0, "ecx"),
    (LEAF_FEATURES, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0xd, 1, "eax"),
    (LEAF_EXT_FEATURES, 0, "ecx"),
    (LEAF_EXT_FEATURES, 0, "edx"),
];

/// Bits KVM sets from the guest's control registers as it runs (OSXSAVE mirrors CR4.OSXSAVE,
/// OSPKE mirrors CR4.PKE): a saved vCPU has them, a fresh one does not.
const DYNAMIC_BITS: &[(u32, u32, &str, u32)] =
    &[(LEAF_FEATURES, 0, "ecx", 1 << 27), (0x7, 0, "ecx", 1 << 4)];

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == function
            && (e.index == index || index == 0 && e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    })
}

fn register(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Why a guest that saw CPUID `saved` cannot run on a vCPU that offers `here`: another CPU
/// vendor, or feature bits `here` lacks (each as "leaf 0x7 ebx bits 0x..."). None: it can.
pub fn incompatible(saved: &[kvm_cpuid_entry2], here: &[kvm_cpuid_entry2]) -> Option<String> {
    let vendor = |entries: &[kvm_cpuid_entry2]| find(entries, 0, 0).map(|e| (e.ebx, e.edx, e.ecx));
    if vendor(saved) != vendor(here) {
        let name = |v: Option<(u32, u32, u32)>| {
            v.map(|(b, d, c)| {
                [b, d, c]
                    .iter()
                    .flat_map(|r| r.to_le_bytes())
                    .map(char::from)
                    .collect::<String>()
            })
            .unwrap_or_else(|| "?".into())
        };
        return Some(format!(
            "the snapshot's CPU is {}, this host's {}",
            name(vendor(saved)),
            name(vendor(here))
        ));
    }
    let missing: Vec<String> = FEATURE_WORDS
        .iter()
        .filter_map(|&(leaf, sub, reg)| {
            let dynamic = DYNAMIC_BITS
                .iter()
                .filter(|d| (d.0, d.1, d.2) == (leaf, sub, reg))
                .fold(0, |m, d| m | d.3);
            let want = find(saved, leaf, sub).map_or(0, |e| register(e, reg)) & !dynamic;
            let have = find(here, leaf, sub).map_or(0, |e| register(e, reg));
            let lacking = want & !have;
            (lacking != 0).then(|| format!("leaf {leaf:#x}.{sub} {reg} bits {lacking:#x}"))
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the snapshot's CPU has features this host lacks: {}",
            missing.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0),
            entry(0x4, 0),
            entry(0xb, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = sample();
        filter(&mut c, 3, 4);
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = sample();
        c.as_mut_slice()[0].edx = EDX_HTT;
        filter(&mut c, 0, 1);
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 0);
    }

    #[test]
    fn extended_topology_describes_cores() {
        let mut c = sample();
        filter(&mut c, 2, 3);
        let smt = find(&c, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff, smt.edx),
            (0, 1, 1, 2)
        );
        let core = find(&c, 0xb, 1);
        // Three cores need two APIC ID bits.
        assert_eq!(
            (core.eax, core.ebx, (core.ecx >> 8) & 0xff, core.edx),
            (2, 3, 2, 2)
        );
        let end = find(&c, 0xb, 2);
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
    }

    #[test]
    fn amd_core_count() {
        let mut c = sample();
        filter(&mut c, 0, 8);
        let e = find(&c, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 7);
        assert_eq!((e.ecx >> 12) & 0xf, 3);
        assert_ne!(find(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(find(&c, 0x4, 0).eax >> 26, 7);
    }

    #[test]
    fn core_bits() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(5), 3);
        assert_eq!(core_id_bits(254), 8);
    }

    #[test]
    fn a_guest_runs_on_a_host_with_all_it_saw() {
        let with = |f: u32, i: u32, ecx: u32, ebx: u32| kvm_cpuid_entry2 {
            function: f,
            index: i,
            ecx,
            ebx,
            ..Default::default()
        };
        let amd = with(
            0,
            0,
            u32::from_le_bytes(*b"cAMD"),
            u32::from_le_bytes(*b"Auth"),
        );
        let host = [amd, with(1, 0, 0b0110, 0), with(7, 0, 0, 0xff)];
        // A subset, and OSXSAVE/OSPKE that KVM set from CR4: fine.
        let saved = [
            amd,
            with(1, 0, 0b0100 | 1 << 27, 0),
            with(7, 0, 1 << 4, 0x0f),
        ];
        assert_eq!(incompatible(&saved, &host), None);
        let more = [amd, with(1, 0, 0b1100, 0), with(7, 0, 0, 0x1ff)];
        assert_eq!(
            incompatible(&more, &host).unwrap(),
            "the snapshot's CPU has features this host lacks: leaf 0x1.0 ecx bits 0x8, \
             leaf 0x7.0 ebx bits 0x100"
        );
        let intel = with(
            0,
            0,
            u32::from_le_bytes(*b"ntel"),
            u32::from_le_bytes(*b"Genu"),
        );
        let reason = incompatible(&[intel], &host).unwrap();
        assert!(reason.starts_with("the snapshot's CPU is Genu"), "{reason}");
    }
}
