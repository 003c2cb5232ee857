//! The I/O thread of a virtio-blk device: drains the request queues, executes each request
//! against the disk image (synchronously, or several at once on an io_uring, see `uring`) and
//! completes it.
//!
//! One thread serves all of a device's queues with one ring: a request that must run alone
//! (a flush, anything that changes qcow2 metadata) waits for every request in flight, on any
//! queue, as it would with a single queue. Completions are put in their own queue's used ring,
//! and each queue's driver is interrupted at most once per wakeup, on that queue's vector.

use std::cell::Cell;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::config::{
    Execution, BLK_QUEUE_SIZE, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use super::request::{self, ParseError, Request, RequestType, Segment};
use super::uring::{InFlight, IoRing};
use super::{BlkCounters, ID_BYTES};
use crate::block::{BlockError, DiskImage};
use crate::virtio::drain::{drain_queue, ChainServer};
use crate::virtio::worker_thread::DeviceWorker;
use crate::virtio::{lock_queue, ActivatedQueue, VirtioError, VirtioInterrupt};

const TOKEN_KILL: u32 = 0;
/// The io_uring completion eventfd.
const TOKEN_RING: u32 = 1;
/// Queue `i` of the worker's list notifies with token `TOKEN_QUEUE + i`.
const TOKEN_QUEUE: u32 = 2;

/// Requests handled per queue and wakeup before the worker yields (and re-arms itself), so a
/// reset is noticed promptly whatever the driver queues.
pub(super) const MAX_REQUESTS_PER_WAKEUP: usize = 256;
/// Bytes of reads and writes one wakeup serves or submits before it looks for a pause or
/// reset again (the rest is served on the next wakeup): a guest cannot make the worker,
/// and a vCPU resetting the device, wait behind gigabytes.
pub(super) const WAKEUP_BYTES: u64 = 64 << 20;
/// Bytes of reads and writes in flight on the ring at most; a queue that would put more
/// waits for completions (a pause or reset waits for what is in flight).
pub(super) const IN_FLIGHT_BYTES: u64 = 128 << 20;

/// The most requests in flight on the ring: a full queue's worth per queue, up to this. More
/// go through the synchronous path.
const MAX_RING_DEPTH: u32 = 4096;

/// Most guest buffers one request may put on the ring (Linux's `IOV_MAX`); more go through
/// the synchronous path, which splits them.
const MAX_RING_IOVECS: usize = 1024;

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

/// A request the ring finished, its status written, waiting to go into its queue's used ring.
struct Done {
    queue: usize,
    head: u16,
    used_len: u32,
}

/// One of the device's queues, as the worker serves it.
struct WorkerQueue {
    /// The queue's index in the device (its interrupt vector follows from it).
    index: u16,
    queue: Arc<Mutex<Queue>>,
    notify: EventFd,
    /// The driver corrupted the ring; nothing more is served from it until a reset.
    broken: bool,
    /// Chains put in the used ring since the driver was last considered for an interrupt.
    used: usize,
    /// Serving stopped at [`IN_FLIGHT_BYTES`]: it goes on once completions free room.
    throttled: bool,
}

pub(super) struct BlkWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<WorkerQueue>,
    kill: EventFd,
    /// The kill eventfd fired (or the worker could not watch its eventfds).
    finished: bool,
    disk: Arc<Mutex<Box<dyn DiskImage>>>,
    exec: Execution,
    counters: Arc<BlkCounters>,
    /// Reads and writes in flight together; `None` serves every request synchronously.
    ring: Option<IoRing>,
    /// Bytes of the requests in flight on the ring.
    in_flight: Cell<u64>,
}

impl BlkWorker {
    /// A worker for `queues` (the ones the driver enabled, at least one); `kill` ends its runs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        kill: EventFd,
        disk: Arc<Mutex<Box<dyn DiskImage>>>,
        exec: Execution,
        counters: Arc<BlkCounters>,
        io_uring: bool,
    ) -> Result<Self, VirtioError> {
        let ring = if io_uring {
            let depth = (u32::from(BLK_QUEUE_SIZE) * queues.len() as u32).min(MAX_RING_DEPTH);
            match IoRing::new(depth) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    tracing::info!("virtio-blk: io_uring unavailable ({e}): synchronous I/O");
                    None
                }
            }
        } else {
            None
        };
        let queues = queues
            .into_iter()
            .map(|q| WorkerQueue {
                index: q.index,
                queue: q.queue,
                notify: q.notify,
                broken: false,
                used: 0,
                throttled: false,
            })
            .collect();
        Ok(BlkWorker {
            mem,
            interrupt,
            queues,
            kill,
            finished: false,
            disk,
            exec,
            counters,
            ring,
            in_flight: Cell::new(0),
        })
    }
}

impl MutEventSubscriber for BlkWorker {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch =
            |fd: RawFd, token: u32| ops.add(Events::with_data_raw(fd, token, EventSet::IN));
        let mut result = watch(self.kill.as_raw_fd(), TOKEN_KILL);
        for (i, q) in self.queues.iter().enumerate() {
            result = result.and_then(|()| watch(q.notify.as_raw_fd(), TOKEN_QUEUE + i as u32));
        }
        if let Some(ring) = &self.ring {
            result = result.and_then(|()| watch(ring.event_fd(), TOKEN_RING));
        }
        if let Err(e) = result {
            tracing::error!("virtio-blk: cannot watch its eventfds: {e:?}");
            self.finished = true;
            return;
        }
        // Requests queued before activation, a snapshot or a resume are served right away.
        for i in 0..self.queues.len() {
            self.serve_queue(i);
        }
        self.interrupt_drivers();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_KILL => {
                let _ = self.kill.read();
                self.finished = true;
            }
            // A pause or reset came in this wakeup: serve nothing more.
            _ if self.finished => {}
            TOKEN_RING => self.complete_finished(),
            token => {
                let i = (token - TOKEN_QUEUE) as usize;
                if let Some(wq) = self.queues.get(i) {
                    // EAGAIN only means a concurrent read already consumed the count.
                    let _ = wq.notify.read();
                    self.serve_queue(i);
                }
            }
        }
    }
}

impl DeviceWorker for BlkWorker {
    fn finished(&self) -> bool {
        self.finished
    }

    /// One interrupt per queue for everything a wakeup completed.
    fn end_of_wakeup(&mut self) {
        self.interrupt_drivers();
    }

    fn hand_back(&mut self) {
        // Paused or reset: nothing may stay in flight.
        self.finish_in_flight();
        for wq in &mut self.queues {
            wq.throttled = false;
        }
        self.finished = false;
    }
}

impl BlkWorker {
    /// Serves every available request of queue `i` (up to [`MAX_REQUESTS_PER_WAKEUP`]):
    /// synchronous ones at once, the others put on the ring; completes what the ring finished.
    /// Requests may stay in flight until the ring's eventfd wakes the worker again (or a pause
    /// or reset drains them).
    fn serve_queue(&mut self, i: usize) {
        if self.queues[i].broken {
            return;
        }
        let queue = self.queues[i].queue.clone();
        let mut q = lock_queue(&queue);
        let disk = self.disk.clone();
        let mut disk = disk.lock().unwrap_or_else(|e| e.into_inner());
        let mut ring = self.ring.take();
        let mut server = Server {
            worker: self,
            queue: i,
            disk: disk.as_mut(),
            ring: ring.as_mut(),
            done: Vec::new(),
            used: 0,
            bytes: 0,
        };
        let pass = drain_queue(&mut q, &self.mem, MAX_REQUESTS_PER_WAKEUP, &mut server);
        let (done, used) = (server.done, server.used);
        self.ring = ring;
        drop(disk);
        drop(q);
        let wq = &mut self.queues[i];
        wq.used += used;
        if pass.more && self.in_flight.get() >= IN_FLIGHT_BYTES {
            // Completions wake the worker; the queue goes on from there.
            wq.throttled = true;
        } else if pass.more {
            let _ = wq.notify.write(1);
        }
        if let Some(e) = pass.error {
            crate::warn_limited!("virtio-blk: queue {} disabled until reset: {e}", wq.index);
            wq.broken = true;
        }
        self.publish(done);
    }

    /// Completes what the ring finished, without waiting.
    fn complete_finished(&mut self) {
        let Some(ring) = &mut self.ring else {
            return;
        };
        ring.clear_event();
        let finished = ring.completed();
        if finished.is_empty() {
            return;
        }
        let disk = self.disk.clone();
        let mut disk = disk.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = Vec::new();
        self.complete(finished, disk.as_mut(), &mut done);
        drop(disk);
        self.publish(done);
        if self.in_flight.get() < IN_FLIGHT_BYTES {
            for i in 0..self.queues.len() {
                if std::mem::take(&mut self.queues[i].throttled) {
                    self.serve_queue(i);
                }
            }
        }
    }

    /// Puts finished requests in their queues' used rings.
    fn publish(&mut self, done: Vec<Done>) {
        if done.is_empty() {
            return;
        }
        for (i, wq) in self.queues.iter_mut().enumerate() {
            let mut mine = done.iter().filter(|d| d.queue == i).peekable();
            if wq.broken || mine.peek().is_none() {
                continue;
            }
            let mut q = lock_queue(&wq.queue);
            for d in mine {
                if let Err(e) = q.add_used(&self.mem, d.head, d.used_len) {
                    crate::warn_limited!(
                        "virtio-blk: queue {} disabled until reset: {e}",
                        wq.index
                    );
                    wq.broken = true;
                    break;
                }
                wq.used += 1;
            }
        }
    }

    /// Interrupts the driver of each queue that got used buffers, if it wants to be.
    fn interrupt_drivers(&mut self) {
        for wq in &mut self.queues {
            if std::mem::take(&mut wq.used) == 0 {
                continue;
            }
            let wants = lock_queue(&wq.queue)
                .needs_notification(&self.mem)
                .unwrap_or(true);
            if wants {
                self.interrupt.signal_used_queue(wq.index);
            }
        }
    }

    /// Puts a read or write on the ring when the image takes it as it is; gives the request
    /// back otherwise (to be served synchronously).
    fn submit(
        &self,
        ring: &mut IoRing,
        queue: usize,
        head: u16,
        req: Request,
        started: Instant,
        disk: &mut dyn DiskImage,
    ) -> Result<(), Request> {
        let write = match req.kind {
            RequestType::In => false,
            // Write-through devices flush after each write: synchronous.
            RequestType::Out if self.exec.writeback && !self.exec.read_only => true,
            _ => return Err(req),
        };
        if !ring.has_room() || req.data_len & (SECTOR_SIZE - 1) != 0 || req.data_len == 0 {
            return Err(req);
        }
        let Some(offset) = byte_offset(req.sector, req.data_len / SECTOR_SIZE, self.exec.capacity)
        else {
            return Err(req);
        };
        let Some(slices) = guest_slices(&self.mem, &req.data) else {
            return Err(req);
        };
        if slices.len() > MAX_RING_IOVECS || !within_limits(&req) {
            return Err(req);
        }
        let Some((fd, file_offset)) = disk.passthrough(&slices, offset, write) else {
            return Err(req);
        };
        let iovecs = slices
            .iter()
            .map(|s| libc::iovec {
                // Only the address is taken; `self.mem` keeps the mapping alive until the
                // completion is reaped (the worker drains before it returns).
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        let len = req.data_len;
        ring.push(
            fd,
            write,
            InFlight::new(queue, head, req, file_offset, started, iovecs),
        )?;
        self.in_flight.set(self.in_flight.get() + len);
        Ok(())
    }

    /// Waits for every request in flight, completes them and interrupts the drivers that want
    /// it: the worker then has nothing in flight.
    fn finish_in_flight(&mut self) {
        let Some(mut ring) = self.ring.take() else {
            return;
        };
        if ring.in_flight() > 0 {
            let disk = self.disk.clone();
            let mut disk = disk.lock().unwrap_or_else(|e| e.into_inner());
            let mut done = Vec::new();
            self.drain(&mut ring, disk.as_mut(), &mut done);
            drop(disk);
            self.publish(done);
            self.interrupt_drivers();
        }
        self.ring = Some(ring);
    }

    /// Waits for every request in flight and completes each (its status written; its used
    /// ring entry added to `done`).
    fn drain(&self, ring: &mut IoRing, disk: &mut dyn DiskImage, done: &mut Vec<Done>) {
        while ring.in_flight() > 0 {
            let finished = ring.reap();
            self.complete(finished, disk, done);
        }
    }

    /// Completes requests the ring finished: writes each status and adds its used ring entry
    /// to `done`.
    fn complete(
        &self,
        finished: Vec<(InFlight, i32)>,
        disk: &mut dyn DiskImage,
        done: &mut Vec<Done>,
    ) {
        for (op, result) in finished {
            self.in_flight
                .set(self.in_flight.get().saturating_sub(op.req.data_len));
            let used_len = self.complete_async(op.req, op.offset, op.started, result, disk);
            done.push(Done {
                queue: op.queue,
                head: op.head,
                used_len,
            });
        }
    }

    /// Completes a request the ring finished with `result` (bytes or a negative errno); a
    /// short transfer is done again synchronously, which finishes it or reports why not.
    fn complete_async(
        &self,
        req: Request,
        offset: u64,
        started: Instant,
        result: i32,
        disk: &mut dyn DiskImage,
    ) -> u32 {
        let status = req.status;
        mark_data_dirty(&self.mem, &req);
        let done = match u64::try_from(result) {
            Ok(n) if n == req.data_len => {
                let c = &self.counters;
                if req.kind == RequestType::Out {
                    BlkCounters::add(&c.write_ops, 1);
                    BlkCounters::add(&c.write_bytes, req.data_len);
                    Completion::status(S_OK)
                } else {
                    BlkCounters::add(&c.read_ops, 1);
                    BlkCounters::add(&c.read_bytes, req.data_len);
                    Completion {
                        status: S_OK,
                        data_written: u32::try_from(req.data_len).unwrap_or(u32::MAX),
                    }
                }
            }
            Ok(_) => self.read_write(&req, disk),
            Err(_) => {
                let e = std::io::Error::from_raw_os_error(-result);
                match e.kind() {
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => {
                        self.read_write(&req, disk)
                    }
                    _ => {
                        crate::warn_limited!(
                            "virtio-blk: {} of {} bytes at {offset}: {e}",
                            if req.kind == RequestType::Out {
                                "write"
                            } else {
                                "read"
                            },
                            req.data_len
                        );
                        Completion::status(S_IOERR)
                    }
                }
            }
        };
        if done.status == S_OK {
            self.counters.time(req.kind, started);
        }
        self.write_status(status, done)
    }

    /// Executes a parsed (or unparsable) request, taken from its queue at `started`, and
    /// completes it; returns the used length.
    fn finish(
        &self,
        parsed: Result<Request, ParseError>,
        started: Instant,
        disk: &mut dyn DiskImage,
    ) -> u32 {
        let (status_addr, done) = match parsed {
            Ok(req) => {
                let done = self.execute(&req, disk);
                if done.status == S_OK {
                    self.counters.time(req.kind, started);
                }
                mark_data_dirty(&self.mem, &req);
                (req.status, done)
            }
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
        self.write_status(status_addr, done)
    }

    /// Writes the status byte of a finished request; returns the used length.
    fn write_status(&self, status_addr: GuestAddress, done: Completion) -> u32 {
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
        if !within_limits(req) {
            tracing::debug!(
                "virtio-blk: {} data segments, {} bytes: past seg_max or size_max",
                req.data.len(),
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

/// Serves one wakeup's requests of one queue for [`BlkWorker::serve_queue`]: reads and writes
/// the image takes as they are go on the ring, the rest are executed at once.
struct Server<'a> {
    worker: &'a BlkWorker,
    /// The queue served, in the worker's list.
    queue: usize,
    disk: &'a mut dyn DiskImage,
    ring: Option<&'a mut IoRing>,
    /// Requests the ring finished (of any queue), for [`BlkWorker::publish`].
    done: Vec<Done>,
    /// Requests of this queue completed in its used ring.
    used: usize,
    /// Bytes of the requests taken this wakeup.
    bytes: u64,
}

impl ChainServer for Server<'_> {
    fn serve(
        &mut self,
        q: &mut Queue,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), virtio_queue::Error> {
        let head = chain.head_index();
        let started = Instant::now();
        let worker = self.worker;
        let parsed = request::parse(chain, &worker.mem);
        if let Ok(req) = &parsed {
            self.bytes += req.data_len;
        }
        let parsed = match (self.ring.as_deref_mut(), parsed) {
            (Some(r), Ok(req)) => match worker.submit(r, self.queue, head, req, started, self.disk)
            {
                Ok(()) => return Ok(()),
                Err(req) => Ok(req),
            },
            (_, parsed) => parsed,
        };
        // Synchronous: after everything submitted before it, on any queue, has completed.
        if let Some(r) = self.ring.as_deref_mut() {
            worker.drain(r, self.disk, &mut self.done);
        }
        let used_len = worker.finish(parsed, started, self.disk);
        q.add_used(&worker.mem, head, used_len)?;
        self.used += 1;
        Ok(())
    }

    fn bad_head(&mut self) {
        BlkCounters::add(&self.worker.counters.errors, 1);
    }

    fn spent(&self) -> bool {
        self.bytes >= WAKEUP_BYTES || self.worker.in_flight.get() >= IN_FLIGHT_BYTES
    }

    fn end_batch(&mut self, _q: &mut Queue) -> Result<(), virtio_queue::Error> {
        if let Some(r) = self.ring.as_deref_mut() {
            // The batch goes to the kernel; what already finished is completed now, the rest
            // when the ring's eventfd wakes the worker.
            r.submit();
            let finished = r.completed();
            self.worker.complete(finished, self.disk, &mut self.done);
        }
        Ok(())
    }
}

/// Whether a read or write keeps to the limits the device offered: at most `seg_max` data
/// segments of at most `size_max` bytes each.
fn within_limits(req: &Request) -> bool {
    req.data.len() <= SEG_MAX as usize && req.data.iter().all(|s| s.len <= SIZE_MAX)
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
///
/// The slices carry no dirty bitmap (the disk layer takes plain ones): what a read writes into
/// them is marked with [`mark_data_dirty`] when the request completes.
fn guest_slices<'m>(mem: &'m GuestMemoryMmap, data: &[Segment]) -> Option<Vec<VolatileSlice<'m>>> {
    let mut slices = Vec::with_capacity(data.len());
    for seg in data {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.ok()?;
            // SAFETY: the pointer and length are those of a slice of guest memory that `mem`
            // keeps mapped for 'm; the new slice covers exactly the same bytes.
            slices.push(unsafe { VolatileSlice::new(slice.ptr_guard_mut().as_ptr(), slice.len()) });
        }
    }
    Some(slices)
}

/// Marks the data buffers of a request that wrote into guest memory (IN, GET_ID) dirty, once
/// it has completed (see [`crate::mark_dirty`]).
fn mark_data_dirty(mem: &GuestMemoryMmap, req: &Request) {
    if req.kind.device_writes() {
        for seg in &req.data {
            crate::mark_dirty(mem, seg.addr, seg.len as usize);
        }
    }
}

fn disk_error(e: BlockError) -> Completion {
    match e {
        BlockError::Io { .. } => crate::warn_limited!("virtio-blk: {e}"),
        _ => tracing::debug!("virtio-blk: {e}"),
    }
    Completion::status(S_IOERR)
}
