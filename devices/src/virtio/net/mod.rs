//! virtio-net (virtio 1.x section 5.1) over a Linux tap interface.
//!
//! Two queues: receive (0) and transmit (1). Every frame carries the 12-byte
//! `virtio_net_hdr_v1` in front, which the tap (IFF_VNET_HDR) takes and produces as is, so
//! checksum and segmentation offloads pass between guest and host kernel without work here.
//!
//! One worker thread per device serves both queues and the tap ([`worker`]); transmit writes
//! straight from guest memory ([`tx`]), receive reads straight into the guest's buffers when
//! they can hold the largest frame and through one bounce buffer otherwise ([`rx`]).
//!
//! Pause stops the worker thread but keeps the worker: the receive chains it held go back to
//! the ring (so the queues can be saved), a frame already read from the tap waits in its
//! bounce buffer, and new frames wait in the kernel's tap queue. Resume runs the same worker
//! on a new thread. A frame in the bounce buffer is not part of a snapshot (a restored VM has
//! lost it, as if the link had dropped it).

mod iovec;
mod mac;
mod rx;
mod tap;
mod tx;
mod worker;

#[cfg(test)]
mod pause_tests;
#[cfg(test)]
mod tap_tests;
#[cfg(test)]
pub(super) mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mac::MacAddr;
pub use tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};

use super::worker_thread::{WorkerSlot, WorkerThread};
use super::{
    ActivatedQueue, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1_BIT,
    VIRTIO_RING_F_EVENT_IDX_BIT,
};
use crate::persist::{self, Persist, PersistError, SavedState};

/// The virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;

/// Length of `virtio_net_hdr_v1` (the header with `num_buffers`, used with VERSION_1).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest frame without header: a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// The largest frame with its header, as read from or written to the tap.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Feature bits (virtio 1.x section 5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `status` in the configuration: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Configuration layout: mac[6], status u16, max_virtqueue_pairs u16.
const CONFIG_LEN: usize = 10;

/// Errors of the tap backend and of network configuration values.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open tap '{name}': {source} (need CAP_NET_ADMIN and /dev/net/tun)")]
    OpenTap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tap '{name}': {what}: {source}")]
    TapIoctl {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tap name '{name}': {reason}")]
    InvalidTapName { name: String, reason: &'static str },
    #[error("invalid MAC address '{value}': {reason}")]
    InvalidMac { value: String, reason: &'static str },
}

/// What the device has done, for metrics. Bytes count frames without the virtio header.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_dropped: AtomicU64,
    rx_errors: AtomicU64,
    tx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
}

macro_rules! counter_getters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        impl NetCounters {
            $(
                #[doc = $doc]
                pub fn $name(&self) -> u64 {
                    self.$name.load(Ordering::Relaxed)
                }
            )*
        }
    };
}

counter_getters! {
    rx_bytes: "Frame bytes delivered to the guest.",
    rx_packets: "Frames delivered to the guest.",
    rx_dropped: "Frames read from the tap that the guest's buffers could not hold.",
    rx_errors: "Malformed receive buffers (read-only, outside memory, shorter than the header) and tap read errors.",
    tx_bytes: "Frame bytes the guest sent to the tap.",
    tx_packets: "Frames the guest sent to the tap.",
    tx_dropped: "Malformed transmit chains (device-writable, outside memory, too short or too long), dropped unsent.",
    tx_errors: "Frames the tap refused (write errors).",
}

impl NetCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Saved state of a [`VirtioNet`] (the queues are saved by the transport).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub acked_features: u64,
    pub mac: MacAddr,
}

/// The TUNSETOFFLOAD flags matching the guest's acked receive offloads: the kernel then hands
/// the device only frames the guest can take.
pub fn offload_flags(acked: u64) -> u32 {
    use features::*;
    if acked & GUEST_CSUM == 0 {
        // Segmentation offloads need checksum offload; the kernel refuses them alone.
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    for (feature, flag) in [
        (GUEST_TSO4, TUN_F_TSO4),
        (GUEST_TSO6, TUN_F_TSO6),
        (GUEST_ECN, TUN_F_TSO_ECN),
        (GUEST_UFO, TUN_F_UFO),
    ] {
        if acked & feature != 0 {
            flags |= flag;
        }
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) == 0 {
        flags &= !TUN_F_TSO_ECN;
    }
    flags
}

/// A virtio network card backed by a tap interface.
pub struct VirtioNet {
    tap: Arc<Tap>,
    mac: MacAddr,
    avail_features: u64,
    acked_features: u64,
    counters: Arc<NetCounters>,
    worker: Option<WorkerThread<worker::Worker>>,
}

impl VirtioNet {
    /// A card with address `mac` on `tap`.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<VirtioNet, VirtioError> {
        use features::*;
        let mut avail_features = VIRTIO_F_VERSION_1_BIT
            | VIRTIO_RING_F_EVENT_IDX_BIT
            | MAC
            | STATUS
            | MRG_RXBUF
            | CSUM
            | GUEST_CSUM
            | GUEST_TSO4
            | GUEST_TSO6
            | GUEST_ECN
            | HOST_TSO4
            | HOST_TSO6
            | HOST_ECN;
        if tap.supports_ufo() {
            avail_features |= GUEST_UFO | HOST_UFO;
        }
        Ok(VirtioNet {
            tap: Arc::new(tap),
            mac,
            avail_features,
            acked_features: 0,
            counters: Arc::default(),
            worker: None,
        })
    }

    /// The device's counters (keep the Arc before boxing the device into a transport; once
    /// boxed, [`VirtioDevice::counters`] reports them by name).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The card's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn apply_offloads(&self) {
        if let Err(e) = self.tap.set_offload(offload_flags(self.acked_features)) {
            crate::warn_limited!("virtio-net: {e}");
        }
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.bytes());
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
        self.apply_offloads();
    }

    fn config_len(&self) -> u32 {
        CONFIG_LEN as u32
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for modern drivers (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
        tracing::debug!(
            "virtio-net: ignored {}-byte config write at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), VirtioError> {
        self.worker = None;
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), None) = (it.next(), it.next(), it.next()) else {
            return Err(VirtioError::QueueCount {
                device: "virtio-net",
                expected: 2,
                got,
            });
        };
        let io = |what| move |source| VirtioError::Io { what, source };
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio-net kill eventfd"))?;
        let parts = worker::WorkerParts {
            mem,
            interrupt,
            rx,
            tx,
            tap: self.tap.clone(),
            kill: kill.try_clone().map_err(io("virtio-net kill eventfd"))?,
            counters: self.counters.clone(),
            mrg_rxbuf: self.acked_features & features::MRG_RXBUF != 0,
        };
        let worker = worker::Worker::new(parts)?;
        self.worker = Some(WorkerThread::spawn("virtio-net", kill, worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker thread stops and joins it (held receive chains go back to the
        // ring; a frame waiting in the bounce buffer is dropped).
        self.worker = None;
    }

    fn pause(&mut self) {
        self.worker.pause_worker();
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.worker.resume_worker()
    }

    fn save_state(&self) -> Result<SavedState, PersistError> {
        self.worker.save_stopped(self)
    }

    fn restore_state(&mut self, saved: &SavedState) -> Result<(), PersistError> {
        self.worker = None;
        persist::restore_state(self, saved)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("rx_bytes", c.rx_bytes()),
            ("rx_frames", c.rx_packets()),
            ("rx_drops", c.rx_dropped()),
            ("rx_errors", c.rx_errors()),
            ("tx_bytes", c.tx_bytes()),
            ("tx_frames", c.tx_packets()),
            ("tx_drops", c.tx_dropped()),
            ("tx_errors", c.tx_errors()),
        ])
    }
}

impl Persist for VirtioNet {
    const NAME: &'static str = "virtio-net";
    type State = State;

    fn save(&self) -> State {
        State {
            acked_features: self.acked_features,
            mac: self.mac,
        }
    }

    fn restore(&mut self, state: &State) -> Result<(), PersistError> {
        let acked = super::acked_subset(Self::NAME, state.acked_features, self.avail_features)?;
        self.mac = state.mac;
        self.acked_features = acked;
        self.apply_offloads();
        Ok(())
    }
}
