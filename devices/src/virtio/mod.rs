//! Virtio devices and their transport.
//!
//! Every device implements [`VirtioDevice`]; the transport ([`pci::VirtioPciDevice`]) knows
//! only that trait. The transport owns the queues' configuration and notification eventfds,
//! negotiates features, and hands the enabled queues to [`VirtioDevice::activate`] when the
//! driver sets DRIVER_OK; the device signals the driver through [`VirtioInterrupt`].
//!
//! A running device can be paused ([`VirtioDevice::pause`]) and resumed where it stopped, and
//! reports what it has done by name ([`VirtioDevice::counters`]) for the VMM's `vm.counters`.

pub mod block;
mod drain;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
mod testing;
mod worker_thread;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{GuestMemoryMmap, PersistError, SavedState};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use block::VirtioBlk;
pub use net::{MacAddr, Tap, VirtioNet};
pub use pci::VirtioPciDevice;
pub use rng::Rng;

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    use super::*;
    pub const ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    pub const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
    pub const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
    pub const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
    pub const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    pub const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
}

/// Feature bit: the device complies with virtio 1.x (mandatory for the modern transport).
pub const VIRTIO_F_VERSION_1_BIT: u64 = 1 << VIRTIO_F_VERSION_1;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX_BIT: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
/// "No MSI-X vector" in the common configuration's vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Errors of virtio transports and devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Queue maximum sizes are powers of two up to 32768.
    #[error("virtio device type {device_type}: queue {index} has invalid maximum size {size}")]
    QueueMaxSize {
        device_type: u32,
        index: usize,
        size: u16,
    },
    /// The transport's BAR layout has room for a limited number of queues.
    #[error("virtio device type {device_type}: {queues} queues, the transport supports {max}")]
    TooManyQueues {
        device_type: u32,
        queues: usize,
        max: usize,
    },
    /// The device configuration does not fit the transport's window.
    #[error("virtio device type {device_type}: {len}-byte device configuration, at most {max}")]
    ConfigTooLarge {
        device_type: u32,
        len: u32,
        max: u32,
    },
    /// A queue the driver enabled lies outside guest memory (or is misaligned).
    #[error("virtio device type {device_type}: queue {index} is not valid in guest memory")]
    InvalidQueue { device_type: u32, index: u16 },
    /// The device needs a different set of queues than the driver enabled.
    #[error("{device}: needs {expected} queue(s), the driver enabled {got}")]
    QueueCount {
        device: &'static str,
        expected: usize,
        got: usize,
    },
    /// Creating or cloning an eventfd or the entropy source.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A virtio-blk queue count out of range.
    #[error("virtio-blk: {num_queues} queues asked for; 1 to {max} are possible")]
    BlkQueues { num_queues: u16, max: u16 },
    /// A virtio-blk serial (GET_ID string) longer than the spec allows.
    #[error("virtio-blk serial '{serial}' is {len} bytes long, at most {max} are allowed")]
    BlkSerialTooLong {
        serial: String,
        len: usize,
        max: usize,
    },
    /// Starting (or restarting, on resume) a device's worker thread.
    #[error("{device}: cannot start the worker thread: {source}")]
    SpawnWorker {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Placing the transport's BAR or capabilities.
    #[error("virtio PCI configuration space: {0}")]
    Pci(#[from] crate::pci::PciError),
}

/// How a device tells the driver about used buffers and configuration changes.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in the used ring of queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16);
    /// The device configuration changed (or the device needs a reset).
    fn signal_config_change(&self);
}

/// A queue the driver enabled, handed to the device on activation.
pub struct ActivatedQueue {
    /// The queue's index in the device's queue list.
    pub index: u16,
    /// The queue, shared with the transport (which reads its position for snapshots and
    /// resets it when the driver resets the device). Lock it while processing a batch.
    pub queue: Arc<Mutex<Queue>>,
    /// Signalled when the driver notifies this queue (a clone of the fd the VMM registers as
    /// an ioeventfd; MMIO notifications the VMM did not catch are written to it too).
    pub notify: EventFd,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (powers of two); its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits, including [`VIRTIO_F_VERSION_1_BIT`].
    fn features(&self) -> u64;
    /// The driver accepted `acked` (a subset of [`VirtioDevice::features`], with VERSION_1);
    /// called once per negotiation, when the driver sets FEATURES_OK.
    fn ack_features(&mut self, acked: u64);
    /// Length in bytes of the device-specific configuration.
    fn config_len(&self) -> u32;
    /// Reads the device configuration at `offset` (`offset + data.len() <= config_len()`).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration at `offset` (`offset + data.len() <= config_len()`).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the enabled queues (validated against `mem`), in queue order.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), VirtioError>;
    /// Stops the device: when this returns, no worker touches guest memory, the queues or the
    /// interrupt any more, and [`VirtioDevice::activate`] may be called again. Works whether
    /// the device is running or paused.
    fn reset(&mut self);
    /// Pauses an active device: when this returns, no worker touches guest memory, the queues
    /// or the interrupt, requests in flight have completed, nothing new starts and the backend
    /// is not read (frames wait in the tap). Every chain taken from a queue is in the used ring
    /// or back in the available ring, so the queues' positions can be saved. Does nothing if
    /// the device is not active or already paused.
    fn pause(&mut self);
    /// Continues a paused device exactly where it stopped (same queues, features and
    /// positions), serving at once what the driver queued meanwhile. Does nothing unless
    /// paused. Fails only if the worker cannot be started again; the device then stays
    /// stopped until a reset.
    fn resume(&mut self) -> Result<(), VirtioError>;
    /// The device's own state (features, identity; not the queues and registers, which the
    /// transport saves) with its version, for a snapshot or a migration. Only while the device
    /// is stopped (paused, or not active): [`PersistError::Running`] otherwise.
    fn save_state(&self) -> Result<SavedState, PersistError>;
    /// Puts back a state from [`VirtioDevice::save_state`] into a device built from the same
    /// configuration and not active; the transport's restore then activates it. Refuses a
    /// state that does not fit (another disk, another version).
    fn restore_state(&mut self, saved: &SavedState) -> Result<(), PersistError>;
    /// Makes everything the guest saw written durable in the backend (a disk's data and
    /// metadata), for a switch-over to another host that opens the same backend next. Called
    /// while paused; devices without a durable backend have nothing to do.
    fn flush(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// Reads again what the device read from its backend when it was built (a disk image's
    /// metadata), now that another VMM that shared the backend has stopped and flushed it: the
    /// destination of a live migration builds its devices while the source still runs. Called
    /// before the device is restored; devices that read nothing from a backend at build time
    /// have nothing to do.
    fn reload_backend(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
    /// Changes the lock the device holds on its backend (a disk image's, see
    /// [`crate::block::lock`]): the two ends of a live migration share it until one takes
    /// the VM over. Devices without a lockable backend have nothing to do.
    fn set_backend_lock(&mut self, mode: crate::block::LockMode) -> Result<(), VirtioError> {
        let _ = mode;
        Ok(())
    }
    /// What the device has done, by name (`read_bytes`, `rx_frames`...), for `vm.counters`.
    /// Counters only grow; they survive reset, pause and resume.
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::new()
    }
}

/// `acked` if it is a subset of the device's `offered` features (a restored state must not
/// turn on what this device does not offer).
pub(crate) fn acked_subset(
    device: &'static str,
    acked: u64,
    offered: u64,
) -> Result<u64, PersistError> {
    if acked & !offered != 0 {
        return Err(PersistError::mismatch(
            device,
            format!(
                "saved features {acked:#x} include {:#x}, which this device does not offer",
                acked & !offered
            ),
        ));
    }
    Ok(acked)
}

/// Locks a queue, recovering it if a thread panicked while holding it.
pub fn lock_queue(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod persist_tests {
    use super::*;
    use crate::persist::{restore_state, save_state};
    use crate::Persist;

    #[test]
    fn a_restored_device_takes_only_features_it_offers() {
        let file = std::fs::File::open("/dev/zero").unwrap();
        let mut rng = Rng::with_source(file);
        rng.ack_features(VIRTIO_F_VERSION_1_BIT);
        let saved = save_state(&rng).unwrap();
        let mut fresh = Rng::with_source(std::fs::File::open("/dev/zero").unwrap());
        restore_state(&mut fresh, &saved).unwrap();
        assert_eq!(fresh.acked_features(), VIRTIO_F_VERSION_1_BIT);
        let err = fresh
            .restore(&rng::RngState {
                acked_features: VIRTIO_F_VERSION_1_BIT | 1 << 40,
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "virtio-rng: saved features 0x10100000000 include 0x10000000000, which this device does not offer"
        );
    }
}
