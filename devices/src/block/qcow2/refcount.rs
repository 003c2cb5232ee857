//! Reference counts: the refcount table (always in memory) and refcount blocks (cached), with
//! entries of 2^refcount_order bits (1 to 64).
//!
//! Dirty refcount blocks only ever carry *increments* until the owner's flush has made the
//! removal of the references durable (see the module docs of `qcow2`), so a dirty block may be
//! written back at any time — including when the cache needs room.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use super::super::file::HostFile;
use super::super::BlockError;
use super::header::Header;
use super::tables::{decode_table, encode_table, runs, TableCache};

/// Bits 0..=8 of a refcount table entry are reserved.
const REFTABLE_RESERVED: u64 = 0x1ff;

/// Reads entry `idx` of a refcount block with 2^`order`-bit entries.
pub(crate) fn entry_get(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            u64::from((block[idx / per_byte] >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[idx]),
        4 => u64::from(u16::from_be_bytes([block[2 * idx], block[2 * idx + 1]])),
        5 => {
            let b = &block[4 * idx..4 * idx + 4];
            u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        _ => {
            let b = &block[8 * idx..8 * idx + 8];
            u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        }
    }
}

/// Writes entry `idx`; `value` fits (the caller checked against [`Refcounts::max_refcount`]).
pub(crate) fn entry_set(block: &mut [u8], idx: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut block[idx / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[idx] = value as u8,
        4 => block[2 * idx..2 * idx + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * idx..4 * idx + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * idx..8 * idx + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// The refcount structures of one image, plus what the allocator needs to know about the file.
pub(crate) struct Refcounts {
    pub(super) path: PathBuf,
    pub(super) cluster_bits: u32,
    pub(super) order: u32,
    /// Refcount table entries (host offsets of refcount blocks, 0 = none).
    pub(super) table: Vec<u64>,
    pub(super) table_offset: u64,
    pub(super) table_clusters: u64,
    pub(super) dirty_table: BTreeSet<usize>,
    pub(super) blocks: TableCache<Vec<u8>>,
    /// Lowest cluster index that may be free.
    pub(super) cursor: u64,
    /// Bytes of the host file in use, as far as we know (grows as we allocate).
    pub(super) host_end: u64,
    /// Clusters holding metadata (L2 tables, refcount blocks, header, L1, snapshot table):
    /// never handed out for data, never written as data.
    pub(super) reserved: HashSet<u64>,
    /// Refcounts found set past the end of the file while scanning (leaks of a crash, or a
    /// hostile image): bounded so that scanning stays cheap.
    pub(super) skipped_past_eof: u64,
}

impl Refcounts {
    /// Loads the refcount table described by `header` and records the fixed metadata areas.
    pub(crate) fn load(
        file: &HostFile,
        header: &Header,
        cache_capacity: usize,
    ) -> Result<Self, BlockError> {
        let cluster_size = header.cluster_size();
        let table_bytes = u64::from(header.refcount_table_clusters) * cluster_size;
        // Bounded by the header checks (at most 8 MiB and inside the file).
        let mut raw = vec![0u8; table_bytes as usize];
        file.read_exact_at(&mut raw, header.refcount_table_offset)?;
        let table = decode_table(&raw);
        let mut reserved = HashSet::new();
        reserved.insert(0);
        let cb = header.cluster_bits;
        let l1_clusters = (u64::from(header.l1_size) * 8).div_ceil(cluster_size);
        let l1_first = header.l1_table_offset >> cb;
        reserved.extend(l1_first..l1_first + l1_clusters);
        if header.nb_snapshots > 0 {
            reserved.insert(header.snapshots_offset >> cb);
        }
        for &e in &table {
            let off = e & !REFTABLE_RESERVED;
            if off != 0 {
                reserved.insert(off >> cb);
            }
        }
        Ok(Self {
            path: file.path().to_path_buf(),
            cluster_bits: cb,
            order: header.refcount_order,
            table,
            table_offset: header.refcount_table_offset,
            table_clusters: u64::from(header.refcount_table_clusters),
            dirty_table: BTreeSet::new(),
            blocks: TableCache::new(cache_capacity),
            cursor: 0,
            host_end: file.len()?,
            reserved,
            skipped_past_eof: 0,
        })
    }

    pub(super) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub(super) fn entries_per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    pub(crate) fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    pub(super) fn corrupt(&self, reason: String) -> BlockError {
        BlockError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// The host file's extent rounded up to whole clusters, in clusters.
    pub(super) fn end_cluster(&self) -> u64 {
        self.host_end.div_ceil(self.cluster_size())
    }

    /// Whether a metadata cluster at `off` lies within the file (or was allocated by us).
    pub(crate) fn check_in_file(&self, what: &str, off: u64, len: u64) -> Result<(), BlockError> {
        let limit = self.end_cluster() << self.cluster_bits;
        match off.checked_add(len) {
            Some(end) if end <= limit => Ok(()),
            _ => Err(self.corrupt(format!(
                "{what} at {off:#x} lies beyond the end of the file"
            ))),
        }
    }

    /// Whether `[off, off + len)` touches a cluster holding metadata.
    pub(crate) fn overlaps_metadata(&self, off: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = off >> self.cluster_bits;
        let last = (off + (len - 1)) >> self.cluster_bits;
        let table_first = self.table_offset >> self.cluster_bits;
        (first..=last).any(|c| {
            self.reserved.contains(&c)
                || (c >= table_first && c < table_first + self.table_clusters)
        })
    }

    /// The host offset of refcount block `index`, if it exists.
    fn block_offset(&self, index: u64) -> Result<Option<u64>, BlockError> {
        let Some(&entry) = usize::try_from(index).ok().and_then(|i| self.table.get(i)) else {
            return Ok(None);
        };
        let off = entry & !REFTABLE_RESERVED;
        if off == 0 {
            return Ok(None);
        }
        if entry & REFTABLE_RESERVED != 0 || off & (self.cluster_size() - 1) != 0 {
            return Err(self.corrupt(format!("refcount table entry {entry:#x} is unaligned")));
        }
        Ok(Some(off))
    }

    /// Makes room for one more block in the cache, writing dirty blocks back if need be.
    pub(super) fn make_room(&mut self, file: &mut HostFile) -> Result<(), BlockError> {
        if self.blocks.is_full() && !self.blocks.evict_clean() {
            self.write_dirty_blocks(file)?;
            self.blocks.evict_clean();
        }
        Ok(())
    }

    fn load_block(&mut self, file: &mut HostFile, off: u64) -> Result<(), BlockError> {
        if self.blocks.contains(off) {
            return Ok(());
        }
        self.check_in_file("refcount block", off, self.cluster_size())?;
        self.make_room(file)?;
        let mut block = vec![0u8; self.cluster_size() as usize];
        file.read_at(&mut block, off)?;
        self.blocks.insert(off, block, false);
        Ok(())
    }

    /// (block offset, index in block) of `cluster`'s refcount, if its block exists.
    fn locate(
        &mut self,
        file: &mut HostFile,
        cluster: u64,
    ) -> Result<Option<(u64, usize)>, BlockError> {
        let epb = self.entries_per_block();
        let Some(off) = self.block_offset(cluster / epb)? else {
            return Ok(None);
        };
        self.load_block(file, off)?;
        Ok(Some((off, (cluster % epb) as usize)))
    }

    /// The refcount of host cluster `cluster`.
    pub(crate) fn get(&mut self, file: &mut HostFile, cluster: u64) -> Result<u64, BlockError> {
        let order = self.order;
        match self.locate(file, cluster)? {
            None => Ok(0),
            Some((off, idx)) => Ok(self.blocks.get(off).map_or(0, |b| entry_get(b, idx, order))),
        }
    }

    /// Sets the refcount of `cluster`, whose block must exist.
    pub(super) fn set(
        &mut self,
        file: &mut HostFile,
        cluster: u64,
        value: u64,
    ) -> Result<(), BlockError> {
        let order = self.order;
        let Some((off, idx)) = self.locate(file, cluster)? else {
            return Err(self.corrupt(format!(
                "no refcount block for cluster at {:#x}",
                cluster << self.cluster_bits
            )));
        };
        if let Some(block) = self.blocks.get_mut(off) {
            entry_set(block, idx, order, value);
        }
        Ok(())
    }

    /// Adds `delta` (+1 or -1) to the refcount of every cluster that `[off, off + len)` touches.
    pub(crate) fn update_range(
        &mut self,
        file: &mut HostFile,
        off: u64,
        len: u64,
        increment: bool,
    ) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        let first = off >> self.cluster_bits;
        let last = (off + (len - 1)) >> self.cluster_bits;
        for c in first..=last {
            let rc = self.get(file, c)?;
            let new = if increment {
                if rc >= self.max_refcount() {
                    return Err(BlockError::ImageFull {
                        path: self.path.clone(),
                        reason: format!(
                            "refcount of cluster {:#x} would exceed {}",
                            c << self.cluster_bits,
                            self.max_refcount()
                        ),
                    });
                }
                rc + 1
            } else {
                if rc == 0 {
                    return Err(self.corrupt(format!(
                        "freeing cluster {:#x} whose refcount is already 0",
                        c << self.cluster_bits
                    )));
                }
                rc - 1
            };
            self.set(file, c, new)?;
            if new == 0 {
                self.cursor = self.cursor.min(c);
            }
        }
        Ok(())
    }

    /// Writes every dirty refcount block back.
    pub(crate) fn write_dirty_blocks(&mut self, file: &mut HostFile) -> Result<(), BlockError> {
        for off in self.blocks.dirty_offsets() {
            let Some(block) = self.blocks.take_for_writeback(off) else {
                continue;
            };
            if let Err(e) = file.write_at(block, off) {
                self.blocks.mark_dirty(off);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) fn has_dirty_blocks(&self) -> bool {
        self.blocks.has_dirty()
    }

    pub(crate) fn has_dirty_table(&self) -> bool {
        !self.dirty_table.is_empty()
    }

    /// Writes the dirty refcount table entries back (after the blocks they point to).
    pub(crate) fn write_dirty_table(&mut self, file: &mut HostFile) -> Result<(), BlockError> {
        for (first, n) in runs(self.dirty_table.iter().copied()) {
            let bytes = encode_table(&self.table[first..first + n]);
            file.write_at(&bytes, self.table_offset + first as u64 * 8)?;
        }
        self.dirty_table.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                entry_set(&mut block, i, order, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    entry_get(&block, i, order),
                    (i as u64 * 7 + 1) & max,
                    "order {order} idx {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let mut block = vec![0u8; 1];
        entry_set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0b0000_0001);
        entry_set(&mut block, 3, 1, 2);
        assert_eq!(block[0], 0b1000_0001);
    }
}
