//! virtio-blk (block device, virtio 1.x section 5.2): request queues (one per vCPU with
//! VIRTIO_BLK_F_MQ, as QEMU gives them) served by one I/O worker thread against a
//! [`DiskImage`] (raw or qcow2).
//!
//! - [`config`]: the feature bits offered and the device configuration space.
//! - [`request`]: turning a descriptor chain (hostile guest input) into a checked [`Request`].
//! - [`worker`]: the thread that executes requests, off the vCPU threads.
//! - [`uring`]: the reads and writes the worker keeps in flight together on an io_uring.
//!
//! # I/O
//!
//! The worker is an `event-manager` subscriber on the queues' notification eventfds, a kill
//! eventfd and, with io_uring, the ring's completion eventfd (the ring's completions arrive as
//! one more event, so they fit the same loop). Each wakeup takes every available request of the
//! queues notified (up to a bound, so a reset is noticed promptly). With several queues the
//! guest submits from each vCPU on a queue of its own and takes that queue's completion
//! interrupt (its own MSI-X vector) on the same vCPU.
//!
//! Reads and writes that the image can hand over as they are ([`DiskImage::passthrough`]: raw
//! images, allocated data clusters of qcow2) go on an io_uring as `readv`/`writev` straight on
//! guest memory, so up to the queue depth are in flight together, as with QEMU's
//! `aio=io_uring`; they complete in any order (IN_ORDER is not offered), and each round of
//! completions raises at most one interrupt per queue, as EVENT_IDX allows. Every other
//! request (flush, discard, write-zeroes, GET_ID, anything that changes qcow2 metadata) is
//! served synchronously once everything submitted before it, on any queue, completed, so a
//! flush makes durable every write the driver saw complete. Where io_uring is unavailable
//! (or turned off, [`VirtioBlk::set_io_uring`]) every request is served synchronously, with
//! one interrupt per batch.
//!
//! Reset and pause (which stops the thread but keeps the worker, to run it again on resume)
//! first wait for every request in flight, so no request is ever half done. Data moves
//! between the image and guest memory without an intermediate copy: the data buffers become
//! [`vm_memory::VolatileSlice`]s of guest memory and the image's
//! [`DiskImage::read_volatile_at`] / [`DiskImage::write_volatile_at`] hand them to
//! `preadv`/`pwritev` (qcow2 cluster run by cluster run; misaligned `O_DIRECT` buffers and
//! compressed or partially written qcow2 clusters are the exceptions).
//!
//! # Save and restore
//!
//! The device has no guest-visible state of its own: the transport saves the queues and the
//! acked features, and on restore calls [`VirtioDevice::ack_features`] then
//! [`VirtioDevice::activate`], which is all this device needs. Pause the device first
//! ([`VirtioDevice::pause`]): it returns once every request in flight completed, and none
//! starts after it.

mod config;
mod request;
mod uring;
mod worker;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vmm_sys_util::eventfd::EventFd;

use super::worker_thread::{WorkerSlot, WorkerThread};
use super::{acked_subset, ActivatedQueue, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::block::{DiskImage, ImageLock, LockMode};
use crate::persist::{self, Persist, PersistError, SavedState};

pub use config::{BlkConfig, BLK_QUEUE_SIZE, SECTOR_SIZE};
pub use request::{Request, RequestType};

use worker::BlkWorker;

/// Length of the GET_ID string (virtio 1.x section 5.2.6).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The most request queues a device offers.
pub const MAX_QUEUES: u16 = 64;

/// What the device has done, for metrics.
#[derive(Debug, Default)]
pub struct BlkCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    read_ns: AtomicU64,
    write_ns: AtomicU64,
    flush_ns: AtomicU64,
}

impl BlkCounters {
    /// Bytes read from the disk into guest memory.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    /// Bytes written from guest memory to the disk.
    pub fn write_bytes(&self) -> u64 {
        self.write_bytes.load(Ordering::Relaxed)
    }

    /// Read (IN) requests completed successfully.
    pub fn read_ops(&self) -> u64 {
        self.read_ops.load(Ordering::Relaxed)
    }

    /// Write (OUT) requests completed successfully.
    pub fn write_ops(&self) -> u64 {
        self.write_ops.load(Ordering::Relaxed)
    }

    /// FLUSH requests completed successfully.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// DISCARD requests completed successfully.
    pub fn discards(&self) -> u64 {
        self.discards.load(Ordering::Relaxed)
    }

    /// WRITE_ZEROES requests completed successfully.
    pub fn write_zeroes(&self) -> u64 {
        self.write_zeroes.load(Ordering::Relaxed)
    }

    /// Requests that completed with an error status (IOERR, UNSUPP) or were dropped because
    /// the chain had no place for a status byte.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Nanoseconds the successful reads took, from the device taking each from its queue to
    /// its completion (the guest's wait, less the time it sat in the available ring).
    pub fn read_ns(&self) -> u64 {
        self.read_ns.load(Ordering::Relaxed)
    }

    /// Nanoseconds the successful writes took, as [`Self::read_ns`].
    pub fn write_ns(&self) -> u64 {
        self.write_ns.load(Ordering::Relaxed)
    }

    /// Nanoseconds the successful flushes took, as [`Self::read_ns`].
    pub fn flush_ns(&self) -> u64 {
        self.flush_ns.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds the time a successful request of `kind` took since `started` to its kind's total
    /// (reads, writes and flushes are timed; the other kinds are not).
    fn time(&self, kind: RequestType, started: std::time::Instant) {
        let counter = match kind {
            RequestType::In => &self.read_ns,
            RequestType::Out => &self.write_ns,
            RequestType::Flush => &self.flush_ns,
            _ => return,
        };
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Self::add(counter, ns);
    }
}

/// The virtio block device.
pub struct VirtioBlk {
    disk: Arc<Mutex<Box<dyn DiskImage>>>,
    /// The image's lock, changed while the worker has the image (a live migration).
    lock: Option<ImageLock>,
    config: BlkConfig,
    /// One entry per request queue.
    queue_sizes: Vec<u16>,
    id: [u8; ID_BYTES],
    acked_features: u64,
    counters: Arc<BlkCounters>,
    /// Put reads and writes in flight together on an `io_uring` where the image allows.
    io_uring: bool,
    worker: Option<WorkerThread<BlkWorker>>,
}

impl VirtioBlk {
    /// A device serving `disk` on one request queue. `serial` is the GET_ID string (at most
    /// [`ID_BYTES`] bytes); without one, the ID is derived from the identity (device and
    /// inode) of the image file, so it stays the same across runs.
    pub fn new(disk: Box<dyn DiskImage>, serial: Option<String>) -> Result<VirtioBlk, VirtioError> {
        Self::with_queues(disk, serial, 1)
    }

    /// A device with `num_queues` request queues (1 to [`MAX_QUEUES`]; more than one offers
    /// VIRTIO_BLK_F_MQ).
    pub fn with_queues(
        disk: Box<dyn DiskImage>,
        serial: Option<String>,
        num_queues: u16,
    ) -> Result<VirtioBlk, VirtioError> {
        if !(1..=MAX_QUEUES).contains(&num_queues) {
            return Err(VirtioError::BlkQueues {
                num_queues,
                max: MAX_QUEUES,
            });
        }
        let id = match serial {
            Some(serial) => {
                if serial.len() > ID_BYTES {
                    return Err(VirtioError::BlkSerialTooLong {
                        len: serial.len(),
                        serial,
                        max: ID_BYTES,
                    });
                }
                pad_id(serial.as_bytes())
            }
            None => default_id(disk.path()),
        };
        Ok(VirtioBlk {
            lock: disk.image_lock(),
            config: BlkConfig::new(disk.size(), disk.is_read_only(), num_queues),
            queue_sizes: vec![BLK_QUEUE_SIZE; usize::from(num_queues)],
            disk: Arc::new(Mutex::new(disk)),
            id,
            acked_features: 0,
            counters: Arc::default(),
            io_uring: true,
            worker: None,
        })
    }

    /// Whether reads and writes may be in flight together on an `io_uring` (the default);
    /// without, or where the kernel refuses it, each request is served synchronously. Takes
    /// effect at the next activation.
    pub fn set_io_uring(&mut self, enabled: bool) {
        self.io_uring = enabled;
    }

    /// The device's counters (keep the Arc before boxing the device into a transport; once
    /// boxed, [`VirtioDevice::counters`] reports them by name).
    pub fn counters(&self) -> Arc<BlkCounters> {
        self.counters.clone()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The GET_ID string, NUL-padded to [`ID_BYTES`].
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The disk's capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }
}

/// `id` NUL-padded to [`ID_BYTES`] (a shorter ID is NUL-terminated, one of exactly 20 bytes is
/// not, as the spec says).
/// Saved state of a [`VirtioBlk`]: the features the driver accepted and the identity of the
/// disk the guest saw, which a restore checks the new device against (the queues are saved by
/// the transport; requests in flight were completed by the pause that came before the save).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlkState {
    pub acked_features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub num_queues: u16,
    /// The GET_ID string, NUL-padded.
    pub id: Vec<u8>,
}

impl Persist for VirtioBlk {
    const NAME: &'static str = "virtio-blk";
    type State = BlkState;

    fn save(&self) -> BlkState {
        BlkState {
            acked_features: self.acked_features,
            capacity: self.config.capacity,
            read_only: self.config.read_only,
            num_queues: self.config.num_queues,
            id: self.id.to_vec(),
        }
    }

    fn restore(&mut self, state: &BlkState) -> Result<(), PersistError> {
        let disk = self
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .path()
            .display()
            .to_string();
        let differs = |what: String| PersistError::mismatch(Self::NAME, format!("{disk}: {what}"));
        let c = &self.config;
        if state.capacity != c.capacity {
            return Err(differs(format!(
                "{} sectors, the saved disk had {}",
                c.capacity, state.capacity
            )));
        }
        if state.read_only != c.read_only {
            let mode = |ro| if ro { "read-only" } else { "writable" };
            return Err(differs(format!(
                "{}, the saved disk was {}",
                mode(c.read_only),
                mode(state.read_only)
            )));
        }
        if state.num_queues != c.num_queues {
            return Err(differs(format!(
                "{} queues, the saved device had {}",
                c.num_queues, state.num_queues
            )));
        }
        if state.id[..] != self.id[..] {
            let text = |id: &[u8]| {
                String::from_utf8_lossy(id)
                    .trim_end_matches('\0')
                    .to_owned()
            };
            return Err(differs(format!(
                "serial {:?}, the saved disk's was {:?}",
                text(&self.id),
                text(&state.id)
            )));
        }
        self.acked_features = acked_subset(Self::NAME, state.acked_features, self.features())?;
        Ok(())
    }
}

fn pad_id(id: &[u8]) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    let n = id.len().min(ID_BYTES);
    out[..n].copy_from_slice(&id[..n]);
    out
}

/// An ID that names the image file: its device, special device and inode numbers in hex (so
/// two disks never share one), else the file name.
fn default_id(path: &Path) -> [u8; ID_BYTES] {
    match std::fs::metadata(path) {
        Ok(m) => pad_id(format!("{:x}{:x}{:x}", m.dev(), m.rdev(), m.ino()).as_bytes()),
        Err(_) => pad_id(
            path.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        ),
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.config.features()
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn config_len(&self) -> u32 {
        config::CONFIG_LEN as u32
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only for the driver (no VIRTIO_BLK_F_CONFIG_WCE).
        tracing::debug!(
            "virtio-blk: ignoring a {}-byte configuration write at {offset:#x}",
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
        // The driver may use fewer queues than offered (Linux: at most one per vCPU).
        let got = queues.len();
        if got == 0 || got > self.queue_sizes.len() {
            return Err(VirtioError::QueueCount {
                device: "virtio-blk",
                expected: self.queue_sizes.len(),
                got,
            });
        }
        let io = |what| move |source| VirtioError::Io { what, source };
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio-blk kill eventfd"))?;
        let worker = BlkWorker::new(
            mem,
            interrupt,
            queues,
            kill.try_clone().map_err(io("virtio-blk kill eventfd"))?,
            self.disk.clone(),
            self.config.execution(self.acked_features, self.id),
            self.counters.clone(),
            self.io_uring,
        )?;
        self.worker = Some(WorkerThread::spawn("virtio-blk", kill, worker)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker thread stops and joins it.
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

    fn flush(&mut self) -> Result<(), VirtioError> {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.flush().map_err(|e| VirtioError::Io {
            what: "virtio-blk: flush the disk",
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn reload_backend(&mut self) -> Result<(), VirtioError> {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.reload().map_err(|e| VirtioError::Io {
            what: "virtio-blk: read the disk's metadata again",
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn set_backend_lock(&mut self, mode: LockMode) -> Result<(), VirtioError> {
        match &self.lock {
            Some(lock) => lock.set(mode).map_err(|e| VirtioError::Io {
                what: "virtio-blk: lock the disk",
                source: std::io::Error::other(e.to_string()),
            }),
            None => Ok(()),
        }
    }

    fn restore_state(&mut self, saved: &SavedState) -> Result<(), PersistError> {
        self.worker = None;
        persist::restore_state(self, saved)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c = &self.counters;
        BTreeMap::from([
            ("read_bytes", c.read_bytes()),
            ("write_bytes", c.write_bytes()),
            ("read_ops", c.read_ops()),
            ("write_ops", c.write_ops()),
            ("flushes", c.flushes()),
            ("discards", c.discards()),
            ("write_zeroes", c.write_zeroes()),
            ("errors", c.errors()),
            ("read_ns", c.read_ns()),
            ("write_ns", c.write_ns()),
            ("flush_ns", c.flush_ns()),
        ])
    }
}
