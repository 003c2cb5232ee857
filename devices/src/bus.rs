//! Address buses that route guest port I/O and MMIO accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a range of port or MMIO addresses.
///
/// `offset` is relative to the start of the range the device was inserted at. A guest can access
/// any offset with any width, so implementations must tolerate every combination: unknown offsets
/// read as all ones (as an absent device would) and writes to them are ignored.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from placing devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The requested range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The requested range overlaps one already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

impl Range {
    fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

/// A map from address ranges to the devices that answer them.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<Range, Arc<Mutex<dyn BusDevice>>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let new = Range { base, len };
        let end = base + (len - 1);
        if self
            .devices
            .keys()
            .any(|r| r.base <= end && base <= r.base + (r.len - 1))
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(new, device);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (range, dev) = self
            .devices
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        range.contains(addr).then(|| (addr - range.base, dev))
    }

    /// Routes a guest read. Returns false (and fills `data` with ones) when no device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a guest write. Returns false when no device answers (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a thread panicked while holding it: a device's state is
/// plain data that stays consistent between accesses.
fn lock<'a>(
    dev: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().last_write, Some((0, vec![0x41])));
    }

    #[test]
    fn unclaimed_reads_return_ones() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0x14, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        assert!(!bus.read(0x0f, &mut buf));
        assert!(!bus.write(0x9999, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf0, 0x11),
            Err(BusError::Overlap {
                base: 0xf0,
                len: 0x11
            })
        );
        assert!(bus.insert(dev.clone(), 0x110, 1).is_ok());
        assert!(bus.insert(dev.clone(), 0xff, 1).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), 5, 0),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );
        assert!(bus.insert(dev, u64::MAX, 2).is_err());
    }
}
