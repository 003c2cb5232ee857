//! The virtio PCI transport, modern (virtio 1.x) only: a PCI function with one 64-bit memory
//! BAR that holds every virtio structure and the MSI-X table.
//!
//! BAR 0 layout (32 KiB):
//!
//! ```text
//! 0x0000  common configuration   (VIRTIO_PCI_CAP_COMMON_CFG, 0x40 bytes)
//! 0x1000  ISR status             (VIRTIO_PCI_CAP_ISR_CFG, 1 byte, read-to-clear)
//! 0x2000  device configuration   (VIRTIO_PCI_CAP_DEVICE_CFG, device's config_len())
//! 0x3000  notifications          (VIRTIO_PCI_CAP_NOTIFY_CFG, queue i at 0x3000 + 4 * i)
//! 0x4000  MSI-X table            (one vector per queue plus one for configuration changes)
//! 0x6000  MSI-X PBA
//! ```
//!
//! # Pause
//!
//! [`VirtioPciDevice::pause`] pauses the device (when the driver has started it) and keeps it
//! paused until [`VirtioPciDevice::resume`]: a driver start or a restore meanwhile is carried
//! out on resume, so nothing runs while the VM is paused. A paused transport can be saved.

mod common;
mod interrupt;
mod persist;
pub use persist::VirtioFunctionState;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use persist::{QueueConfigState, VirtioPciState};

use self::interrupt::VirtioPciInterrupt;
use super::{VirtioDevice, VirtioError, VirtioInterrupt};
use crate::pci::msix::{msix_capability, pba_size, MSIX_CAPABILITY_ID};
use crate::pci::{
    BarReprogram, MsiIrqs, MsixTable, PciBar, PciBarKind, PciConfiguration, PciDevice, PciError,
    PciHeader,
};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio PCI device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR holding every virtio structure.
pub const VIRTIO_PCI_BAR: u8 = 0;
/// Size of [`VIRTIO_PCI_BAR`].
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
/// Distance between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

const COMMON_CFG_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
/// Vectors that fit the table region; one is for configuration changes.
const MAX_QUEUES: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize - 1;

const VENDOR_CAPABILITY_ID: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// Offsets inside the VIRTIO_PCI_CAP_PCI_CFG capability.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    msix: MsixTable,
    interrupt: Arc<VirtioPciInterrupt>,
    queues: Vec<Arc<Mutex<Queue>>>,
    notify: Vec<EventFd>,
    device_status: u8,
    acked_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    /// Whether the device is running or paused (activate succeeded and no reset since).
    activated: bool,
    /// The VMM paused the device ([`VirtioPciDevice::pause`]).
    paused: bool,
    /// The device is to be activated on resume (the driver or a restore started it while
    /// paused).
    activate_on_resume: bool,
    msix_cap: usize,
    pci_cfg_cap: usize,
}

/// PCI class code for a virtio device type.
fn class_code(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        1 => (0x02, 0x00, 0x00), // network controller
        2 => (0x01, 0x00, 0x00), // mass storage (as QEMU and Linux expect for virtio-blk)
        3 => (0x07, 0x80, 0x00), // communication controller
        _ => (0xff, 0x00, 0x00), // unclassified
    }
}

/// The body (after ID and next pointer) of a virtio PCI capability.
fn virtio_cap(cfg_type: u8, offset: u64, length: u32, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![16 + extra.len() as u8, cfg_type, VIRTIO_PCI_BAR, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    body
}

fn overlaps(offset: usize, len: usize, start: usize, size: usize) -> bool {
    offset < start + size && start < offset.saturating_add(len)
}

impl VirtioPciDevice {
    /// Wraps `device`; `mem` is the guest memory its queues live in, `msi` delivers its MSI-X
    /// vectors (there are [`VirtioPciDevice::msix_vector_count`] of them).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiIrqs>,
    ) -> Result<Self, VirtioError> {
        let device_type = device.device_type();
        let sizes = device.queue_max_sizes().to_vec();
        if sizes.len() > MAX_QUEUES {
            return Err(VirtioError::TooManyQueues {
                device_type,
                queues: sizes.len(),
                max: MAX_QUEUES,
            });
        }
        if u64::from(device.config_len()) > REGION_SIZE {
            return Err(VirtioError::ConfigTooLarge {
                device_type,
                len: device.config_len(),
                max: REGION_SIZE as u32,
            });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size)
                    .map(|q| Arc::new(Mutex::new(q)))
                    .map_err(|_| VirtioError::QueueMaxSize {
                        device_type,
                        index,
                        size,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let notify = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioError::Io {
                what: "creating a virtio queue notification eventfd",
                source,
            })?;
        let vectors = Self::msix_vector_count(device.as_ref());
        let msix = MsixTable::new(vectors, msi);
        let interrupt = Arc::new(VirtioPciInterrupt::new(msix.vectors(), sizes.len()));

        let type_id = device_type as u16;
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(type_id),
            revision_id: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
            interrupt_pin: 0,
        });
        config.add_bar(
            VIRTIO_PCI_BAR,
            VIRTIO_PCI_BAR_SIZE,
            PciBarKind::Memory64,
            false,
        )?;
        let vendor_cap = |config: &mut PciConfiguration, body: Vec<u8>| {
            config.add_capability(VENDOR_CAPABILITY_ID, &body, &[])
        };
        let common = virtio_cap(
            CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            common::COMMON_CFG_LEN,
            &[],
        );
        vendor_cap(&mut config, common)?;
        let notify_len = (sizes.len().max(1) as u32) * NOTIFY_OFF_MULTIPLIER;
        let multiplier = NOTIFY_OFF_MULTIPLIER.to_le_bytes();
        let notify_cap = virtio_cap(CAP_NOTIFY_CFG, NOTIFY_OFFSET, notify_len, &multiplier);
        vendor_cap(&mut config, notify_cap)?;
        vendor_cap(&mut config, virtio_cap(CAP_ISR_CFG, ISR_OFFSET, 1, &[]))?;
        if device.config_len() > 0 {
            let cap = virtio_cap(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, device.config_len(), &[]);
            vendor_cap(&mut config, cap)?;
        }
        // The access window: bar, offset, length and data are the driver's to write.
        let pci_cfg = virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut writable = vec![0u8; pci_cfg.len()];
        writable[PCI_CFG_BAR - 2] = 0xff;
        writable[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_cap = config.add_capability(VENDOR_CAPABILITY_ID, &pci_cfg, &writable)?;
        let (body, writable) = msix_capability(
            vectors,
            VIRTIO_PCI_BAR,
            MSIX_TABLE_OFFSET as u32,
            VIRTIO_PCI_BAR,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(MSIX_CAPABILITY_ID, &body, &writable)?;

        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            msix,
            interrupt,
            queues,
            notify,
            device_status: 0,
            acked_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            activated: false,
            paused: false,
            activate_on_resume: false,
            msix_cap,
            pci_cfg_cap,
        })
    }

    /// MSI-X vectors a transport for `device` has: one per queue, one for configuration
    /// changes.
    pub fn msix_vector_count(device: &dyn VirtioDevice) -> u16 {
        device.queue_max_sizes().len() as u16 + 1
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The wrapped device, mutably (e.g. for device-specific snapshot state).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The virtio device ID of the wrapped device (`VIRTIO_ID_*`).
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The wrapped device's counters by name ([`VirtioDevice::counters`]).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.device.counters()
    }

    /// Pauses the device ([`VirtioDevice::pause`]) if the driver started it: when this
    /// returns, the device does not touch guest memory, its queues or its interrupts, and the
    /// queues are consistent for [`crate::Persist::save`]. Pausing twice does nothing more.
    pub fn pause(&mut self) {
        if std::mem::replace(&mut self.paused, true) {
            return;
        }
        if self.activated {
            self.device.pause();
        }
    }

    /// Flushes the device's backend (see [`VirtioDevice::flush`]).
    pub fn flush(&mut self) -> Result<(), VirtioError> {
        self.device.flush()
    }

    /// Has the device read its backend again (see [`VirtioDevice::reload_backend`]); before a
    /// restore, while the device is not active.
    pub fn reload_backend(&mut self) -> Result<(), VirtioError> {
        self.device.reload_backend()
    }

    /// Changes the lock on the device's backend (see [`VirtioDevice::set_backend_lock`]).
    pub fn set_backend_lock(&mut self, mode: crate::block::LockMode) -> Result<(), VirtioError> {
        self.device.set_backend_lock(mode)
    }

    /// Continues a paused device where it stopped, or activates it if the driver or a restore
    /// started it while paused. Does nothing unless paused. On failure the device stops, is
    /// marked DEVICE_NEEDS_RESET and the driver is told (as for a failed activation).
    pub fn resume(&mut self) -> Result<(), VirtioError> {
        if !std::mem::take(&mut self.paused) {
            return Ok(());
        }
        let result = if std::mem::take(&mut self.activate_on_resume) {
            self.activate()
        } else if self.activated {
            self.device.resume()
        } else {
            Ok(())
        };
        if let Err(e) = &result {
            crate::warn_limited!("virtio device type {}: {e}", self.device.device_type());
            if std::mem::take(&mut self.activated) {
                self.device.reset();
            }
            self.device_status |= super::status::NEEDS_RESET;
            self.interrupt.signal_config_change();
        }
        result
    }

    /// Whether the VMM paused the device.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.device_status
    }

    /// Where each queue's notifications land when BAR 0 is at `bar_base`, with the eventfd to
    /// register there as a KVM ioeventfd (any access length, no datamatch). Re-register at
    /// the new base when the guest moves BAR 0.
    pub fn queue_notifiers(&self, bar_base: u64) -> Vec<(u64, &EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                let addr = NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                (bar_base + addr, fd)
            })
            .collect()
    }

    /// Current address of BAR 0.
    pub fn bar_address(&self) -> u64 {
        self.config.bar_address(VIRTIO_PCI_BAR.into()).unwrap_or(0)
    }

    /// Validates the access window's registers: `(offset, length)` of a BAR 0 access.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let mut bar = [0u8; 1];
        self.config.read(cap + PCI_CFG_BAR, &mut bar);
        let offset = u64::from(self.config.read_u32(cap + PCI_CFG_OFFSET));
        let length = self.config.read_u32(cap + PCI_CFG_LENGTH) as usize;
        let valid = bar[0] == VIRTIO_PCI_BAR
            && matches!(length, 1 | 2 | 4)
            && offset % length as u64 == 0
            && offset + length as u64 <= VIRTIO_PCI_BAR_SIZE;
        valid.then_some((offset, length))
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let offset = usize::from(offset);
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.read_bar(VIRTIO_PCI_BAR, bar_offset, &mut buf[..length]);
                self.config.put(self.pci_cfg_cap + PCI_CFG_DATA, &buf);
            }
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) -> Option<BarReprogram> {
        let offset = usize::from(offset);
        let moved = self.config.write(offset, data);
        if overlaps(offset, data.len(), self.msix_cap + 2, 2) {
            let control = self.config.read_u16(self.msix_cap + 2);
            self.msix.set_message_control(control);
        }
        if overlaps(offset, data.len(), self.pci_cfg_cap + PCI_CFG_DATA, 4) {
            if let Some((bar_offset, length)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(self.pci_cfg_cap + PCI_CFG_DATA, &mut buf);
                self.write_bar(VIRTIO_PCI_BAR, bar_offset, &buf[..length]);
            }
        }
        moved
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_PCI_BAR {
            return;
        }
        let table_end = MSIX_TABLE_OFFSET + self.msix.table_size();
        let pba_end = MSIX_PBA_OFFSET + pba_size(self.msix.len());
        match offset {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_CFG_OFFSET, data),
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.interrupt.take_isr();
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                let o = o - DEVICE_CFG_OFFSET;
                let len = u64::from(self.device.config_len());
                let n = len.saturating_sub(o).min(data.len() as u64) as usize;
                if n > 0 {
                    self.device.read_config(o, &mut data[..n]);
                }
            }
            o if (MSIX_TABLE_OFFSET..table_end).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..pba_end).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != VIRTIO_PCI_BAR {
            return;
        }
        let table_end = MSIX_TABLE_OFFSET + self.msix.table_size();
        match offset {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_CFG_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                let o = o - DEVICE_CFG_OFFSET;
                let len = u64::from(self.device.config_len());
                let n = len.saturating_sub(o).min(data.len() as u64) as usize;
                if n > 0 {
                    self.device.write_config(o, &data[..n]);
                }
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                let index = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(fd) = self.notify.get(index as usize) {
                    // A full counter only means a notification is already pending.
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..table_end).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.activated {
            self.device.reset();
        }
    }
}
