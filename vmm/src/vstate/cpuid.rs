//! Per-vCPU CPUID: what KVM supports, with the topology rewritten to describe the VM's
//! [`Topology`] (threads, cores, dies, packages; each vCPU's APIC ID) and the hypervisor bit
//! set. Intel's leaves (0x1, 0x4, 0xB, 0x1F) and AMD's (0x8000_0001, _0008, _001D, _001E) both
//! say it, whichever the host has.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::topology::Topology;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_PARAMS: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_CMP_LEGACY: u32 = 1 << 1;
/// AMD's topology extensions (leaves 0x8000_001D and _001E), in leaf 0x8000_0001 ECX.
const ECX_TOPOEXT: u32 = 1 << 22;
const LEAF_EXT_MAX: u32 = 0x8000_0000;

/// Topology level types of leaves 0xB and 0x1F.
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
const LEVEL_TYPE_DIE: u32 = 5;

/// Cache parameter leaves: bits 25:14 of EAX count the logical processors sharing the cache,
/// minus one; bits 7:5 are the cache level.
const EAX_CACHE_SHARING: u32 = 0xfff << 14;

/// Rewrites `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `topology`.
pub fn filter(cpuid: &mut CpuId, index: u8, topology: &Topology) {
    let apic_id = topology.apic_id(index);
    let (_, core, _, package) = topology.place(index);
    let threads = u32::from(topology.threads_per_core);
    let per_package = topology.threads_per_package();
    let package_ids = 1u32 << topology.package_shift();
    // Logical processors sharing a cache of `level`: a core's threads share L1 and L2, the
    // package's share L3.
    let sharing = |eax: u32, ids: bool| {
        let level = (eax >> 5) & 7;
        let n = match (level <= 2, ids) {
            (true, true) => 1 << topology.thread_bits(),
            (true, false) => threads,
            (false, true) => package_ids,
            (false, false) => per_package,
        };
        (eax & !EAX_CACHE_SHARING) | ((n - 1).min(0xfff) << 14)
    };
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // APIC ID, addressable logical processor IDs per package, CLFLUSH line size
                // (8 * 8 bytes).
                e.ebx = (apic_id << 24) | (package_ids.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if per_package > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Addressable core IDs per package - 1 in bits 31:26.
                let core_ids = 1u32 << (topology.package_shift() - topology.thread_bits());
                e.eax = (sharing(e.eax, true) & 0x03ff_ffff) | ((core_ids - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let levels = levels(topology, e.function);
                let (eax, ebx, level) =
                    levels
                        .get(e.index as usize)
                        .copied()
                        .unwrap_or((0, 0, LEVEL_TYPE_INVALID));
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (level << 8) | e.index;
                e.edx = apic_id;
            }
            LEAF_EXT_FEATURES => {
                if per_package > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_ADDR_SIZES => {
                // AMD: logical processors per package - 1, and the APIC ID bits of a package.
                e.ecx = (e.ecx & !0xf0ff)
                    | (topology.package_shift() << 12)
                    | (per_package - 1).min(255);
            }
            LEAF_AMD_CACHE_PARAMS => e.eax = sharing(e.eax, false),
            LEAF_AMD_TOPOLOGY => {
                // Extended APIC ID; threads per core - 1 and the core's number; one node per
                // package.
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | ((threads - 1) << 8) | (core & 0xff);
                e.ecx = (e.ecx & !0x7ff) | (package & 0xff);
                e.edx = 0;
            }
            _ => {}
        }
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        ensure_topology_levels(cpuid, leaf, apic_id, &levels(topology, leaf));
    }
    if threads > 1 && is_amd(cpuid.as_slice()) {
        ensure_amd_topology_leaf(cpuid, apic_id, threads, core, package);
    }
}

/// Whether the CPU is AMD's (or Hygon's, which follows AMD's leaves).
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    find(entries, 0, 0).is_some_and(|e| {
        let vendor: Vec<u8> = [e.ebx, e.edx, e.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
    })
}

/// An AMD guest (Linux) counts a core's threads only through the topology extensions: set
/// their flag and make sure leaf 0x8000_001E is there (a host CPU without them, e.g. an
/// emulated one, has none to pass on); the guest then reads leaf 0xB as well.
fn ensure_amd_topology_leaf(
    cpuid: &mut CpuId,
    apic_id: u32,
    threads: u32,
    core: u32,
    package: u32,
) {
    let mut has_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_EXT_MAX => e.eax = e.eax.max(LEAF_AMD_TOPOLOGY),
            LEAF_EXT_FEATURES => e.ecx |= ECX_TOPOEXT,
            LEAF_AMD_TOPOLOGY => has_leaf = true,
            _ => {}
        }
    }
    if !has_leaf {
        // A full table only loses the leaf; the guest then sees single-threaded cores.
        let _ = cpuid.push(kvm_cpuid_entry2 {
            function: LEAF_AMD_TOPOLOGY,
            eax: apic_id,
            ebx: ((threads - 1) << 8) | (core & 0xff),
            ecx: package & 0xff,
            ..Default::default()
        });
    }
}

/// The levels of extended topology leaf `leaf`, from subleaf 0: (EAX: APIC ID bits below the
/// next level, EBX: logical processors at this level, level type). Leaf 0xB has no die level:
/// its core level spans the package.
fn levels(topology: &Topology, leaf: u32) -> Vec<(u32, u32, u32)> {
    let threads = u32::from(topology.threads_per_core);
    let smt = (topology.thread_bits(), threads, LEVEL_TYPE_SMT);
    let package = topology.package_shift();
    let per_package = topology.threads_per_package();
    if leaf == LEAF_TOPOLOGY_V2 && topology.dies_per_package > 1 {
        let per_die = threads * u32::from(topology.cores_per_die);
        vec![
            smt,
            (topology.die_shift(), per_die, LEVEL_TYPE_CORE),
            (package, per_package, LEVEL_TYPE_DIE),
        ]
    } else {
        vec![smt, (package, per_package, LEVEL_TYPE_CORE)]
    }
}

/// KVM lists leaves 0xB and 0x1F (when the host has them) with however many subleaves the host
/// has; make sure every level and the invalid one after them exist, so the guest never sees a
/// partial topology.
fn ensure_topology_levels(cpuid: &mut CpuId, leaf: u32, apic_id: u32, levels: &[(u32, u32, u32)]) {
    let has_leaf = cpuid.as_slice().iter().any(|e| e.function == leaf);
    if !has_leaf {
        return;
    }
    for index in 0..=levels.len() as u32 {
        let present = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == leaf && e.index == index);
        if present {
            continue;
        }
        let (eax, ebx, level) =
            levels
                .get(index as usize)
                .copied()
                .unwrap_or((0, 0, LEVEL_TYPE_INVALID));
        let entry = kvm_cpuid_entry2 {
            function: leaf,
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

    /// `n` single-threaded cores in one package.
    fn flat(n: u8) -> Topology {
        Topology::of(&crate::config::CpusConfig::new(n))
    }

    use super::Topology as T;

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = sample();
        filter(&mut c, 3, &flat(4));
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
        filter(&mut c, 0, &flat(1));
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 0);
    }

    #[test]
    fn extended_topology_describes_cores() {
        let mut c = sample();
        filter(&mut c, 2, &flat(3));
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
        filter(&mut c, 0, &flat(8));
        let e = find(&c, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 7);
        assert_eq!((e.ecx >> 12) & 0xf, 3);
        assert_ne!(find(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(find(&c, 0x4, 0).eax >> 26, 7);
    }

    #[test]
    fn threads_and_packages_reach_every_leaf() {
        // 2 threads × 2 cores × 1 die × 2 packages; vCPU 5 is thread 1 of core 0 of package 1.
        let mut c = CpuId::from_entries(&[
            entry(0x1, 0),
            kvm_cpuid_entry2 {
                eax: 1 << 5, // L1
                ..entry(0x4, 0)
            },
            kvm_cpuid_entry2 {
                eax: 3 << 5, // L3
                ..entry(0x4, 3)
            },
            entry(0xb, 0),
            entry(0x8000_0008, 0),
            kvm_cpuid_entry2 {
                eax: 3 << 5,
                ..entry(0x8000_001d, 3)
            },
            kvm_cpuid_entry2 {
                ebx: 0xdead_0000,
                ..entry(0x8000_001e, 0)
            },
        ])
        .unwrap();
        let t = T::new(2, 2, 1, 2);
        assert_eq!(t.apic_id(5), 5);
        filter(&mut c, 5, &t);
        let e = find(&c, 1, 0);
        assert_eq!((e.ebx >> 24, (e.ebx >> 16) & 0xff), (5, 4));
        let smt = find(&c, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff, smt.edx),
            (1, 2, 1, 5)
        );
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (2, 4, 2));
        assert_eq!((find(&c, 0xb, 2).ecx >> 8) & 0xff, LEVEL_TYPE_INVALID);
        // Cores per package, and who shares a cache: a core's two threads L1, the package L3.
        let l1 = find(&c, 0x4, 0).eax;
        assert_eq!((l1 >> 26, (l1 >> 14) & 0xfff), (1, 1));
        assert_eq!((find(&c, 0x4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!((find(&c, 0x8000_001d, 3).eax >> 14) & 0xfff, 3);
        let amd = find(&c, 0x8000_001e, 0);
        assert_eq!((amd.eax, amd.ebx, amd.ecx & 0xff), (5, 0xdead_0100, 1));
        let sizes = find(&c, 0x8000_0008, 0).ecx;
        assert_eq!((sizes & 0xff, (sizes >> 12) & 0xf), (3, 2));
    }

    #[test]
    fn an_amd_cpu_without_topology_extensions_gets_them_for_threads() {
        let vendor = |v: &[u8; 12]| kvm_cpuid_entry2 {
            ebx: u32::from_le_bytes(v[0..4].try_into().unwrap()),
            edx: u32::from_le_bytes(v[4..8].try_into().unwrap()),
            ecx: u32::from_le_bytes(v[8..12].try_into().unwrap()),
            ..entry(0, 0)
        };
        let table = |v: &[u8; 12]| {
            CpuId::from_entries(&[
                vendor(v),
                entry(0x1, 0),
                entry(0xb, 0),
                kvm_cpuid_entry2 {
                    eax: 0x8000_0008,
                    ..entry(0x8000_0000, 0)
                },
                entry(0x8000_0001, 0),
                entry(0x8000_0008, 0),
            ])
            .unwrap()
        };
        let t = T::new(2, 2, 1, 1);
        let mut c = table(b"AuthenticAMD");
        filter(&mut c, 3, &t);
        assert_ne!(find(&c, 0x8000_0001, 0).ecx & ECX_TOPOEXT, 0);
        assert_eq!(find(&c, 0x8000_0000, 0).eax, 0x8000_001e);
        let e = find(&c, 0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (3, 0x101, 0));
        // Intel's guests read leaf 0xB alone; single-threaded AMD cores need nothing more.
        let mut c = table(b"GenuineIntel");
        filter(&mut c, 3, &t);
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & ECX_TOPOEXT, 0);
        let mut c = table(b"AuthenticAMD");
        filter(&mut c, 3, &T::new(1, 4, 1, 1));
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & ECX_TOPOEXT, 0);
        assert_eq!(find(&c, 0x8000_0000, 0).eax, 0x8000_0008);
    }

    #[test]
    fn leaf_1f_has_a_die_level_when_there_are_dies() {
        let mut c = CpuId::from_entries(&[entry(0xb, 0), entry(0x1f, 0)]).unwrap();
        let t = T::new(1, 2, 2, 1);
        filter(&mut c, 3, &t);
        let level = |leaf, i| {
            let e = find(&c, leaf, i);
            (e.eax, e.ebx, (e.ecx >> 8) & 0xff, e.edx)
        };
        assert_eq!(level(0x1f, 0), (0, 1, LEVEL_TYPE_SMT, 3));
        assert_eq!(level(0x1f, 1), (1, 2, LEVEL_TYPE_CORE, 3));
        assert_eq!(level(0x1f, 2), (2, 4, LEVEL_TYPE_DIE, 3));
        assert_eq!(level(0x1f, 3).2, LEVEL_TYPE_INVALID);
        // 0xB folds the dies into the core level.
        assert_eq!(level(0xb, 1), (2, 4, LEVEL_TYPE_CORE, 3));
        assert_eq!(level(0xb, 2).2, LEVEL_TYPE_INVALID);
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
