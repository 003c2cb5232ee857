use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::*;

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xaa, 0xbb, 0xcc];

fn lease() -> Lease {
    Lease {
        mac: MAC,
        address: "10.244.1.7/24".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(10, 244, 1, 1)),
        routes: vec![(
            "10.96.0.0/12".parse().unwrap(),
            Ipv4Addr::new(10, 244, 1, 1),
        )],
        server: Ipv4Addr::new(169, 254, 75, 10),
        dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
        hostname: Some("testvmi".into()),
        mtu: Some(1450),
    }
}

fn request(kind: MessageType, mac: &[u8], extra: &[DhcpOption]) -> Vec<u8> {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_htype(v4::HType::Eth)
        .set_xid(0x1234_5678)
        .set_flags(Flags::default().set_broadcast())
        .set_chaddr(mac);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in extra {
        m.opts_mut().insert(o.clone());
    }
    encode(&m)
}

fn encode(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode(&mut Encoder::new(&mut out)).unwrap();
    out
}

fn kind(r: &Reply) -> MessageType {
    r.message.opts().msg_type().unwrap()
}

#[test]
fn a_discover_is_offered_the_lease_with_the_pod_network_configuration() {
    let r = answer(&request(MessageType::Discover, &MAC, &[]), &lease()).unwrap();
    assert_eq!(kind(&r), MessageType::Offer);
    assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT));
    let m = &r.message;
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 0x1234_5678);
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 244, 1, 7));
    assert_eq!(m.chaddr(), MAC);
    let o = m.opts();
    let get = |c| o.get(c).cloned();
    assert_eq!(
        get(OptionCode::SubnetMask),
        Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        get(OptionCode::Router),
        Some(DhcpOption::Router(vec![Ipv4Addr::new(10, 244, 1, 1)]))
    );
    assert_eq!(
        get(OptionCode::ServerIdentifier),
        Some(DhcpOption::ServerIdentifier(Ipv4Addr::new(
            169, 254, 75, 10
        )))
    );
    assert_eq!(
        get(OptionCode::DomainNameServer),
        Some(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 96, 0, 10
        )]))
    );
    assert_eq!(
        get(OptionCode::InterfaceMtu),
        Some(DhcpOption::InterfaceMtu(1450))
    );
    assert_eq!(
        get(OptionCode::Hostname),
        Some(DhcpOption::Hostname("testvmi".into()))
    );
    assert_eq!(
        get(OptionCode::AddressLeaseTime),
        Some(DhcpOption::AddressLeaseTime(u32::MAX))
    );
    // Classless routes carry the default route too: a client that takes them ignores option 3.
    let Some(DhcpOption::ClasslessStaticRoute(routes)) = get(OptionCode::ClasslessStaticRoute)
    else {
        panic!("no classless static routes in {o:?}");
    };
    assert!(routes.contains(&("0.0.0.0/0".parse().unwrap(), Ipv4Addr::new(10, 244, 1, 1))));
    assert!(routes.contains(&(
        "10.96.0.0/12".parse().unwrap(),
        Ipv4Addr::new(10, 244, 1, 1)
    )));
    let Some(DhcpOption::DomainSearch(search)) = get(OptionCode::DomainSearch) else {
        panic!("no search domains in {o:?}");
    };
    assert_eq!(search.len(), 2);
    // What goes on the wire reads back the same (the names now fully qualified).
    let back = Message::decode(&mut Decoder::new(&encode(m))).unwrap();
    assert_eq!(back.yiaddr(), m.yiaddr());
    for code in [
        OptionCode::ClasslessStaticRoute,
        OptionCode::Hostname,
        OptionCode::Router,
    ] {
        assert_eq!(back.opts().get(code), o.get(code), "{code:?}");
    }
    let Some(DhcpOption::DomainSearch(names)) = back.opts().get(OptionCode::DomainSearch) else {
        panic!("no search domains on the wire");
    };
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["default.svc.cluster.local.", "cluster.local."]);
}

#[test]
fn a_request_for_the_lease_is_acked_any_other_address_naked() {
    let ip = Ipv4Addr::new(10, 244, 1, 7);
    let ours = DhcpOption::ServerIdentifier(Ipv4Addr::new(169, 254, 75, 10));
    let r = answer(
        &request(
            MessageType::Request,
            &MAC,
            &[DhcpOption::RequestedIpAddress(ip), ours.clone()],
        ),
        &lease(),
    )
    .unwrap();
    assert_eq!(kind(&r), MessageType::Ack);
    assert_eq!(r.message.yiaddr(), ip);

    let other = DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 0, 9));
    let r = answer(&request(MessageType::Request, &MAC, &[other]), &lease()).unwrap();
    assert_eq!(kind(&r), MessageType::Nak);
    assert_eq!(r.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(r.message.opts().get(OptionCode::SubnetMask).is_none());

    // A client that chose another server's offer is left alone.
    let theirs = DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1));
    let req = request(
        MessageType::Request,
        &MAC,
        &[DhcpOption::RequestedIpAddress(ip), theirs],
    );
    assert_eq!(answer(&req, &lease()), None);
}

#[test]
fn a_renewing_client_and_an_inform_are_answered_unicast() {
    let ip = Ipv4Addr::new(10, 244, 1, 7);
    for (k, lease_time) in [(MessageType::Request, true), (MessageType::Inform, false)] {
        let mut m = Message::decode(&mut Decoder::new(&request(k, &MAC, &[]))).unwrap();
        m.set_ciaddr(ip).set_flags(Flags::default());
        let r = answer(&encode(&m), &lease()).unwrap();
        assert_eq!(kind(&r), MessageType::Ack, "{k:?}");
        assert_eq!(r.to, SocketAddrV4::new(ip, CLIENT_PORT));
        assert_eq!(
            r.message.opts().get(OptionCode::AddressLeaseTime).is_some(),
            lease_time,
            "{k:?}"
        );
    }
}

#[test]
fn other_clients_other_messages_and_garbage_get_no_answer() {
    let l = lease();
    let stranger = [0x02, 0, 0, 0, 0, 1];
    assert_eq!(
        answer(&request(MessageType::Discover, &stranger, &[]), &l),
        None
    );
    for k in [
        MessageType::Release,
        MessageType::Decline,
        MessageType::Offer,
    ] {
        assert_eq!(answer(&request(k, &MAC, &[]), &l), None, "{k:?}");
    }
    // A reply sent by someone else on the link.
    let mut m = Message::decode(&mut Decoder::new(&request(
        MessageType::Discover,
        &MAC,
        &[],
    )))
    .unwrap();
    m.set_opcode(Opcode::BootReply);
    assert_eq!(answer(&encode(&m), &l), None);
    // hlen past chaddr's 16 bytes (the parser keeps it as sent), and a short one.
    let mut bytes = request(MessageType::Discover, &MAC, &[]);
    for hlen in [0u8, 5, 16, 17, 255] {
        bytes[2] = hlen;
        assert_eq!(answer(&bytes, &l), None, "hlen {hlen}");
    }
    // No message type, truncated, empty, noise.
    let mut none = Message::decode(&mut Decoder::new(&request(
        MessageType::Discover,
        &MAC,
        &[],
    )))
    .unwrap();
    none.opts_mut().remove(OptionCode::MessageType);
    assert_eq!(answer(&encode(&none), &l), None);
    let whole = request(MessageType::Discover, &MAC, &[]);
    for cut in [0, 1, 100, 236, 240, whole.len() - 1] {
        let _ = answer(&whole[..cut], &l);
    }
    // Options the server does not read, of any shape, never reach the decoder; the ones it
    // reads must have their length.
    let mut odd = whole[..240].to_vec();
    odd.extend_from_slice(&[53, 1, 1, 91, 0, 55, 3, 1, 3, 6, 255]);
    assert_eq!(kind(&answer(&odd, &l).unwrap()), MessageType::Offer);
    let mut bad = whole[..240].to_vec();
    bad.extend_from_slice(&[53, 2, 1, 1, 255]);
    assert_eq!(answer(&bad, &l), None);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        let mut junk = whole.clone();
        for _ in 0..8 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % junk.len();
            junk[at] = (seed >> 32) as u8;
        }
        let _ = answer(&junk, &l);
        // Random options after a valid header.
        let mut opts = whole[..240].to_vec();
        for _ in 0..(seed % 64) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            opts.push(
                [0u8, 50, 53, 54, 55, 91, 255, 12][seed as usize % 8]
                    .wrapping_add((seed >> 24) as u8 % 3),
            );
        }
        let _ = answer(&opts, &l);
    }
}

#[test]
fn the_server_answers_on_its_interface_until_dropped() {
    // Loopback and unprivileged ports: the same code path as on a tap, minus the guest.
    let client = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    client.set_broadcast(true).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let client_port = client.local_addr().unwrap().port();
    let server_port = {
        let probe = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        probe.local_addr().unwrap().port()
    };
    let server = DhcpServer::start_on("lo", server_port, client_port, lease()).unwrap();
    let discover = request(MessageType::Discover, &MAC, &[]);
    let mut buf = [0u8; 1500];
    let mut offer = None;
    for _ in 0..20 {
        client
            .send_to(&discover, (Ipv4Addr::LOCALHOST, server_port))
            .unwrap();
        if let Ok(n) = client.recv(&mut buf) {
            offer = Some(Message::decode(&mut Decoder::new(&buf[..n])).unwrap());
            break;
        }
    }
    let offer = offer.expect("no offer from the server");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 244, 1, 7));
    drop(server);
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    client
        .send_to(&discover, (Ipv4Addr::LOCALHOST, server_port))
        .unwrap();
    assert!(
        client.recv(&mut buf).is_err(),
        "an answer after the server stopped"
    );
}

#[test]
fn a_missing_interface_is_one_clear_error() {
    let Err(e) = DhcpServer::start_on("podvisor-nope0", 0, 0, lease()) else {
        panic!("a server on a missing interface");
    };
    assert!(e.to_string().contains("DHCP on podvisor-nope0"), "{e}");
}
