//! Pause and resume on a socket pair standing in for the tap: while paused the device reads
//! nothing (frames wait in the "tap"), sends nothing and touches no ring; the receive chains it
//! held are back in the ring; resume delivers and sends what waited, in order.

use std::io::Write;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::tests::{lock_queue_next_avail, mac, packet, recv, socket_pair, start, BUF_BASE, MRG};
use super::*;

#[test]
fn paused_device_leaves_frames_in_the_tap_until_resumed() {
    let (mut h, mut peer) = start(MRG, 16);
    for i in 0..4 {
        h.post_rx(&[(BUF_BASE + i * 0x1000, 1000)]);
    }
    h.kick_rx();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        lock_queue_next_avail(&h.rx_queue),
        4,
        "worker holds the chains"
    );
    h.net.pause();
    // The held chains are back in the ring: what the transport would save is consistent.
    assert_eq!(lock_queue_next_avail(&h.rx_queue), 0);
    let rx_pkt = packet(300, 50);
    peer.write_all(&rx_pkt).unwrap();
    let tx_pkt = packet(80, 51);
    h.mem
        .write_slice(&tx_pkt, GuestAddress(BUF_BASE + 0x8000))
        .unwrap();
    h.tx.add_chain(&h.mem, &[(BUF_BASE + 0x8000, 80, 0)]);
    h.tx_kick.write(1).unwrap();
    h.kick_rx();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rx.used_idx(&h.mem), 0, "received while paused");
    assert_eq!(h.tx.used_idx(&h.mem), 0, "transmitted while paused");
    assert_eq!(h.read(BUF_BASE, 300), vec![0; 300]);
    assert!(recv(&mut peer).is_none());
    assert_eq!(lock_queue_next_avail(&h.rx_queue), 0);

    h.net.resume().unwrap();
    assert_eq!(h.next_rx(Duration::from_secs(5)), Some((0, 300)));
    let mut want = rx_pkt.clone();
    want[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
    assert!(h.read(BUF_BASE, 300) == want);
    assert!(h.tx.wait_used(&h.mem, 1));
    assert_eq!(recv(&mut peer).unwrap(), tx_pkt);
    let c = VirtioDevice::counters(&h.net);
    assert_eq!(
        (c["rx_frames"], c["rx_bytes"]),
        (1, 300 - VNET_HDR_LEN as u64)
    );
    assert_eq!(
        (c["tx_frames"], c["tx_bytes"]),
        (1, 80 - VNET_HDR_LEN as u64)
    );
    assert_eq!(
        (c["rx_drops"], c["rx_errors"], c["tx_drops"], c["tx_errors"]),
        (0, 0, 0, 0)
    );
}

#[test]
fn a_frame_read_before_the_pause_is_delivered_after_it() {
    let (mut h, mut peer) = start(MRG, 16);
    let frame = packet(12 + 700, 60);
    peer.write_all(&frame).unwrap();
    // One 500-byte chain: the frame is read but waits for more buffers.
    h.post_rx(&[(BUF_BASE, 500)]);
    h.kick_rx();
    assert_eq!(h.next_rx(Duration::from_millis(100)), None);
    h.net.pause();
    assert_eq!(lock_queue_next_avail(&h.rx_queue), 0);
    h.post_rx(&[(BUF_BASE + 0x1000, 500)]);
    h.kick_rx();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    h.net.resume().unwrap();
    assert_eq!(h.next_rx(Duration::from_secs(5)), Some((0, 500)));
    assert_eq!(h.next_rx(Duration::from_secs(5)), Some((1, 212)));
    let mut got = h.read(BUF_BASE, 500);
    got.extend(h.read(BUF_BASE + 0x1000, 212));
    let mut want = frame;
    want[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&2u16.to_le_bytes());
    assert!(got == want);
    assert_eq!(VirtioDevice::counters(&h.net)["rx_drops"], 0);
}

#[test]
fn pause_resume_reset_and_drop_in_any_order() {
    let (mut h, mut peer) = start(MRG, 16);
    h.net.resume().unwrap();
    h.net.pause();
    h.net.pause();
    h.net.resume().unwrap();
    h.net.resume().unwrap();
    h.post_rx(&[(BUF_BASE, 1000)]);
    h.kick_rx();
    peer.write_all(&packet(100, 70)).unwrap();
    assert_eq!(h.next_rx(Duration::from_secs(5)), Some((0, 100)));
    // Reset while paused; resume brings nothing back.
    h.net.pause();
    h.net.reset();
    h.net.resume().unwrap();
    h.post_rx(&[(BUF_BASE, 1000)]);
    h.kick_rx();
    peer.write_all(&packet(100, 71)).unwrap();
    assert_eq!(h.next_rx(Duration::from_millis(50)), None);
    // Activation works again; the frame waited in the tap.
    h.activate(MRG);
    let deadline = Instant::now() + Duration::from_secs(5);
    while VirtioDevice::counters(&h.net)["rx_frames"] < 2 {
        assert!(
            Instant::now() < deadline,
            "frame not delivered after reactivation"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Dropped while paused.
    h.net.pause();
    drop(h);
    // Never activated: pause and resume do nothing.
    let (dev, _peer) = socket_pair();
    let mut net = VirtioNet::new(Tap::from_file(dev, "pair"), mac()).unwrap();
    net.pause();
    net.resume().unwrap();
    net.pause();
    drop(net);
}
