//! Guest I/O on a qcow2 image straight between guest memory and the file: each request is
//! mapped cluster by cluster to host offsets, and runs of clusters that are contiguous on the
//! host (and on the guest) go to the file in one `preadv`/`pwritev`.
//!
//! Copies remain only where the bytes must be built on the host: compressed clusters (read:
//! decompressed into the one-cluster cache; written: copied to a new normal cluster) and
//! clusters partially written that need their old contents around the new data (copy-on-write
//! from the backing file, a zero cluster or a shared cluster). Those use one cluster-sized
//! buffer kept by the image, so no request allocates or zeroes a data buffer.
//!
//! Crash ordering is the one of the module docs: data is written before the L2 entry that
//! points at it is even changed in the cache, so no metadata written back in the middle of a
//! request (a cache eviction) can reach a cluster whose data is not in the file yet.

use std::os::unix::io::RawFd;

use vm_memory::VolatileSlice;

use super::super::file::AlignedBuf;
use super::super::guest_io::{total_len, SliceCursor};
use super::super::BlockError;
use super::tables::{Mapping, COPIED};
use super::Qcow2Image;

/// An L2 entry to set once the data it points to is written: (L2 table offset, index, entry,
/// the mapping it replaces, whose reference is then released).
type L2Update = (u64, usize, u64, Option<Mapping>);

/// Guest data for a host-contiguous range, written in one call when the run ends.
#[derive(Default)]
struct WriteRun<'a> {
    start: u64,
    end: u64,
    parts: Vec<VolatileSlice<'a>>,
    updates: Vec<L2Update>,
}

impl Qcow2Image {
    /// How many bytes from guest cluster `vc` on (starting `n` bytes into the request, of
    /// `total`) continue `first` the same way: data clusters contiguous on the host, or more
    /// clusters of the same unallocated/zero kind.
    fn extend_run(
        &mut self,
        vc: u64,
        first: Mapping,
        mut n: u64,
        left: u64,
    ) -> Result<u64, BlockError> {
        let cs = self.cluster_size();
        let mut next = vc + 1;
        while n < left {
            let m = self.mapping(next)?;
            let continues = match (first, m) {
                (Mapping::Data { host, .. }, Mapping::Data { host: h, .. }) => {
                    h == host + (next - vc) * cs
                }
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            n += cs.min(left - n);
            next += 1;
        }
        Ok(n)
    }

    /// The host range of a request that lies in one host-contiguous run of data clusters
    /// (for a write: clusters of the active layer alone, written in place), as
    /// [`DiskImage::passthrough`](super::super::DiskImage::passthrough) hands it out. Metadata
    /// only changes in requests served synchronously, after those in flight completed.
    pub(super) fn data_run(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        write: bool,
    ) -> Option<(RawFd, u64)> {
        let total = total_len(bufs);
        if total == 0 || (write && self.read_only) {
            return None;
        }
        self.check_range(offset, total).ok()?;
        let (vc, in_off, n) = self.locate(offset, total);
        let first = self.mapping(vc).ok()?;
        let Mapping::Data { host, .. } = first else {
            return None;
        };
        if self.extend_run(vc, first, n, total).ok()? != total {
            return None;
        }
        let host_off = host + in_off;
        if write {
            let last = (offset + total - 1) >> self.cluster_bits;
            for c in vc..=last {
                let owned = self.l1_entry(self.split(c).0).ok()? & COPIED != 0
                    && matches!(self.mapping(c).ok()?, Mapping::Data { copied: true, .. });
                if !owned {
                    return None;
                }
            }
            if self.refs.overlaps_metadata(host_off, total) {
                return None;
            }
        }
        if !self.file.can_use_vectored(bufs, host_off) {
            return None;
        }
        if write {
            self.file.note_write();
        }
        Some((self.file.raw_fd(), host_off))
    }

    /// Reads `[offset, offset + total_len(bufs))` into guest memory.
    pub(super) fn read_guest(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        let total = total_len(bufs);
        self.check_range(offset, total)?;
        let mut cursor = SliceCursor::new(bufs);
        let mut parts = Vec::new();
        let mut pos = 0u64;
        while pos < total {
            let off = offset + pos;
            let (vc, in_off, n) = self.locate(off, total - pos);
            let m = self.mapping(vc)?;
            let n = match m {
                Mapping::Compressed { .. } => n,
                _ => self.extend_run(vc, m, n, total - pos)?,
            };
            match m {
                Mapping::Unallocated => {
                    let from_backing = match &self.backing {
                        Some(b) => b.size().saturating_sub(off).min(n),
                        None => 0,
                    };
                    if let Some(backing) = self.backing.as_mut().filter(|_| from_backing > 0) {
                        parts.clear();
                        cursor.take_into(from_backing as usize, &mut parts);
                        backing.read_volatile_at(&parts, off)?;
                    }
                    cursor.zero((n - from_backing) as usize);
                }
                Mapping::Zero { .. } => cursor.zero(n as usize),
                Mapping::Data { host, .. } => {
                    parts.clear();
                    cursor.take_into(n as usize, &mut parts);
                    self.file.read_guest(&parts, host + in_off)?;
                }
                Mapping::Compressed { host, len } => {
                    let data = self.load_compressed(host, len)?;
                    let from = in_off as usize;
                    cursor.scatter(&data[from..from + n as usize]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes guest memory to `[offset, offset + total_len(bufs))`.
    pub(super) fn write_guest(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.check_writable()?;
        let total = total_len(bufs);
        self.check_range(offset, total)?;
        let mut cursor = SliceCursor::new(bufs);
        let mut run = WriteRun::default();
        let mut pos = 0u64;
        while pos < total {
            let (vc, in_off, n) = self.locate(offset + pos, total - pos);
            if let Err(e) = self.write_guest_cluster(vc, in_off, n, &mut cursor, &mut run) {
                // What was queued before the failure is still written, as the copying path
                // would have written it cluster by cluster.
                let _ = self.end_run(&mut run);
                return Err(e);
            }
            pos += n;
        }
        self.end_run(&mut run)
    }

    /// Queues (or, for partial copy-on-write, writes) `n` guest bytes at `in_off` of guest
    /// cluster `vc`, taken from `cursor`.
    fn write_guest_cluster<'a>(
        &mut self,
        vc: u64,
        in_off: u64,
        n: u64,
        cursor: &mut SliceCursor<'_, 'a>,
        run: &mut WriteRun<'a>,
    ) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let (l1_idx, l2_idx) = self.split(vc);

        // Fast path: an allocated cluster that is ours alone.
        if self.l1_entry(l1_idx)? & COPIED != 0 {
            if let Mapping::Data { host, copied: true } = self.mapping(vc)? {
                self.check_data_cluster(host)?;
                return self.queue(run, host + in_off, n, cursor, None);
            }
        }

        let l2_off = self.writable_l2(l1_idx)?;
        let old = self.mapping(vc)?;
        let whole = in_off == 0 && n == cs;
        match old {
            Mapping::Data { host, copied } if self.exclusive(host, copied)? => {
                self.check_data_cluster(host)?;
                let update = (!copied).then_some((l2_off, l2_idx, host | COPIED, None));
                return self.queue(run, host + in_off, n, cursor, update);
            }
            Mapping::Zero {
                host: Some(host),
                copied,
            } if self.exclusive(host, copied)? => {
                // A preallocated zero cluster: fill it, then it holds data.
                self.check_data_cluster(host)?;
                let update = Some((l2_off, l2_idx, host | COPIED, None));
                if whole {
                    return self.queue(run, host, n, cursor, update);
                }
                self.end_run(run)?;
                let mut scratch = self.take_scratch();
                scratch.as_mut_slice().fill(0);
                let result = self.write_around(&mut scratch, host, in_off, n, cursor);
                self.scratch = Some(scratch);
                result?;
                return self.set_l2_entry(l2_off, l2_idx, host | COPIED);
            }
            _ => {}
        }

        // Copy on write into a new cluster.
        if whole {
            let new = self.refs.alloc(&mut self.file)?;
            return self.queue(
                run,
                new,
                n,
                cursor,
                Some((l2_off, l2_idx, new | COPIED, Some(old))),
            );
        }
        self.end_run(run)?;
        let mut scratch = self.take_scratch();
        let result = self.cow_partial(&mut scratch, vc, old, in_off, n, cursor);
        self.scratch = Some(scratch);
        let new = result?;
        self.set_l2_entry(l2_off, l2_idx, new | COPIED)?;
        self.release(old);
        Ok(())
    }

    /// Builds the new contents of guest cluster `vc` (old contents under the new data) in
    /// `scratch` and writes them to a newly allocated cluster; returns its offset.
    fn cow_partial(
        &mut self,
        scratch: &mut AlignedBuf,
        vc: u64,
        old: Mapping,
        in_off: u64,
        n: u64,
        cursor: &mut SliceCursor<'_, '_>,
    ) -> Result<u64, BlockError> {
        let buf = scratch.as_mut_slice();
        let covers_visible = in_off == 0 && n >= self.visible(vc);
        match old {
            _ if covers_visible => buf.fill(0),
            Mapping::Unallocated => self.read_backing(buf, vc << self.cluster_bits)?,
            Mapping::Zero { .. } => buf.fill(0),
            Mapping::Data { host, .. } => {
                self.file.read_at(buf, host)?;
            }
            Mapping::Compressed { host, len } => {
                buf.copy_from_slice(self.load_compressed(host, len)?);
            }
        }
        let new = self.refs.alloc(&mut self.file)?;
        self.write_around(scratch, new, in_off, n, cursor)?;
        Ok(new)
    }

    /// Copies `n` guest bytes from `cursor` into `scratch` at `in_off` and writes the whole
    /// cluster at `host`.
    fn write_around(
        &mut self,
        scratch: &mut AlignedBuf,
        host: u64,
        in_off: u64,
        n: u64,
        cursor: &mut SliceCursor<'_, '_>,
    ) -> Result<(), BlockError> {
        let from = in_off as usize;
        cursor.gather(&mut scratch.as_mut_slice()[from..from + n as usize]);
        self.file.write_at(scratch.as_slice(), host)
    }

    /// The image's one-cluster buffer, allocated on first use.
    fn take_scratch(&mut self) -> AlignedBuf {
        let cs = self.cluster_size() as usize;
        match self.scratch.take() {
            Some(buf) if buf.as_slice().len() == cs => buf,
            _ => AlignedBuf::new(cs),
        }
    }

    /// A data cluster about to be written in place must not hold metadata.
    fn check_data_cluster(&self, host: u64) -> Result<(), BlockError> {
        if self.refs.overlaps_metadata(host, self.cluster_size()) {
            return Err(self.corrupt(format!("data cluster at {host:#x} overlaps metadata")));
        }
        Ok(())
    }

    /// Adds `n` guest bytes for host offset `host` to `run`, writing the run first when `host`
    /// does not continue it.
    fn queue<'a>(
        &mut self,
        run: &mut WriteRun<'a>,
        host: u64,
        n: u64,
        cursor: &mut SliceCursor<'_, 'a>,
        update: Option<L2Update>,
    ) -> Result<(), BlockError> {
        if !run.parts.is_empty() && run.end != host {
            self.end_run(run)?;
        }
        if run.parts.is_empty() {
            run.start = host;
            run.end = host;
        }
        cursor.take_into(n as usize, &mut run.parts);
        run.end += n;
        run.updates.extend(update);
        Ok(())
    }

    /// Writes the queued run, then points the L2 entries at the data now in the file.
    fn end_run(&mut self, run: &mut WriteRun<'_>) -> Result<(), BlockError> {
        if run.parts.is_empty() {
            return Ok(());
        }
        let written = self.file.write_guest(&run.parts, run.start);
        run.parts.clear();
        let updates = std::mem::take(&mut run.updates);
        // Without the data in the file, no L2 entry may point to it (the clusters leak).
        written?;
        for (l2_off, l2_idx, entry, old) in updates {
            self.set_l2_entry(l2_off, l2_idx, entry)?;
            if let Some(old) = old {
                self.release(old);
            }
        }
        Ok(())
    }
}
