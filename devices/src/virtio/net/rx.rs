//! Receive: frames from the tap into the guest's device-writable buffers.
//!
//! The worker holds descriptor chains it took from the ring until a frame fills them. When the
//! held chains can take the largest frame, the frame is read with one `readv` straight into
//! guest memory; otherwise it goes through one bounce buffer and is copied once it fits. With
//! MRG_RXBUF a frame spreads over as many chains as needed (`num_buffers` says how many);
//! without it, one chain holds the whole frame or the frame is dropped. A frame that does not
//! fit yet waits in the bounce buffer, and the tap is not read until the driver adds buffers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::iovec::{GuestIoVecs, PushError, MAX_IOVS};
use super::{NetCounters, Tap, MAX_PACKET_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};

/// Frames received per wakeup at most (the tap's readiness brings the worker back).
pub const MAX_RX_PER_WAKEUP: usize = 256;

/// A chain taken from the ring, its buffers being the next `segs` segments of the list.
#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    segs: usize,
    cap: usize,
}

/// What a receive pass did.
#[derive(Debug, Default)]
pub struct RxOutcome {
    /// Chains went to the used ring.
    pub used: bool,
    /// The guest's buffers ran out: stop reading the tap until the driver adds some.
    pub stalled: bool,
    /// Reading the tap failed (e.g. the interface was deleted): stop watching it.
    pub tap_failed: bool,
}

/// The receive side's state across wakeups.
pub struct RxState {
    mem: GuestMemoryMmap,
    iovs: GuestIoVecs,
    chains: VecDeque<RxChain>,
    /// Total capacity of `chains`.
    cap: usize,
    bounce: Vec<u8>,
    /// Length of a frame waiting in `bounce` for buffers (0: none).
    pending: usize,
    mrg_rxbuf: bool,
}

impl RxState {
    pub fn new(mem: GuestMemoryMmap, mrg_rxbuf: bool) -> Self {
        RxState {
            iovs: GuestIoVecs::new(mem.clone()),
            mem,
            chains: VecDeque::with_capacity(256),
            cap: 0,
            bounce: vec![0; MAX_PACKET_LEN],
            pending: 0,
            mrg_rxbuf,
        }
    }

    /// Forgets the chains taken from the ring and not used yet, for the worker to give them
    /// back to the ring (it stops); returns how many there were. A frame waiting in the bounce
    /// buffer stays, for when the worker runs again.
    pub fn release_chains(&mut self) -> usize {
        let held = self.chains.len();
        self.chains.clear();
        self.iovs.clear();
        self.cap = 0;
        held
    }

    /// Takes available chains until the held ones can hold `want` bytes (one chain without
    /// MRG_RXBUF). Malformed chains are completed empty and counted.
    fn refill(
        &mut self,
        q: &mut Queue,
        want: usize,
        counters: &NetCounters,
        used: &mut bool,
    ) -> Result<(), virtio_queue::Error> {
        while self.cap < want && (self.mrg_rxbuf || self.chains.is_empty()) {
            let Some(chain) = q.iter(&self.mem)?.next() else {
                return Ok(());
            };
            let head = chain.head_index();
            if head >= q.size() {
                NetCounters::add(&counters.rx_errors, 1);
                continue;
            }
            let start = self.iovs.len();
            let mut cap = 0usize;
            let mut bad = false;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                match self.iovs.push(desc.addr(), desc.len()) {
                    Ok(()) => cap += desc.len() as usize,
                    Err(PushError::Full) if start > 0 => {
                        // No room beside the held chains: take this one again later.
                        self.iovs.truncate(start);
                        q.go_to_previous_position();
                        return Ok(());
                    }
                    Err(_) => {
                        bad = true;
                        break;
                    }
                }
            }
            if bad || cap < VNET_HDR_LEN {
                self.iovs.truncate(start);
                NetCounters::add(&counters.rx_errors, 1);
                q.add_used(&self.mem, head, 0)?;
                *used = true;
                continue;
            }
            self.chains.push_back(RxChain {
                head,
                segs: self.iovs.len() - start,
                cap,
            });
            self.cap += cap;
            if self.iovs.len() >= MAX_IOVS {
                return Ok(());
            }
        }
        Ok(())
    }

    /// How many held chains a frame of `len` bytes needs, if they suffice.
    fn chains_for(&self, len: usize) -> Option<usize> {
        let mut sum = 0;
        for (i, c) in self.chains.iter().enumerate() {
            sum += c.cap;
            if sum >= len {
                return Some(i + 1);
            }
        }
        None
    }

    fn segs_of(&self, k: usize) -> usize {
        self.chains.iter().take(k).map(|c| c.segs).sum()
    }

    /// Puts the first `k` held chains, now holding a `len`-byte frame, in the used ring.
    fn complete(
        &mut self,
        q: &mut Queue,
        k: usize,
        len: usize,
        counters: &NetCounters,
    ) -> Result<(), virtio_queue::Error> {
        let mut left = len;
        let mut segs = 0;
        for c in self.chains.drain(..k) {
            let n = left.min(c.cap);
            left -= n;
            segs += c.segs;
            self.cap -= c.cap;
            q.add_used(&self.mem, c.head, n as u32)?;
        }
        self.iovs.mark_front_dirty(segs);
        self.iovs.drain_front(segs);
        NetCounters::add(&counters.rx_packets, 1);
        NetCounters::add(&counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(())
    }

    /// Receives frames from `tap` into the ring (at most [`MAX_RX_PER_WAKEUP`]).
    pub fn process(
        &mut self,
        q: &mut Queue,
        tap: &Tap,
        counters: &NetCounters,
    ) -> Result<RxOutcome, virtio_queue::Error> {
        let mut out = RxOutcome::default();
        for _ in 0..MAX_RX_PER_WAKEUP {
            if self.pending == 0 {
                self.refill(q, MAX_PACKET_LEN, counters, &mut out.used)?;
                if self.chains.is_empty() {
                    out.stalled = true;
                    break;
                }
                if self.cap >= MAX_PACKET_LEN {
                    // The held buffers take any frame: read straight into guest memory.
                    match self.iovs.readv(tap.as_raw_fd(), 0..self.iovs.len()) {
                        Ok(n) => self.deliver_direct(q, n, counters, &mut out)?,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            out.tap_failed = read_failed(e, counters);
                            break;
                        }
                    }
                    continue;
                }
                match tap.read_frame(&mut self.bounce) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        NetCounters::add(&counters.rx_dropped, 1);
                        continue;
                    }
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        out.tap_failed = read_failed(e, counters);
                        break;
                    }
                }
            }
            if !self.deliver_pending(q, counters, &mut out)? {
                out.stalled = true;
                break;
            }
        }
        Ok(out)
    }

    /// A frame of `n` bytes was read into the held chains.
    fn deliver_direct(
        &mut self,
        q: &mut Queue,
        n: usize,
        counters: &NetCounters,
        out: &mut RxOutcome,
    ) -> Result<(), virtio_queue::Error> {
        // Shorter than a header, or longer than the buffers (truncated by the kernel).
        let Some(k) = self.chains_for(n).filter(|_| n >= VNET_HDR_LEN) else {
            NetCounters::add(&counters.rx_dropped, 1);
            return Ok(());
        };
        let num_buffers = (k as u16).to_le_bytes();
        let first = self.chains[0].segs;
        self.iovs
            .write_at(0..first, NUM_BUFFERS_OFFSET, &num_buffers);
        self.complete(q, k, n, counters)?;
        out.used = true;
        Ok(())
    }

    /// Copies the frame waiting in the bounce buffer to the guest if its buffers can take it;
    /// returns false when it must wait for more buffers.
    fn deliver_pending(
        &mut self,
        q: &mut Queue,
        counters: &NetCounters,
        out: &mut RxOutcome,
    ) -> Result<bool, virtio_queue::Error> {
        let len = self.pending;
        self.refill(q, len, counters, &mut out.used)?;
        let Some(k) = self.chains_for(len) else {
            let never = (!self.mrg_rxbuf && !self.chains.is_empty()) || self.iovs.len() >= MAX_IOVS;
            if never {
                // Without MRG_RXBUF one chain must hold the frame; this one cannot.
                NetCounters::add(&counters.rx_dropped, 1);
                self.pending = 0;
                return Ok(true);
            }
            return Ok(false);
        };
        self.bounce[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&(k as u16).to_le_bytes());
        let segs = self.segs_of(k);
        if self.iovs.write_at(0..segs, 0, &self.bounce[..len]) < len {
            // Guest memory went away under the chain (cannot happen with fixed memory).
            NetCounters::add(&counters.rx_errors, 1);
        }
        self.complete(q, k, len, counters)?;
        self.pending = 0;
        out.used = true;
        Ok(true)
    }
}

/// Counts a failed tap read; returns whether the tap is unusable (rather than interrupted).
fn read_failed(e: io::Error, counters: &NetCounters) -> bool {
    if e.kind() == io::ErrorKind::Interrupted {
        return false;
    }
    crate::warn_limited!("virtio-net: tap read failed, receive stopped until reset: {e}");
    NetCounters::add(&counters.rx_errors, 1);
    true
}
