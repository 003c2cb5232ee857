//! Conventional PCI: configuration spaces, the root complex with its two configuration access
//! mechanisms (port I/O at 0xcf8 and ECAM), MSI-X, and the [`PciDevice`] trait every function
//! on the bus implements.
//!
//! Wiring in the VMM:
//! - put [`PciConfigIo`] on the port I/O bus at [`PCI_CONFIG_IO_PORT`] and [`PciConfigMmio`] on
//!   the MMIO bus at the ECAM base (both share one [`PciRoot`]);
//! - for every BAR in [`PciDevice::bars`], put a [`PciBarRegion`] on the MMIO bus at the BAR's
//!   address (after choosing it with [`PciDevice::set_bar_address`], e.g. from a
//!   [`BarAllocator`]);
//! - when the guest moves a BAR, the root calls the handler given to
//!   [`PciRoot::set_bar_reprogram_handler`] with a [`BarReprogram`]: move the bus mapping (and
//!   any ioeventfds) from `old` to `new`.

pub mod config;
pub mod msix;
pub mod root;

use std::sync::{Arc, Mutex};

pub use config::{BarReprogram, PciBar, PciBarKind, PciConfiguration, PciHeader};
pub use msix::{MsiIrqs, MsiMessage, MsixTable, MsixVectors};
pub use root::{
    HostBridge, PciConfigIo, PciConfigMmio, PciRoot, ECAM_SIZE, PCI_CONFIG_IO_LEN,
    PCI_CONFIG_IO_PORT,
};

use crate::BusDevice;

/// Errors from building PCI functions and placing them on the root bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// A BAR index beyond the six of a type-0 header (or BAR 5 for a 64-bit BAR).
    #[error("BAR {0} does not exist (a 64-bit BAR needs two consecutive slots among 0..6)")]
    BarIndex(u8),
    /// The BAR slot (or the upper half of a 64-bit BAR) is already taken.
    #[error("BAR {0} is already in use")]
    BarInUse(u8),
    /// BAR sizes are powers of two, at least 16 bytes (4 for I/O), below 4 GiB for 32-bit BARs.
    #[error("BAR {index} cannot have size {size:#x}")]
    BarSize { index: u8, size: u64 },
    /// The address is not aligned to the BAR's size or does not fit the BAR's width.
    #[error("BAR {index} cannot be placed at {addr:#x}")]
    BarAddress { index: u8, addr: u64 },
    /// The standard configuration space (256 bytes) has no room for another capability.
    #[error("no room for a {len}-byte capability in the configuration space")]
    CapabilitySpace { len: usize },
    /// Device numbers on a bus are 0..32.
    #[error("PCI device number {0} is out of range 0..32")]
    Slot(u8),
    /// The device number is taken.
    #[error("PCI device number {0} is already in use")]
    SlotInUse(u8),
    /// All 32 device numbers are taken.
    #[error("the PCI bus is full")]
    BusFull,
}

/// A PCI function on the root bus.
///
/// Configuration accesses reach a device with `offset + data.len() <= 4096` and never cross a
/// 4-byte boundary (the root splits wider accesses). BAR accesses carry the offset inside the
/// BAR. Every offset and width must be tolerated: the guest chooses them.
pub trait PciDevice: Send {
    /// Reads configuration space (may have side effects, e.g. the virtio PCI access window).
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space. Returns the BAR the write moved, if any, so the VMM can
    /// move its mapping.
    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarReprogram>;
    /// The BARs the function decodes, with their current addresses.
    fn bars(&self) -> Vec<PciBar>;
    /// Places BAR `index` at `addr` (firmware-style assignment by the VMM; not reported as a
    /// move).
    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError>;
    /// Handles a guest read inside BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// Handles a guest write inside BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// Locks a PCI device, recovering it if a thread panicked while holding it (the device state is
/// plain data that stays consistent between accesses).
pub(crate) fn lock_device<'a>(
    dev: &'a Mutex<dyn PciDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// One BAR of a PCI function as a [`BusDevice`] for the MMIO (or port I/O) bus: insert it at
/// the BAR's address with the BAR's size.
pub struct PciBarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl PciBarRegion {
    /// The region of BAR `bar` of `device`.
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, bar: u8) -> Self {
        PciBarRegion { device, bar }
    }
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_device(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_device(&self.device).write_bar(self.bar, offset, data);
    }
}

/// Hands out naturally aligned BAR addresses from a list of free ranges, lowest first (a bump
/// allocator: addresses are not reused). The VMM may use vm-allocator instead.
#[derive(Clone, Debug)]
pub struct BarAllocator {
    /// Free `[start, end)` ranges and the next candidate address in each.
    ranges: Vec<(u64, u64)>,
}

impl BarAllocator {
    /// An allocator over the `[start, end)` ranges, e.g. the 32-bit MMIO hole minus the ECAM
    /// window.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let mut ranges: Vec<_> = ranges.iter().copied().filter(|(s, e)| s < e).collect();
        ranges.sort_unstable();
        BarAllocator { ranges }
    }

    /// An address for a BAR of `size` bytes (a power of two), aligned to `size`.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        self.ranges.iter_mut().find_map(|(next, end)| {
            let addr = next.checked_add(size - 1)? & !(size - 1);
            let last = addr.checked_add(size)?;
            (last <= *end).then(|| {
                *next = last;
                addr
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_aligns_and_skips_full_ranges() {
        let mut a = BarAllocator::new(&[(0xe000_0000, 0xe000_4000), (0xc000_1000, 0xc001_0000)]);
        assert_eq!(a.allocate(0x1000), Some(0xc000_1000));
        assert_eq!(a.allocate(0x8000), Some(0xc000_8000));
        // The first range is exhausted below 0xc001_0000: the next one is used.
        assert_eq!(a.allocate(0x4000), Some(0xe000_0000));
        assert_eq!(a.allocate(0x4000), None);
        assert_eq!(
            a.allocate(0x1000),
            None,
            "a bump allocator does not fill gaps"
        );
        assert_eq!(a.allocate(3), None);
        assert_eq!(
            BarAllocator::new(&[(u64::MAX - 10, u64::MAX)]).allocate(16),
            None
        );
    }
}
