//! A type-0 (endpoint) PCI configuration space: the standard 256-byte header and capability
//! area plus the 4 KiB extended space reached through ECAM, with per-byte write masks, the BAR
//! sizing protocol and a capability list.

use serde::{Deserialize, Serialize};

use super::PciError;
use crate::PersistError;

/// Size of a function's configuration space as seen through ECAM.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional configuration space (what port I/O reaches).
pub const STANDARD_CONFIG_SIZE: usize = 256;

const NUM_BARS: usize = 6;
const BAR0: usize = 0x10;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAPABILITY: usize = 0x40;

/// Command register bits a guest may set: I/O space, memory space, bus master, parity error
/// response, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;
/// Command register bit enabling memory-space decoding.
pub const COMMAND_MEMORY_SPACE: u16 = 0x2;
/// Status register bit announcing a capability list.
const STATUS_CAPABILITIES_LIST: u16 = 0x10;

/// Identity of a PCI function: what the header's read-only fields say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class, subclass and programming interface, e.g. `(0x06, 0x00, 0x00)` for a host
    /// bridge.
    pub class_code: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// INTx pin (1 = INTA#), or 0 when the function has no INTx line.
    pub interrupt_pin: u8,
}

/// The address decoder type of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciBarKind {
    /// A memory BAR anywhere below 4 GiB.
    Memory32,
    /// A memory BAR anywhere in the 64-bit space; it takes two BAR slots.
    Memory64,
    /// A port I/O BAR.
    Io,
}

/// A BAR a function decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    pub index: u8,
    /// Current guest physical (or port) address.
    pub addr: u64,
    pub size: u64,
    pub kind: PciBarKind,
    pub prefetchable: bool,
}

/// A guest write moved a BAR: the VMM must move the region from `old` to `new`.
///
/// A 64-bit BAR the guest rewrites half by half is reported after each half, so the first
/// report may name an intermediate address. Moves are reported whether or not memory decoding
/// is enabled in the command register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    pub bar: u8,
    pub old: u64,
    pub new: u64,
    pub size: u64,
    pub kind: PciBarKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BarSlot {
    size: u64,
    kind: PciBarKind,
    prefetchable: bool,
    /// The address last reported (or set by the VMM): sizing writes do not move a BAR.
    reported: u64,
}

/// Saved configuration space: the register bytes (masks and BAR layout are rebuilt by the
/// device's constructor).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    pub bytes: Vec<u8>,
}

/// A type-0 configuration space.
pub struct PciConfiguration {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarSlot>; NUM_BARS],
    /// BAR slots holding the upper half of a 64-bit BAR.
    upper_half: [bool; NUM_BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfiguration {
    /// A configuration space with the identity in `header`, no BARs and no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut cfg = PciConfiguration {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            upper_half: [false; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        cfg.put(0x00, &header.vendor_id.to_le_bytes());
        cfg.put(0x02, &header.device_id.to_le_bytes());
        cfg.put(0x08, &[header.revision_id]);
        let (class, subclass, prog_if) = header.class_code;
        cfg.put(0x09, &[prog_if, subclass, class]);
        cfg.put(0x2c, &header.subsystem_vendor_id.to_le_bytes());
        cfg.put(0x2e, &header.subsystem_id.to_le_bytes());
        cfg.put(0x3d, &[header.interrupt_pin]);
        cfg.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        // Cache line size, latency timer, interrupt line: plain storage for the guest.
        cfg.writable[0x0c] = 0xff;
        cfg.writable[0x0d] = 0xff;
        cfg.writable[INTERRUPT_LINE] = 0xff;
        cfg
    }

    /// Reads `data.len()` bytes at `offset`; bytes beyond the space read as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A little-endian 16-bit register.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// A little-endian 32-bit register.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A guest write: only the writable bits change. Returns the BAR the write moved, if any.
    /// Writing all ones to a BAR register is the sizing protocol and never reports a move.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<BarReprogram> {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                break;
            };
            let mask = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !mask) | (v & mask);
        }
        let end = offset.saturating_add(data.len());
        if end <= BAR0 || offset >= BAR0 + 4 * NUM_BARS {
            return None;
        }
        if data.len() == 4 && data.iter().all(|&b| b == 0xff) {
            return None;
        }
        let first = offset.saturating_sub(BAR0) / 4;
        let last = ((end - 1 - BAR0) / 4).min(NUM_BARS - 1);
        let mut moved = None;
        for slot in first..=last {
            let index = if self.upper_half[slot] {
                slot - 1
            } else {
                slot
            };
            moved = self.check_bar_moved(index).or(moved);
        }
        moved
    }

    fn check_bar_moved(&mut self, index: usize) -> Option<BarReprogram> {
        let new = self.bar_address(index)?;
        let slot = self.bars[index].as_mut()?;
        if new == slot.reported {
            return None;
        }
        let old = std::mem::replace(&mut slot.reported, new);
        Some(BarReprogram {
            bar: index as u8,
            old,
            new,
            size: slot.size,
            kind: slot.kind,
        })
    }

    /// Sets bytes regardless of the write masks (for the device's own registers).
    pub fn put(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len()) else {
            return;
        };
        if end <= CONFIG_SPACE_SIZE {
            self.bytes[offset..end].copy_from_slice(data);
        }
    }

    /// Whether the guest enabled memory-space decoding.
    pub fn memory_enabled(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_MEMORY_SPACE != 0
    }

    /// Declares BAR `index` of `size` bytes.
    pub fn add_bar(
        &mut self,
        index: u8,
        size: u64,
        kind: PciBarKind,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let i = usize::from(index);
        let slots = if kind == PciBarKind::Memory64 { 2 } else { 1 };
        if i + slots > NUM_BARS {
            return Err(PciError::BarIndex(index));
        }
        if (i..i + slots).any(|s| self.bars[s].is_some() || self.upper_half[s]) {
            return Err(PciError::BarInUse(index));
        }
        let (min, max) = match kind {
            PciBarKind::Memory32 => (16, 1 << 31),
            PciBarKind::Memory64 => (16, 1 << 63),
            PciBarKind::Io => (4, 1 << 16),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BarSize { index, size });
        }
        let (flags, low_mask): (u32, u32) = match kind {
            PciBarKind::Memory32 => ((prefetchable as u32) << 3, !0xf),
            PciBarKind::Memory64 => (0x4 | (prefetchable as u32) << 3, !0xf),
            PciBarKind::Io => (0x1, !0x3),
        };
        let reg = BAR0 + 4 * i;
        self.put(reg, &flags.to_le_bytes());
        let writable = low_mask & !((size - 1) as u32);
        self.writable[reg..reg + 4].copy_from_slice(&writable.to_le_bytes());
        if kind == PciBarKind::Memory64 {
            let high = !((size - 1) >> 32) as u32;
            self.writable[reg + 4..reg + 8].copy_from_slice(&high.to_le_bytes());
            self.upper_half[i + 1] = true;
        }
        self.bars[i] = Some(BarSlot {
            size,
            kind,
            prefetchable: prefetchable && kind != PciBarKind::Io,
            reported: 0,
        });
        Ok(())
    }

    /// Places BAR `index` at `addr` (aligned to its size) without reporting a move.
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        let i = usize::from(index);
        let slot = self
            .bars
            .get(i)
            .copied()
            .flatten()
            .ok_or(PciError::BarIndex(index))?;
        let limit = match slot.kind {
            PciBarKind::Memory32 => 1 << 32,
            PciBarKind::Memory64 => u64::MAX,
            PciBarKind::Io => 1 << 16,
        };
        if addr & (slot.size - 1) != 0 || addr > limit - slot.size {
            return Err(PciError::BarAddress { index, addr });
        }
        let reg = BAR0 + 4 * i;
        let flags = self.read_u32(reg)
            & if slot.kind == PciBarKind::Io {
                0x3
            } else {
                0xf
            };
        self.put(reg, &(addr as u32 | flags).to_le_bytes());
        if slot.kind == PciBarKind::Memory64 {
            self.put(reg + 4, &((addr >> 32) as u32).to_le_bytes());
        }
        if let Some(s) = self.bars[i].as_mut() {
            s.reported = addr;
        }
        Ok(())
    }

    /// The address BAR `index` currently decodes, as programmed in its register(s).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let slot = self.bars.get(index)?.as_ref()?;
        let low = u64::from(self.read_u32(BAR0 + 4 * index));
        Some(match slot.kind {
            PciBarKind::Memory32 => low & !0xf,
            PciBarKind::Io => low & !0x3,
            PciBarKind::Memory64 => {
                (low & !0xf) | u64::from(self.read_u32(BAR0 + 4 * index + 4)) << 32
            }
        })
    }

    /// The declared BARs with their current addresses.
    pub fn bars(&self) -> Vec<PciBar> {
        (0..NUM_BARS)
            .filter_map(|i| {
                let slot = self.bars[i]?;
                Some(PciBar {
                    index: i as u8,
                    addr: self.bar_address(i)?,
                    size: slot.size,
                    kind: slot.kind,
                    prefetchable: slot.prefetchable,
                })
            })
            .collect()
    }

    /// Appends a capability with ID `id` whose bytes after the ID and next-pointer are `body`;
    /// `writable` gives the guest-writable bits of `body` (missing bytes are read-only).
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let offset = self.next_capability;
        if offset + len > STANDARD_CONFIG_SIZE {
            return Err(PciError::CapabilitySpace { len });
        }
        self.put(offset, &[id, 0]);
        self.put(offset + 2, body);
        for (i, &m) in writable.iter().take(body.len()).enumerate() {
            self.writable[offset + 2 + i] = m;
        }
        match self.last_capability {
            Some(last) => self.put(last + 1, &[offset as u8]),
            None => {
                self.put(CAPABILITIES_POINTER, &[offset as u8]);
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES_LIST;
                self.put(STATUS, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len + 3) & !3;
        Ok(offset)
    }

    /// Saves the register bytes.
    pub fn save(&self) -> PciConfigurationState {
        PciConfigurationState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Restores saved register bytes; BAR positions count as already reported.
    pub fn restore(&mut self, state: &PciConfigurationState) -> Result<(), PersistError> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(PersistError::mismatch(
                "PCI configuration space",
                format!(
                    "{} bytes saved, it has {CONFIG_SPACE_SIZE}",
                    state.bytes.len()
                ),
            ));
        }
        self.bytes.copy_from_slice(&state.bytes);
        for i in 0..NUM_BARS {
            if let Some(addr) = self.bar_address(i) {
                if let Some(s) = self.bars[i].as_mut() {
                    s.reported = addr;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision_id: 1,
            class_code: (0xff, 0x00, 0x00),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0044,
            interrupt_pin: 0,
        })
    }

    fn write32(c: &mut PciConfiguration, off: usize, v: u32) -> Option<BarReprogram> {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = cfg();
        assert_eq!(c.read_u32(0), 0x1044_1af4);
        assert_eq!(c.read_u32(8), 0xff00_0001);
        assert_eq!(c.read_u32(0x2c), 0x0044_1af4);
        write32(&mut c, 0, 0xdead_beef);
        write32(&mut c, 8, 0);
        assert_eq!(c.read_u32(0), 0x1044_1af4);
        assert_eq!(c.read_u32(8), 0xff00_0001);
        // Command: only the defined bits stick; status is read-only.
        write32(&mut c, 4, 0xffff_ffff);
        assert_eq!(c.read_u32(4), 0x0000_0547);
        assert!(c.memory_enabled());
        c.write(0x3c, &[0x0b]);
        let mut b = [0u8; 2];
        c.read(0x3c, &mut b);
        assert_eq!(b, [0x0b, 0]);
        // Expansion ROM and unused BARs size to 0.
        write32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(c.read_u32(0x30), 0);
        // Beyond the space: ones, and writes are dropped without panicking.
        let mut b = [0u8; 4];
        c.read(4094, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
        c.write(4094, &[1, 2, 3, 4]);
        c.read(usize::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.write(usize::MAX - 1, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_32_and_64_bit() {
        let mut c = cfg();
        c.add_bar(0, 0x1000, PciBarKind::Memory32, false).unwrap();
        c.add_bar(2, 0x1_0000_0000, PciBarKind::Memory64, true)
            .unwrap();
        c.add_bar(4, 0x20, PciBarKind::Io, false).unwrap();
        c.set_bar_address(0, 0xc000_1000).unwrap();
        assert_eq!(c.read_u32(0x10), 0xc000_1000);

        assert_eq!(write32(&mut c, 0x10, 0xffff_ffff), None);
        assert_eq!(c.read_u32(0x10), 0xffff_f000);
        assert_eq!(
            write32(&mut c, 0x10, 0xc000_1000),
            None,
            "restore is no move"
        );

        assert_eq!(write32(&mut c, 0x18, 0xffff_ffff), None);
        assert_eq!(c.read_u32(0x18), 0x0000_000c, "64-bit prefetchable, 4 GiB");
        assert_eq!(write32(&mut c, 0x1c, 0xffff_ffff), None);
        assert_eq!(c.read_u32(0x1c), 0xffff_ffff);
        write32(&mut c, 0x18, 0);
        write32(&mut c, 0x1c, 0);

        assert_eq!(write32(&mut c, 0x20, 0xffff_ffff), None);
        assert_eq!(c.read_u32(0x20), 0xffff_ffe1);
        // Unused BAR slot.
        write32(&mut c, 0x24, 0xffff_ffff);
        assert_eq!(c.read_u32(0x24), 0);

        let bars = c.bars();
        assert_eq!(bars.len(), 3);
        assert_eq!(bars[1].size, 0x1_0000_0000);
        assert!(bars[1].prefetchable);
    }

    #[test]
    fn guest_bar_moves_are_reported() {
        let mut c = cfg();
        c.add_bar(0, 0x4000, PciBarKind::Memory64, false).unwrap();
        c.set_bar_address(0, 0xc000_0000).unwrap();
        let moved = write32(&mut c, 0x10, 0xd000_0004).unwrap();
        assert_eq!(
            (moved.bar, moved.old, moved.new),
            (0, 0xc000_0000, 0xd000_0000)
        );
        let moved = write32(&mut c, 0x14, 0x1).unwrap();
        assert_eq!((moved.old, moved.new), (0xd000_0000, 0x1_d000_0000));
        assert_eq!(moved.size, 0x4000);
        // Low bits below the size are hard-wired to zero.
        let moved = write32(&mut c, 0x10, 0xd800_1234).unwrap();
        assert_eq!(moved.new, 0x1_d800_0000);
        assert_eq!(c.bar_address(0), Some(0x1_d800_0000));
        assert_eq!(write32(&mut c, 0x10, 0xd800_0000), None);
        // A byte write counts too.
        let moved = c.write(0x13, &[0xe0]).unwrap();
        assert_eq!(moved.new, 0x1_e000_0000);
    }

    #[test]
    fn bar_errors() {
        let mut c = cfg();
        assert_eq!(
            c.add_bar(5, 0x1000, PciBarKind::Memory64, false),
            Err(PciError::BarIndex(5))
        );
        assert_eq!(
            c.add_bar(0, 0x1001, PciBarKind::Memory32, false),
            Err(PciError::BarSize {
                index: 0,
                size: 0x1001
            })
        );
        c.add_bar(0, 0x1000, PciBarKind::Memory64, false).unwrap();
        assert_eq!(
            c.add_bar(1, 0x1000, PciBarKind::Memory32, false),
            Err(PciError::BarInUse(1))
        );
        assert!(c.set_bar_address(0, 0x800).is_err());
        assert!(c.set_bar_address(1, 0x1000).is_err());
        c.add_bar(2, 0x1000, PciBarKind::Memory32, false).unwrap();
        assert!(c.set_bar_address(2, 0xffff_f000).is_ok());
        assert!(c.set_bar_address(2, 0x1_0000_0000).is_err());
    }

    #[test]
    fn capability_list() {
        let mut c = cfg();
        assert_eq!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let a = c.add_capability(0x09, &[5, 1, 2], &[0, 0xff]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        let mut p = [0u8; 1];
        c.read(CAPABILITIES_POINTER, &mut p);
        assert_eq!(p[0], 0x40);
        let mut hdr = [0u8; 5];
        c.read(a, &mut hdr);
        assert_eq!(hdr, [0x09, 0x48, 5, 1, 2]);
        c.write(a, &[0xff; 5]);
        c.read(a, &mut hdr);
        assert_eq!(hdr, [0x09, 0x48, 5, 0xff, 2]);
        let mut n = [0u8; 2];
        c.read(b, &mut n);
        assert_eq!(n, [0x11, 0]);
        while c.add_capability(0x09, &[0; 30], &[]).is_ok() {}
        assert!(matches!(
            c.add_capability(0x09, &[0; 30], &[]),
            Err(PciError::CapabilitySpace { len: 32 })
        ));
    }

    #[test]
    fn save_restore_keeps_bar_positions() {
        let mut c = cfg();
        c.add_bar(0, 0x1000, PciBarKind::Memory32, false).unwrap();
        write32(&mut c, 0x10, 0xc000_0000);
        write32(&mut c, 4, 0x6);
        let state = c.save();
        let mut d = cfg();
        d.add_bar(0, 0x1000, PciBarKind::Memory32, false).unwrap();
        d.restore(&state).unwrap();
        assert_eq!(d.read_u32(4), 0x6);
        assert_eq!(d.bar_address(0), Some(0xc000_0000));
        assert_eq!(write32(&mut d, 0x10, 0xc000_0000), None);
    }
}
