//! The DHCP server the launcher runs for its guest on the pod network, as KubeVirt's bridge and
//! masquerade bindings do: it knows one client (the guest's MAC) and one answer (a [`Lease`]:
//! the pod's address for the bridge binding, 10.0.2.2 for masquerade), and offers it with
//! the pod's gateway, routes, DNS servers, search domains and MTU. Everything else on the link
//! is ignored; nothing a guest sends can make it answer with anything but its lease.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder, Name};
use ipnet::Ipv4Net;
use socket2::{Domain, Protocol, Socket, Type};

/// The DHCP server's and client's UDP ports (RFC 2131).
pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

/// KubeVirt hands out leases that never expire: the address is the pod's for the pod's life.
const INFINITE: u32 = u32::MAX;

/// The fixed part of a message (RFC 2131 section 2) and the magic cookie after it.
const HEADER: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// The options a request is read for, with the length each must have (`None`: any).
const READ: &[(u8, Option<usize>)] = &[
    (53, Some(1)), // message type
    (50, Some(4)), // requested address
    (54, Some(4)), // server identifier
    (55, None),    // parameter request list
];

/// What the guest is told.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// The only client answered.
    pub mac: [u8; 6],
    /// The guest's address and prefix.
    pub address: Ipv4Net,
    /// The default gateway, if the network has one.
    pub gateway: Option<Ipv4Addr>,
    /// Routes beyond the default one (destination, next hop), sent as classless static routes
    /// (RFC 3442) with the default route among them, since a client that takes them ignores
    /// the router option.
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// The server's identifier: an address of the host side (masquerade: the gateway; bridge:
    /// a link-local address, since the pod's address is the guest's now).
    pub server: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub search: Vec<String>,
    pub hostname: Option<String>,
    pub mtu: Option<u16>,
}

/// A reply and where it goes.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub to: SocketAddrV4,
    pub message: Message,
}

/// The answer to one datagram from the link: `None` for anything that is not a request of the
/// lease's client this server should answer (other clients, a request meant for another server,
/// RELEASE, DECLINE, garbage).
pub fn answer(datagram: &[u8], lease: &Lease) -> Option<Reply> {
    let request = Message::decode(&mut Decoder::new(&only_read_options(datagram)?)).ok()?;
    // A hostile hlen must not reach chaddr() (which slices by it).
    if request.opcode() != Opcode::BootRequest
        || request.htype() != v4::HType::Eth
        || request.hlen() != 6
        || request.chaddr() != lease.mac
    {
        return None;
    }
    let kind = match request.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(id)) =
                request.opts().get(OptionCode::ServerIdentifier)
            {
                if *id != lease.server {
                    // The client took another server's offer.
                    return None;
                }
            }
            let wanted = match request.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ => request.ciaddr(),
            };
            if wanted == lease.address.addr() {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        MessageType::Inform => MessageType::Ack,
        _ => return None,
    };
    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_htype(v4::HType::Eth)
        .set_xid(request.xid())
        .set_flags(request.flags())
        .set_giaddr(request.giaddr())
        .set_chaddr(&lease.mac);
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(lease.server));
    if kind != MessageType::Nak {
        configure(opts, lease);
    }
    let inform = request.opts().msg_type() == Some(MessageType::Inform);
    if kind != MessageType::Nak && !inform {
        opts.insert(DhcpOption::AddressLeaseTime(INFINITE));
        reply.set_yiaddr(lease.address.addr());
    }
    // A client with an address (renewing, INFORM) takes unicast; one without has no address
    // to send to yet, so the answer is broadcast on the link (the server is bound to it).
    let to = if request.ciaddr().is_unspecified() || kind == MessageType::Nak {
        Ipv4Addr::BROADCAST
    } else {
        request.ciaddr()
    };
    Some(Reply {
        to: SocketAddrV4::new(to, CLIENT_PORT),
        message: reply,
    })
}

/// The request with only the options [`answer`] reads, each of its right length, or `None` if
/// the options are not well formed. A guest's datagram never reaches the option decoder with
/// anything else in it: the decoder knows hundreds of options and checks some lengths only in
/// debug builds.
fn only_read_options(datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.len() < HEADER + MAGIC.len() || datagram[HEADER..HEADER + MAGIC.len()] != MAGIC {
        return None;
    }
    let mut out = datagram[..HEADER + MAGIC.len()].to_vec();
    let mut rest = &datagram[HEADER + MAGIC.len()..];
    loop {
        match rest {
            [] | [255, ..] => break,
            [0, tail @ ..] => rest = tail,
            [code, len, tail @ ..] => {
                let len = usize::from(*len);
                let value = tail.get(..len)?;
                let wanted = READ.iter().find(|(c, _)| c == code);
                if let Some((_, want)) = wanted {
                    if want.is_some_and(|w| w != len) {
                        return None;
                    }
                    out.extend_from_slice(&[*code, len as u8]);
                    out.extend_from_slice(value);
                }
                rest = &tail[len..];
            }
            [_] => return None,
        }
    }
    out.push(255);
    Some(out)
}

/// The lease's configuration options.
fn configure(opts: &mut v4::DhcpOptions, lease: &Lease) {
    opts.insert(DhcpOption::SubnetMask(lease.address.netmask()));
    opts.insert(DhcpOption::BroadcastAddr(lease.address.broadcast()));
    if let Some(gw) = lease.gateway {
        opts.insert(DhcpOption::Router(vec![gw]));
    }
    if !lease.routes.is_empty() {
        let mut routes = lease.routes.clone();
        if let Some(gw) = lease.gateway {
            routes.push((Ipv4Net::default(), gw));
        }
        opts.insert(DhcpOption::ClasslessStaticRoute(routes));
    }
    if !lease.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
    }
    let search: Vec<Name> = lease
        .search
        .iter()
        .filter_map(|s| Name::from_ascii(s).ok())
        .collect();
    if !search.is_empty() {
        opts.insert(DhcpOption::DomainSearch(search));
    }
    if let Some(name) = &lease.hostname {
        opts.insert(DhcpOption::Hostname(name.clone()));
    }
    if let Some(mtu) = lease.mtu {
        opts.insert(DhcpOption::InterfaceMtu(mtu));
    }
}

/// A DHCP server answering on one network interface until dropped.
pub struct DhcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DhcpServer {
    /// Serves `lease` on `interface` (the bridge or tap the guest's NIC is on).
    pub fn start(interface: &str, lease: Lease) -> io::Result<Self> {
        Self::start_on(interface, SERVER_PORT, CLIENT_PORT, lease)
    }

    /// As [`Self::start`], on other ports (for tests that cannot take the privileged ones).
    pub fn start_on(
        interface: &str,
        server_port: u16,
        client_port: u16,
        lease: Lease,
    ) -> io::Result<Self> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("DHCP on {interface}: {e}"));
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(named)?;
        socket.set_reuse_address(true).map_err(named)?;
        socket.set_broadcast(true).map_err(named)?;
        // Only the guest's link: the pod's other interfaces may have DHCP of their own.
        socket
            .bind_device(Some(interface.as_bytes()))
            .map_err(named)?;
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, server_port));
        socket.bind(&any.into()).map_err(named)?;
        let socket: UdpSocket = socket.into();
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let name = interface.to_owned();
        let thread = std::thread::Builder::new()
            .name("dhcp".into())
            .spawn(move || serve(&socket, &lease, client_port, &stopped, &name))?;
        Ok(DhcpServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The DHCP thread's system calls beyond every thread's (`vmm::seccomp::BASE`).
const DHCP_CALLS: &[i64] = &[
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
];

fn serve(socket: &UdpSocket, lease: &Lease, client_port: u16, stop: &AtomicBool, name: &str) {
    // The guest's datagrams are parsed here: this thread needs no capability at all.
    if let Err(e) = vmm::privileges::keep_only(&[]) {
        tracing::debug!("DHCP on {name}: {e}");
    }
    // Nor any system call but answering on its socket.
    if let Err(e) = vmm::seccomp::apply_custom("dhcp", &[vmm::seccomp::BASE, DHCP_CALLS]) {
        tracing::error!("DHCP on {name}: {e}");
        return;
    }
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("DHCP on {name}: {e}; the server stops");
                return;
            }
        };
        let Some(reply) = answer(&buf[..n], lease) else {
            continue;
        };
        let mut out = Vec::with_capacity(548);
        if reply.message.encode(&mut Encoder::new(&mut out)).is_err() {
            continue;
        }
        let to = SocketAddrV4::new(*reply.to.ip(), client_port);
        match socket.send_to(&out, to) {
            Ok(_) => tracing::debug!(
                "DHCP on {name}: {:?} to {to}",
                reply.message.opts().msg_type()
            ),
            Err(e) => tracing::warn!("DHCP on {name}: reply to {to}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
