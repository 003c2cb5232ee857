//! How a virtio PCI device interrupts the driver: the per-queue and configuration MSI-X
//! vectors the driver chose, and the ISR status byte for when MSI-X is off.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use crate::pci::MsixVectors;
use crate::virtio::{VirtioInterrupt, VIRTIO_MSI_NO_VECTOR};

/// ISR bit: a queue has used buffers.
pub(super) const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub(super) const ISR_CONFIG: u8 = 2;

/// The interrupt state shared between the transport (vCPU threads) and the device's workers.
pub(super) struct VirtioPciInterrupt {
    msix: Arc<MsixVectors>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    config_generation: AtomicU8,
}

impl VirtioPciInterrupt {
    pub(super) fn new(msix: Arc<MsixVectors>, queues: usize) -> Self {
        VirtioPciInterrupt {
            msix,
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
        }
    }

    pub(super) fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(queue))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(super) fn set_queue_vector(&self, queue: u16, vector: u16) {
        if let Some(v) = self.queue_vectors.get(usize::from(queue)) {
            v.store(vector, Ordering::Release);
        }
    }

    pub(super) fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    pub(super) fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    pub(super) fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Reads and clears the ISR status (the driver's read of the ISR byte).
    pub(super) fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    pub(super) fn isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    /// Restores saved registers.
    pub(super) fn restore(&self, config_vector: u16, queue_vectors: &[u16], isr: u8, gen: u8) {
        self.config_vector.store(config_vector, Ordering::Release);
        for (i, v) in self.queue_vectors.iter().enumerate() {
            let saved = queue_vectors.get(i).copied();
            v.store(saved.unwrap_or(VIRTIO_MSI_NO_VECTOR), Ordering::Release);
        }
        self.isr.store(isr, Ordering::Release);
        self.config_generation.store(gen, Ordering::Release);
    }

    /// Device reset: no vectors, no pending ISR bits.
    pub(super) fn reset(&self) {
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        self.isr.store(0, Ordering::Release);
    }

    /// With MSI-X enabled, `vector` fires (unless it is NO_VECTOR); otherwise the ISR bit is
    /// set for the INTx path.
    fn raise(&self, vector: u16, isr_bit: u8) {
        if self.msix.enabled() && (vector == VIRTIO_MSI_NO_VECTOR || self.msix.trigger(vector)) {
            return;
        }
        // MSI-X off: INTx semantics. The function has no INTx pin, so the ISR byte is all the
        // driver gets (a polling driver still sees it).
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        if usize::from(queue_index) < self.queue_vectors.len() {
            self.raise(self.queue_vector(queue_index), ISR_QUEUE);
        }
    }

    fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        // The configuration bit is set even with MSI-X (virtio 1.x 4.1.4.5.1).
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.raise(self.config_vector(), ISR_CONFIG);
    }
}
