//! The features virtio-blk offers and its configuration space (virtio 1.x section 5.2.4).

use std::mem::offset_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use super::ID_BYTES;
use crate::virtio::{VIRTIO_F_VERSION_1_BIT, VIRTIO_RING_F_EVENT_IDX_BIT};

/// Size of the request queue.
pub const BLK_QUEUE_SIZE: u16 = 256;
/// The unit of `capacity` and of request sectors, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Logical block size reported to the driver.
const BLK_SIZE: u32 = 512;
/// Physical block = logical block << this (4 KiB): the driver aligns its I/O to it, which
/// suits `O_DIRECT` hosts and qcow2 clusters.
const PHYSICAL_BLOCK_EXP: u8 = 3;
/// Data segments per request: the queue size less the header and status descriptors (what
/// Linux can fit in one indirect table or in the ring).
pub(super) const SEG_MAX: u32 = BLK_QUEUE_SIZE as u32 - 2;
/// Bytes per data segment (VIRTIO_BLK_F_SIZE_MAX): with [`SEG_MAX`], a request moves at
/// most 254 MiB, so that one request cannot keep the device busy for long.
pub(super) const SIZE_MAX: u32 = 1 << 20;
/// Sectors per DISCARD / WRITE_ZEROES segment (512 MiB).
pub(super) const MAX_DISCARD_SECTORS: u32 = 1 << 20;
/// Segments per DISCARD / WRITE_ZEROES request.
pub(super) const MAX_DISCARD_SEG: u32 = 8;

/// Bytes of configuration space exposed: everything up to the secure-erase fields (not offered).
pub const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The device's fixed description: what it offers and its configuration bytes.
pub struct BlkConfig {
    /// Capacity in 512-byte sectors (a partial last sector is not exposed).
    pub capacity: u64,
    /// The image refuses writes.
    pub read_only: bool,
    /// Request queues offered.
    pub num_queues: u16,
    bytes: [u8; CONFIG_LEN],
}

impl BlkConfig {
    /// The description of a disk of `size` bytes with `num_queues` request queues.
    pub fn new(size: u64, read_only: bool, num_queues: u16) -> Self {
        let capacity = size / SECTOR_SIZE;
        let mut config = BlkConfig {
            capacity,
            read_only,
            num_queues,
            bytes: [0; CONFIG_LEN],
        };
        macro_rules! put {
            ($field:ident, $value:expr) => {
                config.put(offset_of!(virtio_blk_config, $field), &$value.to_le_bytes())
            };
        }
        put!(capacity, capacity);
        put!(size_max, SIZE_MAX);
        put!(seg_max, SEG_MAX);
        put!(blk_size, BLK_SIZE);
        put!(physical_block_exp, PHYSICAL_BLOCK_EXP);
        put!(min_io_size, 1u16 << PHYSICAL_BLOCK_EXP);
        put!(num_queues, num_queues);
        put!(max_discard_sectors, MAX_DISCARD_SECTORS);
        put!(max_discard_seg, MAX_DISCARD_SEG);
        put!(discard_sector_alignment, BLK_SIZE / SECTOR_SIZE as u32);
        put!(max_write_zeroes_sectors, MAX_DISCARD_SECTORS);
        put!(max_write_zeroes_seg, MAX_DISCARD_SEG);
        put!(write_zeroes_may_unmap, 1u8);
        config
    }

    fn put(&mut self, at: usize, value: &[u8]) {
        self.bytes[at..at + value.len()].copy_from_slice(value);
    }

    /// The feature bits offered: RO for a read-only image, DISCARD and WRITE_ZEROES otherwise;
    /// MQ with more than one queue.
    pub fn features(&self) -> u64 {
        let mq = if self.num_queues > 1 {
            bit(VIRTIO_BLK_F_MQ)
        } else {
            0
        };
        let common = mq
            | VIRTIO_F_VERSION_1_BIT
            | VIRTIO_RING_F_EVENT_IDX_BIT
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            common | bit(VIRTIO_BLK_F_RO)
        } else {
            common | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        }
    }

    /// Reads the configuration at `offset`; bytes past its end read as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= CONFIG_LEN {
            return;
        }
        let n = data.len().min(CONFIG_LEN - start);
        data[..n].copy_from_slice(&self.bytes[start..start + n]);
    }

    /// What the worker needs to execute requests, given the features the driver accepted.
    pub(super) fn execution(&self, acked: u64, id: [u8; ID_BYTES]) -> Execution {
        Execution {
            capacity: self.capacity,
            read_only: self.read_only,
            writeback: acked & bit(VIRTIO_BLK_F_FLUSH) != 0,
            discard: acked & bit(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            id,
        }
    }
}

/// The parameters requests are executed with.
#[derive(Clone, Copy, Debug)]
pub(super) struct Execution {
    pub capacity: u64,
    pub read_only: bool,
    /// FLUSH was negotiated: writes may stay in the host cache until a FLUSH. Without it the
    /// device is write-through (each write is flushed before it completes).
    pub writeback: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub id: [u8; ID_BYTES],
}
