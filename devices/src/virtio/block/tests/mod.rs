//! virtio-blk through its queue: requests laid out in guest memory as a driver would, served
//! by the worker thread against real raw and qcow2 images in a temporary directory.

mod hostile;
mod inflight;
mod multiqueue;
mod pause;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::block::{open_disk, DiskOptions, Format};
use crate::virtio::testing::*;
use crate::virtio::{ActivatedQueue, VIRTIO_F_VERSION_1_BIT, VIRTIO_RING_F_EVENT_IDX_BIT};

const MEM_SIZE: usize = 0x10_0000;
/// Disk size used by most tests: 1 MiB = 2048 sectors.
const DISK_SIZE: u64 = 1 << 20;
const HEADERS: u64 = 0x1_0000;
const STATUSES: u64 = 0x1_8000;
const DATA: u64 = 0x2_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The bytes of sector `n` of the pattern images: every byte says which sector it is in.
fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(7) ^ (i as u8))
        .collect()
}

/// A raw image of `size` bytes holding [`pattern`].
fn raw_image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    std::fs::write(&path, pattern(size)).unwrap();
    path
}

fn open(path: &Path, format: Format, read_only: bool) -> Box<dyn DiskImage> {
    open_disk(
        path,
        DiskOptions {
            format: Some(format),
            read_only,
            ..DiskOptions::default()
        },
    )
    .unwrap()
}

fn queue_for(ring: &TestRing, event_idx: bool) -> Arc<Mutex<Queue>> {
    let mut q = Queue::new(BLK_QUEUE_SIZE).unwrap();
    q.set_size(ring.size);
    q.set_desc_table_address(Some(ring.desc as u32), Some(0));
    q.set_avail_ring_address(Some(ring.avail as u32), Some(0));
    q.set_used_ring_address(Some(ring.used as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Arc::new(Mutex::new(q))
}

struct Running {
    mem: GuestMemoryMmap,
    ring: TestRing,
    blk: VirtioBlk,
    notify: EventFd,
    irq: Arc<CountingInterrupt>,
    /// Requests submitted so far (each gets its own header and status slot).
    submitted: u64,
}

/// Activates `blk` on a fresh ring of `ring_size`, with every offered feature acked except
/// EVENT_IDX unless asked for.
fn start_with(mut blk: VirtioBlk, ring_size: u16, event_idx: bool) -> Running {
    let mem = guest_memory(MEM_SIZE);
    let ring = TestRing::new(0x1000, ring_size);
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(CountingInterrupt::default());
    let mut acked = blk.features();
    if !event_idx {
        acked &= !VIRTIO_RING_F_EVENT_IDX_BIT;
    }
    blk.ack_features(acked);
    let queue = ActivatedQueue {
        index: 0,
        queue: queue_for(&ring, event_idx),
        notify: notify.try_clone().unwrap(),
    };
    blk.activate(mem.clone(), irq.clone(), vec![queue]).unwrap();
    Running {
        mem,
        ring,
        blk,
        notify,
        irq,
        submitted: 0,
    }
}

fn start(disk: Box<dyn DiskImage>) -> Running {
    start_with(VirtioBlk::new(disk, None).unwrap(), 64, false)
}

/// Where request `n`'s header and status live.
fn header_addr(n: u64) -> u64 {
    HEADERS + 32 * (n % 1024)
}
fn status_addr(n: u64) -> u64 {
    STATUSES + (n % 4096)
}

impl Running {
    /// Writes a header for the next request and returns its address and the status address
    /// (the status byte is preset to 0xff so an untouched status is seen).
    fn next_slots(&mut self, kind: u32, sector: u64) -> (u64, u64) {
        let n = self.submitted;
        self.submitted += 1;
        let (h, s) = (header_addr(n), status_addr(n));
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(h, &raw);
        self.write(s, &[0xff]);
        (h, s)
    }

    /// Submits `descs`, kicks the device, waits for completion; returns the used length.
    fn complete(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        let head = self.ring.add_chain(&self.mem, descs);
        self.kick_and_wait(head)
    }

    fn kick_and_wait(&mut self, head: u16) -> u32 {
        let idx = self.ring.avail_idx(&self.mem);
        self.notify.write(1).unwrap();
        assert!(self.ring.wait_used(&self.mem, idx), "request not served");
        let (id, len) = self.ring.used_elem(&self.mem, idx.wrapping_sub(1));
        assert_eq!(id, u32::from(head));
        len
    }

    /// A well-formed request: header, data descriptors, status. Returns (status, used len).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
        let (h, s) = self.next_slots(kind, sector);
        let mut descs = vec![(h, 16, R)];
        descs.extend_from_slice(data);
        descs.push((s, 1, W));
        let len = self.complete(&descs);
        (self.read(s, 1)[0], len)
    }

    /// Reads `len` bytes at `sector` into guest memory at `DATA`; returns status and bytes.
    fn read_sectors(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.write(DATA, &vec![0xee; len as usize]);
        let (status, used) = self.request(VIRTIO_BLK_T_IN, sector, &[(DATA, len, W)]);
        if status == S_OK {
            assert_eq!(used, len + 1);
        }
        (status, self.read(DATA, len as usize))
    }

    /// Writes `bytes` at `sector` from guest memory at `DATA`; returns the status.
    fn write_sectors(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        self.write(DATA, bytes);
        let (status, used) =
            self.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, bytes.len() as u32, R)]);
        assert_eq!(used, 1);
        status
    }

    /// A DISCARD or WRITE_ZEROES request with `(sector, sectors, flags)` segments.
    fn discard(&mut self, kind: u32, segments: &[(u64, u32, u32)]) -> u8 {
        let mut raw = Vec::new();
        for (sector, sectors, flags) in segments {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&sectors.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        self.write(DATA, &raw);
        self.request(kind, 0, &[(DATA, raw.len() as u32, R)]).0
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    data[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn raw_read_write_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut r = start(open(&path, Format::Raw, false));

    // Reads see the image's bytes.
    let (status, got) = r.read_sectors(3, 2048);
    assert_eq!(status, S_OK);
    assert_eq!(got, pattern(DISK_SIZE)[3 * 512..3 * 512 + 2048]);
    // What a read wrote into guest memory is marked dirty (live migration sends it again).
    let _ = crate::take_dirty_pages(&r.mem);
    let (status, _) = r.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x5_0000, 8192, W)]);
    assert_eq!(status, S_OK);
    let dirty = crate::take_dirty_pages(&r.mem);
    for page in [DATA + 0x5_0000, DATA + 0x5_1000] {
        assert!(dirty.contains(&page), "{page:#x} not in {dirty:x?}");
    }

    // A write split over two descriptors lands in the file at sector 8.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
    r.write(DATA + 0x1_0000, &data[..512]);
    r.write(DATA + 0x3_0000, &data[512..]);
    let (status, used) = r.request(
        VIRTIO_BLK_T_OUT,
        8,
        &[(DATA + 0x1_0000, 512, R), (DATA + 0x3_0000, 3584, R)],
    );
    assert_eq!((status, used), (S_OK, 1));
    assert_eq!(file_bytes(&path, 8 * 512, 4096), data);
    // Its neighbours are untouched.
    assert_eq!(
        file_bytes(&path, 7 * 512, 512),
        pattern(DISK_SIZE)[7 * 512..8 * 512]
    );

    // And reads back through the queue, scattered over three buffers.
    r.write(DATA, &[0; 4096]);
    let (status, used) = r.request(
        VIRTIO_BLK_T_IN,
        8,
        &[
            (DATA, 1000, W),
            (DATA + 0x2000, 24, W),
            (DATA + 0x4000, 3072, W),
        ],
    );
    assert_eq!((status, used), (S_OK, 4097));
    let mut back = r.read(DATA, 1000);
    back.extend(r.read(DATA + 0x2000, 24));
    back.extend(r.read(DATA + 0x4000, 3072));
    assert_eq!(back, data);

    let c = r.blk.counters();
    assert_eq!((c.read_ops(), c.read_bytes()), (3, 2048 + 8192 + 4096));
    assert_eq!((c.write_ops(), c.write_bytes()), (1, 4096));
    assert_eq!(c.errors(), 0);
    assert!(r.irq.wait_used(4));
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("these tests need qemu-img (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qcow2_read_write_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let p = path.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p,
        "4M",
    ]);
    let mut r = start(open(&path, Format::Qcow2, false));
    assert_eq!(r.blk.capacity(), 8192);

    // Unallocated clusters read as zeros.
    let (status, got) = r.read_sectors(100, 4096);
    assert_eq!((status, got), (S_OK, vec![0; 4096]));

    // A write across a cluster boundary, then a read of it and its surroundings.
    let data: Vec<u8> = (0..12288u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(r.write_sectors(5, &data), S_OK);
    let (status, got) = r.read_sectors(4, 14336);
    assert_eq!(status, S_OK);
    assert_eq!(got[..512], [0; 512]);
    assert_eq!(got[512..512 + 12288], data[..]);
    assert_eq!(got[512 + 12288..], [0; 1536]);
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, S_OK);
    drop(r);

    // QEMU reads the same bytes.
    let out = dir.path().join("out.raw");
    qemu_img(&["convert", "-O", "raw", p, out.to_str().unwrap()]);
    assert_eq!(file_bytes(&out, 5 * 512, 12288), data);
    qemu_img(&["check", "-q", p]);
}

#[test]
fn flush_completes_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut r = start(open(&path, Format::Raw, false));
    assert_eq!(r.write_sectors(0, &[9; 512]), S_OK);
    let (status, used) = r.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((status, used), (S_OK, 1));
    assert_eq!(r.blk.counters().flushes(), 1);
    assert_eq!(file_bytes(&path, 0, 512), vec![9; 512]);
}

#[test]
fn get_id_returns_the_serial() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let blk = VirtioBlk::new(open(&path, Format::Raw, false), Some("podvisor-0".into())).unwrap();
    let mut r = start_with(blk, 64, false);
    r.write(DATA, &[0xee; 32]);
    let (status, used) = r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!((status, used), (S_OK, 21));
    let mut want = b"podvisor-0".to_vec();
    want.resize(20, 0);
    assert_eq!(r.read(DATA, 20), want);
    // A shorter buffer gets what fits, a longer one only the 20 bytes.
    r.write(DATA, &[0xee; 32]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 4, W)]),
        (S_OK, 5)
    );
    assert_eq!(r.read(DATA, 5), b"podv\xee");
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 32, W)]),
        (S_OK, 21)
    );
}

#[test]
fn serial_limits_and_default_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let long = "x".repeat(21);
    let err = VirtioBlk::new(open(&path, Format::Raw, false), Some(long.clone()))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains(&long) && msg.contains("21") && msg.contains("20"),
        "{msg}"
    );
    let exact = "y".repeat(20);
    let blk = VirtioBlk::new(open(&path, Format::Raw, false), Some(exact.clone())).unwrap();
    assert_eq!(blk.id(), exact.as_bytes());
    drop(blk);

    // The default ID is stable for a file and differs between files.
    let a = VirtioBlk::new(open(&path, Format::Raw, true), None).unwrap();
    let b = VirtioBlk::new(open(&path, Format::Raw, true), None).unwrap();
    assert_eq!(a.id(), b.id());
    assert_ne!(a.id(), &[0; ID_BYTES]);
    let other = dir.path().join("other.raw");
    std::fs::write(&other, [0; 512]).unwrap();
    let c = VirtioBlk::new(open(&other, Format::Raw, true), None).unwrap();
    assert_ne!(a.id(), c.id());
}

#[test]
fn write_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut r = start(open(&path, Format::Raw, false));
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // Two segments, one of them allowed to unmap.
    assert_eq!(
        r.discard(VIRTIO_BLK_T_WRITE_ZEROES, &[(8, 8, unmap), (40, 1, 0)]),
        S_OK
    );
    let p = pattern(DISK_SIZE);
    assert_eq!(file_bytes(&path, 8 * 512, 4096), vec![0; 4096]);
    assert_eq!(file_bytes(&path, 40 * 512, 512), vec![0; 512]);
    assert_eq!(file_bytes(&path, 7 * 512, 512), p[7 * 512..8 * 512]);
    assert_eq!(file_bytes(&path, 16 * 512, 512), p[16 * 512..17 * 512]);
    assert_eq!(file_bytes(&path, 41 * 512, 512), p[41 * 512..42 * 512]);
    let (status, got) = r.read_sectors(8, 4096);
    assert_eq!((status, got), (S_OK, vec![0; 4096]));

    // Discard (advisory; raw punches a hole, which reads as zeros).
    assert_eq!(r.discard(VIRTIO_BLK_T_DISCARD, &[(64, 16, 0)]), S_OK);
    // Discard with the UNMAP flag, or unknown flags, is unsupported.
    assert_eq!(
        r.discard(VIRTIO_BLK_T_DISCARD, &[(64, 16, unmap)]),
        S_UNSUPP
    );
    assert_eq!(
        r.discard(VIRTIO_BLK_T_WRITE_ZEROES, &[(64, 16, 2)]),
        S_UNSUPP
    );
    // Out of range, overflowing, too large, empty, ragged, too many segments: rejected,
    // and nothing is executed when one segment of several is bad.
    let cap = r.blk.capacity();
    assert_eq!(
        r.discard(VIRTIO_BLK_T_WRITE_ZEROES, &[(100, 1, 0), (cap, 1, 0)]),
        S_IOERR
    );
    assert_eq!(file_bytes(&path, 100 * 512, 512), p[100 * 512..101 * 512]);
    assert_eq!(
        r.discard(VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 2, 0)]),
        S_IOERR
    );
    assert_eq!(
        r.discard(
            VIRTIO_BLK_T_DISCARD,
            &[(0, config::MAX_DISCARD_SECTORS + 1, 0)]
        ),
        S_IOERR
    );
    assert_eq!(r.discard(VIRTIO_BLK_T_DISCARD, &[]), S_IOERR);
    r.write(DATA, &[0; 24]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 24, R)]).0,
        S_IOERR
    );
    let many = vec![(0, 1, 0); config::MAX_DISCARD_SEG as usize + 1];
    assert_eq!(r.discard(VIRTIO_BLK_T_DISCARD, &many), S_UNSUPP);
    let c = r.blk.counters();
    assert_eq!((c.write_zeroes(), c.discards(), c.errors()), (1, 1, 8));
}

#[test]
fn discard_is_unsupported_unless_negotiated() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut blk = VirtioBlk::new(open(&path, Format::Raw, false), None).unwrap();
    let discard_bits = (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    assert_eq!(blk.features() & discard_bits, discard_bits);
    blk.ack_features(VIRTIO_F_VERSION_1_BIT);
    let mem = guest_memory(MEM_SIZE);
    let ring = TestRing::new(0x1000, 16);
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(CountingInterrupt::default());
    let queue = ActivatedQueue {
        index: 0,
        queue: queue_for(&ring, false),
        notify: notify.try_clone().unwrap(),
    };
    blk.activate(mem.clone(), irq.clone(), vec![queue]).unwrap();
    let mut r = Running {
        mem,
        ring,
        blk,
        notify,
        irq,
        submitted: 0,
    };
    assert_eq!(r.discard(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]), S_UNSUPP);
    assert_eq!(r.discard(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]), S_UNSUPP);
    assert_eq!(file_bytes(&path, 0, 4096), pattern(4096));
    // Write-through without FLUSH: writes still work.
    assert_eq!(r.write_sectors(0, &[3; 512]), S_OK);
    assert_eq!(file_bytes(&path, 0, 512), vec![3; 512]);
}

#[test]
fn read_only_disk_rejects_writes_and_keeps_serving_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let blk = VirtioBlk::new(open(&path, Format::Raw, true), None).unwrap();
    let f = blk.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut r = start_with(blk, 64, false);
    assert_eq!(r.write_sectors(0, &[1; 1024]), S_IOERR);
    assert_eq!(r.discard(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]), S_IOERR);
    assert_eq!(r.discard(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]), S_IOERR);
    let (status, got) = r.read_sectors(0, 1024);
    assert_eq!((status, got), (S_OK, pattern(1024)));
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, S_OK);
    assert_eq!(std::fs::read(&path).unwrap(), pattern(DISK_SIZE));
    assert_eq!(r.blk.counters().errors(), 3);
}

#[test]
fn out_of_range_sectors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A partial last sector is not exposed.
    let path = raw_image(dir.path(), DISK_SIZE + 100);
    let mut r = start(open(&path, Format::Raw, false));
    let cap = r.blk.capacity();
    assert_eq!(cap, DISK_SIZE / 512);
    assert_eq!(r.read_sectors(cap - 1, 512).0, S_OK);
    assert_eq!(r.read_sectors(cap - 1, 1024).0, S_IOERR);
    assert_eq!(r.read_sectors(cap, 512).0, S_IOERR);
    assert_eq!(r.read_sectors(u64::MAX, 512).0, S_IOERR);
    assert_eq!(r.read_sectors(u64::MAX / 512 + 1, 512).0, S_IOERR);
    assert_eq!(r.write_sectors(cap, &[1; 512]), S_IOERR);
    assert_eq!(r.write_sectors(u64::MAX, &[1; 512]), S_IOERR);
    // Data that is not whole sectors.
    assert_eq!(r.read_sectors(0, 100).0, S_IOERR);
    assert_eq!(r.write_sectors(0, &[1; 700]), S_IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), pattern(DISK_SIZE + 100));
    assert_eq!(r.blk.counters().errors(), 8);
    // An unknown request type.
    assert_eq!(r.request(99, 0, &[]), (S_UNSUPP, 1));
}

#[test]
fn many_requests_are_served_in_one_batch_with_one_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut blk = VirtioBlk::new(open(&path, Format::Raw, false), None).unwrap();
    // Served synchronously, the batch completes as a whole (with io_uring, completions are
    // signalled as they arrive: see `inflight`).
    blk.set_io_uring(false);
    let mut r = start_with(blk, 256, false);
    // Queued while the worker is parked, so that its first look at the queue sees them all
    // (a worker thread still starting could otherwise serve the first ones on their own).
    r.blk.pause();
    // 80 requests of three descriptors each: even ones read sector i, odd ones write it.
    let mut heads = Vec::new();
    for i in 0..80u64 {
        let kind = if i % 2 == 0 {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        let (h, s) = r.next_slots(kind, i);
        let buf = DATA + i * 1024;
        let flags = if i % 2 == 0 { W } else { R };
        r.write(buf, &[i as u8; 512]);
        heads.push((
            r.ring
                .add_chain(&r.mem, &[(h, 16, R), (buf, 512, flags), (s, 1, W)]),
            s,
        ));
    }
    r.blk.resume().unwrap();
    assert!(r.ring.wait_used(&r.mem, 80));
    let p = pattern(DISK_SIZE);
    // Requests in flight together complete in any order (IN_ORDER is not offered).
    let used: std::collections::HashMap<u32, u32> =
        (0..80u16).map(|i| r.ring.used_elem(&r.mem, i)).collect();
    assert_eq!(used.len(), 80);
    for (i, (head, s)) in heads.iter().enumerate() {
        assert_eq!(r.read(*s, 1), [S_OK]);
        let len = used[&u32::from(*head)];
        let at = i * 512;
        if i % 2 == 0 {
            assert_eq!(len, 513);
            assert_eq!(r.read(DATA + i as u64 * 1024, 512), p[at..at + 512]);
        } else {
            assert_eq!(len, 1);
            assert_eq!(file_bytes(&path, at as u64, 512), vec![i as u8; 512]);
        }
    }
    assert!(r.irq.wait_used(1));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.irq.used.load(Ordering::SeqCst), 1);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let blk = VirtioBlk::new(open(&path, Format::Raw, false), None).unwrap();
    let mut r = start_with(blk, 64, true);
    r.ring.set_used_event(&r.mem, 5);
    assert_eq!(r.read_sectors(0, 512).0, S_OK);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.irq.used.load(Ordering::SeqCst), 0);
    // used_event = 1: the next used entry (index 1 -> 2) crosses it.
    r.ring.set_used_event(&r.mem, 1);
    assert_eq!(r.read_sectors(0, 512).0, S_OK);
    assert!(r.irq.wait_used(1));
}

#[test]
fn reset_stops_the_worker_and_activate_starts_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut r = start(open(&path, Format::Raw, false));
    assert_eq!(r.write_sectors(0, &[5; 512]), S_OK);
    r.blk.reset();
    // Nothing is served after the reset.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    r.ring
        .add_chain(&r.mem, &[(h, 16, R), (DATA, 512, W), (s, 1, W)]);
    r.notify.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.ring.used_idx(&r.mem), 1);
    assert_eq!(r.read(s, 1), [0xff]);
    r.blk.reset();

    // The driver re-initialises: a fresh ring, features, activation.
    r.ring = TestRing::new(0x8000, 16);
    r.blk
        .ack_features(r.blk.features() & !VIRTIO_RING_F_EVENT_IDX_BIT);
    let queue = ActivatedQueue {
        index: 0,
        queue: queue_for(&r.ring, false),
        notify: r.notify.try_clone().unwrap(),
    };
    r.blk
        .activate(r.mem.clone(), r.irq.clone(), vec![queue])
        .unwrap();
    let (status, got) = r.read_sectors(0, 512);
    assert_eq!((status, got), (S_OK, vec![5; 512]));
}

#[test]
fn configuration_space_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mut blk = VirtioBlk::new(open(&path, Format::Raw, false), None).unwrap();
    assert_eq!(blk.device_type(), 2);
    assert_eq!(blk.queue_max_sizes(), &[BLK_QUEUE_SIZE]);
    let f = blk.features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & VIRTIO_F_VERSION_1_BIT, VIRTIO_F_VERSION_1_BIT);
    assert_eq!(f & VIRTIO_RING_F_EVENT_IDX_BIT, VIRTIO_RING_F_EVENT_IDX_BIT);
    assert_eq!(blk.config_len(), 60);

    let mut cfg = vec![0u8; 60];
    blk.read_config(0, &mut cfg);
    let le32 = |at: usize| u32::from_le_bytes(cfg[at..at + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 2048);
    assert_eq!(le32(12), u32::from(BLK_QUEUE_SIZE) - 2); // seg_max
    assert_eq!(le32(20), 512); // blk_size
    assert_eq!(cfg[24], 3); // physical_block_exp
    assert_eq!(le32(36), config::MAX_DISCARD_SECTORS);
    assert_eq!(le32(40), config::MAX_DISCARD_SEG);
    assert_eq!(le32(48), config::MAX_DISCARD_SECTORS);
    assert_eq!(cfg[56], 1); // write_zeroes_may_unmap
                            // Partial and out-of-range reads; writes change nothing.
    let mut cap = [0u8; 4];
    blk.read_config(1, &mut cap);
    assert_eq!(cap, [8, 0, 0, 0]);
    blk.read_config(58, &mut cap);
    assert_eq!(cap, [0; 4]);
    blk.write_config(0, &[0xff; 8]);
    blk.read_config(0, &mut cap);
    assert_eq!(cap, [0, 8, 0, 0]);

    let mem = guest_memory(MEM_SIZE);
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingInterrupt::default());
    assert!(matches!(
        blk.activate(mem, irq, Vec::new()),
        Err(VirtioError::QueueCount { got: 0, .. })
    ));
}
