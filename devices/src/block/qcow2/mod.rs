//! qcow2 images (versions 2 and 3), as `qemu-img create -f qcow2` makes them.
//!
//! Layout: guest cluster → L1 entry → L2 table → L2 entry → host cluster. Host clusters are
//! reference-counted through the refcount table and refcount blocks. See `header.rs` for what
//! is validated and which features are refused.
//!
//! # What is supported
//!
//! Reading and writing v2 and v3 images with any cluster size (512 B – 2 MiB) and any
//! refcount width (1 – 64 bits); allocation on write (data clusters, L2 tables, refcount blocks,
//! growing and moving the refcount table); v3 zero clusters (read, and written by
//! `write_zeroes`/`discard`); compressed clusters (zlib and zstd; reads decompress, writes copy
//! the cluster to a new normal cluster); internal snapshots (the active layer is read and
//! written; shared L2 tables and data clusters are copied on write, so snapshots stay intact);
//! backing files of any format we read, in chains of any length.
//!
//! Guest I/O goes straight between guest memory and the file, a run of host-contiguous
//! clusters per system call (`guest.rs`); requests within allocated data clusters can be
//! handed to the caller to submit itself ([`DiskImage::passthrough`]).
//!
//! Refused: encryption, external data files, extended L2 entries (subclusters), unknown
//! incompatible features; images with the dirty or corrupt bit are opened read-only only.
//!
//! # Crash consistency
//!
//! Data clusters are written as soon as a guest write arrives; metadata changes (refcount
//! blocks, the refcount table, L2 tables, L1 entries) are made in cached copies and reach the
//! file in `Qcow2Image::flush_metadata` — at `flush()`, when a cache needs room, and on drop —
//! in an order that keeps the image free of corruption whenever the process (or the machine)
//! stops, leaks at most:
//!
//! 1. refcount blocks (they only carry increments at that point), then a barrier (`fdatasync`);
//! 2. refcount table entries pointing to new blocks, then a barrier;
//! 3. L2 tables — which only now may point to the new data clusters, whose refcounts and
//!    contents are durable — then a barrier;
//! 4. L1 entries pointing to new L2 tables, then a barrier;
//! 5. only then are the refcounts of clusters whose last reference was removed (discard,
//!    copy-on-write of compressed or shared clusters) decremented; such a cluster cannot be
//!    allocated again before this point, so no L2 entry on disk can point to a reused cluster.
//!
//! A barrier is skipped when nothing was written since the last one. Growing the refcount table
//! writes the new blocks and table, syncs, switches the header in one write and syncs again
//! before the old table is freed. The dirty bit is never set (no lazy refcounts).

mod alloc;
mod cluster;
mod compressed;
pub mod create;
mod guest;
pub mod header;
mod refcount;
mod tables;

use std::collections::BTreeSet;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use super::file::{AlignedBuf, HostFile};
use super::{BlockError, DiskImage, Format};
use header::{Header, AUTOCLEAR_FIELD, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use refcount::Refcounts;
use tables::{decode_l1, decode_l2, decode_table, encode_table, runs, Mapping, TableCache, COPIED};

pub use header::Compression;

/// Bytes of L2 tables (and of refcount blocks) each cache holds, at most.
const CACHE_BYTES: u64 = 4 << 20;
/// Tables per cache, whatever the cluster size.
const MIN_CACHE_TABLES: u64 = 4;
const MAX_CACHE_TABLES: u64 = 1024;
/// Freed bytes past which a write or discard reclaims them without waiting for a flush (less
/// on small images: a sixteenth of the virtual size).
const RECLAIM_BYTES: u64 = 32 << 20;

/// An open qcow2 image.
pub struct Qcow2Image {
    file: HostFile,
    header: Header,
    read_only: bool,
    cluster_bits: u32,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: TableCache<Vec<u64>>,
    refs: Refcounts,
    backing: Option<Box<dyn DiskImage>>,
    /// Host ranges whose references were removed in memory; their refcounts drop once that
    /// removal is durable (step 5 of the flush).
    pending_free: Vec<(u64, u64)>,
    /// Bytes in `pending_free`.
    pending_free_bytes: u64,
    decompressor: compressed::Decompressor,
    /// The last decompressed cluster: (its L2 entry's host offset, data).
    decompressed: Option<(u64, Vec<u8>)>,
    /// One cluster for building partially written clusters, kept across requests.
    scratch: Option<AlignedBuf>,
}

impl Qcow2Image {
    /// Opens the qcow2 image in `file`; `open_backing` opens its backing file, if it has one,
    /// given the resolved path and the format from the header extension.
    pub(crate) fn open(
        file: HostFile,
        read_only: bool,
        open_backing: impl FnOnce(&Path, Option<&str>) -> Result<Box<dyn DiskImage>, BlockError>,
    ) -> Result<Self, BlockError> {
        let header = Header::read(&file)?;
        let path = file.path().to_path_buf();
        if !read_only && header.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
            let what = if header.incompatible & INCOMPAT_CORRUPT != 0 {
                "the corrupt bit is set"
            } else {
                "the dirty bit is set (lazy refcounts were in use)"
            };
            return Err(BlockError::Unsupported {
                path,
                feature: format!(
                    "writing while {what}: repair with 'qemu-img check -r all' or open read-only"
                ),
            });
        }
        let cluster_size = header.cluster_size();
        let cache_tables =
            (CACHE_BYTES / cluster_size).clamp(MIN_CACHE_TABLES, MAX_CACHE_TABLES) as usize;

        // Bounded by the header checks (at most 32 MiB and inside the file).
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_exact_at(&mut raw, header.l1_table_offset)?;
        let l1 = decode_table(&raw);
        let mut refs = Refcounts::load(&file, &header, cache_tables)?;
        for &e in &l1 {
            let off = decode_l1(e, header.cluster_bits).map_err(|reason| BlockError::Corrupt {
                path: path.clone(),
                reason,
            })?;
            if off != 0 {
                refs.reserved.insert(off >> header.cluster_bits);
            }
        }

        let backing = match &header.backing_file {
            None => None,
            Some(name) => {
                let name = bytes_to_path(name);
                let resolved = match path.parent() {
                    Some(dir) if name.is_relative() => dir.join(&name),
                    _ => name,
                };
                Some(open_backing(&resolved, header.backing_format.as_deref())?)
            }
        };

        let mut image = Self {
            decompressor: compressed::Decompressor::new(header.compression),
            cluster_bits: header.cluster_bits,
            file,
            header,
            read_only,
            l1,
            l1_dirty: BTreeSet::new(),
            l2: TableCache::new(cache_tables),
            refs,
            backing,
            pending_free: Vec::new(),
            pending_free_bytes: 0,
            decompressed: None,
            scratch: None,
        };
        // Autoclear bits mean "valid only if every writer knew this feature": we do not (only
        // bitmaps use one today), so a writer clears them before its first write.
        if !read_only && image.header.version >= 3 && image.header.autoclear != 0 {
            image.file.write_at(&[0u8; 8], AUTOCLEAR_FIELD)?;
            image.file.barrier()?;
            image.header.autoclear = 0;
        }
        Ok(image)
    }

    /// The qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&dyn DiskImage> {
        self.backing.as_deref()
    }

    fn corrupt(&self, reason: String) -> BlockError {
        BlockError::Corrupt {
            path: self.path().to_path_buf(),
            reason,
        }
    }

    /// (L1 index, L2 index) of guest cluster `vc`.
    fn split(&self, vc: u64) -> (usize, usize) {
        let l2_bits = self.cluster_bits - 3;
        (
            (vc >> l2_bits) as usize,
            (vc & ((1u64 << l2_bits) - 1)) as usize,
        )
    }

    fn l1_entry(&self, l1_idx: usize) -> Result<u64, BlockError> {
        self.l1
            .get(l1_idx)
            .copied()
            .ok_or_else(|| self.corrupt(format!("L1 index {l1_idx} beyond the L1 table")))
    }

    /// Brings the L2 table at `off` into the cache.
    fn load_l2(&mut self, off: u64) -> Result<(), BlockError> {
        if self.l2.contains(off) {
            return Ok(());
        }
        let cs = self.cluster_size();
        self.refs.check_in_file("L2 table", off, cs)?;
        self.make_l2_room()?;
        let mut raw = vec![0u8; cs as usize];
        self.file.read_at(&mut raw, off)?;
        self.l2.insert(off, decode_table(&raw), false);
        Ok(())
    }

    fn make_l2_room(&mut self) -> Result<(), BlockError> {
        if self.l2.is_full() && !self.l2.evict_clean() {
            self.flush_metadata()?;
            self.l2.evict_clean();
        }
        Ok(())
    }

    /// Raw L2 entry of guest cluster `vc` (0 when its L2 table does not exist).
    fn l2_entry(&mut self, vc: u64) -> Result<u64, BlockError> {
        let (l1_idx, l2_idx) = self.split(vc);
        let l2_off =
            decode_l1(self.l1_entry(l1_idx)?, self.cluster_bits).map_err(|r| self.corrupt(r))?;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load_l2(l2_off)?;
        Ok(self
            .l2
            .get(l2_off)
            .and_then(|t| t.get(l2_idx))
            .copied()
            .unwrap_or(0))
    }

    /// Where guest cluster `vc` lives, validated against the file.
    fn mapping(&mut self, vc: u64) -> Result<Mapping, BlockError> {
        let entry = self.l2_entry(vc)?;
        let m = decode_l2(entry, self.cluster_bits, self.header.version)
            .map_err(|r| self.corrupt(r))?;
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } => {
                self.refs
                    .check_in_file("data cluster", host, self.cluster_size())?;
            }
            // A descriptor claims at most two clusters' worth of sectors; the part of them
            // past the end of the file reads as zeros.
            Mapping::Compressed { host, .. } => {
                self.refs.check_in_file("compressed cluster", host, 1)?;
            }
            _ => {}
        }
        Ok(m)
    }

    /// Sets L2 entry `l2_idx` of the (cached, writable) table at `l2_off`.
    fn set_l2_entry(&mut self, l2_off: u64, l2_idx: usize, entry: u64) -> Result<(), BlockError> {
        self.load_l2(l2_off)?;
        match self.l2.get_mut(l2_off).and_then(|t| t.get_mut(l2_idx)) {
            Some(slot) => {
                *slot = entry;
                Ok(())
            }
            None => Err(self.corrupt(format!("L2 table at {l2_off:#x} vanished from the cache"))),
        }
    }

    fn set_l1_entry(&mut self, l1_idx: usize, entry: u64) {
        self.l1[l1_idx] = entry;
        self.l1_dirty.insert(l1_idx);
    }

    /// Returns the offset of an L2 table for `l1_idx` that may be modified in place: allocates
    /// a new one, or copies one shared with a snapshot.
    fn writable_l2(&mut self, l1_idx: usize) -> Result<u64, BlockError> {
        let entry = self.l1_entry(l1_idx)?;
        let off = decode_l1(entry, self.cluster_bits).map_err(|r| self.corrupt(r))?;
        if off == 0 {
            let new = self.refs.alloc(&mut self.file)?;
            self.refs.reserved.insert(new >> self.cluster_bits);
            self.make_l2_room()?;
            self.l2
                .insert(new, vec![0u64; (self.cluster_size() / 8) as usize], true);
            self.set_l1_entry(l1_idx, new | COPIED);
            return Ok(new);
        }
        self.load_l2(off)?;
        if entry & COPIED != 0 {
            return Ok(off);
        }
        if self.refs.get(&mut self.file, off >> self.cluster_bits)? == 1 {
            self.set_l1_entry(l1_idx, off | COPIED);
            return Ok(off);
        }
        // Shared with a snapshot: copy it. Refcounts count references per L1 table walked, so
        // the clusters it maps keep theirs (the snapshot's L1 still reaches them through the
        // old table, the active L1 now through the copy); they are shared, hence not COPIED.
        let mut table = self.l2.get(off).cloned().unwrap_or_default();
        let cs = self.cluster_size();
        for e in table.iter_mut() {
            if *e & tables::COMPRESSED == 0 {
                *e &= !COPIED;
            }
        }
        let new = self.refs.alloc(&mut self.file)?;
        self.refs.reserved.insert(new >> self.cluster_bits);
        self.make_l2_room()?;
        self.l2.insert(new, table, true);
        self.set_l1_entry(l1_idx, new | COPIED);
        self.pending_free_bytes += cs;
        self.pending_free.push((off, cs));
        Ok(new)
    }

    /// Writes all dirty metadata in crash-safe order (see the module docs). Does not make the
    /// last step durable: `flush()` adds the final barrier.
    pub(crate) fn flush_metadata(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        // 1. Refcount blocks (increments only).
        self.refs.write_dirty_blocks(&mut self.file)?;
        // 2. The refcount table entries that point to new blocks.
        if self.refs.has_dirty_table() {
            self.file.barrier()?;
            self.refs.write_dirty_table(&mut self.file)?;
        }
        // 3. L2 tables, after the data and refcounts they point to.
        if self.l2.has_dirty() {
            self.file.barrier()?;
            for off in self.l2.dirty_offsets() {
                let Some(table) = self.l2.take_for_writeback(off) else {
                    continue;
                };
                let bytes = encode_table(table);
                if let Err(e) = self.file.write_at(&bytes, off) {
                    self.l2.mark_dirty(off);
                    return Err(e);
                }
            }
        }
        // 4. L1 entries pointing to new L2 tables.
        if !self.l1_dirty.is_empty() {
            self.file.barrier()?;
            let l1_offset = self.header.l1_table_offset;
            for (first, n) in runs(self.l1_dirty.iter().copied()) {
                let bytes = encode_table(&self.l1[first..first + n]);
                self.file.write_at(&bytes, l1_offset + first as u64 * 8)?;
            }
            self.l1_dirty.clear();
        }
        // 5. Drop the references that are durably gone.
        if !self.pending_free.is_empty() {
            self.file.barrier()?;
            self.pending_free_bytes = 0;
            for (host, len) in std::mem::take(&mut self.pending_free) {
                self.refs.update_range(&mut self.file, host, len, false)?;
            }
            self.refs.write_dirty_blocks(&mut self.file)?;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        super::check_range(self.path(), offset, len, self.header.size)
    }

    /// Makes the clusters freed since the last flush reusable once they are many: a guest
    /// that rewrites and discards without ever flushing must not grow the file without bound.
    /// The same ordered write-back as a flush (freed only after the removal of their
    /// references is durable), without the final barrier.
    fn reclaim(&mut self) -> Result<(), BlockError> {
        let limit = (self.header.size / 16)
            .min(RECLAIM_BYTES)
            .max(self.cluster_size());
        if self.pending_free_bytes >= limit {
            self.flush_metadata()?;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                path: self.path().to_path_buf(),
            });
        }
        Ok(())
    }

    /// Tests: tiny metadata caches, so that every request evicts tables.
    #[cfg(test)]
    pub(crate) fn shrink_caches(&mut self, tables: usize) -> Result<(), BlockError> {
        self.flush_metadata()?;
        self.l2 = TableCache::new(tables);
        self.refs.blocks = TableCache::new(tables);
        Ok(())
    }

    /// Tests: the host file, to observe every write.
    #[cfg(test)]
    pub(crate) fn host_file_mut(&mut self) -> &mut HostFile {
        &mut self.file
    }
}

fn bytes_to_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_clusters(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.write_clusters(buf, offset)?;
        self.reclaim()
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.flush_metadata()?;
        self.file.barrier()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.zero_clusters(offset, len, true, true)?;
        self.reclaim()
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.zero_clusters(offset, len, may_unmap, false)?;
        self.reclaim()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn image_lock(&self) -> Option<super::ImageLock> {
        self.file.lock_handle(!self.read_only).ok()
    }

    fn reload(&mut self) -> Result<(), BlockError> {
        if !self.l1_dirty.is_empty()
            || self.l2.has_dirty()
            || self.refs.has_dirty_blocks()
            || self.refs.has_dirty_table()
            || !self.pending_free.is_empty()
        {
            return Err(BlockError::Unsupported {
                path: self.path().to_path_buf(),
                feature: "reloading the metadata while changes to it are not written".to_owned(),
            });
        }
        // The backing chain is read-only: it stays as it is.
        let mut backing = self.backing.take();
        let fresh = Self::open(self.file.try_clone()?, self.read_only, |path, _| {
            backing.take().ok_or_else(|| BlockError::Unsupported {
                path: path.to_path_buf(),
                feature: "a backing file named after the image was opened".to_owned(),
            })
        });
        match fresh {
            Ok(fresh) => *self = fresh,
            Err(e) => {
                self.backing = backing;
                return Err(e);
            }
        }
        Ok(())
    }

    fn passthrough(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
        write: bool,
    ) -> Option<(RawFd, u64)> {
        self.data_run(bufs, offset, write)
    }

    fn read_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.read_guest(bufs, offset)
    }

    fn write_volatile_at(
        &mut self,
        bufs: &[VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.write_guest(bufs, offset)?;
        self.reclaim()
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!("flushing '{}' on close: {e}", self.path().display());
        }
    }
}
