//! podvisor's emulated devices.
//!
//! Every device is a small type that implements [`BusDevice`] and, so that snapshots and live
//! migration can carry it, [`Persist`]. The VM owns the devices and places them on a [`Bus`] (one
//! for port I/O, one for MMIO); a device never calls back into the VMM, it reports through the
//! event file descriptors it was given.

pub mod block;
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod ratelimit;
pub mod seccomp;
pub mod virtio;

#[doc(hidden)]
pub use tracing;

pub use bus::{Bus, BusDevice, BusError};
pub use persist::{Persist, PersistError, SavedState};

/// Guest memory as every device and the VMM see it, with a dirty-page bitmap per region: every
/// write the VMM makes through it (`Bytes`, `VolatileSlice` copies) marks its pages, so live
/// migration can send again what devices wrote. Writes through raw pointers (`readv`,
/// `preadv`, io_uring into guest buffers) are marked with [`mark_dirty`] when they complete.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

/// Marks `[addr, addr + len)` written in the dirty bitmaps of `mem` (the part of it that is
/// guest memory: a device only marks what it has written, which was guest memory).
pub fn mark_dirty(mem: &GuestMemoryMmap, addr: vm_memory::GuestAddress, len: usize) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut at = addr;
    let mut left = len;
    while left > 0 {
        let Some((region, offset)) = mem.to_region_addr(at) else {
            return;
        };
        let n = left.min((region.len() - offset.0) as usize);
        region.bitmap().mark_dirty(offset.0 as usize, n);
        left -= n;
        at = vm_memory::GuestAddress(at.0.wrapping_add(n as u64));
    }
}

/// Stack size of the VMM's threads (vCPUs, device workers, the VMM loop, console input,
/// payload readers). Only pages a thread touches are resident, so the size is headroom; it
/// is kept under 2 MiB because a 2 MiB stack mapping that happens to be 2 MiB-aligned gets a
/// whole transparent huge page on its first touch where the host sets THP `enabled=always`
/// (measured: 2 MiB of one podvisor's 4.7 MiB overhead came from one such stack).
pub const THREAD_STACK_SIZE: usize = 1 << 20;

/// The guest addresses of the pages marked dirty in `mem` (see [`mark_dirty`]); the marks are
/// cleared.
#[cfg(test)]
pub(crate) fn take_dirty_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut pages = Vec::new();
    for region in mem.iter() {
        let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (w, word) in words.iter().enumerate() {
            for bit in 0..64 {
                if word & (1 << bit) != 0 {
                    pages.push(region.start_addr().0 + ((w * 64 + bit) as u64) * 4096);
                }
            }
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn marks_cover_every_page_touched_across_regions() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10000), 0x4000),
        ])
        .unwrap();
        // From the last page of the first region on: the hole between them is skipped.
        mark_dirty(&mem, GuestAddress(0x3ff0), 0x20);
        assert_eq!(take_dirty_pages(&mem), vec![0x3000]);
        mark_dirty(&mem, GuestAddress(0x10ff0), 0x1020);
        assert_eq!(take_dirty_pages(&mem), vec![0x10000, 0x11000, 0x12000]);
        assert!(take_dirty_pages(&mem).is_empty(), "taking clears");
        // Outside guest memory: nothing to mark, and no panic.
        mark_dirty(&mem, GuestAddress(0x8000), 0x100);
        assert!(take_dirty_pages(&mem).is_empty());
    }
}
