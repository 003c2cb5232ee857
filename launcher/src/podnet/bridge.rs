//! KubeVirt's bridge binding: the guest takes the pod's place on the pod network. The pod
//! interface's IPv4 address leaves it (the guest will answer for it), the interface and the
//! guest's tap join a bridge, and a DHCP server on the bridge gives the guest that address
//! with the pod's gateway, routes, DNS and MTU. Everything done is undone, in reverse order,
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

/// What to bind and what to tell the guest beyond what the pod interface has.
#[derive(Clone, Debug)]
pub struct BridgeSpec {
    /// The pod's interface for this network (`eth0`, `net1`, ...).
    pub pod_interface: String,
    /// The bridge to create (`k6t-eth0`).
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
    /// Give the pod interface its address back, then the routes that went with it.
    Readdress {
        link: u32,
        address: Ipv4Net,
        routes: Vec<Route>,
    },
    /// Remove the saved configuration (last, once everything else is back).
    Forget(PathBuf),
}

/// What the pod interface had, as written to [`BridgeSpec::saved`].
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    interface: String,
    address: String,
    /// (destination, gateway, protocol) of the routes that leave by the interface.
    routes: Vec<(String, Option<Ipv4Addr>, u8)>,
    bridge: String,
    tap: Option<String>,
}

impl Undo {
    fn describe(&self) -> String {
        match self {
            Undo::DeleteLink(_, name) => format!("cannot delete {name}"),
            Undo::FreeFromBridge(_, name) => format!("cannot take {name} off the bridge"),
            Undo::Readdress { address, .. } => {
                format!("cannot give the pod interface {address} and its routes back")
            }
            Undo::Forget(path) => format!("cannot remove {}", path.display()),
        }
    }
}

/// A wired bridge binding; dropping it unwires it.
pub struct BridgeBinding {
    netlink: Netlink,
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
            undo: Vec::new(),
            dhcp: None,
            lease: None,
        };
        binding.steps(spec)?;
        if let Some(lease) = &binding.lease {
            tracing::info!(
                "pod network: {} bridged to {} by {}; the guest is offered {} (gateway {:?})",
                spec.pod_interface,
                spec.guest_link,
                spec.bridge,
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
        if nl.link(&spec.bridge)?.is_some() {
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
        let Some(&address) = addresses.first() else {
            return Err(PodNetError::Refused(format!(
                "the pod interface {} has no IPv4 address to hand to the guest",
                pod.name
            )));
        };
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

        let saved = Saved {
            interface: pod.name.clone(),
            address: address.to_string(),
            routes: routes
                .iter()
                .filter(|r| !r.connected)
                .map(|r| (r.destination.to_string(), r.gateway, r.protocol))
                .collect(),
            bridge: spec.bridge.clone(),
            tap: spec.make_tap.then(|| spec.guest_link.clone()),
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
        let bridge = nl.add_bridge(&spec.bridge, pod.mtu)?;
        self.undo
            .push(Undo::DeleteLink(bridge.index, bridge.name.clone()));
        nl.delete_address(pod.index, address)?;
        self.undo.push(Undo::Readdress {
            link: pod.index,
            address,
            routes: routes.iter().filter(|r| !r.connected).cloned().collect(),
        });
        self.enslave(&pod, &bridge)?;
        self.enslave(&guest, &bridge)?;
        let nl = &self.netlink;
        nl.add_address(
            bridge.index,
            Ipv4Net::new(SERVER_ADDRESS, 32).expect("a /32"),
        )?;
        nl.up(bridge.index, None)?;
        let lease = Lease {
            mac: spec.guest_mac,
            address,
            gateway,
            routes: extra,
            server: SERVER_ADDRESS,
            dns: spec.dns.clone(),
            search: spec.search.clone(),
            hostname: spec.hostname.clone(),
            mtu: u16::try_from(pod.mtu).ok(),
        };
        self.dhcp = Some(
            DhcpServer::start(&bridge.name, lease.clone())
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
        let address: Ipv4Net = saved
            .address
            .parse()
            .map_err(|e: ipnet::AddrParseError| unreadable(e.to_string()))?;
        tracing::warn!(
            "pod network: a previous launcher left {} wired; putting it back first",
            saved.interface
        );
        let nl = &self.netlink;
        for name in [Some(&saved.bridge), saved.tap.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(link) = nl.link(name)? {
                nl.delete_link(link.index)?;
            }
        }
        let pod = nl.existing(&saved.interface)?;
        if !nl.addresses(pod.index)?.contains(&address) {
            nl.add_address(pod.index, address)?;
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
                Undo::DeleteLink(index, _) => nl.delete_link(*index),
                Undo::FreeFromBridge(index, _) => nl.set_controller(*index, None),
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
