//! How the vCPUs are arranged into threads, cores, dies and packages (sockets), and the APIC
//! ID each one gets from that: the guest's CPUID ([`super::cpuid`]), MADT and KVM's vCPU IDs
//! all follow it, so `lscpu` in the guest shows the sockets, cores and threads asked for.
//!
//! An APIC ID is the vCPU's place in each level, packed from the thread up, each level taking
//! as many bits as its count needs (as real x86 CPUs number them):
//!
//! ```text
//! | package | die | core | thread |     e.g. 2 threads × 3 cores: thread 1 bit, core 2 bits
//! ```
//!
//! so the IDs have gaps when a count is not a power of two.

use crate::config::{CpuTopology, CpusConfig};

/// The arrangement of a VM's vCPUs: the configuration's [`CpuTopology`], always present (see
/// [`CpuTopology::of`]).
pub type Topology = CpuTopology;

/// Bits needed to number `n` things (0 for one).
fn bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

impl CpuTopology {
    /// The topology `config` asks for; without one, every vCPU is a single-threaded core of
    /// one package.
    pub fn of(config: &CpusConfig) -> Self {
        config
            .topology
            .unwrap_or_else(|| CpuTopology::new(1, config.boot_vcpus.max(1), 1, 1))
    }

    /// APIC ID bits of the thread number.
    pub fn thread_bits(&self) -> u32 {
        bits(self.threads_per_core)
    }

    /// Where the core number starts in an APIC ID.
    pub fn core_shift(&self) -> u32 {
        self.thread_bits()
    }

    /// Where the die number starts.
    pub fn die_shift(&self) -> u32 {
        self.core_shift() + bits(self.cores_per_die)
    }

    /// Where the package number starts: the APIC ID bits of one package.
    pub fn package_shift(&self) -> u32 {
        self.die_shift() + bits(self.dies_per_package)
    }

    /// Logical processors in one package.
    pub fn threads_per_package(&self) -> u32 {
        u32::from(self.threads_per_core)
            * u32::from(self.cores_per_die)
            * u32::from(self.dies_per_package)
    }

    /// vCPU `index`'s (thread, core in its package, die, package).
    pub fn place(&self, index: u8) -> (u32, u32, u32, u32) {
        let i = u32::from(index);
        let threads = u32::from(self.threads_per_core.max(1));
        let cores = u32::from(self.cores_per_die.max(1));
        let dies = u32::from(self.dies_per_package.max(1));
        let thread = i % threads;
        let core = (i / threads) % (cores * dies);
        let die = (i / (threads * cores)) % dies;
        let package = i / (threads * cores * dies);
        (thread, core, die, package)
    }

    /// vCPU `index`'s APIC ID (and KVM vCPU ID).
    pub fn apic_id(&self, index: u8) -> u32 {
        let (thread, core, die, package) = self.place(index);
        let cores = u32::from(self.cores_per_die.max(1));
        (package << self.package_shift())
            | (die << self.die_shift())
            | ((core % cores) << self.core_shift())
            | thread
    }

    /// The largest APIC ID of `vcpus` vCPUs.
    pub fn max_apic_id(&self, vcpus: u8) -> u32 {
        (0..vcpus).map(|i| self.apic_id(i)).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::Topology as T;

    #[test]
    fn without_a_topology_every_vcpu_is_a_core() {
        let t = Topology::of(&CpusConfig::new(6));
        assert_eq!(t, T::new(1, 6, 1, 1));
        let ids: Vec<u32> = (0..6).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        assert_eq!((t.thread_bits(), t.package_shift()), (0, 3));
    }

    #[test]
    fn ids_pack_thread_core_die_package() {
        // 2 threads × 3 cores × 1 die × 2 packages: thread 1 bit, core 2 bits, package from 3.
        let t = T::new(2, 3, 1, 2);
        assert_eq!(
            (t.core_shift(), t.die_shift(), t.package_shift()),
            (1, 3, 3)
        );
        let ids: Vec<u32> = (0..12).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(t.place(7), (1, 0, 0, 1));
        assert_eq!(t.max_apic_id(12), 13);
        // Dies: 1 thread × 2 cores × 2 dies × 1 package.
        let d = T::new(1, 2, 2, 1);
        let ids: Vec<u32> = (0..4).map(|i| d.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert_eq!(d.place(3), (0, 3, 1, 0));
        let d3 = T::new(1, 3, 2, 1);
        let ids: Vec<u32> = (0..6).map(|i| d3.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 4, 5, 6]);
    }

    #[test]
    fn a_configured_topology_is_taken_as_is() {
        let mut c = CpusConfig::new(4);
        c.topology = Some(CpuTopology::new(2, 2, 1, 1));
        assert_eq!(Topology::of(&c), T::new(2, 2, 1, 1));
    }
}
