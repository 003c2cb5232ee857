//! The bridge binding in network namespaces: a "node" namespace plays the CNI's side of the pod
//! interface (a veth), a "guest" namespace holds the far end of a veth standing in for the tap,
//! and a DHCP exchange and a TCP connection run over it. Nothing leaves these namespaces.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use ipnet::Ipv4Net;

use super::*;
use crate::podnet::netns::{
    assert_masqueraded, configure_guest, connect, pod_ip, pod_on_a_node, Netns, PodOnANode,
    NODE_IP, POD_IP,
};

const GUEST_MAC: [u8; 6] = [0x02, 0x6b, 0x36, 0x00, 0x00, 0x07];

fn spec(pod_interface: &str, dir: &std::path::Path) -> BridgeSpec {
    BridgeSpec {
        kind: Kind::Bridge,
        pod_interface: pod_interface.into(),
        bridge: "k6t-eth0".into(),
        guest_link: "tap0".into(),
        make_tap: false,
        saved: dir.join("podnet-eth0.json"),
        guest_mac: GUEST_MAC,
        hostname: Some("testvmi".into()),
        dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: vec!["default.svc.cluster.local".into()],
    }
}

/// What the pod's namespace holds that the binding touches.
#[derive(Debug, PartialEq)]
struct PodState {
    links: Vec<(String, Option<u32>)>,
    eth0_addresses: Vec<Ipv4Net>,
    tap0_addresses: Vec<Ipv4Net>,
    routes: Vec<(Ipv4Net, Option<Ipv4Addr>, u8)>,
}

fn pod_state(pod: &Netns) -> PodState {
    pod.run(|| {
        let nl = Netlink::open().unwrap();
        let mut links = Vec::new();
        for name in ["eth0", "tap0", "k6t-eth0"] {
            if let Some(l) = nl.link(name).unwrap() {
                links.push((l.name, l.controller));
            }
        }
        let eth0 = nl.existing("eth0").unwrap().index;
        let tap0 = nl.existing("tap0").unwrap().index;
        let mut routes: Vec<_> = nl
            .routes()
            .unwrap()
            .into_iter()
            .map(|r| (r.destination, r.gateway, r.protocol))
            .collect();
        routes.sort();
        PodState {
            links,
            eth0_addresses: nl.addresses(eth0).unwrap(),
            tap0_addresses: nl.addresses(tap0).unwrap(),
            routes,
        }
    })
}

/// DISCOVER, then REQUEST what was offered, from the guest's namespace; returns the ACK.
fn dhcp_exchange(guest: &Netns) -> Message {
    guest.run(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        socket.set_broadcast(true).unwrap();
        socket.bind_device(Some(b"guest0")).unwrap();
        let any = std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68));
        socket.bind(&any.into()).unwrap();
        let socket: UdpSocket = socket.into();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        let ask = |kind: MessageType, extra: Vec<DhcpOption>| -> Option<Message> {
            let mut m = Message::default();
            m.set_opcode(Opcode::BootRequest)
                .set_htype(v4::HType::Eth)
                .set_xid(7)
                .set_flags(Flags::default().set_broadcast())
                .set_chaddr(&GUEST_MAC);
            m.opts_mut().insert(DhcpOption::MessageType(kind));
            for o in extra {
                m.opts_mut().insert(o);
            }
            let mut out = Vec::new();
            m.encode(&mut Encoder::new(&mut out)).unwrap();
            let mut buf = [0u8; 1500];
            for _ in 0..20 {
                socket.send_to(&out, server).unwrap();
                if let Ok(n) = socket.recv(&mut buf) {
                    return Message::decode(&mut Decoder::new(&buf[..n])).ok();
                }
            }
            None
        };
        let offer = ask(MessageType::Discover, vec![]).expect("no DHCPOFFER");
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        let Some(DhcpOption::ServerIdentifier(id)) = offer.opts().get(OptionCode::ServerIdentifier)
        else {
            panic!("no server identifier in {offer:?}");
        };
        let request = vec![
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
            DhcpOption::ServerIdentifier(*id),
        ];
        ask(MessageType::Request, request).expect("no DHCPACK")
    })
}

#[test]
fn the_guest_takes_the_pods_address_and_reaches_the_node_and_all_is_undone() {
    let Some(PodOnANode { node, pod, guest }) = pod_on_a_node() else {
        return;
    };
    let before = pod_state(&pod);
    assert!(before.eth0_addresses.contains(&POD_IP.parse().unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let s = spec("eth0", dir.path());
    // Twice: a second launcher in the same pod (a container restart) finds it as the first did.
    for round in 0..2 {
        let this = s.clone();
        let binding = pod.run(move || BridgeBinding::wire(&this).map_err(|e| e.to_string()));
        let binding = binding.unwrap_or_else(|e| panic!("round {round}: {e}"));
        let lease = binding.lease().unwrap().clone();
        assert_eq!(lease.address, POD_IP.parse().unwrap());
        assert_eq!(lease.gateway, Some(NODE_IP));
        assert_eq!(lease.mtu, Some(1450));
        let during = pod_state(&pod);
        assert!(during.eth0_addresses.is_empty(), "{during:?}");
        let bridge = pod.run(|| Netlink::open().unwrap().existing("k6t-eth0").unwrap().index);
        for (name, controller) in &during.links {
            if name != "k6t-eth0" {
                assert_eq!(*controller, Some(bridge), "{name} is not on the bridge");
            }
        }

        let ack = dhcp_exchange(&guest);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), pod_ip());
        let get = |c| ack.opts().get(c).cloned();
        assert_eq!(
            get(OptionCode::Router),
            Some(DhcpOption::Router(vec![NODE_IP]))
        );
        assert_eq!(
            get(OptionCode::InterfaceMtu),
            Some(DhcpOption::InterfaceMtu(1450))
        );
        assert_eq!(
            get(OptionCode::SubnetMask),
            Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        let Some(DhcpOption::ClasslessStaticRoute(routes)) = get(OptionCode::ClasslessStaticRoute)
        else {
            panic!("no routes in {ack:?}");
        };
        assert!(
            routes.contains(&("10.96.0.0/12".parse().unwrap(), NODE_IP)),
            "{routes:?}"
        );

        // The guest, configured as told, reaches the node through the bridge and the pod's
        // interface, and the node sees it at the pod's address.
        if round == 0 {
            configure_guest(&guest, POD_IP.parse().unwrap(), NODE_IP);
        }
        let node_port = SocketAddrV4::new(NODE_IP, 8080);
        let seen = connect(&node, node_port, &guest, node_port);
        assert_eq!(seen, pod_ip());

        assert!(
            s.saved.exists(),
            "no record of the pod interface while wired"
        );
        drop(binding);
        assert_eq!(
            pod_state(&pod),
            before,
            "round {round}: the pod is not as it was"
        );
        assert!(!s.saved.exists(), "the record outlived the binding");
    }
}

#[test]
fn a_launcher_killed_while_wired_is_cleaned_up_after_by_the_next() {
    // The node and guest namespaces live as long as `net`: the pod's veths end there.
    let Some(net) = pod_on_a_node() else {
        return;
    };
    let pod = &net.pod;
    let before = pod_state(pod);
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("eth0", dir.path());
    // The launcher makes its own tap.
    s.guest_link = "tap7".into();
    s.make_tap = true;
    let first = s.clone();
    pod.run(move || {
        let binding = BridgeBinding::wire(&first).unwrap();
        assert!(Netlink::open().unwrap().link("tap7").unwrap().is_some());
        // kill -9: nothing is undone.
        std::mem::forget(binding);
    });
    assert_ne!(pod_state(pod), before);
    let second = s.clone();
    let binding = pod.run(move || BridgeBinding::wire(&second).map_err(|e| e.to_string()));
    let binding = binding.expect("a launcher after a killed one");
    assert_eq!(binding.lease().unwrap().address, POD_IP.parse().unwrap());
    drop(binding);
    assert_eq!(pod_state(pod), before);
    assert!(pod.run(|| Netlink::open().unwrap().link("tap7").unwrap().is_none()));
    assert!(!s.saved.exists());

    // The same with masquerade: its NAT table and ip_forward are put back too.
    s.kind = Kind::Masquerade {
        ports: vec![(6, 80)],
    };
    let first = s.clone();
    pod.run(move || std::mem::forget(BridgeBinding::wire(&first).unwrap()));
    assert_eq!(
        pod.run(|| std::fs::read_to_string(IP_FORWARD).unwrap()),
        "1\n"
    );
    let second = s.clone();
    let binding = pod.run(move || BridgeBinding::wire(&second).map_err(|e| e.to_string()));
    drop(binding.expect("a masquerade launcher after a killed one"));
    assert_eq!(pod_state(pod), before);
    assert_eq!(
        pod.run(|| std::fs::read_to_string(IP_FORWARD).unwrap()),
        "0\n"
    );
    let gone = pod.run(|| crate::podnet::nft::Nft::open()?.remove("podvisor_eth0"));
    assert_eq!(gone.unwrap_err().raw_os_error(), Some(libc::ENOENT));
    assert!(!s.saved.exists());

    // Masquerade on a tap that was there before (not the launcher's): the next launcher takes
    // the gateway's address off it before it puts it on again, and it is left as it was.
    s.guest_link = "tap0".into();
    s.make_tap = false;
    let first = s.clone();
    pod.run(move || std::mem::forget(BridgeBinding::wire(&first).unwrap()));
    assert_ne!(pod_state(pod), before);
    let second = s.clone();
    let binding = pod.run(move || BridgeBinding::wire(&second).map_err(|e| e.to_string()));
    drop(binding.expect("a masquerade launcher on a given tap after a killed one"));
    assert_eq!(pod_state(pod), before);
    assert!(!s.saved.exists());
}

#[test]
fn a_missing_interface_or_a_taken_bridge_is_refused_and_nothing_is_left() {
    // The node and guest namespaces live as long as `net`: the pod's veths end there.
    let Some(net) = pod_on_a_node() else {
        return;
    };
    let pod = &net.pod;
    let before = pod_state(pod);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let p = path.clone();
    let e = pod.run(move || {
        BridgeBinding::wire(&spec("net1", &p))
            .err()
            .map(|e| e.to_string())
    });
    let e = e.expect("a binding of a missing interface");
    assert!(e.contains("net1"), "{e}");
    assert_eq!(pod_state(pod), before);
    // The guest's tap missing: found before anything is changed.
    let mut no_tap = spec("eth0", &path);
    no_tap.guest_link = "tap9".into();
    let e = pod.run(move || BridgeBinding::wire(&no_tap).err().map(|e| e.to_string()));
    assert!(e.expect("a binding without a tap").contains("tap9"));
    assert_eq!(pod_state(pod), before);
    // A bridge of that name already there (a crashed launcher's): refused, left alone.
    pod.run(|| {
        Netlink::open()
            .unwrap()
            .add_bridge("k6t-eth0", 1500)
            .unwrap();
    });
    let with_bridge = pod_state(pod);
    let p = path.clone();
    let e = pod.run(move || {
        BridgeBinding::wire(&spec("eth0", &p))
            .err()
            .map(|e| e.to_string())
    });
    assert!(e.expect("a second bridge").contains("k6t-eth0 exists"));
    assert_eq!(pod_state(pod), with_bridge);
    assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0, "files left");
}

#[test]
fn masquerade_puts_the_guest_behind_the_pods_address_and_all_is_undone() {
    let Some(PodOnANode { node, pod, guest }) = pod_on_a_node() else {
        return;
    };
    let before = pod_state(&pod);
    let forward_before = pod.run(|| std::fs::read_to_string(IP_FORWARD).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("eth0", dir.path());
    s.kind = Kind::Masquerade { ports: Vec::new() };
    let this = s.clone();
    let binding = pod.run(move || BridgeBinding::wire(&this).map_err(|e| e.to_string()));
    let binding = binding.expect("a masquerade binding");
    // The pod keeps its address; the guest is offered the private one; no bridge: the
    // gateway's address is the tap's.
    let wired = pod_state(&pod);
    assert_eq!(wired.eth0_addresses, before.eth0_addresses);
    assert_eq!(wired.tap0_addresses, vec!["10.0.2.1/24".parse().unwrap()]);
    assert!(
        wired
            .links
            .iter()
            .all(|(name, controller)| name != "k6t-eth0" && controller.is_none()),
        "{wired:?}"
    );
    let ack = dhcp_exchange(&guest);
    assert_eq!(ack.yiaddr(), MASQUERADE_GUEST);
    assert_eq!(
        ack.opts().get(OptionCode::Router),
        Some(&DhcpOption::Router(vec![MASQUERADE_GATEWAY]))
    );
    configure_guest(
        &guest,
        Ipv4Net::new(MASQUERADE_GUEST, 24).unwrap(),
        MASQUERADE_GATEWAY,
    );
    assert_masqueraded(&node, &guest);
    drop(binding);
    assert_eq!(pod_state(&pod), before);
    assert_eq!(
        pod.run(|| std::fs::read_to_string(IP_FORWARD).unwrap()),
        forward_before
    );
    let gone = pod.run(|| crate::podnet::nft::Nft::open()?.remove("podvisor_eth0"));
    assert_eq!(gone.unwrap_err().raw_os_error(), Some(libc::ENOENT));
    assert!(!s.saved.exists());
}
