//! Saved state of the virtio PCI transport: PCI configuration space, MSI-X, the common
//! configuration registers and each queue's setup and position. The wrapped device saves its
//! own state separately.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::VirtioPciDevice;
use crate::pci::config::PciConfigurationState;
use crate::pci::msix::MsixState;
use crate::virtio::{lock_queue, status};
use crate::Persist;

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

impl Persist for VirtioPciDevice {
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

    /// Puts the transport back and, if the driver had started the device, re-activates it
    /// (the device's own state should be restored first); a paused transport activates it on
    /// resume instead. A queue that no longer fits guest memory leaves the device in
    /// DEVICE_NEEDS_RESET.
    fn restore(&mut self, state: &VirtioPciState) {
        if std::mem::take(&mut self.activated) {
            self.device.reset();
        }
        self.activate_on_resume = false;
        self.config.restore(&state.config);
        self.msix.restore(&state.msix);
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
        for (queue, saved) in self.queues.iter().zip(&state.queues) {
            let mut q = lock_queue(queue);
            q.reset();
            // Invalid saved values leave the defaults, which activation then rejects.
            let _ = q.try_set_size(saved.size);
            let _ = q.try_set_desc_table_address(GuestAddress(saved.desc_table));
            let _ = q.try_set_avail_ring_address(GuestAddress(saved.avail_ring));
            let _ = q.try_set_used_ring_address(GuestAddress(saved.used_ring));
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
            q.set_ready(saved.ready);
        }
        if self.device_status & status::FEATURES_OK != 0 {
            self.device.ack_features(self.acked_features);
        }
        let running = status::DRIVER_OK | status::FEATURES_OK;
        if self.device_status & running == running && self.device_status & status::NEEDS_RESET == 0
        {
            if let Err(e) = self.start_device() {
                tracing::warn!("virtio device restore: {e}");
                self.device_status |= status::NEEDS_RESET;
            }
        }
    }
}
