//! Hostile descriptor chains: each completes with an error status where a status byte can be
//! written, or is returned untouched where none can; the device keeps serving afterwards and
//! never touches memory outside the guest's.

use super::*;

/// Checks that the device still serves a plain read after whatever came before.
fn still_serves(r: &mut Running) {
    let (status, got) = r.read_sectors(2, 512);
    assert_eq!(status, S_OK);
    assert_eq!(got, pattern(DISK_SIZE)[1024..1536]);
}

fn running() -> (tempfile::TempDir, PathBuf, Running) {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path(), DISK_SIZE);
    let r = start(open(&path, Format::Raw, false));
    (dir, path, r)
}

#[test]
fn malformed_requests_complete_with_ioerr() {
    let (_dir, path, mut r) = running();
    let expect_ioerr = |r: &mut Running, descs: &dyn Fn(u64, u64) -> Vec<(u64, u32, u16)>| {
        let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
        r.write(DATA, &[0xee; 512]);
        let used = r.complete(&descs(h, s));
        assert_eq!(r.read(s, 1), [S_IOERR], "chain {:x?}", descs(h, s));
        assert_eq!(used, 1);
        assert_eq!(r.read(DATA, 512), vec![0xee; 512], "data written on error");
    };
    // The header in a device-writable descriptor.
    expect_ioerr(&mut r, &|h, s| vec![(h, 16, W), (DATA, 512, W), (s, 1, W)]);
    // A header shorter than 16 bytes.
    expect_ioerr(&mut r, &|h, s| vec![(h, 8, R), (DATA, 512, W), (s, 1, W)]);
    // No header at all.
    expect_ioerr(&mut r, &|_, s| vec![(s, 1, W)]);
    // IN with device-readable data.
    expect_ioerr(&mut r, &|h, s| vec![(h, 16, R), (DATA, 512, R), (s, 1, W)]);
    // The header outside guest memory.
    expect_ioerr(&mut r, &|_, s| {
        vec![(MEM_SIZE as u64 + 0x1000, 16, R), (DATA, 512, W), (s, 1, W)]
    });
    // Data outside guest memory, or straddling its end.
    expect_ioerr(&mut r, &|h, s| {
        vec![(h, 16, R), (MEM_SIZE as u64 * 4, 512, W), (s, 1, W)]
    });
    expect_ioerr(&mut r, &|h, s| {
        vec![
            (h, 16, R),
            (DATA, 512, W),
            (MEM_SIZE as u64 - 256, 512, W),
            (s, 1, W),
        ]
    });
    expect_ioerr(&mut r, &|h, s| {
        vec![(h, 16, R), (u64::MAX - 100, 512, W), (s, 1, W)]
    });

    // OUT with device-writable data: nothing reaches the disk.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_OUT, 0);
    r.write(DATA, &[0xaa; 512]);
    assert_eq!(r.complete(&[(h, 16, R), (DATA, 512, W), (s, 1, W)]), 1);
    assert_eq!(r.read(s, 1), [S_IOERR]);
    // OUT whose data leaves guest memory: nothing reaches the disk either.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_OUT, 0);
    r.complete(&[
        (h, 16, R),
        (DATA, 512, R),
        (MEM_SIZE as u64 - 4, 512, R),
        (s, 1, W),
    ]);
    assert_eq!(r.read(s, 1), [S_IOERR]);
    assert_eq!(std::fs::read(&path).unwrap(), pattern(DISK_SIZE));

    assert_eq!(r.blk.counters().errors(), 10);
    still_serves(&mut r);
}

#[test]
fn chains_without_a_status_byte_are_returned_untouched() {
    let (_dir, path, mut r) = running();
    let expect_dropped = |r: &mut Running, descs: Vec<(u64, u32, u16)>, s: u64| {
        r.write(DATA, &[0xee; 512]);
        assert_eq!(r.complete(&descs), 0, "chain {descs:x?}");
        assert_eq!(r.read(s, 1), [0xff]);
        assert_eq!(r.read(DATA, 512), vec![0xee; 512]);
    };
    // Nothing device-writable.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    expect_dropped(&mut r, vec![(h, 16, R), (DATA, 512, R)], s);
    // A read-only status after device-writable data.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    expect_dropped(&mut r, vec![(h, 16, R), (DATA, 512, W), (s, 1, R)], s);
    // A zero-length status.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_FLUSH, 0);
    expect_dropped(&mut r, vec![(h, 16, R), (s, 0, W)], s);
    // Buffers adding up to more than 4 GiB (the queue cuts the chain short).
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    expect_dropped(
        &mut r,
        vec![(h, 16, R), (DATA, u32::MAX, W), (DATA, 512, W), (s, 1, W)],
        s,
    );
    assert_eq!(r.blk.counters().errors(), 4);
    assert_eq!(std::fs::read(&path).unwrap(), pattern(DISK_SIZE));
    still_serves(&mut r);
}

#[test]
fn status_outside_guest_memory_is_not_written() {
    let (_dir, _path, mut r) = running();
    let (h, _) = r.next_slots(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.complete(&[(h, 16, R), (MEM_SIZE as u64 + 8, 1, W)]), 0);
    let (h, _) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    // The read itself succeeds; only the status cannot be written.
    assert_eq!(
        r.complete(&[(h, 16, R), (DATA, 512, W), (u64::MAX, 1, W)]),
        512
    );
    assert_eq!(r.blk.counters().errors(), 2);
    still_serves(&mut r);
}

#[test]
fn loops_and_bad_indirect_tables_are_dropped() {
    let (_dir, _path, mut r) = running();
    let size = r.ring.size;

    // A descriptor that chains to itself.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    let head = size - 1;
    r.ring
        .write_desc(&r.mem, head, h, 16, VRING_DESC_F_NEXT, head);
    r.ring.push_avail(&r.mem, head);
    assert_eq!(r.kick_and_wait(head), 0);
    // Two descriptors chaining to each other, the second one writable.
    let (a, b) = (size - 3, size - 2);
    r.ring.write_desc(&r.mem, a, h, 16, VRING_DESC_F_NEXT, b);
    r.ring.write_desc(&r.mem, b, s, 1, W | VRING_DESC_F_NEXT, a);
    r.ring.push_avail(&r.mem, a);
    assert_eq!(r.kick_and_wait(a), 0);
    assert_eq!(r.read(s, 1), [0xff]);

    // An indirect table outside guest memory, and one of a ragged length.
    let head = r
        .ring
        .add_chain(&r.mem, &[(MEM_SIZE as u64 * 2, 48, VRING_DESC_F_INDIRECT)]);
    assert_eq!(r.kick_and_wait(head), 0);
    let table = 0xc000;
    let head = r
        .ring
        .add_chain(&r.mem, &[(table, 40, VRING_DESC_F_INDIRECT)]);
    assert_eq!(r.kick_and_wait(head), 0);

    // An indirect table naming another indirect table.
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    let inner = TestRing::new(0xd000, 4);
    inner.write_desc(&r.mem, 0, h, 16, VRING_DESC_F_NEXT, 1);
    inner.write_desc(&r.mem, 1, 0xe000, 32, VRING_DESC_F_INDIRECT, 0);
    let head = r
        .ring
        .add_chain(&r.mem, &[(0xd000, 32, VRING_DESC_F_INDIRECT)]);
    assert_eq!(r.kick_and_wait(head), 0);
    assert_eq!(r.read(s, 1), [0xff]);
    assert_eq!(r.blk.counters().errors(), 5);
    still_serves(&mut r);
}

#[test]
fn requests_through_an_indirect_table_are_served() {
    let (_dir, _path, mut r) = running();
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 4);
    let table = TestRing::new(0xd000, 3);
    table.write_desc(&r.mem, 0, h, 16, VRING_DESC_F_NEXT, 1);
    table.write_desc(&r.mem, 1, DATA, 1024, W | VRING_DESC_F_NEXT, 2);
    table.write_desc(&r.mem, 2, s, 1, W, 0);
    let head = r
        .ring
        .add_chain(&r.mem, &[(0xd000, 48, VRING_DESC_F_INDIRECT)]);
    assert_eq!(r.kick_and_wait(head), 1025);
    assert_eq!(r.read(s, 1), [S_OK]);
    assert_eq!(r.read(DATA, 1024), pattern(DISK_SIZE)[2048..3072]);
}

#[test]
fn header_status_and_data_framed_any_way() {
    let (_dir, _path, mut r) = running();
    // Header split over two descriptors, the first data bytes sharing its last descriptor;
    // data and status in one writable descriptor.
    let (h, _) = r.next_slots(VIRTIO_BLK_T_OUT, 6);
    let data = [0x5a; 1024];
    r.write(h + 16, &data[..500]);
    r.write(DATA, &data[500..]);
    let s = DATA + 0x1000;
    assert_eq!(
        r.complete(&[(h, 10, R), (h + 10, 506, R), (DATA, 524, R), (s, 1, W)]),
        1
    );
    assert_eq!(r.read(s, 1), [S_OK]);
    let (h, _) = r.next_slots(VIRTIO_BLK_T_IN, 6);
    let buf = DATA + 0x2000;
    assert_eq!(r.complete(&[(h, 16, R), (buf, 1025, W)]), 1025);
    assert_eq!(r.read(buf + 1024, 1), [S_OK]);
    assert_eq!(r.read(buf, 1024), data);
}

#[test]
fn corrupt_avail_index_disables_the_queue_until_reset() {
    let (_dir, _path, mut r) = running();
    r.ring.set_avail_idx(&r.mem, 1000);
    r.notify.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(r.ring.used_idx(&r.mem), 0);
    r.blk.reset();
    r.ring = TestRing::new(0x8000, 16);
    let queue = ActivatedQueue {
        index: 0,
        queue: queue_for(&r.ring, false),
        notify: r.notify.try_clone().unwrap(),
    };
    r.blk
        .activate(r.mem.clone(), r.irq.clone(), vec![queue])
        .unwrap();
    still_serves(&mut r);
}

#[test]
fn out_of_range_head_is_skipped() {
    let (_dir, _path, mut r) = running();
    r.ring.push_avail(&r.mem, 999);
    let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
    let head = r
        .ring
        .add_chain(&r.mem, &[(h, 16, R), (DATA, 512, W), (s, 1, W)]);
    r.notify.write(1).unwrap();
    assert!(r.ring.wait_used(&r.mem, 1));
    assert_eq!(r.ring.used_elem(&r.mem, 0), (u32::from(head), 513));
    assert_eq!(r.read(s, 1), [S_OK]);
    assert_eq!(r.blk.counters().errors(), 1);
}

/// Writes an indirect table of `descs` (chained in order) at `table`; returns its length.
fn indirect_table(r: &Running, table: u64, descs: &[(u64, u32, u16)]) -> u32 {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let flags = if last {
            flags
        } else {
            flags | VRING_DESC_F_NEXT
        };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        r.write(table + 16 * i as u64, &raw);
    }
    16 * descs.len() as u32
}

/// Issue 15, item 3: a request with more data segments than the device offered (seg_max)
/// completes with IOERR; one at the limit is served.
#[test]
fn requests_past_seg_max_are_refused() {
    let (_dir, _path, mut r) = running();
    const TABLE: u64 = 0xc_0000;
    for (segments, want) in [(254usize, S_OK), (255, S_IOERR)] {
        let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(h, 16, R)];
        descs.extend(std::iter::repeat_n((DATA, 512, W), segments));
        descs.push((s, 1, W));
        let len = indirect_table(&r, TABLE, &descs);
        r.complete(&[(TABLE, len, VRING_DESC_F_INDIRECT)]);
        assert_eq!(r.read(s, 1), [want], "{segments} segments");
    }
    still_serves(&mut r);
}

/// Issue 15, item 3: one wakeup serves at most `WAKEUP_BYTES` of reads and writes, then
/// looks for a pause or reset before the rest: 7 requests of 16 MiB take two wakeups (one
/// interrupt each), where they took one.
#[test]
fn one_wakeup_serves_a_bounded_number_of_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut blk = VirtioBlk::new(open(&path, Format::Raw, false), None).unwrap();
    blk.set_io_uring(false);
    let mut r = start_with(blk, 256, false);
    r.blk.pause();
    // 32 segments of 512 KiB, all over the same guest buffer: 16 MiB a request.
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let (h, s) = r.next_slots(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![(h, 16, R)];
        descs.extend(std::iter::repeat_n((DATA, 512 << 10, W), 32));
        descs.push((s, 1, W));
        r.ring.add_chain(&r.mem, &descs);
        statuses.push(s);
    }
    assert_eq!(4 * (16 << 20), super::super::worker::WAKEUP_BYTES);
    r.blk.resume().unwrap();
    assert!(r.ring.wait_used(&r.mem, 7));
    for s in statuses {
        assert_eq!(r.read(s, 1), [S_OK]);
    }
    assert!(r.irq.wait_used(2));
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(r.irq.used.load(Ordering::SeqCst), 2);
}
