//! Several request queues (VIRTIO_BLK_F_MQ): what is offered, a driver enabling fewer queues
//! than offered, requests on every queue completed in their own used ring and interrupt, and
//! pause and resume across queues.

use super::*;

/// Where queue `i`'s ring lives (queue 0 is `Running::ring`, at 0x1000).
fn ring_base(i: u64) -> u64 {
    0x1000 + 0x4000 * i
}

/// A device with `offered` queues started with its first `enabled` (each 64 entries, EVENT_IDX
/// off). `Running::ring`/`notify` are queue 0; the returned vectors hold every queue's.
fn start_queues(
    disk: Box<dyn DiskImage>,
    offered: u16,
    enabled: u16,
    io_uring: bool,
) -> (Running, Vec<TestRing>, Vec<EventFd>) {
    let mut blk = VirtioBlk::with_queues(disk, None, offered).unwrap();
    blk.set_io_uring(io_uring);
    blk.ack_features(blk.features() & !VIRTIO_RING_F_EVENT_IDX_BIT);
    let mem = guest_memory(MEM_SIZE);
    let irq = Arc::new(CountingInterrupt::default());
    let mut rings = Vec::new();
    let mut notifies = Vec::new();
    let mut queues = Vec::new();
    for i in 0..enabled {
        let ring = TestRing::new(ring_base(u64::from(i)), 64);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(ActivatedQueue {
            index: i,
            queue: queue_for(&ring, false),
            notify: notify.try_clone().unwrap(),
        });
        rings.push(ring);
        notifies.push(notify);
    }
    blk.activate(mem.clone(), irq.clone(), queues).unwrap();
    let r = Running {
        mem,
        ring: TestRing::new(ring_base(0), 64),
        blk,
        notify: notifies[0].try_clone().unwrap(),
        irq,
        submitted: 0,
    };
    (r, rings, notifies)
}

/// Queues a one-sector request on `ring`: a write of `byte` or a read into `buf`. Returns
/// (head, status address).
fn queue_io(
    r: &mut Running,
    ring: &mut TestRing,
    write: bool,
    sector: u64,
    buf: u64,
) -> (u16, u64) {
    let kind = if write {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let (h, s) = r.next_slots(kind, sector);
    let data = if write { (buf, 512, R) } else { (buf, 512, W) };
    (ring.add_chain(&r.mem, &[(h, 16, R), data, (s, 1, W)]), s)
}

fn modes() -> Vec<bool> {
    if io_uring::IoUring::new(4).is_ok() {
        vec![true, false]
    } else {
        vec![false]
    }
}

#[test]
fn more_than_one_queue_offers_mq_and_says_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let num_queues_at = std::mem::offset_of!(virtio_blk_config, num_queues) as u64;
    for (n, mq) in [(1u16, false), (2, true), (MAX_QUEUES, true)] {
        let blk = VirtioBlk::with_queues(open(&path, Format::Raw, false), None, n).unwrap();
        assert_eq!(
            blk.features() & (1 << VIRTIO_BLK_F_MQ) != 0,
            mq,
            "{n} queues"
        );
        assert_eq!(blk.queue_max_sizes(), vec![BLK_QUEUE_SIZE; usize::from(n)]);
        let mut raw = [0u8; 2];
        blk.read_config(num_queues_at, &mut raw);
        assert_eq!(u16::from_le_bytes(raw), n);
    }
    for n in [0, MAX_QUEUES + 1] {
        let e = VirtioBlk::with_queues(open(&path, Format::Raw, false), None, n)
            .err()
            .unwrap();
        assert!(e.to_string().contains("queues"), "{e}");
    }
}

#[test]
fn activation_takes_one_to_all_offered_queues() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let mem = guest_memory(MEM_SIZE);
    let irq = Arc::new(CountingInterrupt::default());
    let queues = |n: u16| -> Vec<ActivatedQueue> {
        (0..n)
            .map(|i| ActivatedQueue {
                index: i,
                queue: queue_for(&TestRing::new(ring_base(u64::from(i)), 64), false),
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect()
    };
    let mut blk = VirtioBlk::with_queues(open(&path, Format::Raw, false), None, 3).unwrap();
    for n in [0, 4] {
        let e = blk
            .activate(mem.clone(), irq.clone(), queues(n))
            .unwrap_err();
        assert!(
            matches!(e, VirtioError::QueueCount { expected: 3, .. }),
            "{e}"
        );
    }
    for n in 1..=3 {
        blk.activate(mem.clone(), irq.clone(), queues(n)).unwrap();
        blk.reset();
    }
}

#[test]
fn every_queue_is_served_into_its_own_used_ring_and_interrupt() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_image(dir.path(), DISK_SIZE);
        // Four offered, three enabled: the fourth is never touched.
        let (mut r, mut rings, notifies) =
            start_queues(open(&path, Format::Raw, false), 4, 3, mode);
        let mut expect = Vec::new();
        for round in 0..4u64 {
            for (q, ring) in rings.iter_mut().enumerate() {
                let q = q as u64;
                let sector = 10 * q + round;
                let buf = DATA + 0x1000 * (4 * q + round);
                let write = round % 2 == 0;
                if write {
                    r.write(buf, &[(sector as u8) ^ 0x5a; 512]);
                }
                let (head, status) = queue_io(&mut r, ring, write, sector, buf);
                expect.push((q as usize, head, status, write, sector, buf));
            }
        }
        for n in &notifies {
            n.write(1).unwrap();
        }
        for ring in &rings {
            assert!(
                ring.wait_used(&r.mem, 4),
                "mode {mode}: a queue was not served"
            );
        }
        let p = pattern(DISK_SIZE);
        for (q, head, status, write, sector, buf) in expect {
            assert_eq!(r.read(status, 1), [S_OK]);
            let used: Vec<_> = (0..4).map(|i| rings[q].used_elem(&r.mem, i)).collect();
            let len = if write { 1 } else { 513 };
            assert!(
                used.contains(&(u32::from(head), len)),
                "queue {q}: {used:?}"
            );
            let at = sector as usize * 512;
            if write {
                assert_eq!(
                    file_bytes(&path, at as u64, 512),
                    vec![(sector as u8) ^ 0x5a; 512]
                );
            } else {
                assert_eq!(r.read(buf, 512), p[at..at + 512]);
            }
        }
        let by_queue = r.irq.by_queue();
        assert_eq!(
            by_queue.keys().copied().collect::<Vec<_>>(),
            [0, 1, 2],
            "mode {mode}"
        );
        let c = VirtioDevice::counters(&r.blk);
        assert_eq!((c["write_ops"], c["read_ops"], c["errors"]), (6, 6, 0));
    }
}

#[test]
fn a_flush_on_one_queue_and_writes_on_another_all_complete() {
    for mode in modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_image(dir.path(), DISK_SIZE);
        let (mut r, mut rings, notifies) =
            start_queues(open(&path, Format::Raw, false), 2, 2, mode);
        let writes: Vec<u64> = (0..16u64)
            .map(|i| {
                let buf = DATA + 512 * i;
                r.write(buf, &[i as u8 + 1; 512]);
                queue_io(&mut r, &mut rings[0], true, i, buf).1
            })
            .collect();
        let (h, flush_status) = r.next_slots(VIRTIO_BLK_T_FLUSH, 0);
        rings[1].add_chain(&r.mem, &[(h, 16, R), (flush_status, 1, W)]);
        notifies[0].write(1).unwrap();
        notifies[1].write(1).unwrap();
        assert!(rings[1].wait_used(&r.mem, 1));
        assert_eq!(r.read(flush_status, 1), [S_OK]);
        // The worker takes the queues in either order; a flush that finds writes in flight
        // (io_uring) waits for them first, and every write completes either way.
        assert!(rings[0].wait_used(&r.mem, 16), "mode {mode}");
        for (i, s) in writes.iter().enumerate() {
            assert_eq!(r.read(*s, 1), [S_OK], "write {i}");
            assert_eq!(
                file_bytes(&path, i as u64 * 512, 512),
                vec![i as u8 + 1; 512]
            );
        }
    }
}

#[test]
fn pause_stops_every_queue_and_resume_serves_what_each_got_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let (mut r, mut rings, notifies) = start_queues(open(&path, Format::Raw, false), 2, 2, true);
    r.blk.pause();
    let mut statuses = Vec::new();
    for (q, ring) in rings.iter_mut().enumerate() {
        let buf = DATA + 0x1000 * q as u64;
        r.write(buf, &[0x70 + q as u8; 512]);
        statuses.push(queue_io(&mut r, ring, true, 100 + q as u64, buf).1);
    }
    for n in &notifies {
        n.write(1).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    for (q, ring) in rings.iter().enumerate() {
        assert_eq!(ring.used_idx(&r.mem), 0, "queue {q} served while paused");
    }
    r.blk.resume().unwrap();
    for (q, ring) in rings.iter().enumerate() {
        assert!(
            ring.wait_used(&r.mem, 1),
            "queue {q} not served after resume"
        );
        assert_eq!(r.read(statuses[q], 1), [S_OK]);
        assert_eq!(
            file_bytes(&path, (100 + q as u64) * 512, 512),
            vec![0x70 + q as u8; 512]
        );
    }
}
