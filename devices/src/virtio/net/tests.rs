//! Device tests against a hand-laid ring, with a datagram socket pair standing in for the tap
//! (each read and write is one whole frame, as on a tap).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::testing::*;

pub const MEM_SIZE: usize = 0x40_0000;
/// Buffers live from here on.
pub const BUF_BASE: u64 = 0x10_0000;

pub fn queue_for(ring: &TestRing, event_idx: bool) -> Arc<Mutex<Queue>> {
    let mut q = Queue::new(NET_QUEUE_SIZE).unwrap();
    q.set_size(ring.size);
    q.set_desc_table_address(Some(ring.desc as u32), Some(0));
    q.set_avail_ring_address(Some(ring.avail as u32), Some(0));
    q.set_used_ring_address(Some(ring.used as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Arc::new(Mutex::new(q))
}

/// A running device with its two rings, as a driver sees it.
pub struct Harness {
    pub mem: GuestMemoryMmap,
    pub rx: TestRing,
    pub tx: TestRing,
    pub rx_queue: Arc<Mutex<Queue>>,
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
    pub irq: Arc<CountingInterrupt>,
    pub net: VirtioNet,
    /// Used rx entries already looked at.
    pub rx_seen: u16,
}

impl Harness {
    /// Acks `acked` and activates `net` with fresh rings of `ring_size` entries.
    pub fn start(mut net: VirtioNet, acked: u64, ring_size: u16) -> Harness {
        net.ack_features(acked);
        let mem = guest_memory(MEM_SIZE);
        let irq = Arc::new(CountingInterrupt::default());
        let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut h = Harness {
            rx: TestRing::new(0x1_0000, ring_size),
            tx: TestRing::new(0x2_0000, ring_size),
            rx_queue: Arc::new(Mutex::new(Queue::new(NET_QUEUE_SIZE).unwrap())),
            mem,
            rx_kick,
            tx_kick,
            irq,
            net,
            rx_seen: 0,
        };
        h.activate(acked);
        h
    }

    pub fn activate(&mut self, acked: u64) {
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX_BIT != 0;
        self.rx_queue = queue_for(&self.rx, event_idx);
        let queues = vec![
            ActivatedQueue {
                index: RX_QUEUE,
                queue: self.rx_queue.clone(),
                notify: self.rx_kick.try_clone().unwrap(),
            },
            ActivatedQueue {
                index: TX_QUEUE,
                queue: queue_for(&self.tx, event_idx),
                notify: self.tx_kick.try_clone().unwrap(),
            },
        ];
        self.net
            .activate(self.mem.clone(), self.irq.clone(), queues)
            .unwrap();
    }

    /// Submits a transmit chain of `(addr, bytes)` readable buffers and waits for it to be used.
    pub fn transmit(&mut self, bufs: &[(u64, &[u8])]) -> u32 {
        let descs: Vec<_> = bufs
            .iter()
            .map(|&(addr, data)| {
                self.mem.write_slice(data, GuestAddress(addr)).unwrap();
                (addr, data.len() as u32, 0)
            })
            .collect();
        self.transmit_raw(&descs)
    }

    /// Submits a raw transmit chain and waits for it to be used; returns the used length.
    pub fn transmit_raw(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        let head = self.tx.add_chain(&self.mem, descs);
        let idx = self.tx.avail_idx(&self.mem);
        self.tx_kick.write(1).unwrap();
        assert!(self.tx.wait_used(&self.mem, idx), "tx chain not used");
        let (id, len) = self.tx.used_elem(&self.mem, idx - 1);
        assert_eq!(id, u32::from(head));
        len
    }

    /// Offers a receive chain of writable buffers `(addr, len)`; returns its head.
    pub fn post_rx(&mut self, bufs: &[(u64, u32)]) -> u16 {
        let descs: Vec<_> = bufs
            .iter()
            .map(|&(a, l)| (a, l, VRING_DESC_F_WRITE))
            .collect();
        self.rx.add_chain(&self.mem, &descs)
    }

    pub fn kick_rx(&self) {
        self.rx_kick.write(1).unwrap();
    }

    /// Waits for the next used rx entry: `(head, len)`.
    pub fn next_rx(&mut self, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        while self.rx.used_idx(&self.mem) == self.rx_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = self.rx.used_elem(&self.mem, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        Some(e)
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

/// A datagram socket pair: the device's "tap" and the test's end.
pub(super) fn socket_pair() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array, which is large enough.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

pub(super) fn mac() -> MacAddr {
    "52:54:00:12:34:56".parse().unwrap()
}

/// A device on a socket pair, started with `acked` features; returns the peer end.
pub(super) fn start(acked: u64, ring_size: u16) -> (Harness, File) {
    let (dev, peer) = socket_pair();
    let net = VirtioNet::new(Tap::from_file(dev, "pair"), mac()).unwrap();
    (Harness::start(net, acked, ring_size), peer)
}

pub(super) const BASE: u64 = VIRTIO_F_VERSION_1_BIT | features::MAC | features::STATUS;
pub(super) const MRG: u64 = BASE | features::MRG_RXBUF;

/// Reads one datagram from the peer, waiting up to a second.
pub(super) fn recv(peer: &mut File) -> Option<Vec<u8>> {
    let mut buf = vec![0; MAX_PACKET_LEN + 100];
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match peer.read(&mut buf) {
            Ok(n) => return Some(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("peer read: {e}"),
        }
    }
}

/// A frame with a header whose num_buffers is garbage (the device must overwrite it).
pub(super) fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    p[..VNET_HDR_LEN].fill(0);
    p[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&[0xee, 0xee]);
    p
}

fn num_buffers(h: &Harness, addr: u64) -> u16 {
    let b = h.read(addr + NUM_BUFFERS_OFFSET as u64, 2);
    u16::from_le_bytes([b[0], b[1]])
}

#[test]
fn features_and_config() {
    let (dev, _peer) = socket_pair();
    let mut net = VirtioNet::new(Tap::from_file(dev, "pair"), mac()).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let f = net.features();
    for bit in [
        VIRTIO_F_VERSION_1_BIT,
        VIRTIO_RING_F_EVENT_IDX_BIT,
        features::MAC,
        features::STATUS,
        features::MRG_RXBUF,
        features::CSUM,
        features::GUEST_CSUM,
        features::GUEST_TSO4,
        features::GUEST_TSO6,
        features::GUEST_ECN,
        features::HOST_TSO4,
        features::HOST_TSO6,
        features::HOST_ECN,
    ] {
        assert_eq!(f & bit, bit, "{bit:#x} not offered");
    }
    // The socket pair is no tap, so UFO is not offered.
    assert_eq!(f & (features::GUEST_UFO | features::HOST_UFO), 0);
    let mut config = [0xaa; 10];
    net.read_config(0, &mut config);
    assert_eq!(config, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0]);
    let mut status = [0; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
    // Out-of-range reads are zeros; writes change nothing.
    let mut tail = [0xaa; 4];
    net.read_config(8, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0]);
    net.write_config(0, &[0; 6]);
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &mac().bytes());
    // Acking keeps only offered bits.
    net.ack_features(u64::MAX);
    assert_eq!(net.acked_features(), f);
}

#[test]
fn offload_flags_follow_the_acked_guest_features() {
    use features::*;
    assert_eq!(offload_flags(0), 0);
    assert_eq!(offload_flags(GUEST_TSO4 | GUEST_TSO6), 0, "TSO needs CSUM");
    assert_eq!(offload_flags(GUEST_CSUM), TUN_F_CSUM);
    assert_eq!(
        offload_flags(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | GUEST_UFO),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
    );
    assert_eq!(offload_flags(GUEST_CSUM | GUEST_ECN), TUN_F_CSUM);
    // Host-side features do not change what the tap may hand the guest.
    assert_eq!(offload_flags(CSUM | HOST_TSO4 | MRG_RXBUF), 0);
}

#[test]
fn save_and_restore_round_trip() {
    let (dev, _peer) = socket_pair();
    let mut net = VirtioNet::new(Tap::from_file(dev, "pair"), mac()).unwrap();
    net.ack_features(MRG | features::GUEST_CSUM);
    let json = serde_json::to_string(&net.save()).unwrap();
    let (dev, _peer2) = socket_pair();
    let mut other = VirtioNet::new(Tap::from_file(dev, "pair"), MacAddr::stable_for("x")).unwrap();
    other
        .restore(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(other.save(), net.save());
    assert_eq!(other.mac(), mac());
    assert_eq!(other.acked_features(), MRG | features::GUEST_CSUM);
}

#[test]
fn activation_needs_two_queues() {
    let (dev, _peer) = socket_pair();
    let mut net = VirtioNet::new(Tap::from_file(dev, "pair"), mac()).unwrap();
    let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingInterrupt::default());
    let ring = TestRing::new(0x1_0000, 16);
    let one = vec![ActivatedQueue {
        index: 0,
        queue: queue_for(&ring, false),
        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    }];
    assert!(matches!(
        net.activate(guest_memory(MEM_SIZE), irq, one),
        Err(VirtioError::QueueCount {
            expected: 2,
            got: 1,
            ..
        })
    ));
}

#[test]
fn transmits_header_and_frame_in_one_write() {
    let (mut h, mut peer) = start(BASE, 16);
    let pkt = packet(12 + 200, 1);
    // Header and frame in separate descriptors, the frame split once more.
    let len = h.transmit(&[
        (BUF_BASE, &pkt[..12]),
        (BUF_BASE + 0x1000, &pkt[12..100]),
        (BUF_BASE + 0x3000, &pkt[100..]),
    ]);
    assert_eq!(len, 0);
    assert_eq!(recv(&mut peer).unwrap(), pkt);
    assert!(h.irq.wait_used(1));
    let c = h.net.counters();
    assert_eq!((c.tx_packets(), c.tx_bytes(), c.tx_dropped()), (1, 200, 0));
}

#[test]
fn hostile_transmit_chains_are_dropped_and_counted() {
    let (mut h, mut peer) = start(BASE, 16);
    let big = (MAX_PACKET_LEN + 1) as u32;
    let chains: Vec<Vec<(u64, u32, u16)>> = vec![
        // A device-writable buffer.
        vec![
            (BUF_BASE, 12, 0),
            (BUF_BASE + 0x1000, 64, VRING_DESC_F_WRITE),
        ],
        // Shorter than the header.
        vec![(BUF_BASE, 8, 0)],
        // Outside guest memory, straddling its end, at the top of the address space.
        vec![(MEM_SIZE as u64 * 4, 64, 0)],
        vec![(MEM_SIZE as u64 - 8, 64, 0)],
        vec![(u64::MAX - 4, 64, 0)],
        // Longer than 64 KiB plus header, in one and in several descriptors.
        vec![(BUF_BASE, big, 0)],
        vec![(BUF_BASE, 40_000, 0), (BUF_BASE, 40_000, 0)],
        vec![(BUF_BASE, u32::MAX, 0)],
        // An indirect table outside memory.
        vec![(MEM_SIZE as u64 * 2, 64, VRING_DESC_F_INDIRECT)],
    ];
    for chain in &chains {
        assert_eq!(h.transmit_raw(chain), 0);
    }
    assert!(recv(&mut peer).is_none(), "a malformed chain was sent");
    let c = h.net.counters();
    assert_eq!(c.tx_dropped(), chains.len() as u64);
    assert_eq!(c.tx_packets(), 0);
    // A descriptor looping onto itself is bounded by the ring size (and too short to send
    // anything sensible, but it is sent as 16 x 4 bytes: the device does not panic).
    h.tx.write_desc(&h.mem, 15, BUF_BASE, 4, VRING_DESC_F_NEXT, 15);
    h.tx.push_avail(&h.mem, 15);
    let idx = h.tx.avail_idx(&h.mem);
    h.tx_kick.write(1).unwrap();
    assert!(h.tx.wait_used(&h.mem, idx));
    // The queue still works.
    let pkt = packet(60, 2);
    h.transmit(&[(BUF_BASE, &pkt)]);
    let got = loop {
        let p = recv(&mut peer).expect("good frame not sent");
        if p == pkt {
            break p;
        }
    };
    assert_eq!(got.len(), 60);
}

#[test]
fn out_of_range_avail_index_disables_the_queue_until_reset() {
    let (mut h, mut peer) = start(BASE, 16);
    h.tx.set_avail_idx(&h.mem, 1000);
    h.tx_kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.tx.used_idx(&h.mem), 0);
    h.net.reset();
    h.tx = TestRing::new(0x3_0000, 16);
    h.rx = TestRing::new(0x6_0000, 16);
    h.activate(BASE);
    let pkt = packet(60, 3);
    h.transmit(&[(BUF_BASE, &pkt)]);
    assert_eq!(recv(&mut peer).unwrap(), pkt);
}

#[test]
fn receive_without_mrg_rxbuf_uses_one_chain_per_frame() {
    let (mut h, mut peer) = start(BASE, 16);
    // Header and frame buffers in separate descriptors, 1 + 2000 bytes of room.
    let head = h.post_rx(&[(BUF_BASE, 12), (BUF_BASE + 0x1000, 2000)]);
    h.kick_rx();
    let pkt = packet(12 + 1000, 4);
    peer.write_all(&pkt).unwrap();
    let (id, len) = h
        .next_rx(Duration::from_secs(5))
        .expect("frame not received");
    assert_eq!((id, len), (u32::from(head), 1012));
    assert_eq!(num_buffers(&h, BUF_BASE), 1);
    assert_eq!(h.read(BUF_BASE, 10), pkt[..10].to_vec());
    assert_eq!(h.read(BUF_BASE + 0x1000, 1000), pkt[12..].to_vec());
    assert!(h.irq.wait_used(1));

    // A frame larger than the one chain is dropped; the chain serves the next frame.
    let head = h.post_rx(&[(BUF_BASE, 512)]);
    h.kick_rx();
    peer.write_all(&packet(12 + 600, 5)).unwrap();
    let small = packet(12 + 100, 6);
    peer.write_all(&small).unwrap();
    let (id, len) = h
        .next_rx(Duration::from_secs(5))
        .expect("frame not received");
    assert_eq!((id, len), (u32::from(head), 112));
    assert_eq!(h.read(BUF_BASE + 12, 100), small[12..].to_vec());
    let c = h.net.counters();
    assert_eq!((c.rx_packets(), c.rx_bytes(), c.rx_dropped()), (2, 1100, 1));

    // A chain that can hold the largest frame is read into directly (and its pages are
    // marked dirty for live migration).
    let _ = crate::take_dirty_pages(&h.mem);
    let head = h.post_rx(&[(BUF_BASE, 12), (BUF_BASE + 0x1000, MAX_FRAME_LEN as u32)]);
    h.kick_rx();
    let large = packet(MAX_PACKET_LEN, 7);
    peer.write_all(&large).unwrap();
    let (id, len) = h
        .next_rx(Duration::from_secs(5))
        .expect("large frame not received");
    assert_eq!((id, len as usize), (u32::from(head), MAX_PACKET_LEN));
    assert_eq!(num_buffers(&h, BUF_BASE), 1);
    assert!(h.read(BUF_BASE + 0x1000, MAX_FRAME_LEN) == large[12..]);
    let dirty = crate::take_dirty_pages(&h.mem);
    for page in (BUF_BASE + 0x1000..BUF_BASE + 0x1000 + MAX_FRAME_LEN as u64).step_by(4096) {
        assert!(dirty.contains(&page), "{page:#x} not marked dirty");
    }
}

#[test]
fn receive_with_mrg_rxbuf_spreads_a_frame_over_chains() {
    let (mut h, mut peer) = start(MRG, 16);
    let heads: Vec<u16> = (0..4)
        .map(|i| h.post_rx(&[(BUF_BASE + i * 0x1000, 1000)]))
        .collect();
    h.kick_rx();
    let pkt = packet(12 + 2500, 8);
    peer.write_all(&pkt).unwrap();
    let mut used = Vec::new();
    for _ in 0..3 {
        used.push(h.next_rx(Duration::from_secs(5)).expect("buffer not used"));
    }
    let want: Vec<(u32, u32)> = heads[..3]
        .iter()
        .zip([1000, 1000, 512])
        .map(|(&h, l)| (u32::from(h), l))
        .collect();
    assert_eq!(used, want);
    assert_eq!(num_buffers(&h, BUF_BASE), 3);
    let mut got = h.read(BUF_BASE, 1000);
    got.extend(h.read(BUF_BASE + 0x1000, 1000));
    got.extend(h.read(BUF_BASE + 0x2000, 512));
    assert_eq!(got[12..], pkt[12..]);
    // The fourth chain takes the next frame.
    let small = packet(12 + 50, 9);
    peer.write_all(&small).unwrap();
    assert_eq!(
        h.next_rx(Duration::from_secs(5)),
        Some((u32::from(heads[3]), 62))
    );
    assert_eq!(num_buffers(&h, BUF_BASE + 0x3000), 1);
    assert_eq!(h.net.counters().rx_dropped(), 0);
}

#[test]
fn receive_with_mrg_rxbuf_reads_straight_into_many_chains() {
    // 80 chains of 1000 bytes hold the largest frame: the direct (readv) path.
    let (mut h, mut peer) = start(MRG | VIRTIO_RING_F_EVENT_IDX_BIT, 128);
    let heads: Vec<u16> = (0..80)
        .map(|i| h.post_rx(&[(BUF_BASE + i * 0x1000, 1000)]))
        .collect();
    h.kick_rx();
    let pkt = packet(12 + 2500, 10);
    peer.write_all(&pkt).unwrap();
    let large = packet(MAX_PACKET_LEN, 11);
    peer.write_all(&large).unwrap();
    let first: Vec<_> = (0..3)
        .map(|_| h.next_rx(Duration::from_secs(5)).unwrap())
        .collect();
    assert_eq!(first[2], (u32::from(heads[2]), 512));
    assert_eq!(num_buffers(&h, BUF_BASE), 3);
    let n = MAX_PACKET_LEN.div_ceil(1000);
    let mut got = Vec::new();
    for i in 0..n {
        let (id, len) = h.next_rx(Duration::from_secs(5)).expect("buffer not used");
        assert_eq!(id, u32::from(heads[3 + i]));
        got.extend(h.read(BUF_BASE + (3 + i as u64) * 0x1000, len as usize));
    }
    assert_eq!(num_buffers(&h, BUF_BASE + 3 * 0x1000), n as u16);
    assert!(got[12..] == large[12..]);
    assert_eq!(h.net.counters().rx_packets(), 2);
}

#[test]
fn hostile_receive_chains_are_completed_empty() {
    let (mut h, mut peer) = start(MRG, 16);
    let bad = [
        h.rx.add_chain(&h.mem, &[(BUF_BASE, 1000, 0)]),
        h.post_rx(&[(BUF_BASE, 8)]),
        h.post_rx(&[(MEM_SIZE as u64 * 4, 1000)]),
        h.post_rx(&[(MEM_SIZE as u64 - 8, 1000)]),
    ];
    let good = h.post_rx(&[(BUF_BASE + 0x1000, 1000)]);
    h.kick_rx();
    for head in bad {
        assert_eq!(
            h.next_rx(Duration::from_secs(5)),
            Some((u32::from(head), 0))
        );
    }
    peer.write_all(&packet(12 + 20, 12)).unwrap();
    assert_eq!(
        h.next_rx(Duration::from_secs(5)),
        Some((u32::from(good), 32))
    );
    assert_eq!(h.net.counters().rx_errors(), 4);
    // A frame shorter than a header is dropped.
    let good = h.post_rx(&[(BUF_BASE + 0x1000, 1000)]);
    h.kick_rx();
    peer.write_all(&[1, 2, 3]).unwrap();
    peer.write_all(&packet(20, 13)).unwrap();
    assert_eq!(
        h.next_rx(Duration::from_secs(5)),
        Some((u32::from(good), 20))
    );
    assert_eq!(h.net.counters().rx_dropped(), 1);
}

#[test]
fn without_receive_buffers_frames_wait_in_the_tap() {
    let (mut h, mut peer) = start(MRG, 16);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| packet(12 + 700, 20 + i)).collect();
    for f in &frames {
        peer.write_all(f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    // One small chain: the first frame is read but cannot be delivered yet.
    h.post_rx(&[(BUF_BASE, 500)]);
    h.kick_rx();
    assert_eq!(h.next_rx(Duration::from_millis(100)), None);
    // More buffers: everything arrives, in order, nothing dropped.
    for i in 1..6 {
        h.post_rx(&[(BUF_BASE + i * 0x1000, 500)]);
    }
    h.kick_rx();
    let mut data = Vec::new();
    let mut at = Vec::new();
    for i in 0..6u64 {
        let (id, len) = h
            .next_rx(Duration::from_secs(5))
            .expect("frame not delivered");
        assert_eq!(id as u64, i);
        at.push(i);
        data.extend(h.read(BUF_BASE + i * 0x1000, len as usize));
    }
    assert_eq!(num_buffers(&h, BUF_BASE), 2);
    assert_eq!(num_buffers(&h, BUF_BASE + 0x2000), 2);
    assert_eq!(num_buffers(&h, BUF_BASE + 0x4000), 2);
    let mut want = Vec::new();
    for f in &frames {
        let mut f = f.clone();
        f[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&2u16.to_le_bytes());
        want.extend(f);
    }
    assert!(data == want);
    let c = h.net.counters();
    assert_eq!((c.rx_packets(), c.rx_dropped()), (3, 0));
    // Without buffers again the device asks for kicks (notifications enabled).
    peer.write_all(&packet(12 + 10, 30)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let flags: u16 = h.mem.read_obj(GuestAddress(h.rx.used)).unwrap();
    assert_eq!(
        flags & 1,
        0,
        "VRING_USED_F_NO_NOTIFY left set while stalled"
    );
    h.post_rx(&[(BUF_BASE, 500)]);
    h.kick_rx();
    assert_eq!(h.next_rx(Duration::from_secs(5)), Some((6, 22)));
}

#[test]
fn reset_stops_the_worker_and_activate_works_again() {
    let (mut h, mut peer) = start(MRG, 16);
    for i in 0..4 {
        h.post_rx(&[(BUF_BASE + i * 0x1000, 1000)]);
    }
    h.kick_rx();
    std::thread::sleep(Duration::from_millis(30));
    h.net.reset();
    // Chains the worker held go back to the ring.
    assert_eq!(lock_queue_next_avail(&h.rx_queue), 0);
    peer.write_all(&packet(100, 40)).unwrap();
    let pkt = packet(60, 41);
    let head = h.tx.add_chain(&h.mem, &[(BUF_BASE + 0x8000, 60, 0)]);
    h.mem
        .write_slice(&pkt, GuestAddress(BUF_BASE + 0x8000))
        .unwrap();
    h.tx_kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.rx.used_idx(&h.mem), 0);
    assert_eq!(h.tx.used_idx(&h.mem), 0);
    assert!(recv(&mut peer).is_none());
    // Re-activate on the same rings (their state carried over, as after a restore).
    h.activate(MRG);
    assert!(h.tx.wait_used(&h.mem, 1));
    assert_eq!(h.tx.used_elem(&h.mem, 0).0, u32::from(head));
    assert_eq!(recv(&mut peer).unwrap(), pkt);
    assert_eq!(h.next_rx(Duration::from_secs(5)), Some((0, 100)));
    assert!(h.irq.used.load(Ordering::SeqCst) >= 1);
    h.net.reset();
    h.net.reset();
}

pub(super) fn lock_queue_next_avail(q: &Arc<Mutex<Queue>>) -> u16 {
    crate::virtio::lock_queue(q).next_avail()
}
