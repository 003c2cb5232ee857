//! Saved state of the virtio PCI transport: PCI configuration space, MSI-X, the common
//! configuration registers and each queue's setup and position ([`VirtioPciState`]), and of a
//! whole virtio PCI function: the transport with the state of the device behind it
//! ([`VirtioFunctionState`]), which the transport saves through [`VirtioDevice`] without
//! knowing the device's type.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::VirtioPciDevice;
use crate::pci::config::PciConfigurationState;
use crate::pci::msix::MsixState;
use crate::virtio::{lock_queue, status};
use crate::{Persist, PersistError, SavedState};

/// One queue's registers and ring positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub msix_vector: u16,
}

/// The transport's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub config: PciConfigurationState,
    pub msix: MsixState,
    pub device_status: u8,
    pub acked_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
    pub config_msix_vector: u16,
    pub config_generation: u8,
    pub isr: u8,
    pub queues: Vec<QueueConfigState>,
}

/// A virtio PCI function's state: the transport's and the device's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioFunctionState {
    pub transport: VirtioPciState,
    pub device: SavedState,
}

impl VirtioPciDevice {
    /// Saves the transport and the device behind it. The function must be paused
    /// ([`VirtioPciDevice::pause`]) if the driver started it ([`PersistError::Running`]).
    pub fn save_function(&self) -> Result<VirtioFunctionState, PersistError> {
        Ok(VirtioFunctionState {
            device: self.device.save_state()?,
            transport: self.save(),
        })
    }

    /// Restores a function saved by [`VirtioPciDevice::save_function`] into one built from the
    /// same configuration: the device first, then the transport, which starts the device if the
    /// driver had (at once, or on resume if this function is paused).
    pub fn restore_function(&mut self, state: &VirtioFunctionState) -> Result<(), PersistError> {
        if std::mem::take(&mut self.activated) {
            self.device.reset();
        }
        self.device.restore_state(&state.device)?;
        self.restore(&state.transport)
    }
}

impl Persist for VirtioPciDevice {
    const NAME: &'static str = "virtio PCI transport";
    type State = VirtioPciState;

    /// Captures the transport. Take it with the vCPUs parked and the device paused
    /// ([`VirtioPciDevice::pause`]): the device's worker has then stopped, its requests in
    /// flight have completed and the chains it held (virtio-net's receive buffers) are back in
    /// the available ring, so `next_avail`/`next_used` say exactly what the device has consumed
    /// and a restored device continues from there. (Saving a running device is consistent per
    /// batch only, and misses chains a worker holds across batches.)
    fn save(&self) -> VirtioPciState {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let q = lock_queue(q);
                QueueConfigState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    msix_vector: self.interrupt.queue_vector(i as u16),
                }
            })
            .collect();
        VirtioPciState {
            config: self.config.save(),
            msix: self.msix.save(),
            device_status: self.device_status,
            acked_features: self.acked_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            config_msix_vector: self.interrupt.config_vector(),
            config_generation: self.interrupt.config_generation(),
            isr: self.interrupt.isr(),
            queues,
        }
    }

    /// Puts the transport back and, if the driver had started the device, activates it (the
    /// device's own state must be restored first; see [`VirtioPciDevice::restore_function`]); a
    /// paused transport activates it on resume instead. Refused: another number of queues,
    /// queue sizes or rings that are invalid or outside guest memory.
    fn restore(&mut self, state: &VirtioPciState) -> Result<(), PersistError> {
        let name = Self::NAME;
        let bad_queue =
            |i: usize, what: &str| PersistError::mismatch(name, format!("queue {i}: {what}"));
        if state.queues.len() != self.queues.len() {
            return Err(PersistError::mismatch(
                name,
                format!(
                    "{} queues saved, the device has {}",
                    state.queues.len(),
                    self.queues.len()
                ),
            ));
        }
        if std::mem::take(&mut self.activated) {
            self.device.reset();
        }
        self.activate_on_resume = false;
        self.config.restore(&state.config)?;
        self.msix.restore(&state.msix)?;
        self.device_status = state.device_status;
        self.acked_features = state.acked_features;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.queue_select = state.queue_select;
        let vectors: Vec<u16> = state.queues.iter().map(|q| q.msix_vector).collect();
        self.interrupt.restore(
            state.config_msix_vector,
            &vectors,
            state.isr,
            state.config_generation,
        );
        for (i, (queue, saved)) in self.queues.iter().zip(&state.queues).enumerate() {
            let mut q = lock_queue(queue);
            q.reset();
            q.try_set_size(saved.size)
                .map_err(|_| bad_queue(i, &format!("size {} is not valid here", saved.size)))?;
            q.try_set_desc_table_address(GuestAddress(saved.desc_table))
                .and_then(|()| q.try_set_avail_ring_address(GuestAddress(saved.avail_ring)))
                .and_then(|()| q.try_set_used_ring_address(GuestAddress(saved.used_ring)))
                .map_err(|_| bad_queue(i, "a ring address is misaligned"))?;
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
            q.set_ready(saved.ready);
            if saved.ready && !q.is_valid(&self.mem) {
                return Err(bad_queue(i, "its rings do not fit guest memory"));
            }
        }
        if self.device_status & status::FEATURES_OK != 0 {
            self.device.ack_features(self.acked_features);
        }
        let running = status::DRIVER_OK | status::FEATURES_OK;
        if self.device_status & running == running && self.device_status & status::NEEDS_RESET == 0
        {
            self.start_device()
                .map_err(|e| PersistError::mismatch(name, e.to_string()))?;
        }
        Ok(())
    }
}
