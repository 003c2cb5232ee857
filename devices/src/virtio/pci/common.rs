//! The common configuration structure (virtio 1.x section 4.1.4.3) and the device status
//! state machine it drives: feature negotiation, queue setup, activation and reset.

use std::sync::Arc;

use virtio_queue::QueueT;

use super::VirtioPciDevice;
use crate::virtio::{
    lock_queue, status, ActivatedQueue, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1_BIT,
    VIRTIO_MSI_NO_VECTOR, VIRTIO_RING_F_EVENT_IDX_BIT,
};

/// Length of the structure: up to `admin_queue_num`, which reads 0 (no admin queues).
pub(super) const COMMON_CFG_LEN: u32 = 0x40;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Which half of a 64-bit queue address register an access covers.
enum Half {
    Low,
    High,
    Both,
}

fn put(regs: &mut [u8], offset: u64, bytes: &[u8]) {
    let o = offset as usize;
    regs[o..o + bytes.len()].copy_from_slice(bytes);
}

impl VirtioPciDevice {
    /// The structure as the driver currently sees it (queue fields for `queue_select`).
    fn common_registers(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut r = [0u8; COMMON_CFG_LEN as usize];
        let features = self.device.features();
        let half = |v: u64, select: u32| match select {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(
            &mut r,
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(
            &mut r,
            DEVICE_FEATURE,
            &half(features, self.device_feature_select).to_le_bytes(),
        );
        put(
            &mut r,
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let acked = half(self.acked_features, self.driver_feature_select);
        put(&mut r, DRIVER_FEATURE, &acked.to_le_bytes());
        put(
            &mut r,
            CONFIG_MSIX_VECTOR,
            &self.interrupt.config_vector().to_le_bytes(),
        );
        put(
            &mut r,
            NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(&mut r, DEVICE_STATUS, &[self.device_status]);
        put(
            &mut r,
            CONFIG_GENERATION,
            &[self.interrupt.config_generation()],
        );
        put(&mut r, QUEUE_SELECT, &self.queue_select.to_le_bytes());
        let index = self.queue_select;
        if let Some(q) = self.queues.get(usize::from(index)) {
            let q = lock_queue(q);
            put(&mut r, QUEUE_SIZE, &q.size().to_le_bytes());
            let vector = self.interrupt.queue_vector(index);
            put(&mut r, QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(&mut r, QUEUE_ENABLE, &u16::from(q.ready()).to_le_bytes());
            put(&mut r, QUEUE_NOTIFY_OFF, &index.to_le_bytes());
            put(&mut r, QUEUE_DESC, &q.desc_table().to_le_bytes());
            put(&mut r, QUEUE_DRIVER, &q.avail_ring().to_le_bytes());
            put(&mut r, QUEUE_DEVICE, &q.used_ring().to_le_bytes());
        }
        r
    }

    /// A driver read at `offset` in the common configuration region (any width).
    pub(super) fn common_read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(COMMON_CFG_LEN) {
            return;
        }
        let regs = self.common_registers();
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// A driver write at `offset` in the common configuration region. Only naturally sized
    /// accesses to a register (or a 32-bit half of a 64-bit one) have an effect.
    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                self.interrupt.set_config_vector(vector);
            }
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_SIZE, 2) => self.with_configurable_queue(|q| q.set_size(value as u16)),
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                if self.device_status & status::DRIVER_OK == 0 {
                    self.interrupt.set_queue_vector(self.queue_select, vector);
                }
            }
            (QUEUE_ENABLE, 2) if value == 1 => self.with_configurable_queue(|q| q.set_ready(true)),
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 4 | 8) | (0x24 | 0x2c | 0x34, 4) => {
                self.write_queue_address(offset, data.len(), value)
            }
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.device_status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
            return;
        }
        let (shift, mask) = match self.driver_feature_select {
            0 => (0, 0xffff_ffff),
            1 => (32, 0xffff_ffff_0000_0000),
            _ => return,
        };
        self.acked_features = (self.acked_features & !mask) | (u64::from(value) << shift);
    }

    /// `vector` if the MSI-X table has it, otherwise NO_VECTOR (which the driver reads back to
    /// learn the assignment failed).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.len() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// Runs `f` on the selected queue if it may still be configured: it exists, is not enabled
    /// yet and the device is not running.
    fn with_configurable_queue(&mut self, f: impl FnOnce(&mut virtio_queue::Queue)) {
        if self.device_status & status::DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            let mut q = lock_queue(q);
            if !q.ready() {
                f(&mut q);
            }
        }
    }

    fn write_queue_address(&mut self, offset: u64, len: usize, value: u64) {
        let base = offset & !7;
        let half = match (offset & 4, len) {
            (_, 8) => Half::Both,
            (0, _) => Half::Low,
            _ => Half::High,
        };
        let (low, high) = match half {
            Half::Low => (Some(value as u32), None),
            Half::High => (None, Some(value as u32)),
            Half::Both => (Some(value as u32), Some((value >> 32) as u32)),
        };
        self.with_configurable_queue(|q| match base {
            QUEUE_DESC => q.set_desc_table_address(low, high),
            QUEUE_DRIVER => q.set_avail_ring_address(low, high),
            _ => q.set_used_ring_address(low, high),
        });
    }

    /// The driver wrote the device status.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset_transport();
            return;
        }
        let old = self.device_status;
        // The driver only ever adds bits; NEEDS_RESET is the device's own.
        let mut new = old | (value & !status::NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let acceptable = self.acked_features & VIRTIO_F_VERSION_1_BIT != 0
                && self.acked_features & !offered == 0;
            if acceptable {
                self.device.ack_features(self.acked_features);
            } else {
                tracing::debug!(
                    acked = self.acked_features,
                    offered,
                    "virtio: refusing FEATURES_OK"
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.device_status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            let result = if new & status::FEATURES_OK == 0 {
                Err(None)
            } else {
                self.start_device().map_err(Some)
            };
            if let Err(e) = result {
                if let Some(e) = e {
                    crate::warn_limited!("virtio device type {}: {e}", self.device.device_type());
                }
                self.device_status |= status::NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    /// Activates the device, or, while paused, leaves that to [`VirtioPciDevice::resume`].
    pub(super) fn start_device(&mut self) -> Result<(), VirtioError> {
        if self.paused {
            self.activate_on_resume = true;
            return Ok(());
        }
        self.activate()
    }

    /// Hands the enabled queues to the device.
    pub(super) fn activate(&mut self) -> Result<(), VirtioError> {
        let device_type = self.device.device_type();
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX_BIT != 0;
        let mut active = Vec::new();
        for (index, queue) in self.queues.iter().enumerate() {
            let index = index as u16;
            {
                let mut q = lock_queue(queue);
                if !q.ready() {
                    continue;
                }
                if !q.is_valid(&self.mem) {
                    return Err(VirtioError::InvalidQueue { device_type, index });
                }
                q.set_event_idx(event_idx);
            }
            let notify = self.notify[usize::from(index)]
                .try_clone()
                .map_err(|source| VirtioError::Io {
                    what: "cloning a virtio queue notification eventfd",
                    source,
                })?;
            active.push(ActivatedQueue {
                index,
                queue: queue.clone(),
                notify,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.device.activate(self.mem.clone(), interrupt, active)?;
        self.activated = true;
        Ok(())
    }

    /// Device reset (status 0): stops the device and returns every virtio register to its
    /// initial value. PCI state (BARs, MSI-X table) is untouched.
    pub(super) fn reset_transport(&mut self) {
        if std::mem::take(&mut self.activated) {
            self.device.reset();
        }
        self.activate_on_resume = false;
        self.device_status = 0;
        self.acked_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &self.queues {
            lock_queue(q).reset();
        }
        for fd in &self.notify {
            // Drop notifications left from before the reset; EAGAIN means there were none.
            let _ = fd.read();
        }
        self.interrupt.reset();
    }
}
