//! Several virtio-blk requests in flight at once: an `io_uring` on which the worker submits
//! the reads and writes of a batch as `readv`/`writev` straight on guest memory, then reaps
//! their completions.
//!
//! Only requests an image can hand over as they are ([`crate::block::DiskImage::passthrough`]:
//! raw images, and allocated data clusters of qcow2) go on it; everything else, and every
//! request that is not a plain read or write, runs synchronously once the requests in flight
//! have completed. Where `io_uring` cannot be
//! set up (an old kernel, a seccomp filter, a limit on locked memory), [`IoRing::new`] fails
//! and the worker serves every request synchronously.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

use super::request::Request;

/// One request the kernel is working on.
pub(super) struct InFlight {
    /// Which of the worker's queues the request came from.
    pub(super) queue: usize,
    pub(super) head: u16,
    pub(super) req: Request,
    /// Where in the file.
    pub(super) offset: u64,
    /// When the device took the request from its queue.
    pub(super) started: Instant,
    /// The guest buffers, read or written by the kernel until the completion arrives; kept
    /// here so the array outlives the operation.
    iovecs: Vec<libc::iovec>,
}

impl InFlight {
    /// A read or write of `iovecs` at `offset` in the file, for request `req` (chain `head`
    /// of worker queue `queue`), taken from the queue at `started`.
    pub(super) fn new(
        queue: usize,
        head: u16,
        req: Request,
        offset: u64,
        started: Instant,
        iovecs: Vec<libc::iovec>,
    ) -> Self {
        InFlight {
            queue,
            head,
            req,
            offset,
            started,
            iovecs,
        }
    }
}

/// An `io_uring` and the requests submitted on it.
pub(super) struct IoRing {
    ring: IoUring,
    /// Signalled by the kernel for every completion: the worker watches it in its event loop.
    event: EventFd,
    /// Indexed by the `user_data` of the operation; `None` is a free slot.
    slots: Vec<Option<InFlight>>,
    /// The free slots; the others hold a request in flight.
    free: Vec<usize>,
}

// SAFETY: the raw pointers in `InFlight::iovecs` point into guest memory, which is shared with
// the guest and with other threads anyway; they are only handed to the kernel and never
// dereferenced by us. A worker (and its ring) moves between threads only between runs, when
// nothing is in flight and every slot is empty.
unsafe impl Send for IoRing {}

impl IoRing {
    /// A ring for up to `depth` requests in flight.
    pub(super) fn new(depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(depth)?;
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let depth = ring.params().sq_entries() as usize;
        Ok(IoRing {
            ring,
            event,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
        })
    }

    /// The eventfd signalled when requests complete.
    pub(super) fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Consumes the eventfd's count (the completions themselves are taken by
    /// [`IoRing::completed`]).
    pub(super) fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Requests in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request can be submitted.
    pub(super) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues `op` as a `readv` (`write == false`) or `writev` of its iovecs at its offset of
    /// `fd`. The caller guarantees that the iovecs describe guest memory that stays mapped
    /// until the completion is reaped (the worker holds the memory), and that `fd` stays open
    /// as long (the image is locked by the worker until every request is reaped). Returns the
    /// request back if there is no room.
    pub(super) fn push(&mut self, fd: RawFd, write: bool, op: InFlight) -> Result<(), Request> {
        let Some(&slot) = self.free.last() else {
            return Err(op.req);
        };
        let Ok(count) = u32::try_from(op.iovecs.len()) else {
            return Err(op.req);
        };
        let iovecs = op.iovecs.as_ptr();
        let entry = if write {
            opcode::Writev::new(types::Fd(fd), iovecs, count)
                .offset(op.offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), iovecs, count)
                .offset(op.offset)
                .build()
        }
        .user_data(slot as u64);
        if self.ring.submission().is_full() {
            // Hand what is queued to the kernel, which frees the submission queue.
            let _ = self.ring.submit();
        }
        // SAFETY: the entry points to `op.iovecs`, whose heap array is moved (not copied) with
        // `op` into the slot below and stays there until the completion for `slot` is reaped;
        // the guest memory and the file descriptor outlive the operation (see above).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(op.req);
        }
        self.free.pop();
        self.slots[slot] = Some(op);
        Ok(())
    }

    /// Submits what is queued without waiting.
    pub(super) fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::debug!("virtio-blk: io_uring submit: {e}");
        }
    }

    /// Every request completed so far, with its result (bytes transferred, or a negative
    /// errno); does not wait.
    pub(super) fn completed(&mut self) -> Vec<(InFlight, i32)> {
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let slot = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            if let Some(op) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                done.push((op, cqe.result()));
            }
        }
        done
    }

    /// Waits until at least one request completed (if any is in flight) and returns every
    /// completed one.
    pub(super) fn reap(&mut self) -> Vec<(InFlight, i32)> {
        loop {
            let done = self.completed();
            if !done.is_empty() || self.in_flight() == 0 {
                return done;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::debug!("virtio-blk: io_uring wait: {e}");
                }
            }
        }
    }
}
