//! The few rtnetlink requests the pod network needs, made synchronous: links (find, create a
//! bridge, enslave, bring up, delete), IPv4 addresses and IPv4 routes, in the network
//! namespace of the thread that opened the connection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::stream::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

/// A failed request, naming what it was for.
#[derive(Debug)]
pub struct NetlinkError {
    what: String,
    source: String,
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for NetlinkError {}

impl NetlinkError {
    /// A failure beside netlink's own (a sysctl, a table) in the same terms.
    pub fn new(what: &str, source: impl fmt::Display) -> Self {
        NetlinkError {
            what: what.to_owned(),
            source: source.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

fn failed(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| NetlinkError {
        what,
        source: e.to_string(),
    }
}

/// A network interface.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// The bridge it is enslaved to.
    pub controller: Option<u32>,
}

/// An IPv4 route of the main table.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub destination: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// The interface it leaves by.
    pub interface: Option<u32>,
    /// Who made it (rtnetlink's protocol: 3 `ip route`'s default, 4 static, ...); put back
    /// as it was.
    pub protocol: u8,
    /// Made by the kernel for an address (the connected route): it comes back with the address.
    pub connected: bool,
}

/// A connection to the kernel's routing netlink, with the runtime that drives it.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let io = |e: std::io::Error| NetlinkError {
            what: "open a netlink socket".into(),
            source: e.to_string(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io)?;
        let (connection, handle, _) = runtime
            .block_on(async { rtnetlink::new_connection() })
            .map_err(io)?;
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    /// The link named `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut request = std::pin::pin!(self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute());
        match self.runtime.block_on(request.try_next()) {
            Ok(Some(msg)) => Ok(Some(link_of(&msg))),
            Ok(None) => Ok(None),
            // No such device.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(failed(format!("find link {name}"))(e)),
        }
    }

    /// The link named `name`, which must exist.
    pub fn existing(&self, name: &str) -> Result<Link> {
        self.link(name)?.ok_or_else(|| NetlinkError {
            what: format!("find link {name}"),
            source: "the pod has no such interface".into(),
        })
    }

    /// Creates a bridge; returns it.
    pub fn add_bridge(&self, name: &str, mtu: u32) -> Result<Link> {
        let what = format!("create bridge {name}");
        let msg = LinkBridge::new(name).mtu(mtu).build();
        self.runtime
            .block_on(self.handle.link().add(msg).execute())
            .map_err(failed(what.clone()))?;
        self.existing(name)
    }

    /// Enslaves link `index` to bridge `controller` (or frees it with `None`).
    pub fn set_controller(&self, index: u32, controller: Option<u32>) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index);
        let msg = match controller {
            Some(c) => msg.controller(c),
            None => msg.nocontroller(),
        };
        self.runtime
            .block_on(self.handle.link().set(msg.build()).execute())
            .map_err(failed(format!("set the bridge of link {index}")))
    }

    /// Brings link `index` up, at `mtu` when given.
    pub fn up(&self, index: u32, mtu: Option<u32>) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            msg = msg.mtu(mtu);
        }
        self.runtime
            .block_on(self.handle.link().set(msg.build()).execute())
            .map_err(failed(format!("bring link {index} up")))
    }

    /// Creates a veth pair (tests: a pod interface and its node end, a fake tap and its guest).
    #[cfg(test)]
    pub fn add_veth(&self, name: &str, peer: &str) -> Result<()> {
        let msg = rtnetlink::LinkVeth::new(name, peer).build();
        self.runtime
            .block_on(self.handle.link().add(msg).execute())
            .map_err(failed(format!("create veth {name}")))
    }

    /// Moves link `index` into the network namespace open as `fd`.
    #[cfg(test)]
    pub fn move_to_netns(&self, index: u32, fd: std::os::fd::RawFd) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).setns_by_fd(fd).build();
        self.runtime
            .block_on(self.handle.link().set(msg).execute())
            .map_err(failed(format!("move link {index}")))
    }

    /// Deletes link `index`.
    pub fn delete_link(&self, index: u32) -> Result<()> {
        self.runtime
            .block_on(self.handle.link().del(index).execute())
            .map_err(failed(format!("delete link {index}")))
    }

    /// The address messages of link `index` (only those of address `only`, if given).
    fn address_messages(&self, index: u32, only: Option<Ipv4Addr>) -> Result<Vec<AddressMessage>> {
        let mut request = self.handle.address().get().set_link_index_filter(index);
        if let Some(ip) = only {
            request = request.set_address_filter(IpAddr::V4(ip));
        }
        let messages: Vec<AddressMessage> = self
            .runtime
            .block_on(request.execute().try_collect())
            .map_err(failed(format!("list the addresses of link {index}")))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.index == index)
            .collect())
    }

    /// The IPv4 addresses of link `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>> {
        Ok(self
            .address_messages(index, None)?
            .iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                Ipv4Net::new(ip, m.header.prefix_len).ok()
            })
            .collect())
    }

    pub fn add_address(&self, index: u32, address: Ipv4Net) -> Result<()> {
        let request =
            self.handle
                .address()
                .add(index, IpAddr::V4(address.addr()), address.prefix_len());
        self.runtime
            .block_on(request.execute())
            .map_err(failed(format!("add address {address} to link {index}")))
    }

    pub fn delete_address(&self, index: u32, address: Ipv4Net) -> Result<()> {
        let what = format!("remove address {address} from link {index}");
        for m in self
            .address_messages(index, Some(address.addr()))?
            .into_iter()
            .filter(|m| m.header.prefix_len == address.prefix_len())
        {
            self.runtime
                .block_on(self.handle.address().del(m).execute())
                .map_err(failed(what.clone()))?;
        }
        Ok(())
    }

    /// The IPv4 routes of the main table.
    pub fn routes(&self) -> Result<Vec<Route>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let messages: Vec<RouteMessage> = self
            .runtime
            .block_on(self.handle.route().get(filter).execute().try_collect())
            .map_err(failed("list the routes"))?;
        Ok(messages
            .iter()
            .filter(|m| m.header.table == libc::RT_TABLE_MAIN)
            .filter_map(route_of)
            .collect())
    }

    /// Adds `route` (leaving by its interface).
    pub fn add_route(&self, route: &Route) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.destination.network(), route.destination.prefix_len());
        if let Some(gw) = route.gateway {
            b = b.gateway(gw);
        } else {
            b = b.scope(RouteScope::Link);
        }
        if let Some(oif) = route.interface {
            b = b.output_interface(oif);
        }
        if route.protocol != 0 {
            b = b.protocol(RouteProtocol::from(route.protocol));
        }
        self.runtime
            .block_on(self.handle.route().add(b.build()).execute())
            .map_err(failed(format!("add route to {}", route.destination)))
    }
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        name: String::new(),
        index: msg.header.index,
        mac: None,
        mtu: 1500,
        controller: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

fn route_of(msg: &RouteMessage) -> Option<Route> {
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut interface = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => destination = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(i) => interface = Some(*i),
            RouteAttribute::Table(t) if *t != u32::from(libc::RT_TABLE_MAIN) => return None,
            _ => {}
        }
    }
    Some(Route {
        destination: Ipv4Net::new(destination, msg.header.destination_prefix_length).ok()?,
        gateway,
        interface,
        protocol: u8::from(msg.header.protocol),
        connected: msg.header.protocol == RouteProtocol::Kernel,
    })
}
