//! KubeVirt's bridge binding: the guest takes the pod's place on the pod network. The pod
//! interface's IPv4 address leaves it (the guest will answer for it), the interface and the
//! guest's tap join a bridge, and a DHCP server on the bridge gives the guest that address
//! with the pod's gateway, routes, DNS and MTU. The masquerade binding needs no bridge: the
//! private network's gateway address is the tap's own (one hop less for every packet than
//! KubeVirt's bridge in front of the tap), the DHCP server answers on the tap, and nftables
//! NAT joins that network to the pod's address. Everything done is undone, in reverse order,
//! when the binding is dropped or a step fails: the pod interface gets its address and routes
//! back. What the pod interface had is also written to a file before anything changes, so that
//! the next launcher in the pod (the container restarted after a `kill -9`) puts it back first.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::dhcp::{DhcpServer, Lease};
use super::netlink::{Link, Netlink, Route};
use super::PodNetError;

/// The bridge's own address, only a DHCP server identifier (as KubeVirt's): link-local, so
/// it is never a route to anything.
pub const SERVER_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 75, 10);

/// The masquerade binding's private network (KubeVirt's): the tap is the guest's gateway.
pub const MASQUERADE_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
pub const MASQUERADE_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const MASQUERADE_PREFIX: u8 = 24;

/// How the guest reaches the pod's network.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// The guest takes the pod interface's address; the interface joins the bridge.
    Bridge,
    /// The guest is on a private network behind its tap; connections to the pod's address
    /// (all, or these (protocol, port)) are sent on to it, and its own leave as the pod's.
    Masquerade { ports: Vec<(u8, u16)> },
}

/// What to bind and what to tell the guest beyond what the pod interface has.
#[derive(Clone, Debug)]
pub struct BridgeSpec {
    pub kind: Kind,
    /// The pod's interface for this network (`eth0`, `net1`, ...).
    pub pod_interface: String,
    /// The bridge to create (`k6t-eth0`; bridge binding only).
    pub bridge: String,
    /// The guest's side: its tap.
    pub guest_link: String,
    /// Make the tap (persistent, so that the VMM opens it by name later) and delete it when
    /// unwired; otherwise it exists already and is left.
    pub make_tap: bool,
    /// Where the pod interface's configuration is kept while the binding holds it.
    pub saved: PathBuf,
    pub guest_mac: [u8; 6],
    pub hostname: Option<String>,
    pub dns: Vec<Ipv4Addr>,
    pub search: Vec<String>,
}

/// A step to take back.
#[derive(Debug)]
enum Undo {
    DeleteLink(u32, String),
    FreeFromBridge(u32, String),
    /// Take an address off a link that stays (a tap the launcher did not make).
    DeleteAddress(u32, Ipv4Net, String),
    /// Give the pod interface its address back, then the routes that went with it.
    Readdress {
        link: u32,
        address: Ipv4Net,
        routes: Vec<Route>,
    },
    /// Remove the saved configuration (last, once everything else is back).
    Forget(PathBuf),
    /// Delete the NAT table.
    DeleteNat(String),
    /// Write ip_forward's value back (through the file opened in the pod's namespace).
    IpForward(std::fs::File, String),
}

/// IPv4 forwarding in the pod's namespace, which masquerading needs.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What the pod interface had, as written to [`BridgeSpec::saved`].
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    interface: String,
    address: String,
    /// (destination, gateway, protocol) of the routes that leave by the interface.
    routes: Vec<(String, Option<Ipv4Addr>, u8)>,
    /// Empty for masquerade (no bridge).
    bridge: String,
    tap: Option<String>,
    /// Masquerade: the link that holds the private network's gateway address.
    #[serde(default)]
    gateway_on: Option<String>,
    /// Masquerade: the NAT table made, and ip_forward's value before.
    #[serde(default)]
    nat_table: Option<String>,
    #[serde(default)]
    ip_forward: Option<String>,
}

impl Undo {
    fn describe(&self) -> String {
        match self {
            Undo::DeleteLink(_, name) => format!("cannot delete {name}"),
            Undo::FreeFromBridge(_, name) => format!("cannot take {name} off the bridge"),
            Undo::DeleteAddress(_, address, name) => {
                format!("cannot take {address} off {name}")
            }
            Undo::Readdress { address, .. } => {
                format!("cannot give the pod interface {address} and its routes back")
            }
            Undo::Forget(path) => format!("cannot remove {}", path.display()),
            Undo::DeleteNat(table) => format!("cannot delete the nftables table {table}"),
            Undo::IpForward(_, value) => format!("cannot write {value} to {IP_FORWARD}"),
        }
    }
}

/// A wired bridge binding; dropping it unwires it.
pub struct BridgeBinding {
    netlink: Netlink,
    /// For masquerade: netfilter's socket, opened in the pod's namespace.
    nft: Option<super::nft::Nft>,
    undo: Vec<Undo>,
    dhcp: Option<DhcpServer>,
    lease: Option<Lease>,
}

impl BridgeBinding {
    /// Wires `spec` in the calling thread's network namespace.
    pub fn wire(spec: &BridgeSpec) -> Result<Self, PodNetError> {
        let netlink = Netlink::open()?;
        let mut binding = BridgeBinding {
            netlink,
            nft: None,
            undo: Vec::new(),
            dhcp: None,
            lease: None,
        };
        binding.steps(spec)?;
        if let Some(lease) = &binding.lease {
            let how = match spec.kind {
                Kind::Bridge => format!("bridged to {} by {}", spec.guest_link, spec.bridge),
                Kind::Masquerade { .. } => format!("masqueraded for {}", spec.guest_link),
            };
            tracing::info!(
                "pod network: {} {how}; the guest is offered {} (gateway {:?})",
                spec.pod_interface,
                lease.address,
                lease.gateway
            );
        }
        Ok(binding)
    }

    /// What the guest is offered.
    #[cfg(test)]
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    fn steps(&mut self, spec: &BridgeSpec) -> Result<(), PodNetError> {
        if spec.saved.exists() {
            self.recover(spec)?;
        }
        let nl = &self.netlink;
        let pod = nl.existing(&spec.pod_interface)?;
        let masquerade = spec.kind != Kind::Bridge;
        if !masquerade && nl.link(&spec.bridge)?.is_some() {
            return Err(PodNetError::Refused(format!(
                "{} exists already: another launcher's bridge, or one a crashed launcher left",
                spec.bridge
            )));
        }
        if !spec.make_tap {
            nl.existing(&spec.guest_link)?;
        } else if nl.link(&spec.guest_link)?.is_some() {
            return Err(PodNetError::Refused(format!(
                "{} exists already: the guest's tap must be the launcher's own",
                spec.guest_link
            )));
        }
        let addresses = nl.addresses(pod.index)?;
        let Some(&pod_address) = addresses.first() else {
            return Err(PodNetError::Refused(format!(
                "the pod interface {} has no IPv4 address",
                pod.name
            )));
        };
        let nat_table = format!("podvisor_{}", spec.pod_interface.replace('-', "_"));
        let routes: Vec<Route> = nl
            .routes()?
            .into_iter()
            .filter(|r| r.interface == Some(pod.index))
            .collect();
        let gateway = routes
            .iter()
            .find(|r| r.destination.prefix_len() == 0)
            .and_then(|r| r.gateway);
        let extra: Vec<(Ipv4Net, Ipv4Addr)> = routes
            .iter()
            .filter(|r| r.destination.prefix_len() > 0 && !r.connected)
            .filter_map(|r| Some((r.destination, r.gateway?)))
            .collect();

        let ip_forward = std::fs::read_to_string(IP_FORWARD)
            .map(|v| v.trim().to_owned())
            .map_err(|e| PodNetError::Refused(format!("cannot read {IP_FORWARD}: {e}")))?;
        let saved = Saved {
            interface: pod.name.clone(),
            address: if masquerade {
                String::new()
            } else {
                pod_address.to_string()
            },
            routes: routes
                .iter()
                .filter(|r| !r.connected)
                .map(|r| (r.destination.to_string(), r.gateway, r.protocol))
                .collect(),
            bridge: if masquerade {
                String::new()
            } else {
                spec.bridge.clone()
            },
            tap: spec.make_tap.then(|| spec.guest_link.clone()),
            gateway_on: masquerade.then(|| spec.guest_link.clone()),
            nat_table: masquerade.then(|| nat_table.clone()),
            ip_forward: masquerade.then(|| ip_forward.clone()),
        };
        write_saved(&spec.saved, &saved)?;
        self.undo.push(Undo::Forget(spec.saved.clone()));
        if spec.make_tap {
            devices::virtio::net::Tap::open(Some(&spec.guest_link))
                .and_then(|t| t.set_persistent(true))
                .map_err(|e| PodNetError::Refused(e.to_string()))?;
            let made = nl.existing(&spec.guest_link)?;
            self.undo.push(Undo::DeleteLink(made.index, made.name));
        }
        let guest = nl.existing(&spec.guest_link)?;
        let (address, gateway, extra, server, dhcp_on) = if let Kind::Masquerade { ports } =
            &spec.kind
        {
            let gateway = Ipv4Net::new(MASQUERADE_GATEWAY, MASQUERADE_PREFIX).expect("a /24");
            nl.add_address(guest.index, gateway)?;
            self.undo.push(Undo::DeleteAddress(
                guest.index,
                gateway,
                guest.name.clone(),
            ));
            self.netlink.up(guest.index, Some(pod.mtu))?;
            self.masquerade(&pod, ports, &nat_table, &ip_forward)?;
            let guest_address = Ipv4Net::new(MASQUERADE_GUEST, MASQUERADE_PREFIX).expect("a /24");
            (
                guest_address,
                Some(MASQUERADE_GATEWAY),
                Vec::new(),
                MASQUERADE_GATEWAY,
                guest.name.clone(),
            )
        } else {
            let bridge = nl.add_bridge(&spec.bridge, pod.mtu)?;
            self.undo
                .push(Undo::DeleteLink(bridge.index, bridge.name.clone()));
            nl.delete_address(pod.index, pod_address)?;
            self.undo.push(Undo::Readdress {
                link: pod.index,
                address: pod_address,
                routes: routes.iter().filter(|r| !r.connected).cloned().collect(),
            });
            self.enslave(&pod, &bridge)?;
            self.enslave(&guest, &bridge)?;
            let server = Ipv4Net::new(SERVER_ADDRESS, 32).expect("a /32");
            self.netlink.add_address(bridge.index, server)?;
            self.netlink.up(bridge.index, None)?;
            (pod_address, gateway, extra, SERVER_ADDRESS, bridge.name)
        };
        let lease = Lease {
            mac: spec.guest_mac,
            address,
            gateway,
            routes: extra,
            server,
            dns: spec.dns.clone(),
            search: spec.search.clone(),
            hostname: spec.hostname.clone(),
            mtu: u16::try_from(pod.mtu).ok(),
        };
        self.dhcp = Some(
            DhcpServer::start(&dhcp_on, lease.clone())
                .map_err(|e| PodNetError::Refused(e.to_string()))?,
        );
        self.lease = Some(lease);
        Ok(())
    }

    /// Puts back what a launcher that could not unwire (killed) left: the pod interface's
    /// address and routes as saved, no bridge, no tap.
    fn recover(&mut self, spec: &BridgeSpec) -> Result<(), PodNetError> {
        let path = &spec.saved;
        let unreadable = |why: String| {
            PodNetError::Refused(format!(
                "{} (a previous launcher's record of the pod interface): {why}",
                path.display()
            ))
        };
        let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
        let saved: Saved = serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
        // Empty for masquerade: the pod interface kept its address.
        let address: Option<Ipv4Net> = if saved.address.is_empty() {
            None
        } else {
            Some(
                saved
                    .address
                    .parse()
                    .map_err(|e: ipnet::AddrParseError| unreadable(e.to_string()))?,
            )
        };
        tracing::warn!(
            "pod network: a previous launcher left {} wired; putting it back first",
            saved.interface
        );
        let nl = &self.netlink;
        for name in [Some(&saved.bridge), saved.tap.as_ref()]
            .into_iter()
            .flatten()
            .filter(|name| !name.is_empty())
        {
            if let Some(link) = nl.link(name)? {
                nl.delete_link(link.index)?;
            }
        }
        // A tap that stays (not the launcher's own) gives the gateway address back.
        if let Some(name) = &saved.gateway_on {
            let gateway = Ipv4Net::new(MASQUERADE_GATEWAY, MASQUERADE_PREFIX).expect("a /24");
            if let Some(link) = nl.link(name)? {
                if nl.addresses(link.index)?.contains(&gateway) {
                    nl.delete_address(link.index, gateway)?;
                }
            }
        }
        if let Some(table) = &saved.nat_table {
            let removed = super::nft::Nft::open().and_then(|n| n.remove(table));
            if let Err(e) = removed {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    return Err(unreadable(format!("cannot delete table {table}: {e}")));
                }
            }
        }
        if let Some(value) = &saved.ip_forward {
            std::fs::write(IP_FORWARD, value)
                .map_err(|e| unreadable(format!("cannot write {IP_FORWARD}: {e}")))?;
        }
        let pod = nl.existing(&saved.interface)?;
        if let Some(address) = address {
            if !nl.addresses(pod.index)?.contains(&address) {
                nl.add_address(pod.index, address)?;
            }
        }
        nl.up(pod.index, None)?;
        let present = nl.routes()?;
        for (destination, gateway, protocol) in &saved.routes {
            let route = Route {
                destination: destination
                    .parse()
                    .map_err(|e: ipnet::AddrParseError| unreadable(e.to_string()))?,
                gateway: *gateway,
                interface: Some(pod.index),
                protocol: *protocol,
                connected: false,
            };
            let there = present
                .iter()
                .any(|r| r.destination == route.destination && r.gateway == route.gateway);
            if !there {
                nl.add_route(&route)?;
            }
        }
        std::fs::remove_file(path).map_err(|e| unreadable(e.to_string()))?;
        Ok(())
    }

    /// Masquerade's forwarding and NAT: connections to the pod's address go on to the guest
    /// (all, or `ports`), the guest's own leave as the pod's.
    fn masquerade(
        &mut self,
        pod: &Link,
        ports: &[(u8, u16)],
        nat_table: &str,
        ip_forward: &str,
    ) -> Result<(), PodNetError> {
        if ip_forward != "1" {
            let turn_on = || -> std::io::Result<std::fs::File> {
                let mut f = std::fs::OpenOptions::new().write(true).open(IP_FORWARD)?;
                std::io::Write::write_all(&mut f, b"1")?;
                Ok(f)
            };
            let file = turn_on()
                .map_err(|e| PodNetError::Refused(format!("cannot turn on {IP_FORWARD}: {e}")))?;
            self.undo.push(Undo::IpForward(file, ip_forward.to_owned()));
        }
        let nat = super::nft::MasqueradeNat {
            table: nat_table.to_owned(),
            pod_interface: pod.name.clone(),
            guest: MASQUERADE_GUEST,
            ports: ports.to_vec(),
        };
        let refused = |e: std::io::Error| {
            PodNetError::Refused(format!("cannot make the nftables table {nat_table}: {e}"))
        };
        let nft = super::nft::Nft::open().map_err(refused)?;
        nft.install(&nat).map_err(refused)?;
        self.nft = Some(nft);
        self.undo.push(Undo::DeleteNat(nat_table.to_owned()));
        Ok(())
    }

    fn enslave(&mut self, link: &Link, bridge: &Link) -> Result<(), PodNetError> {
        self.netlink
            .set_controller(link.index, Some(bridge.index))?;
        self.undo
            .push(Undo::FreeFromBridge(link.index, link.name.clone()));
        self.netlink.up(link.index, Some(bridge.mtu))?;
        Ok(())
    }
}

impl Drop for BridgeBinding {
    fn drop(&mut self) {
        self.dhcp = None;
        let mut all_back = true;
        while let Some(step) = self.undo.pop() {
            let nl = &self.netlink;
            let done = match &step {
                // Kept when something could not be put back: the next launcher tries again.
                Undo::Forget(path) if all_back => {
                    let _ = std::fs::remove_file(path);
                    Ok(())
                }
                Undo::Forget(_) => Ok(()),
                Undo::DeleteNat(table) => match &self.nft {
                    Some(nft) => nft
                        .remove(table)
                        .map_err(|e| super::netlink::NetlinkError::new("delete the NAT table", e)),
                    None => Ok(()),
                },
                // At offset 0: a sysctl ignores writes further on.
                Undo::IpForward(file, value) => {
                    std::os::unix::fs::FileExt::write_at(file, value.as_bytes(), 0)
                        .map(drop)
                        .map_err(|e| super::netlink::NetlinkError::new("write ip_forward", e))
                }
                Undo::DeleteLink(index, _) => nl.delete_link(*index),
                Undo::FreeFromBridge(index, _) => nl.set_controller(*index, None),
                Undo::DeleteAddress(index, address, _) => nl.delete_address(*index, *address),
                Undo::Readdress {
                    link,
                    address,
                    routes,
                } => nl
                    .add_address(*link, *address)
                    .and_then(|()| routes.iter().try_for_each(|r| nl.add_route(r))),
            };
            if let Err(e) = done {
                all_back = false;
                tracing::warn!("pod network: {}: {e}", step.describe());
            }
        }
    }
}

/// Writes the record of the pod interface, whole or not at all.
fn write_saved(path: &std::path::Path, saved: &Saved) -> Result<(), PodNetError> {
    let failed =
        |e: std::io::Error| PodNetError::Refused(format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let text = serde_json::to_string(saved).expect("plain data");
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).map_err(failed)?;
    std::fs::rename(&partial, path).map_err(failed)
}

#[cfg(test)]
mod tests;
