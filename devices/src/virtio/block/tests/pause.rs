//! Pause and resume: a paused device serves nothing and touches nothing, requests in flight
//! complete before the pause returns, and resume serves what the driver queued meanwhile.

use std::time::Duration;

use super::*;
use crate::block::BlockError;

/// A disk whose writes take a while, so a pause lands while a batch is being served.
struct SlowDisk {
    inner: Box<dyn DiskImage>,
    delay: Duration,
}

impl DiskImage for SlowDisk {
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
        std::thread::sleep(self.delay);
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
        self.inner.is_read_only()
    }
    fn write_volatile_at(
        &mut self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        std::thread::sleep(self.delay);
        self.inner.write_volatile_at(bufs, offset)
    }
}

fn running() -> (tempfile::TempDir, PathBuf, Running) {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let r = start(open(&path, Format::Raw, false));
    (dir, path, r)
}

/// Queues a one-sector write of `byte` at `sector` (not kicked); returns the status address.
fn queue_write(r: &mut Running, sector: u64, byte: u8, buf: u64) -> u64 {
    let (h, s) = r.next_slots(VIRTIO_BLK_T_OUT, sector);
    r.write(buf, &[byte; 512]);
    r.ring
        .add_chain(&r.mem, &[(h, 16, R), (buf, 512, R), (s, 1, W)]);
    s
}

#[test]
fn paused_device_serves_nothing_until_resumed() {
    let (_dir, path, mut r) = running();
    assert_eq!(r.write_sectors(0, &[1; 512]), S_OK);
    r.blk.pause();
    let s_write = queue_write(&mut r, 4, 0x44, DATA + 0x1000);
    let (h, s_read) = r.next_slots(VIRTIO_BLK_T_IN, 8);
    r.write(DATA + 0x2000, &[0xee; 512]);
    r.ring.add_chain(
        &r.mem,
        &[(h, 16, R), (DATA + 0x2000, 512, W), (s_read, 1, W)],
    );
    r.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.ring.used_idx(&r.mem), 1, "served while paused");
    assert_eq!(r.read(s_write, 1), [0xff]);
    assert_eq!(r.read(s_read, 1), [0xff]);
    assert_eq!(r.read(DATA + 0x2000, 512), vec![0xee; 512]);
    assert_eq!(
        file_bytes(&path, 4 * 512, 512),
        pattern(DISK_SIZE)[2048..2560]
    );
    let irqs = r.irq.used.load(Ordering::SeqCst);

    r.blk.resume().unwrap();
    assert!(r.ring.wait_used(&r.mem, 3), "not served after resume");
    assert_eq!(r.read(s_write, 1), [S_OK]);
    assert_eq!(r.read(s_read, 1), [S_OK]);
    assert_eq!(file_bytes(&path, 4 * 512, 512), vec![0x44; 512]);
    assert_eq!(r.read(DATA + 0x2000, 512), pattern(DISK_SIZE)[4096..4608]);
    assert!(r.irq.wait_used(irqs + 1));
    let c = VirtioDevice::counters(&r.blk);
    assert_eq!((c["write_ops"], c["write_bytes"]), (2, 1024));
    assert_eq!((c["read_ops"], c["read_bytes"]), (1, 512));
    assert_eq!((c["errors"], c["flushes"], c["discards"]), (0, 0, 0));
}

#[test]
fn pause_lets_the_batch_in_flight_finish_and_starts_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let disk = SlowDisk {
        inner: open(&path, Format::Raw, false),
        delay: Duration::from_millis(3),
    };
    let blk = VirtioBlk::new(Box::new(disk), None).unwrap();
    let mut r = start_with(blk, 256, false);
    const N: u64 = 60;
    let statuses: Vec<u64> = (0..N)
        .map(|i| queue_write(&mut r, i, i as u8 + 1, DATA + i * 512))
        .collect();
    r.notify.write(1).unwrap();
    // Pause once the worker is inside the batch.
    assert!(r.ring.wait_used_at_least(&r.mem, 1));
    r.blk.pause();
    let done = r.ring.used_idx(&r.mem);
    let p = pattern(DISK_SIZE);
    let check = |r: &Running, done: u16| {
        for (i, s) in statuses.iter().enumerate() {
            let at = i as u64 * 512;
            if (i as u16) < done {
                assert_eq!(r.read(*s, 1), [S_OK], "request {i}");
                assert_eq!(file_bytes(&path, at, 512), vec![i as u8 + 1; 512]);
            } else {
                assert_eq!(r.read(*s, 1), [0xff], "request {i} touched");
                assert_eq!(
                    file_bytes(&path, at, 512),
                    p[at as usize..at as usize + 512]
                );
            }
        }
    };
    check(&r, done);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.ring.used_idx(&r.mem), done, "served after pause returned");
    check(&r, done);
    r.blk.resume().unwrap();
    assert!(r.ring.wait_used(&r.mem, N as u16));
    check(&r, N as u16);
    assert_eq!(VirtioDevice::counters(&r.blk)["write_ops"], N);
}

#[test]
fn pause_resume_reset_and_drop_in_any_order() {
    let (_dir, _path, mut r) = running();
    // Resume without a pause, pause twice, resume twice.
    r.blk.resume().unwrap();
    r.blk.pause();
    r.blk.pause();
    r.blk.resume().unwrap();
    r.blk.resume().unwrap();
    assert_eq!(r.write_sectors(0, &[2; 512]), S_OK);
    // Reset while paused: resume brings nothing back.
    r.blk.pause();
    r.blk.reset();
    r.blk.resume().unwrap();
    let s = queue_write(&mut r, 1, 3, DATA);
    r.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.ring.used_idx(&r.mem), 1);
    assert_eq!(r.read(s, 1), [0xff]);
    // Pausing a reset (inactive) device does nothing; dropping it paused does not hang.
    r.blk.pause();
    r.blk.resume().unwrap();
    let (_dir2, _path2, fresh) = running();
    let mut blk = fresh.blk;
    blk.pause();
    drop(blk);
}
