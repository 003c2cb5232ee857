//! End-to-end tests on real tap interfaces: the guest side (this test, driving the rings)
//! exchanges UDP with a host socket bound to the tap's address. They need root (or
//! CAP_NET_ADMIN) and /dev/net/tun, and fail with the reason when those are missing.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use super::tests::{Harness, BUF_BASE};
use super::*;

const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;

/// A tap named uniquely for this process and test, with host address `10.<net>.<pid>.1/30`;
/// returns the tap, the host and the guest address.
fn test_tap(tag: &str, net: u8) -> (Tap, Ipv4Addr, Ipv4Addr) {
    let pid = std::process::id();
    let name = format!("pvt{}{tag}", pid % 100_000);
    let tap = Tap::open(Some(&name)).unwrap_or_else(|e| {
        panic!("real tap tests need root and /dev/net/tun: {e}");
    });
    assert_eq!(tap.name(), name);
    // Quieter: no IPv6 chatter (router solicitations, DAD) on the test link.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let third = (pid % 250) as u8;
    let host = Ipv4Addr::new(10, net, third, 1);
    let guest = Ipv4Addr::new(10, net, third, 2);
    tap.set_ip(host, Ipv4Addr::new(255, 255, 255, 252)).unwrap();
    tap.up().unwrap();
    (tap, host, guest)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(dst);
    f.extend(src);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

/// An IPv4/UDP packet (UDP checksum 0: none).
fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend(src.ip().octets());
    p.extend(dst.ip().octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend(src.port().to_be_bytes());
    p.extend(dst.port().to_be_bytes());
    p.extend(((8 + payload.len()) as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

fn arp_reply(mac: [u8; 6], ip: Ipv4Addr, to_mac: [u8; 6], to_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 2];
    a.extend(mac);
    a.extend(ip.octets());
    a.extend(to_mac);
    a.extend(to_ip.octets());
    a
}

fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend(frame);
    p
}

const ACKED: u64 = VIRTIO_F_VERSION_1_BIT
    | VIRTIO_RING_F_EVENT_IDX_BIT
    | features::MAC
    | features::STATUS
    | features::MRG_RXBUF
    | features::CSUM
    | features::GUEST_CSUM
    | features::GUEST_TSO4
    | features::GUEST_TSO6;

/// Both ends of a test link.
struct Link {
    host: Ipv4Addr,
    guest: Ipv4Addr,
    host_mac: [u8; 6],
    mac: MacAddr,
}

impl Link {
    fn of(tap: &Tap, host: Ipv4Addr, guest: Ipv4Addr) -> Link {
        Link {
            host,
            guest,
            host_mac: tap.host_mac().unwrap(),
            mac: MacAddr::stable_for(tap.name()),
        }
    }
}

/// Plays the guest until the host's datagram to `port` arrives: answers the host's ARP request
/// first, re-offers each receive buffer, checks the datagram and its virtio header.
fn expect_datagram(h: &mut Harness, link: &Link, payload: &[u8], port: u16) {
    let Link {
        host,
        guest,
        host_mac,
        mac,
    } = *link;
    const BUF: u32 = 2048;
    // Answer the host's ARP request from the guest side, then expect the datagram.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut arp_answered = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (head, len) = h
            .next_rx(left)
            .unwrap_or_else(|| panic!("no datagram for the guest (ARP answered: {arp_answered})"));
        let addr = BUF_BASE + u64::from(head) * 0x1000;
        assert!(len <= BUF, "a frame spans buffers: {len}");
        let pkt = h.read(addr, len as usize);
        // Re-offer the same buffer.
        h.post_rx(&[(addr, BUF)]);
        h.kick_rx();
        let (hdr, frame) = pkt.split_at(VNET_HDR_LEN);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        if ethertype == ETH_ARP && frame[21] == 1 && frame[38..42] == guest.octets() {
            let reply = ethernet(
                host_mac,
                mac.bytes(),
                ETH_ARP,
                &arp_reply(mac.bytes(), guest, host_mac, host),
            );
            h.transmit(&[(BUF_BASE + 0x20000, &with_header(&reply))]);
            arp_answered = true;
            continue;
        }
        if ethertype != ETH_IPV4 || frame[23] != 17 || frame[30..34] != guest.octets() {
            continue;
        }
        assert_eq!(&frame[0..6], &mac.bytes(), "destination MAC");
        let ihl = usize::from(frame[14] & 0xf) * 4;
        let udp = &frame[14 + ihl..];
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), port);
        assert_eq!(&udp[8..], payload);
        // virtio_net_hdr: no segmentation; the checksum either complete or left to the guest
        // (GUEST_CSUM is acked) with the right start and offset.
        let (flags, gso_type) = (hdr[0], hdr[1]);
        assert_eq!(gso_type, 0, "gso_type");
        let csum_start = u16::from_le_bytes([hdr[6], hdr[7]]);
        let csum_offset = u16::from_le_bytes([hdr[8], hdr[9]]);
        match flags {
            0 => {}
            1 => assert_eq!((csum_start, csum_offset), (14 + ihl as u16, 6)),
            f => panic!("unexpected header flags {f:#x}"),
        }
        assert!(
            arp_answered,
            "the datagram came before the host resolved the guest"
        );
        break;
    }
}

#[test]
fn guest_sends_udp_to_the_host_through_a_real_tap() {
    let (tap, host, guest) = test_tap("t", 201);
    let host_mac = tap.host_mac().unwrap();
    let sock = UdpSocket::bind((host, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let mac = MacAddr::stable_for(tap.name());
    let net = VirtioNet::new(tap, mac).unwrap();
    let mut h = Harness::start(net, ACKED, 16);

    let payload = b"hello from the guest";
    let frame = ethernet(
        host_mac,
        mac.bytes(),
        ETH_IPV4,
        &udp(
            SocketAddrV4::new(guest, 4000),
            SocketAddrV4::new(host, port),
            payload,
        ),
    );
    let pkt = with_header(&frame);
    // Header and frame in separate descriptors.
    assert_eq!(
        h.transmit(&[(BUF_BASE, &pkt[..12]), (BUF_BASE + 0x1000, &pkt[12..])]),
        0
    );
    let mut buf = [0u8; 100];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("the host did not receive the guest's datagram");
    assert_eq!(&buf[..n], payload);
    assert_eq!(
        from,
        std::net::SocketAddr::V4(SocketAddrV4::new(guest, 4000))
    );
    let c = h.net.counters();
    assert_eq!((c.tx_packets(), c.tx_errors()), (1, 0));
}

#[test]
fn host_sends_udp_to_the_guest_through_a_real_tap() {
    let (tap, host, guest) = test_tap("r", 202);
    let link = Link::of(&tap, host, guest);
    let mac = link.mac;
    let net = VirtioNet::new(tap, mac).unwrap();
    let mut h = Harness::start(net, ACKED, 16);
    const BUF: u32 = 2048;
    for i in 0..8 {
        h.post_rx(&[(BUF_BASE + i * 0x1000, BUF)]);
    }
    h.kick_rx();

    let sock = UdpSocket::bind((host, 0)).unwrap();
    let payload = b"hello from the host";
    sock.send_to(payload, SocketAddrV4::new(guest, 5000))
        .unwrap();

    expect_datagram(&mut h, &link, payload, 5000);
    let c = h.net.counters();
    assert!(c.rx_packets() >= 1);
    assert_eq!(c.rx_dropped(), 0);
}

#[test]
fn opening_with_a_template_lets_the_kernel_name_the_tap() {
    let tap = Tap::open(None).unwrap_or_else(|e| panic!("need root and /dev/net/tun: {e}"));
    assert!(tap.name().starts_with("podvisor"), "{}", tap.name());
    eprintln!("{}: UFO offload {}", tap.name(), tap.supports_ufo());
    let name = tap.name().to_string();
    assert!(std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
    drop(tap);
    // The tap vanishes with its last file descriptor.
    assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
}

#[test]
fn a_frame_arriving_while_paused_is_delivered_after_resume() {
    let (tap, host, guest) = test_tap("p", 203);
    let link = Link::of(&tap, host, guest);
    let net = VirtioNet::new(tap, link.mac).unwrap();
    let mut h = Harness::start(net, ACKED, 16);
    for i in 0..8 {
        h.post_rx(&[(BUF_BASE + i * 0x1000, 2048)]);
    }
    h.kick_rx();
    h.net.pause();
    // The host resolves the guest first: its ARP request reaches the tap during the pause.
    let sock = UdpSocket::bind((host, 0)).unwrap();
    let payload = b"sent while the guest was paused";
    sock.send_to(payload, SocketAddrV4::new(guest, 5001))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.rx.used_idx(&h.mem), 0, "received while paused");
    assert_eq!(h.net.counters().rx_packets(), 0);
    h.net.resume().unwrap();
    expect_datagram(&mut h, &link, payload, 5001);
    let c = VirtioDevice::counters(&h.net);
    assert!(c["rx_frames"] >= 2, "ARP request and datagram: {c:?}");
    assert_eq!(c["rx_drops"], 0);
}

#[test]
fn the_host_side_mac_can_be_set() {
    let (tap, _, _) = test_tap("mac", 7);
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    tap.set_host_mac(mac).unwrap();
    assert_eq!(tap.host_mac().unwrap(), mac);
}
