//! L1/L2 entries and the small write-back cache that holds L2 tables and refcount blocks.

use std::collections::HashMap;

/// "Refcount is exactly one": the cluster may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// v3: the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;
/// Host offset bits of L1 entries and standard L2 entries (bits 9..=55).
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 1..=8 of a standard L2 entry and of an L1 entry must be zero: offsets are aligned.
const LOW_RESERVED: u64 = 0x1fe;

/// Where the data of one guest cluster lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; `host` is a cluster kept allocated for it (v3 "preallocated zero").
    Zero { host: Option<u64>, copied: bool },
    /// Uncompressed data at `host`.
    Data { host: u64, copied: bool },
    /// Compressed data: `len` bytes at the (unaligned) host offset `host`.
    Compressed { host: u64, len: u64 },
}

impl Mapping {
    /// The host byte ranges this mapping holds references to (for refcounting).
    pub(crate) fn host_range(&self, cluster_size: u64) -> Option<(u64, u64)> {
        match *self {
            Mapping::Unallocated | Mapping::Zero { host: None, .. } => None,
            Mapping::Zero { host: Some(h), .. } | Mapping::Data { host: h, .. } => {
                Some((h, cluster_size))
            }
            Mapping::Compressed { host, len } => Some((host, len)),
        }
    }
}

/// Decodes an L2 entry; `Err` explains why it is corrupt.
pub(crate) fn decode_l2(entry: u64, cluster_bits: u32, version: u32) -> Result<Mapping, String> {
    if entry & COMPRESSED != 0 {
        // Offset in the low `shift` bits, then the count of additional 512-byte sectors.
        let shift = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        return Ok(Mapping::Compressed { host, len });
    }
    let copied = entry & COPIED != 0;
    let host = entry & OFFSET_MASK;
    if entry & LOW_RESERVED != 0 || host & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "L2 entry {entry:#x} has an unaligned cluster offset"
        ));
    }
    if entry & ZERO != 0 {
        if version < 3 {
            return Err(format!(
                "L2 entry {entry:#x} has the zero flag in a version 2 image"
            ));
        }
        let host = (host != 0).then_some(host);
        return Ok(Mapping::Zero { host, copied });
    }
    if host == 0 {
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Data { host, copied })
}

/// The host offset of the L2 table an L1 entry points to (0: none); `Err` if corrupt.
pub(crate) fn decode_l1(entry: u64, cluster_bits: u32) -> Result<u64, String> {
    let off = entry & OFFSET_MASK;
    if entry & LOW_RESERVED != 0 || off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "L1 entry {entry:#x} has an unaligned L2 table offset"
        ));
    }
    Ok(off)
}

/// Decodes a big-endian table of u64 entries.
pub(crate) fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Encodes u64 entries big-endian.
pub(crate) fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Contiguous runs of sorted indices: `[(first, count)]`.
pub(crate) fn runs(indices: impl IntoIterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some((start, n)) if *start + *n == i => *n += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

struct Slot<T> {
    table: T,
    dirty: bool,
    used: u64,
}

/// A least-recently-used cache of metadata clusters keyed by host offset.
///
/// The cache never writes anything itself: the owner decides when dirty tables may reach the
/// disk (see the ordering rules in the qcow2 module docs), and [`TableCache::evict_clean`]
/// only drops tables that are already on disk.
pub(crate) struct TableCache<T> {
    slots: HashMap<u64, Slot<T>>,
    capacity: usize,
    tick: u64,
}

impl<T> TableCache<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            slots: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    pub(crate) fn get(&mut self, offset: u64) -> Option<&T> {
        self.tick += 1;
        let tick = self.tick;
        self.slots.get_mut(&offset).map(|s| {
            s.used = tick;
            &s.table
        })
    }

    /// The table at `offset`, marked dirty.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        self.tick += 1;
        let tick = self.tick;
        self.slots.get_mut(&offset).map(|s| {
            s.used = tick;
            s.dirty = true;
            &mut s.table
        })
    }

    pub(crate) fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Drops the least recently used clean table; `false` if every table is dirty.
    pub(crate) fn evict_clean(&mut self) -> bool {
        let victim = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used)
            .map(|(&off, _)| off);
        match victim {
            Some(off) => {
                self.slots.remove(&off);
                true
            }
            None => false,
        }
    }

    /// Adds a table; the caller made room first.
    pub(crate) fn insert(&mut self, offset: u64, table: T, dirty: bool) {
        self.tick += 1;
        self.slots.insert(
            offset,
            Slot {
                table,
                dirty,
                used: self.tick,
            },
        );
    }

    pub(crate) fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// Offsets of the dirty tables, sorted.
    pub(crate) fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    /// The table at `offset` without touching its recency, and marks it clean: for writeback.
    pub(crate) fn take_for_writeback(&mut self, offset: u64) -> Option<&T> {
        self.slots.get_mut(&offset).map(|s| {
            s.dirty = false;
            &s.table
        })
    }

    /// Marks the table at `offset` dirty again (its writeback failed).
    pub(crate) fn mark_dirty(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_kind_of_l2_entry() {
        assert_eq!(decode_l2(0, 16, 3), Ok(Mapping::Unallocated));
        assert_eq!(
            decode_l2(COPIED | 0x50000, 16, 3),
            Ok(Mapping::Data {
                host: 0x50000,
                copied: true
            })
        );
        assert_eq!(
            decode_l2(ZERO, 16, 3),
            Ok(Mapping::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(
            decode_l2(COPIED | ZERO | 0x30000, 16, 3),
            Ok(Mapping::Zero {
                host: Some(0x30000),
                copied: true
            })
        );
        assert!(decode_l2(ZERO, 16, 2).is_err());
        assert!(
            decode_l2(0x50200, 16, 3).is_err(),
            "unaligned to the cluster"
        );
        assert!(decode_l2(0x50002, 16, 3).is_err(), "reserved bits");
        // 64K clusters: offset in bits 0..54, additional sectors in 54..62.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            decode_l2(e, 16, 3),
            Ok(Mapping::Compressed {
                host: 0x12345,
                len: 4 * 512 - 0x145
            })
        );
    }

    #[test]
    fn groups_runs() {
        assert_eq!(runs([1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs([]).is_empty());
    }

    #[test]
    fn evicts_only_clean_tables_in_lru_order() {
        let mut c = TableCache::new(2);
        c.insert(1, "a", false);
        c.insert(2, "b", false);
        assert!(c.is_full());
        c.get(1);
        assert!(c.evict_clean());
        assert!(c.contains(1) && !c.contains(2));
        c.get_mut(1);
        assert!(!c.evict_clean());
        assert_eq!(c.dirty_offsets(), vec![1]);
        c.take_for_writeback(1);
        assert!(!c.has_dirty());
    }
}
