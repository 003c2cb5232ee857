//! A VMI's interfaces and networks: checked whole (bindings, names, MACs, ports); the ones
//! with a bridge binding become the guest's NICs, each on a tap bridged to its pod interface
//! (`eth0` for the pod network, `net1`, `net2`, ... for Multus networks, in their order).

use std::collections::BTreeMap;

use serde_json::Value;
use vmm::config::NetConfig;

use super::{PodNic, Translator, OTHER_BINDINGS};
use crate::kubevirt::spec::Vmi;
use crate::podnet::bridge::Kind;

impl Translator<'_> {
    /// The guest's NICs and the pod interfaces they are bridged to.
    pub(super) fn network(
        &mut self,
        vmi: &Vmi,
        name: &str,
        namespace: &str,
    ) -> (Vec<NetConfig>, Vec<PodNic>) {
        let spec = &vmi.spec;
        let mut networks: BTreeMap<&str, usize> = BTreeMap::new();
        // The pod interface of each network: Multus ones are numbered in their order.
        let mut pod_interfaces: BTreeMap<&str, String> = BTreeMap::new();
        let mut multus = 0;
        for (i, net) in spec.networks.iter().enumerate() {
            let path = format!("spec.networks[{i}]");
            self.rest(&path, "spec.networks[]", &net.rest);
            match net.name.as_deref().filter(|n| !n.is_empty()) {
                None => self.error(&format!("{path}.name"), "missing"),
                Some(n) => {
                    let interface = if net.multus.is_some() {
                        multus += 1;
                        format!("net{multus}")
                    } else {
                        "eth0".to_owned()
                    };
                    pod_interfaces.entry(n).or_insert(interface);
                    if networks.insert(n, i).is_some() {
                        self.error(
                            &format!("{path}.name"),
                            format!("a second network named '{n}'"),
                        );
                    }
                }
            }
            if net.pod.is_some() == net.multus.is_some() {
                self.error(&path, "exactly one of pod and multus");
            }
        }
        let mut taken: BTreeMap<&str, usize> = BTreeMap::new();
        let mut nets = Vec::new();
        let mut nics = Vec::new();
        for (i, iface) in spec.domain.devices.interfaces.iter().enumerate() {
            let path = format!("spec.domain.devices.interfaces[{i}]");
            let mut bindings: Vec<&str> = Vec::new();
            if iface.bridge.is_some() {
                bindings.push("bridge");
            }
            if iface.masquerade.is_some() {
                bindings.push("masquerade");
            }
            let mut rest = iface.rest.clone();
            for other in OTHER_BINDINGS {
                if rest.remove(*other).is_some() {
                    self.error(
                        &format!("{path}.{other}"),
                        "not supported: podvisor binds interfaces by bridge or masquerade",
                    );
                    bindings.push(other);
                }
            }
            for harmless in ["pciAddress", "bootOrder", "dhcpOptions", "tag", "acpiIndex"] {
                if rest.remove(harmless).is_some() {
                    self.warnings.push(format!("{path}.{harmless}: ignored"));
                }
            }
            self.rest(&path, "spec.domain.devices.interfaces[]", &rest);
            if bindings.is_empty() {
                self.error(&path, "no binding (bridge or masquerade)");
            } else if bindings.len() > 1 {
                self.error(
                    &path,
                    format!("more than one binding: {}", bindings.join(", ")),
                );
            }
            let mut ports = Vec::new();
            for (j, port) in iface.ports.iter().enumerate() {
                let number = port.get("port").and_then(Value::as_u64);
                let number = number
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0);
                if number.is_none() {
                    self.error(
                        &format!("{path}.ports[{j}].port"),
                        "missing, or not a port number (1-65535)",
                    );
                }
                let protocol = match port.get("protocol").and_then(Value::as_str) {
                    None | Some("TCP") => Some(6),
                    Some("UDP") => Some(17),
                    Some(other) => {
                        self.error(
                            &format!("{path}.ports[{j}].protocol"),
                            format!("'{other}' is not TCP or UDP"),
                        );
                        None
                    }
                };
                if let (Some(proto), Some(n)) = (protocol, number) {
                    ports.push((proto, n));
                }
            }
            if let Some(model) = iface.model.as_deref().filter(|m| *m != "virtio") {
                self.error(
                    &format!("{path}.model"),
                    format!("'{model}' is not supported (virtio)"),
                );
            }
            let mut mac = None;
            if let Some(given) = &iface.mac_address {
                mac = parse_mac(given);
                if mac.is_some_and(|m| m[0] & 1 == 1) {
                    mac = None;
                    self.error(
                        &format!("{path}.macAddress"),
                        format!("'{given}' is a multicast address"),
                    );
                } else if mac.is_none() {
                    self.error(
                        &format!("{path}.macAddress"),
                        format!("'{given}' is not a MAC address"),
                    );
                }
            }
            match iface.name.as_deref().filter(|n| !n.is_empty()) {
                None => self.error(&format!("{path}.name"), "missing"),
                Some(n) if !networks.contains_key(n) => self.error(
                    &format!("{path}.name"),
                    format!("no network named '{n}' in spec.networks"),
                ),
                Some(n) => {
                    if let Some(first) = taken.insert(n, i) {
                        self.error(
                            &format!("{path}.name"),
                            format!("network '{n}' already has interfaces[{first}]"),
                        );
                    }
                    let on_pod_network = pod_interfaces.get(n).is_some_and(|i| i == "eth0");
                    if iface.masquerade.is_some() && !on_pod_network {
                        self.error(
                            &format!("{path}.masquerade"),
                            "masquerade binds the pod network only (a Multus network: bridge)",
                        );
                    }
                    let kind = if iface.masquerade.is_some() {
                        Some(Kind::Masquerade {
                            ports: ports.clone(),
                        })
                    } else {
                        iface.bridge.as_ref().map(|_| Kind::Bridge)
                    };
                    if let Some(kind) = kind {
                        let pod_interface = pod_interfaces.get(n).cloned().unwrap_or_default();
                        // The same on any node (a migrated guest keeps its neighbours' view).
                        let mac = mac.unwrap_or_else(|| derived_mac(namespace, name, n));
                        nets.push(NetConfig {
                            tap: Some(format!("tap{i}")),
                            mac: Some(show_mac(mac)),
                            id: Some(format!("_net{i}")),
                            ..NetConfig::default()
                        });
                        nics.push(PodNic {
                            kind,
                            bridge: format!("k6t-{pod_interface}"),
                            pod_interface,
                            tap: format!("tap{i}"),
                            mac,
                        });
                    }
                }
            }
        }
        if !spec.domain.devices.interfaces.is_empty() && self.options.no_network {
            self.warnings.push(
                "spec.domain.devices.interfaces: left out (--no-network): the VM has no NICs"
                    .into(),
            );
            return (Vec::new(), Vec::new());
        }
        (nets, nics)
    }
}

/// A locally administered unicast MAC from the VMI's namespace, name and network (FNV-1a):
/// the same wherever the VMI runs.
fn derived_mac(namespace: &str, name: &str, network: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{namespace}/{name}/{network}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[1], b[2], b[3], b[4], b[5]]
}

fn show_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// `52:54:00:12:34:56` (or with dashes): six pairs of hex digits.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}
