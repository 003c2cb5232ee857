//! Address buses that route guest port I/O and MMIO accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

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
    /// No device starts at this address.
    #[error("no device on the bus at {0:#x}")]
    NotFound(u64),
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
///
/// The map can change while vCPUs use it (a guest moving a PCI BAR): lookups take a read
/// lock only long enough to find the device, so a device may itself change the bus.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<Range, Arc<Mutex<dyn BusDevice>>>>,
}

type Device = Arc<Mutex<dyn BusDevice>>;

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Range, Device>> {
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Range, Device>> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&self, device: Device, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let new = Range { base, len };
        let end = base + (len - 1);
        let mut map = self.map_mut();
        if map
            .keys()
            .any(|r| r.base <= end && base <= r.base + (r.len - 1))
        {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(new, device);
        Ok(())
    }

    /// Takes the device that starts at `base` off the bus; returns it and its length.
    pub fn remove(&self, base: u64) -> Result<(Device, u64), BusError> {
        let mut map = self.map_mut();
        let range = *map
            .keys()
            .find(|r| r.base == base)
            .ok_or(BusError::NotFound(base))?;
        let dev = map.remove(&range).ok_or(BusError::NotFound(base))?;
        Ok((dev, range.len))
    }

    /// Moves the device at `old` to `new`, keeping its length. On an error (nothing at `old`,
    /// or `new` overlaps another device) the bus is unchanged.
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let (dev, len) = self.remove(old)?;
        if let Err(e) = self.insert(dev.clone(), new, len) {
            // Put it back: the old range was free a moment ago and nothing else inserts
            // concurrently with a relocation of the same device.
            let _ = self.insert(dev, old, len);
            return Err(e);
        }
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, Device)> {
        let map = self.map();
        let (range, dev) = map
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        range
            .contains(addr)
            .then(|| (addr - range.base, dev.clone()))
    }

    /// Routes a guest read. Returns false (and fills `data` with ones) when no device answers.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
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
                lock(&dev).write(offset, data);
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
        let bus = Bus::new();
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
        let bus = Bus::new();
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
        let bus = Bus::new();
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

    #[test]
    fn relocate_moves_a_device_and_refuses_overlaps() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x3000, 0x100)
            .unwrap();
        bus.relocate(0x1000, 0x2000).unwrap();
        assert!(!bus.write(0x1000, &[1]));
        assert!(bus.write(0x2004, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((4, vec![7])));
        // Overlapping the other device: refused, and the device stays where it was.
        assert!(matches!(
            bus.relocate(0x2000, 0x2f80),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.write(0x2000, &[9]));
        assert_eq!(a.lock().unwrap().last_write, Some((0, vec![9])));
        assert_eq!(
            bus.relocate(0x5000, 0x6000),
            Err(BusError::NotFound(0x5000))
        );
        let (_, len) = bus.remove(0x2000).unwrap();
        assert_eq!(len, 0x100);
        assert!(!bus.write(0x2000, &[1]));
    }

    #[test]
    fn a_device_may_change_the_bus_it_is_on() {
        struct Mover(Arc<Bus>);
        impl BusDevice for Mover {
            fn read(&mut self, _: u64, _: &mut [u8]) {}
            fn write(&mut self, _: u64, data: &[u8]) {
                // A write of 1 moves the device (as a BAR write would); others do nothing.
                if data == [1] {
                    self.0.relocate(0x10, 0x20).unwrap();
                }
            }
        }
        let bus = Arc::new(Bus::new());
        bus.insert(Arc::new(Mutex::new(Mover(bus.clone()))), 0x10, 1)
            .unwrap();
        assert!(bus.write(0x10, &[1]));
        assert!(!bus.write(0x10, &[0]), "moved away");
        assert!(bus.write(0x20, &[0]));
    }
}
