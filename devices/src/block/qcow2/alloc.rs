//! Cluster allocation: finding free host clusters, creating refcount blocks, and growing (moving)
//! the refcount table when it is too small.
//!
//! A free cluster is one whose refcount is 0. Clusters freed during this session only become
//! free once the flush that made the removal of their last reference durable applied the
//! decrement (see `Qcow2Image::flush_metadata`), so a cluster is never reused while an old L2
//! entry on disk may still point to it.
//!
//! A missing refcount block is created *inside the range it describes* (at the free cluster
//! being allocated), so it counts itself. Growing the refcount table writes the new blocks and
//! the new table to free space at the end of the file, makes them durable, then switches the
//! header to them in one write; the old table is freed afterwards.

use super::super::file::HostFile;
use super::super::BlockError;
use super::header::{MAX_REFTABLE_BYTES, REFCOUNT_TABLE_FIELD};
use super::refcount::{entry_set, Refcounts};
use super::tables::{encode_table, OFFSET_MASK};

/// How many clusters with a refcount past the end of the file a scan tolerates before it
/// calls the image corrupt (a crash leaks a handful; a hostile image could claim billions).
const MAX_SKIPPED_PAST_EOF: u64 = 1 << 16;

impl Refcounts {
    fn image_full(&self, reason: String) -> BlockError {
        BlockError::ImageFull {
            path: self.path.clone(),
            reason,
        }
    }

    /// Whether host cluster `c` is free to allocate; advances nothing.
    fn is_free(&mut self, file: &mut HostFile, c: u64) -> Result<bool, BlockError> {
        if self.overlaps_metadata(c << self.cluster_bits, 1) {
            return Ok(false);
        }
        if self.get(file, c)? == 0 {
            return Ok(true);
        }
        if c >= self.end_cluster() {
            self.skipped_past_eof += 1;
            if self.skipped_past_eof > MAX_SKIPPED_PAST_EOF {
                return Err(self.corrupt("too many refcounts past the end of the file".into()));
            }
        }
        Ok(false)
    }

    /// Host cluster `c` must be addressable by L2 entries (offsets below 2^56).
    fn check_addressable(&self, c: u64) -> Result<(), BlockError> {
        if c >= (OFFSET_MASK + 1) >> self.cluster_bits {
            return Err(self.image_full("host offsets beyond 2^56 bytes".into()));
        }
        Ok(())
    }

    fn note_used(&mut self, c: u64) {
        self.host_end = self.host_end.max((c + 1) << self.cluster_bits);
    }

    /// Allocates one host cluster: its refcount becomes 1 (in the cache). Returns its offset.
    pub(crate) fn alloc(&mut self, file: &mut HostFile) -> Result<u64, BlockError> {
        loop {
            let c = self.cursor;
            self.check_addressable(c)?;
            if !self.is_free(file, c)? {
                self.cursor += 1;
                continue;
            }
            let epb = self.entries_per_block();
            let index = c / epb;
            if index >= self.table.len() as u64 {
                self.grow_table(file, index)?;
                continue;
            }
            if self.table[index as usize] == 0 {
                self.create_block_at(file, c)?;
                self.cursor += 1;
                continue;
            }
            self.set(file, c, 1)?;
            self.cursor += 1;
            self.note_used(c);
            return Ok(c << self.cluster_bits);
        }
    }

    /// Creates the missing refcount block for `c`'s range at cluster `c` itself.
    fn create_block_at(&mut self, file: &mut HostFile, c: u64) -> Result<(), BlockError> {
        let epb = self.entries_per_block();
        let index = (c / epb) as usize;
        let off = c << self.cluster_bits;
        let mut block = vec![0u8; self.cluster_size() as usize];
        entry_set(&mut block, (c % epb) as usize, self.order, 1);
        self.make_room(file)?;
        self.blocks.insert(off, block, true);
        self.table[index] = off;
        self.dirty_table.insert(index);
        self.reserved.insert(c);
        self.note_used(c);
        Ok(())
    }

    /// Replaces the refcount table by one with room for block `index`, written to free space
    /// at the end of the file together with the blocks that describe that space.
    fn grow_table(&mut self, file: &mut HostFile, index: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let epb = self.entries_per_block();
        let old_len = self.table.len() as u64;
        // Leave headroom so tables do not move at every step.
        let want = (index + 1).max(old_len + old_len / 2);

        let mut start = self.cursor.max(self.end_cluster());
        'place: loop {
            // Fixed point: table clusters T and new blocks k both cover [start, start + T + k).
            let (mut table_clusters, mut new_blocks) = (0u64, Vec::new());
            loop {
                let end = start + table_clusters + new_blocks.len() as u64;
                let entries = want.max(end.div_ceil(epb));
                let t = (entries * 8).div_ceil(cs);
                if t * cs > MAX_REFTABLE_BYTES {
                    return Err(self.image_full("the refcount table would exceed 8 MiB".into()));
                }
                let missing: Vec<u64> = (start / epb..=end.max(start + 1).saturating_sub(1) / epb)
                    .filter(|&i| i >= old_len || self.table[i as usize] == 0)
                    .collect();
                if t == table_clusters && missing.len() == new_blocks.len() {
                    break;
                }
                table_clusters = t;
                new_blocks = missing;
            }
            let total = table_clusters + new_blocks.len() as u64;
            self.check_addressable(start + total)?;
            let mut busy = None;
            for c in start..start + total {
                if !self.is_free(file, c)? {
                    busy = Some(c);
                    break;
                }
            }
            if let Some(c) = busy {
                start = c + 1;
                continue 'place;
            }

            // New table contents: the old entries, then the new blocks after the table.
            let mut table = self.table.clone();
            table.resize((table_clusters * cs / 8) as usize, 0);
            for (k, &i) in new_blocks.iter().enumerate() {
                let c = start + table_clusters + k as u64;
                let off = c << self.cluster_bits;
                self.make_room(file)?;
                self.blocks.insert(off, vec![0u8; cs as usize], true);
                table[i as usize] = off;
                self.reserved.insert(c);
            }
            let old_table = std::mem::replace(&mut self.table, table);
            // Every cluster of the new area is in use: set through the new table.
            for c in start..start + total {
                if let Err(e) = self.set(file, c, 1) {
                    self.table = old_table;
                    return Err(e);
                }
                self.note_used(c);
            }

            // Blocks first, then the table they hang from, then the header switch.
            self.write_dirty_blocks(file)?;
            let new_off = start << self.cluster_bits;
            file.write_at(&encode_table(&self.table), new_off)?;
            file.barrier()?;
            let mut field = [0u8; 12];
            field[..8].copy_from_slice(&new_off.to_be_bytes());
            field[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
            file.write_at(&field, REFCOUNT_TABLE_FIELD)?;
            file.barrier()?;

            // The old table is unreferenced now (durably): free its clusters.
            let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
            self.table_offset = new_off;
            self.table_clusters = table_clusters;
            self.dirty_table.clear();
            self.update_range(file, old_off, old_clusters * cs, false)?;
            return Ok(());
        }
    }
}
