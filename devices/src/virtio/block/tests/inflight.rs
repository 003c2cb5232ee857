//! Many requests in flight together (io_uring) and the synchronous fallback: mixed batches of
//! reads, writes and flushes, a flush ordered after the writes before it, requests failing in
//! the middle of a batch, and pause with requests in flight.

use std::collections::HashMap;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Duration;

use super::*;
use crate::block::BlockError;

/// Both ways of serving requests; the io_uring one only where the kernel has it.
fn modes() -> Vec<bool> {
    match io_uring::IoUring::new(4) {
        Ok(_) => vec![true, false],
        Err(e) => {
            eprintln!("io_uring unavailable here ({e}): testing the synchronous path only");
            vec![false]
        }
    }
}

fn start_mode(disk: Box<dyn DiskImage>, io_uring: bool) -> Running {
    let mut blk = VirtioBlk::new(disk, None).unwrap();
    blk.set_io_uring(io_uring);
    start_with(blk, 256, true)
}

/// Queues a request with one data buffer (none for `len == 0`); returns (head, status addr).
fn queue(r: &mut Running, kind: u32, sector: u64, buf: u64, len: u32) -> (u16, u64) {
    let (h, s) = r.next_slots(kind, sector);
    let mut descs = vec![(h, 16, R)];
    if len > 0 {
        let flags = if kind == VIRTIO_BLK_T_IN { W } else { R };
        descs.push((buf, len, flags));
    }
    descs.push((s, 1, W));
    (r.ring.add_chain(&r.mem, &descs), s)
}

/// Kicks and waits for `total` used entries; returns head → used length.
fn run_batch(r: &mut Running, total: u16) -> HashMap<u32, u32> {
    r.notify.write(1).unwrap();
    assert!(r.ring.wait_used(&r.mem, total), "batch not served");
    (0..total).map(|i| r.ring.used_elem(&r.mem, i)).collect()
}

#[test]
fn mixed_batch_of_reads_writes_and_flushes() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_image(dir.path(), DISK_SIZE);
        let mut r = start_mode(open(&path, Format::Raw, false), mode);
        let p = pattern(DISK_SIZE);
        // 8-sector (4 KiB) slots: writes to slots 0..40, reads of slots 100..140, a flush
        // every 10 requests, then reads of the written slots after a last flush.
        let mut expect = Vec::new();
        for i in 0..80u64 {
            let buf = DATA + i * 4096;
            if i % 10 == 9 {
                expect.push((queue(&mut r, VIRTIO_BLK_T_FLUSH, 0, 0, 0), 1, None));
            } else if i % 2 == 0 {
                r.write(buf, &[i as u8 + 1; 4096]);
                expect.push((queue(&mut r, VIRTIO_BLK_T_OUT, i * 8, buf, 4096), 1, None));
            } else {
                r.write(buf, &[0xee; 4096]);
                let sector = (100 + i) * 8;
                let want = p[sector as usize * 512..sector as usize * 512 + 4096].to_vec();
                let req = queue(&mut r, VIRTIO_BLK_T_IN, sector, buf, 4096);
                expect.push((req, 4097, Some((buf, want))));
            }
        }
        expect.push((queue(&mut r, VIRTIO_BLK_T_FLUSH, 0, 0, 0), 1, None));
        // Written before the flush above: these reads see the new data. (The ring's 256
        // descriptors hold the whole batch: three per request, two per flush.)
        for i in (0..6u64).map(|k| k * 2) {
            let buf = DATA + (100 + i) * 4096;
            let req = queue(&mut r, VIRTIO_BLK_T_IN, i * 8, buf, 4096);
            expect.push((req, 4097, Some((buf, vec![i as u8 + 1; 4096]))));
        }
        let used = run_batch(&mut r, expect.len() as u16);
        assert_eq!(used.len(), expect.len(), "io_uring {mode}");
        for ((head, s), len, data) in &expect {
            assert_eq!(r.read(*s, 1), [S_OK], "io_uring {mode}");
            assert_eq!(used[&u32::from(*head)], *len);
            if let Some((buf, want)) = data {
                assert!(
                    r.read(*buf, 4096) == *want,
                    "io_uring {mode}: read at {buf:#x}"
                );
            }
        }
        for i in (0..80u64).filter(|i| i % 2 == 0 && i % 10 != 9) {
            assert_eq!(file_bytes(&path, i * 4096, 4096), vec![i as u8 + 1; 4096]);
        }
        let c = r.blk.counters();
        assert_eq!((c.write_ops(), c.read_ops(), c.flushes()), (40, 38, 9));
        assert_eq!(c.errors(), 0);
        // Each kind's time is counted, whichever path served it.
        assert!(
            c.read_ns() > 0 && c.write_ns() > 0 && c.flush_ns() > 0,
            "{mode}"
        );
        // With EVENT_IDX, the whole batch raised interrupts only as the driver asked.
        assert!(r.irq.wait_used(1));
    }
}

/// A raw disk whose direct path hands out a descriptor the kernel refuses for writes (opened
/// read-only), so writes put on the ring fail there and reads succeed.
struct RefusingFd {
    inner: Box<dyn DiskImage>,
    read_only_file: std::fs::File,
}

impl DiskImage for RefusingFd {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn format(&self) -> Format {
        self.inner.format()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn reload(&mut self) -> Result<(), BlockError> {
        self.inner.reload()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn passthrough(
        &mut self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
        write: bool,
    ) -> Option<(RawFd, u64)> {
        let (_, at) = self.inner.passthrough(bufs, offset, write)?;
        Some((self.read_only_file.as_raw_fd(), at))
    }
    fn read_volatile_at(
        &mut self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.inner.read_volatile_at(bufs, offset)
    }
    fn write_volatile_at(
        &mut self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        self.inner.write_volatile_at(bufs, offset)
    }
}

#[test]
fn requests_failing_mid_batch_fail_alone() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_image(dir.path(), DISK_SIZE);
        let disk = RefusingFd {
            inner: open(&path, Format::Raw, false),
            read_only_file: std::fs::File::open(&path).unwrap(),
        };
        let mut r = start_mode(Box::new(disk), mode);
        let p = pattern(DISK_SIZE);
        let cap = r.blk.capacity();
        let ok_read = |r: &mut Running, n: u64| {
            let buf = DATA + n * 4096;
            r.write(buf, &[0xee; 4096]);
            queue(r, VIRTIO_BLK_T_IN, n * 8, buf, 4096)
        };
        let mut reqs = vec![(ok_read(&mut r, 0), S_OK, 4097)];
        // Past the end, not whole sectors, outside guest memory: refused before any I/O.
        reqs.push((
            queue(&mut r, VIRTIO_BLK_T_IN, cap - 1, DATA + 0x8000, 4096),
            S_IOERR,
            1,
        ));
        reqs.push((
            queue(&mut r, VIRTIO_BLK_T_IN, 0, DATA + 0x9000, 1000),
            S_IOERR,
            1,
        ));
        reqs.push((queue(&mut r, VIRTIO_BLK_T_IN, 0, 1 << 40, 4096), S_IOERR, 1));
        reqs.push((ok_read(&mut r, 5), S_OK, 4097));
        // A write the kernel refuses on the ring (EBADF); synchronously it succeeds.
        r.write(DATA + 0xa000, &[0x77; 4096]);
        let write_status = if mode { S_IOERR } else { S_OK };
        reqs.push((
            queue(&mut r, VIRTIO_BLK_T_OUT, 16, DATA + 0xa000, 4096),
            write_status,
            1,
        ));
        reqs.push((ok_read(&mut r, 7), S_OK, 4097));
        let used = run_batch(&mut r, reqs.len() as u16);
        for ((head, s), status, len) in &reqs {
            assert_eq!(r.read(*s, 1), [*status], "io_uring {mode}, head {head}");
            assert_eq!(
                used[&u32::from(*head)],
                *len,
                "io_uring {mode}, head {head}"
            );
        }
        for n in [0u64, 5, 7] {
            let at = n as usize * 4096;
            assert!(r.read(DATA + n * 4096, 4096) == p[at..at + 4096]);
        }
        let written = if mode {
            p[16 * 512..16 * 512 + 4096].to_vec()
        } else {
            vec![0x77; 4096]
        };
        assert_eq!(file_bytes(&path, 16 * 512, 4096), written);
        let errors = if mode { 4 } else { 3 };
        assert_eq!(r.blk.counters().errors(), errors, "io_uring {mode}");
        assert_eq!(r.blk.counters().read_ops(), 3);
    }
}

#[test]
fn pause_waits_for_every_request_in_flight() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_image(dir.path(), 4 * DISK_SIZE);
        // O_DIRECT where the filesystem has it, so that requests stay in flight a while.
        let options = |direct| DiskOptions {
            format: Some(Format::Raw),
            read_only: false,
            direct,
            ..DiskOptions::default()
        };
        let disk = open_disk(&path, options(true))
            .or_else(|_| open_disk(&path, options(false)))
            .unwrap();
        let mut r = start_mode(disk, mode);
        // Three descriptors each: as many as the ring's descriptor table holds.
        const N: u16 = 85;
        let mut statuses = Vec::new();
        for i in 0..u64::from(N) {
            // Reads and writes of 4 KiB over the data area (reused: only the status matters).
            let buf = DATA + i * 4096;
            let kind = if i % 3 == 0 {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            r.write(buf, &[0xee; 4096]);
            let s = queue(&mut r, kind, (i % 800) * 8, buf, 4096).1;
            statuses.push((s, kind == VIRTIO_BLK_T_IN, buf));
        }
        r.notify.write(1).unwrap();
        // Pause once the worker is inside the batch.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while r.ring.used_idx(&r.mem) == 0 {
            assert!(std::time::Instant::now() < deadline, "nothing served");
            std::hint::spin_loop();
        }
        r.blk.pause();
        // Whatever was taken is complete: its status is written and it is in the used ring;
        // nothing completes after the pause returned.
        let done = r.ring.used_idx(&r.mem);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            r.ring.used_idx(&r.mem),
            done,
            "io_uring {mode}: completed while paused"
        );
        let finished = statuses
            .iter()
            .filter(|(s, _, _)| r.read(*s, 1) == [S_OK])
            .count();
        assert_eq!(finished, usize::from(done), "io_uring {mode}");
        // No read the device has not completed touched guest memory: none is in flight.
        for (s, read, buf) in &statuses {
            if *read && r.read(*s, 1) != [S_OK] {
                let untouched = r.read(*buf, 4096).iter().all(|&b| b == 0xee);
                assert!(
                    untouched,
                    "io_uring {mode}: a read completed after the pause"
                );
            }
        }
        r.blk.resume().unwrap();
        assert!(r.ring.wait_used(&r.mem, N), "io_uring {mode}");
        assert!(statuses.iter().all(|(s, _, _)| r.read(*s, 1) == [S_OK]));
    }
}

#[test]
fn qcow2_batches_allocate_synchronously_and_overwrite_on_the_ring() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let p = img.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p,
            "1M",
        ]);
        let mut r = start_mode(open(&img, Format::Qcow2, false), mode);
        let mut model = vec![0u8; DISK_SIZE as usize];
        // Allocating writes (served synchronously), every other 4 KiB cluster.
        let mut reqs = Vec::new();
        for i in 0..40u64 {
            let buf = DATA + i * 4096;
            r.write(buf, &[i as u8 + 1; 4096]);
            reqs.push(queue(&mut r, VIRTIO_BLK_T_OUT, i * 16, buf, 4096));
            model[(i * 8192) as usize..(i * 8192 + 4096) as usize].fill(i as u8 + 1);
        }
        run_batch(&mut r, 40);
        assert!(reqs.iter().all(|(_, s)| r.read(*s, 1) == [S_OK]));
        // Overwrites of allocated clusters (in place) and reads, some of them of
        // unallocated clusters (synchronous), in one batch.
        let mut reqs = Vec::new();
        let old = model.clone();
        for i in 0..40u64 {
            let buf = DATA + 0x4_0000 + i * 8192;
            if i % 2 == 0 {
                // Half a cluster at sector 4 of cluster 2i: offset 2048 inside it.
                r.write(buf, &[0xa0 + i as u8; 2048]);
                reqs.push((queue(&mut r, VIRTIO_BLK_T_OUT, i * 16 + 4, buf, 2048), None));
                let at = (i * 8192 + 2048) as usize;
                model[at..at + 2048].fill(0xa0 + i as u8);
            } else {
                // Cluster 2i - 1 is unallocated, 2i - 2 allocated: both read.
                r.write(buf, &[0xee; 8192]);
                let sector = (i - 1) * 16;
                reqs.push((queue(&mut r, VIRTIO_BLK_T_IN, sector, buf, 8192), Some(buf)));
            }
        }
        let used = run_batch(&mut r, 80);
        assert_eq!(used.len(), 80);
        for ((_, s), buf) in &reqs {
            assert_eq!(r.read(*s, 1), [S_OK], "io_uring {mode}");
            if let Some(buf) = buf {
                // Cluster 2i - 2 as before or after the write in the same batch (they are
                // in flight together), then the unallocated cluster's zeros.
                let i = (buf - DATA - 0x4_0000) / 8192;
                let at = ((i - 1) * 8192) as usize;
                let got = r.read(*buf, 8192);
                assert!(
                    got[..4096] == old[at..at + 4096] || got[..4096] == model[at..at + 4096],
                    "io_uring {mode}: read of cluster {}",
                    2 * (i - 1)
                );
                assert_eq!(got[4096..], [0; 4096]);
            }
        }
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, S_OK);
        drop(r);
        qemu_img(&["check", "-q", p]);
        let out = dir.path().join("out.raw");
        qemu_img(&["convert", "-O", "raw", p, out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == model, "io_uring {mode}");
    }
}

/// Microbenchmark (run by hand: `cargo test --release -p devices --lib bench_ -- --ignored
/// --nocapture`): 4 KiB random reads at queue depth 32 from a raw image opened with
/// `O_DIRECT`, served synchronously and on the ring.
#[test]
#[ignore]
fn bench_random_reads_qd32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.raw");
    const SIZE: u64 = 128 << 20;
    let chunk = pattern(1 << 20);
    let mut file = std::fs::File::create(&path).unwrap();
    for _ in 0..SIZE >> 20 {
        std::io::Write::write_all(&mut file, &chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    for mode in modes() {
        let disk = open_disk(
            &path,
            DiskOptions {
                format: Some(Format::Raw),
                read_only: false,
                direct: true,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        let mut r = start_mode(disk, mode);
        let mut rng = 0x1234_5678_9abc_def0u64;
        let rounds = 400u16;
        let start = std::time::Instant::now();
        for round in 0..rounds {
            for k in 0..32u64 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let sector = (rng % (SIZE / 4096)) * 8;
                queue(&mut r, VIRTIO_BLK_T_IN, sector, DATA + k * 4096, 4096);
            }
            r.notify.write(1).unwrap();
            // Spin: the 1 ms sleeps of `wait_used` would dominate.
            let target = (round + 1).wrapping_mul(32);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while r.ring.used_idx(&r.mem) != target {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round} not served"
                );
                std::hint::spin_loop();
            }
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "io_uring {mode}: {:.0} IOPS (4 KiB random reads, QD32, O_DIRECT)",
            f64::from(rounds) * 32.0 / secs
        );
    }
}
