//! The PCI root bus: a host bridge at 00:00.0, up to 31 more single-function devices, and the
//! two ways a guest reaches their configuration spaces — the legacy CONFIG_ADDRESS /
//! CONFIG_DATA ports and the ECAM window.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::config::{PciConfiguration, PciConfigurationState, PciHeader, CONFIG_SPACE_SIZE};
use super::{lock_device, BarReprogram, PciBar, PciDevice, PciError};
use crate::{BusDevice, Persist, PersistError};

/// Port of CONFIG_ADDRESS; CONFIG_DATA follows at 0xcfc.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports claimed by [`PciConfigIo`]: CONFIG_ADDRESS and the four CONFIG_DATA bytes.
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Size of a full ECAM window (256 buses); only bus 0 is populated.
pub const ECAM_SIZE: u64 = 256 << 20;

const SLOTS: usize = 32;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

/// Called when the guest moves a BAR: `(device number, what moved)`.
///
/// It runs on the vCPU thread that made the configuration write, while the root is locked, so
/// it must not wait for the root or for the bus whose dispatch led here.
pub type BarReprogramHandler = Box<dyn FnMut(u8, BarReprogram) + Send>;

/// The host bridge at 00:00.0: identity only.
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    /// An Intel-style host bridge (class 06/00/00).
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                class_code: (0x06, 0x00, 0x00),
                ..Default::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset.into(), data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarReprogram> {
        self.config.write(offset.into(), data)
    }

    fn bars(&self) -> Vec<PciBar> {
        Vec::new()
    }

    fn set_bar_address(&mut self, index: u8, _addr: u64) -> Result<(), PciError> {
        Err(PciError::BarIndex(index))
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// Bus 0 of the PCI hierarchy.
pub struct PciRoot {
    devices: [Option<Arc<Mutex<dyn PciDevice>>>; SLOTS],
    /// Device 0, also in `devices`, kept typed for saving.
    host_bridge: Arc<Mutex<HostBridge>>,
    on_bar_reprogram: Option<BarReprogramHandler>,
}

/// Saved state of the root bus: its host bridge's configuration space (the functions on the
/// bus save their own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    pub host_bridge: PciConfigurationState,
}

impl Persist for PciRoot {
    const NAME: &'static str = "PCI host bridge";
    type State = PciRootState;

    fn save(&self) -> PciRootState {
        let bridge = self.host_bridge.lock().unwrap_or_else(|e| e.into_inner());
        PciRootState {
            host_bridge: bridge.config.save(),
        }
    }

    fn restore(&mut self, state: &PciRootState) -> Result<(), PersistError> {
        let mut bridge = self.host_bridge.lock().unwrap_or_else(|e| e.into_inner());
        bridge.config.restore(&state.host_bridge)
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A root bus holding only the host bridge (device 0).
    pub fn new() -> Self {
        let mut devices: [Option<Arc<Mutex<dyn PciDevice>>>; SLOTS] = Default::default();
        let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
        devices[0] = Some(host_bridge.clone());
        PciRoot {
            devices,
            host_bridge,
            on_bar_reprogram: None,
        }
    }

    /// Places `device` at the lowest free device number and returns it.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = self
            .devices
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::BusFull)?;
        self.devices[slot] = Some(device);
        Ok(slot as u8)
    }

    /// Places `device` at device number `slot`.
    pub fn add_device_at(
        &mut self,
        slot: u8,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciError> {
        let entry = self
            .devices
            .get_mut(usize::from(slot))
            .ok_or(PciError::Slot(slot))?;
        if entry.is_some() {
            return Err(PciError::SlotInUse(slot));
        }
        *entry = Some(device);
        Ok(())
    }

    /// The device at device number `slot`.
    pub fn device(&self, slot: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        self.devices.get(usize::from(slot))?.as_ref()
    }

    /// Sets the function called when the guest moves a BAR.
    pub fn set_bar_reprogram_handler(&mut self, handler: BarReprogramHandler) {
        self.on_bar_reprogram = Some(handler);
    }

    fn function(&self, bus: u8, slot: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.device(slot)
    }

    /// Reads the configuration space of `bus:slot.function` at `reg`; absent functions read
    /// as ones.
    pub fn config_read(&self, bus: u8, slot: u8, function: u8, reg: u16, data: &mut [u8]) {
        let Some(dev) = self.function(bus, slot, function) else {
            data.fill(0xff);
            return;
        };
        let mut dev = lock_device(dev);
        for_each_dword_piece(reg, data.len(), |reg, range| match reg {
            Some(reg) => dev.read_config(reg, &mut data[range]),
            None => data[range].fill(0xff),
        });
    }

    /// Writes the configuration space of `bus:slot.function` at `reg`; writes to absent
    /// functions are dropped.
    pub fn config_write(&mut self, bus: u8, slot: u8, function: u8, reg: u16, data: &[u8]) {
        let Some(dev) = self.function(bus, slot, function) else {
            return;
        };
        let mut moves = Vec::new();
        {
            let mut dev = lock_device(dev);
            for_each_dword_piece(reg, data.len(), |reg, range| {
                if let Some(reg) = reg {
                    moves.extend(dev.write_config(reg, &data[range]));
                }
            });
        }
        if let Some(handler) = self.on_bar_reprogram.as_mut() {
            for m in moves {
                handler(slot, m);
            }
        }
    }
}

/// Splits an access of `len` bytes at `reg` into pieces that stay inside one dword; `f` gets
/// each piece's register (None beyond the 4 KiB space) and its range in the data buffer.
fn for_each_dword_piece(
    reg: u16,
    len: usize,
    mut f: impl FnMut(Option<u16>, std::ops::Range<usize>),
) {
    let mut done = 0;
    while done < len {
        let r = usize::from(reg) + done;
        let n = (4 - r % 4).min(len - done);
        let valid = (r < CONFIG_SPACE_SIZE).then_some(r as u16);
        f(valid, done..done + n);
        done += n;
    }
}

fn lock_root(root: &Mutex<PciRoot>) -> std::sync::MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8 and CONFIG_DATA at 0xcfc..0xcff. Place
/// it on the port I/O bus at [`PCI_CONFIG_IO_PORT`] with length [`PCI_CONFIG_IO_LEN`].
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// `(bus, device, function, register)` selected by CONFIG_ADDRESS, if enabled.
    fn selected(&self) -> Option<(u8, u8, u8, u16)> {
        let a = self.address;
        (a & CONFIG_ADDRESS_ENABLE != 0).then_some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as u16,
        ))
    }
}

/// Saved state of [`PciConfigIo`]: the CONFIG_ADDRESS latch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub address: u32,
}

impl Persist for PciConfigIo {
    const NAME: &'static str = "PCI CONFIG_ADDRESS";
    type State = PciConfigIoState;

    fn save(&self) -> PciConfigIoState {
        PciConfigIoState {
            address: self.address,
        }
    }

    fn restore(&mut self, state: &PciConfigIoState) -> Result<(), PersistError> {
        self.address = state.address;
        Ok(())
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
                }
            }
            4..=7 => match self.selected() {
                Some((bus, dev, func, reg)) => {
                    let reg = reg + (offset - 4) as u16;
                    let n = data.len().min((8 - offset) as usize);
                    data[n..].fill(0xff);
                    lock_root(&self.root).config_read(bus, dev, func, reg, &mut data[..n]);
                }
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only a dword write sets CONFIG_ADDRESS; byte writes to 0xcf9 (the chipset reset
            // control register on real hardware) are ignored.
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                if let Some((bus, dev, func, reg)) = self.selected() {
                    let reg = reg + (offset - 4) as u16;
                    let n = data.len().min((8 - offset) as usize);
                    lock_root(&self.root).config_write(bus, dev, func, reg, &data[..n]);
                }
            }
            _ => {}
        }
    }
}

/// Enhanced configuration access (ECAM / MMCONFIG): place it on the MMIO bus at the ECAM base
/// with length [`ECAM_SIZE`] (or 1 MiB to cover bus 0 only). Offset bits: bus 27:20, device
/// 19:15, function 14:12, register 11:0.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }
}

fn decode_ecam(offset: u64) -> Option<(u8, u8, u8, u16)> {
    (offset < ECAM_SIZE).then_some((
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as u16,
    ))
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match decode_ecam(offset) {
            // An access running past the function's 4 KiB reads ones there.
            Some((bus, dev, func, reg)) => {
                lock_root(&self.root).config_read(bus, dev, func, reg, data)
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg)) = decode_ecam(offset) {
            lock_root(&self.root).config_write(bus, dev, func, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::PciBarKind;

    /// A device with a 64-bit BAR and a scratch register at 0x40.
    struct Scratch {
        config: PciConfiguration,
    }

    impl Scratch {
        fn new() -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                class_code: (0xff, 0, 0),
                ..Default::default()
            });
            config
                .add_bar(0, 0x1000, PciBarKind::Memory64, false)
                .unwrap();
            config
                .add_capability(
                    0x09,
                    &[8, 0, 0, 0, 0, 0],
                    &[0, 0xff, 0xff, 0xff, 0xff, 0xff],
                )
                .unwrap();
            Scratch { config }
        }
    }

    impl PciDevice for Scratch {
        fn read_config(&mut self, offset: u16, data: &mut [u8]) {
            self.config.read(offset.into(), data);
        }
        fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarReprogram> {
            self.config.write(offset.into(), data)
        }
        fn bars(&self) -> Vec<PciBar> {
            self.config.bars()
        }
        fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
            self.config.set_bar_address(index, addr)
        }
        fn read_bar(&mut self, _: u8, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_bar(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, PciConfigIo, PciConfigMmio) {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let slot = root
            .lock()
            .unwrap()
            .add_device(Arc::new(Mutex::new(Scratch::new())))
            .unwrap();
        assert_eq!(slot, 1);
        (
            root.clone(),
            PciConfigIo::new(root.clone()),
            PciConfigMmio::new(root),
        )
    }

    fn io_read(io: &mut PciConfigIo, dev: u8, reg: u16, len: usize) -> u32 {
        let addr = CONFIG_ADDRESS_ENABLE | u32::from(dev) << 11 | u32::from(reg & 0xfc);
        io.write(0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4 + u64::from(reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn io_write(io: &mut PciConfigIo, dev: u8, reg: u16, data: &[u8]) {
        let addr = CONFIG_ADDRESS_ENABLE | u32::from(dev) << 11 | u32::from(reg & 0xfc);
        io.write(0, &addr.to_le_bytes());
        io.write(4 + u64::from(reg & 3), data);
    }

    fn ecam_read(m: &mut PciConfigMmio, dev: u8, reg: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        m.read(u64::from(dev) << 15 | u64::from(reg), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_and_device_ids() {
        let (_, mut io, mut m) = setup();
        assert_eq!(io_read(&mut io, 0, 0, 4), 0x0d57_8086);
        assert_eq!(io_read(&mut io, 0, 8, 4) >> 8, 0x06_00_00);
        assert_eq!(ecam_read(&mut m, 1, 0, 4), 0x5678_1234);
        // CONFIG_ADDRESS reads back.
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), CONFIG_ADDRESS_ENABLE | 8);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let (_, mut io, mut m) = setup();
        assert_eq!(io_read(&mut io, 2, 0, 4), 0xffff_ffff);
        assert_eq!(io_read(&mut io, 31, 0, 2), 0xffff);
        assert_eq!(ecam_read(&mut m, 7, 0, 4), 0xffff_ffff);
        // Function 1 and bus 1 are absent too.
        let mut b = [0u8; 4];
        m.read(1 << 12, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Disabled CONFIG_ADDRESS.
        io.write(0, &0u32.to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io_write(&mut io, 5, 0x3c, &[1]);
        m.write(5 << 15, &[1, 2, 3, 4]);
        m.read(ECAM_SIZE + 4, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn io_and_ecam_reach_the_same_registers_at_every_width() {
        let (_, mut io, mut m) = setup();
        // Scratch bytes 0x43..0x47 are writable.
        for (i, len) in [
            (0x44u16, 4usize),
            (0x44, 2),
            (0x46, 2),
            (0x45, 1),
            (0x47, 1),
        ] {
            let val: u32 = 0xa1b2_c3d4 ^ u32::from(i) ^ len as u32;
            let bytes = &val.to_le_bytes()[..len];
            io_write(&mut io, 1, i, bytes);
            let mask = if len == 4 {
                u32::MAX
            } else {
                (1 << (8 * len)) - 1
            };
            assert_eq!(
                ecam_read(&mut m, 1, i, len) & mask,
                val & mask,
                "reg {i:#x} len {len}"
            );
            m.write(1 << 15 | u64::from(i), &(!val).to_le_bytes()[..len]);
            assert_eq!(io_read(&mut io, 1, i, len) & mask, !val & mask);
        }
        // Every offset and width through both mechanisms agrees and does not panic.
        for reg in 0..256u16 {
            for len in [1usize, 2, 4] {
                let a = io_read(&mut io, 1, reg, len.min(4 - usize::from(reg & 3)));
                let b = ecam_read(&mut m, 1, reg, len.min(4 - usize::from(reg & 3)));
                assert_eq!(a, b, "reg {reg:#x} len {len}");
            }
        }
        // Wide and unaligned ECAM accesses are split per dword.
        let mut q = [0u8; 8];
        m.read(1 << 15, &mut q);
        assert_eq!(u64::from_le_bytes(q) as u32, 0x5678_1234);
        m.read(1 << 15 | 0xffe, &mut q);
        assert_eq!(&q[2..], &[0xff; 6]);
        for off in 0..8 {
            io.read(off, &mut q[..4]);
            io.write(off, &q[..3]);
        }
    }

    #[test]
    fn bar_moves_reach_the_handler() {
        let (root, mut io, mut m) = setup();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        root.lock()
            .unwrap()
            .set_bar_reprogram_handler(Box::new(move |slot, mv| {
                s.lock().unwrap().push((slot, mv))
            }));
        // Sizing is silent.
        io_write(&mut io, 1, 0x10, &[0xff; 4]);
        assert_eq!(io_read(&mut io, 1, 0x10, 4), 0xffff_f004);
        io_write(&mut io, 1, 0x10, &0u32.to_le_bytes());
        assert!(seen.lock().unwrap().is_empty());
        // A real move is reported once.
        m.write(1 << 15 | 0x10, &0xc000_0000u32.to_le_bytes());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, 1);
        assert_eq!((seen[0].1.old, seen[0].1.new), (0, 0xc000_0000));
    }

    #[test]
    fn slots() {
        let mut root = PciRoot::new();
        let dev = Arc::new(Mutex::new(Scratch::new()));
        assert_eq!(
            root.add_device_at(0, dev.clone()),
            Err(PciError::SlotInUse(0))
        );
        assert_eq!(root.add_device_at(32, dev.clone()), Err(PciError::Slot(32)));
        root.add_device_at(31, dev.clone()).unwrap();
        for i in 1..31 {
            assert_eq!(root.add_device(dev.clone()), Ok(i));
        }
        assert_eq!(root.add_device(dev), Err(PciError::BusFull));
    }
}
