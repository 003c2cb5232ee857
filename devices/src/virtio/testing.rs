//! Test helpers: a split virtqueue laid out by hand in guest memory, as a driver would, and a
//! recording interrupt.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::VirtioInterrupt;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A split virtqueue: descriptor table at `base`, available ring at `base + 0x1000`, used ring
/// at `base + 0x2000` (room for 256 entries each).
pub struct TestRing {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
}

impl TestRing {
    pub fn new(base: u64, size: u16) -> Self {
        TestRing {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_desc: 0,
        }
    }

    /// Writes descriptor `index` as is.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Makes head `head` available.
    pub fn push_avail(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Sets avail->idx directly (hostile drivers).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a chain of `(addr, len, flags)` descriptors (NEXT is added between them) and makes
    /// it available; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let flags = if i + 1 < descs.len() {
                flags | VRING_DESC_F_NEXT
            } else {
                flags
            };
            self.write_desc(mem, index, addr, len, flags, next);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.push_avail(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// `(id, len)` of used ring entry `i`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Sets used_event (EVENT_IDX): interrupt when the used index passes `v`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    /// Waits until the used index is exactly `idx`.
    pub fn wait_used(&self, mem: &GuestMemoryMmap, idx: u16) -> bool {
        self.wait_used_until(mem, |used| used == idx)
    }

    /// Waits until the device has returned at least `n` chains (it may have returned more by
    /// the time this looks: a worker in the middle of a batch does not wait for the poll).
    pub fn wait_used_at_least(&self, mem: &GuestMemoryMmap, n: u16) -> bool {
        self.wait_used_until(mem, |used| used >= n)
    }

    fn wait_used_until(&self, mem: &GuestMemoryMmap, done: impl Fn(u16) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if done(self.used_idx(mem)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// Counts `signal_used_queue` calls (all queues, and per queue) and config changes.
#[derive(Default)]
pub struct CountingInterrupt {
    pub used: AtomicU64,
    pub config: AtomicU64,
    /// `signal_used_queue` calls by queue index; its lock is also the one `cond` waits with.
    by_queue: Mutex<BTreeMap<u16, u64>>,
    cond: Condvar,
}

impl CountingInterrupt {
    /// `signal_used_queue` calls so far, by queue index.
    pub fn by_queue(&self) -> BTreeMap<u16, u64> {
        self.by_queue.lock().unwrap().clone()
    }

    pub fn wait_used(&self, count: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut guard = self.by_queue.lock().unwrap();
        while self.used.load(Ordering::SeqCst) < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self.cond.wait_timeout(guard, left).unwrap().0;
        }
        true
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal_used_queue(&self, queue_index: u16) {
        let mut by_queue = self.by_queue.lock().unwrap();
        *by_queue.entry(queue_index).or_default() += 1;
        self.used.fetch_add(1, Ordering::SeqCst);
        self.cond.notify_all();
    }

    fn signal_config_change(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}
