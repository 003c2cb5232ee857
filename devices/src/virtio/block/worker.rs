//! The I/O thread of a virtio-blk device: drains the request queue, executes each request
//! against the disk image and completes it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use super::config::{Execution, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use super::request::{self, ParseError, Request, RequestType, Segment};
use super::{BlkCounters, ID_BYTES};
use crate::block::{BlockError, DiskImage};
use crate::virtio::worker_thread::DeviceWorker;
use crate::virtio::{lock_queue, ActivatedQueue, VirtioInterrupt};

pub(super) const TOKEN_NOTIFY: u64 = 0;
pub(super) const TOKEN_KILL: u64 = 1;

/// Requests handled per wakeup before the worker yields (and re-arms itself), so a reset is
/// noticed promptly whatever the driver queues.
pub(super) const MAX_REQUESTS_PER_WAKEUP: usize = 256;

/// Bytes of one DISCARD / WRITE_ZEROES segment: sector (le64), sectors (le32), flags (le32).
const DISCARD_SEGMENT_LEN: u64 = 16;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// How a request ended: the status byte and how many data bytes the device wrote for the
/// driver (the used length is that plus the status byte).
struct Completion {
    status: u8,
    data_written: u32,
}

impl Completion {
    fn status(status: u8) -> Self {
        Completion {
            status,
            data_written: 0,
        }
    }
}

pub(super) struct BlkWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    index: u16,
    queue: Arc<Mutex<Queue>>,
    notify: EventFd,
    kill: EventFd,
    epoll: Epoll,
    disk: Arc<Mutex<Box<dyn DiskImage>>>,
    exec: Execution,
    counters: Arc<BlkCounters>,
    /// The driver corrupted the ring; nothing more is served until a reset.
    broken: bool,
}

impl BlkWorker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queue: ActivatedQueue,
        kill: EventFd,
        epoll: Epoll,
        disk: Arc<Mutex<Box<dyn DiskImage>>>,
        exec: Execution,
        counters: Arc<BlkCounters>,
    ) -> Self {
        BlkWorker {
            mem,
            interrupt,
            index: queue.index,
            queue: queue.queue,
            notify: queue.notify,
            kill,
            epoll,
            disk,
            exec,
            counters,
            broken: false,
        }
    }
}

impl DeviceWorker for BlkWorker {
    fn run(mut self) -> Self {
        // Requests queued before activation, a snapshot or a resume are served right away.
        self.process_queue();
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk: epoll_wait: {e}");
                    return self;
                }
            };
            if events[..n].iter().any(|e| e.data() == TOKEN_KILL) {
                let _ = self.kill.read();
                return self;
            }
            // EAGAIN only means a concurrent read already consumed the count.
            let _ = self.notify.read();
            self.process_queue();
        }
    }
}

impl BlkWorker {
    /// Serves every available request (up to [`MAX_REQUESTS_PER_WAKEUP`]) and interrupts the
    /// driver once for the batch, if it wants to be.
    fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let queue = self.queue.clone();
        let mut q = lock_queue(&queue);
        let disk = self.disk.clone();
        let mut disk = disk.lock().unwrap_or_else(|e| e.into_inner());
        let mem = &self.mem;
        let mut served = 0;
        let mut error = None;
        'batches: loop {
            if let Err(e) = q.disable_notification(mem) {
                error = Some(e);
                break;
            }
            let chains: Vec<DescriptorChain<&GuestMemoryMmap>> = match q.iter(mem) {
                Ok(iter) => iter.take(MAX_REQUESTS_PER_WAKEUP - served).collect(),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            for chain in chains {
                let head = chain.head_index();
                served += 1;
                if head >= q.size() {
                    // Nothing can be returned for an index outside the ring.
                    BlkCounters::add(&self.counters.errors, 1);
                    continue;
                }
                let used_len = self.serve(chain, disk.as_mut());
                if let Err(e) = q.add_used(mem, head, used_len) {
                    error = Some(e);
                    break 'batches;
                }
            }
            if served >= MAX_REQUESTS_PER_WAKEUP {
                // Yield so a reset is noticed; the next wakeup continues where this one ended.
                let _ = self.notify.write(1);
                break;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        drop(disk);
        if let Some(e) = error {
            tracing::warn!("virtio-blk: queue {} disabled until reset: {e}", self.index);
            self.broken = true;
        }
        if served > 0 && q.needs_notification(mem).unwrap_or(true) {
            drop(q);
            self.interrupt.signal_used_queue(self.index);
        }
    }

    /// Parses, executes and completes one chain; returns the used length.
    fn serve(&self, chain: DescriptorChain<&GuestMemoryMmap>, disk: &mut dyn DiskImage) -> u32 {
        let (status_addr, done) = match request::parse(chain, &self.mem) {
            Ok(req) => (req.status, self.execute(&req, disk)),
            Err(ParseError::Malformed { status, reason }) => {
                tracing::debug!("virtio-blk: malformed request: {reason}");
                (status, Completion::status(S_IOERR))
            }
            Err(ParseError::NoStatus(reason)) => {
                tracing::debug!("virtio-blk: request dropped: {reason}");
                BlkCounters::add(&self.counters.errors, 1);
                return 0;
            }
        };
        if done.status != S_OK {
            BlkCounters::add(&self.counters.errors, 1);
        }
        if self.mem.write_obj(done.status, status_addr).is_err() {
            tracing::debug!("virtio-blk: status byte {status_addr:?} is outside guest memory");
            if done.status == S_OK {
                BlkCounters::add(&self.counters.errors, 1);
            }
            return done.data_written;
        }
        done.data_written.saturating_add(1)
    }

    fn execute(&self, req: &Request, disk: &mut dyn DiskImage) -> Completion {
        let c = &self.counters;
        match req.kind {
            RequestType::In | RequestType::Out => self.read_write(req, disk),
            RequestType::Flush => match disk.flush() {
                Ok(()) => {
                    BlkCounters::add(&c.flushes, 1);
                    Completion::status(S_OK)
                }
                Err(e) => disk_error(e),
            },
            RequestType::GetId => self.get_id(req),
            RequestType::Discard | RequestType::WriteZeroes if self.exec.read_only => {
                Completion::status(S_IOERR)
            }
            RequestType::Discard if !self.exec.discard => Completion::status(S_UNSUPP),
            RequestType::WriteZeroes if !self.exec.write_zeroes => Completion::status(S_UNSUPP),
            RequestType::Discard | RequestType::WriteZeroes => self.discard(req, disk),
            RequestType::Unsupported(kind) => {
                tracing::debug!("virtio-blk: unsupported request type {kind}");
                Completion::status(S_UNSUPP)
            }
        }
    }

    fn read_write(&self, req: &Request, disk: &mut dyn DiskImage) -> Completion {
        let write = req.kind == RequestType::Out;
        if write && self.exec.read_only {
            return Completion::status(S_IOERR);
        }
        if req.data_len & (SECTOR_SIZE - 1) != 0 {
            tracing::debug!(
                "virtio-blk: {}-byte data is not a whole number of sectors",
                req.data_len
            );
            return Completion::status(S_IOERR);
        }
        let Some(offset) = byte_offset(req.sector, req.data_len / SECTOR_SIZE, self.exec.capacity)
        else {
            tracing::debug!(
                "virtio-blk: {} bytes at sector {} are outside the {}-sector disk",
                req.data_len,
                req.sector,
                self.exec.capacity
            );
            return Completion::status(S_IOERR);
        };
        let Some(slices) = guest_slices(&self.mem, &req.data) else {
            tracing::debug!("virtio-blk: a data buffer is outside guest memory");
            return Completion::status(S_IOERR);
        };
        let c = &self.counters;
        if write {
            if let Err(e) = disk.write_volatile_at(&slices, offset) {
                return disk_error(e);
            }
            if let Some(failed) = self.write_through(disk) {
                return failed;
            }
            BlkCounters::add(&c.write_ops, 1);
            BlkCounters::add(&c.write_bytes, req.data_len);
            Completion::status(S_OK)
        } else {
            if let Err(e) = disk.read_volatile_at(&slices, offset) {
                return disk_error(e);
            }
            BlkCounters::add(&c.read_ops, 1);
            BlkCounters::add(&c.read_bytes, req.data_len);
            Completion {
                status: S_OK,
                data_written: u32::try_from(req.data_len).unwrap_or(u32::MAX),
            }
        }
    }

    /// Without a negotiated FLUSH the device is write-through: flushes after each write.
    fn write_through(&self, disk: &mut dyn DiskImage) -> Option<Completion> {
        if self.exec.writeback {
            return None;
        }
        disk.flush().err().map(disk_error)
    }

    fn get_id(&self, req: &Request) -> Completion {
        let id = &self.exec.id;
        let mut written = 0;
        for seg in &req.data {
            if written == ID_BYTES {
                break;
            }
            let n = (seg.len as usize).min(ID_BYTES - written);
            if self
                .mem
                .write_slice(&id[written..written + n], seg.addr)
                .is_err()
            {
                return Completion::status(S_IOERR);
            }
            written += n;
        }
        Completion {
            status: S_OK,
            data_written: written as u32,
        }
    }

    /// DISCARD and WRITE_ZEROES: every segment is checked before any is executed.
    fn discard(&self, req: &Request, disk: &mut dyn DiskImage) -> Completion {
        let zeroes = req.kind == RequestType::WriteZeroes;
        let count = req.data_len / DISCARD_SEGMENT_LEN;
        if req.data_len & (DISCARD_SEGMENT_LEN - 1) != 0 || count == 0 {
            return Completion::status(S_IOERR);
        }
        if count > u64::from(MAX_DISCARD_SEG) {
            return Completion::status(S_UNSUPP);
        }
        let mut raw = vec![0u8; req.data_len as usize];
        let mut at = 0;
        for seg in &req.data {
            let end = at + seg.len as usize;
            if self.mem.read_slice(&mut raw[at..end], seg.addr).is_err() {
                return Completion::status(S_IOERR);
            }
            at = end;
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for entry in raw.chunks_exact(DISCARD_SEGMENT_LEN as usize) {
            let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
            let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
            let (sector, sectors, flags) = (
                le64(&entry[0..8]),
                le32(&entry[8..12]),
                le32(&entry[12..16]),
            );
            let allowed = if zeroes {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Completion::status(S_UNSUPP);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Completion::status(S_IOERR);
            }
            let Some(offset) = byte_offset(sector, u64::from(sectors), self.exec.capacity) else {
                return Completion::status(S_IOERR);
            };
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            ranges.push((offset, u64::from(sectors) * SECTOR_SIZE, unmap));
        }
        for (offset, len, unmap) in ranges {
            let result = if zeroes {
                disk.write_zeroes(offset, len, unmap)
            } else {
                disk.discard(offset, len)
            };
            if let Err(e) = result {
                return disk_error(e);
            }
        }
        if let Some(failed) = self.write_through(disk) {
            return failed;
        }
        let counter: &AtomicU64 = if zeroes {
            &self.counters.write_zeroes
        } else {
            &self.counters.discards
        };
        BlkCounters::add(counter, 1);
        Completion::status(S_OK)
    }
}

/// The byte offset of `sectors` sectors at `sector`, if they lie within `capacity` sectors.
fn byte_offset(sector: u64, sectors: u64, capacity: u64) -> Option<u64> {
    let end = sector.checked_add(sectors)?;
    if end > capacity {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

/// The guest memory behind `data`, or `None` if any byte of it is not guest memory.
fn guest_slices<'m>(mem: &'m GuestMemoryMmap, data: &[Segment]) -> Option<Vec<VolatileSlice<'m>>> {
    let mut slices = Vec::with_capacity(data.len());
    for seg in data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            slices.push(slice.ok()?);
        }
    }
    Some(slices)
}

fn disk_error(e: BlockError) -> Completion {
    match e {
        BlockError::Io { .. } => tracing::warn!("virtio-blk: {e}"),
        _ => tracing::debug!("virtio-blk: {e}"),
    }
    Completion::status(S_IOERR)
}
