//! I/O between an image and guest memory given as [`VolatileSlice`]s (the data buffers of a
//! virtio request), for formats without a direct path: the bytes go through a bounded host
//! buffer, one chunk at a time, so a large request never allocates more than [`BOUNCE_CHUNK`].

use vm_memory::VolatileSlice;

use super::{check_range, BlockError, DiskImage};

/// Largest host buffer used to carry one chunk between the image and guest memory.
pub const BOUNCE_CHUNK: usize = 1 << 20;

/// Total length of `bufs` in bytes.
pub(crate) fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// A position in a list of slices, walked front to back.
pub(crate) struct SliceCursor<'s, 'a> {
    bufs: &'s [VolatileSlice<'a>],
    index: usize,
    skip: usize,
}

impl<'s, 'a> SliceCursor<'s, 'a> {
    pub(crate) fn new(bufs: &'s [VolatileSlice<'a>]) -> Self {
        SliceCursor {
            bufs,
            index: 0,
            skip: 0,
        }
    }

    /// Copies `data` into the slices from the cursor on and advances past it.
    pub(crate) fn scatter(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.index < self.bufs.len() {
            let buf = &self.bufs[self.index];
            let n = (buf.len() - self.skip).min(data.len());
            if let Ok(dst) = buf.subslice(self.skip, n) {
                dst.copy_from(&data[..n]);
            }
            data = &data[n..];
            self.advance(n);
        }
    }

    /// Fills `data` from the slices from the cursor on and advances past it.
    pub(crate) fn gather(&mut self, mut data: &mut [u8]) {
        while !data.is_empty() && self.index < self.bufs.len() {
            let buf = &self.bufs[self.index];
            let n = (buf.len() - self.skip).min(data.len());
            if let Ok(src) = buf.subslice(self.skip, n) {
                src.copy_to(&mut data[..n]);
            }
            data = &mut data[n..];
            self.advance(n);
        }
    }

    /// The next `n` bytes (fewer if the slices end first) as sub-slices, appended to `out`;
    /// advances past them.
    pub(crate) fn take_into(&mut self, mut n: usize, out: &mut Vec<VolatileSlice<'a>>) {
        while n > 0 && self.index < self.bufs.len() {
            let buf = &self.bufs[self.index];
            let k = (buf.len() - self.skip).min(n);
            if let Ok(part) = buf.subslice(self.skip, k) {
                out.push(part);
            }
            n -= k;
            self.advance(k);
        }
    }

    /// Writes zeros to the next `n` bytes and advances past them.
    pub(crate) fn zero(&mut self, n: usize) {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = n;
        while left > 0 && self.index < self.bufs.len() {
            let k = left.min(ZEROS.len());
            self.scatter(&ZEROS[..k]);
            left -= k;
        }
    }

    fn advance(&mut self, n: usize) {
        self.skip += n;
        while self.index < self.bufs.len() && self.skip >= self.bufs[self.index].len() {
            self.skip -= self.bufs[self.index].len();
            self.index += 1;
        }
    }
}

/// Reads `[offset, offset + total_len(bufs))` of `disk` into `bufs` through a host buffer.
pub(crate) fn read_by_copy<D: DiskImage + ?Sized>(
    disk: &mut D,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> Result<(), BlockError> {
    let total = total_len(bufs);
    check_range(disk.path(), offset, total, disk.size())?;
    let mut bounce = vec![0u8; total.min(BOUNCE_CHUNK as u64) as usize];
    let mut cursor = SliceCursor::new(bufs);
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK as u64) as usize;
        disk.read_at(&mut bounce[..n], offset + done)?;
        cursor.scatter(&bounce[..n]);
        done += n as u64;
    }
    Ok(())
}

/// Writes `bufs` to `[offset, offset + total_len(bufs))` of `disk` through a host buffer. The
/// whole range is checked before anything is written.
pub(crate) fn write_by_copy<D: DiskImage + ?Sized>(
    disk: &mut D,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> Result<(), BlockError> {
    let total = total_len(bufs);
    check_range(disk.path(), offset, total, disk.size())?;
    let mut bounce = vec![0u8; total.min(BOUNCE_CHUNK as u64) as usize];
    let mut cursor = SliceCursor::new(bufs);
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(BOUNCE_CHUNK as u64) as usize;
        cursor.gather(&mut bounce[..n]);
        disk.write_at(&bounce[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
