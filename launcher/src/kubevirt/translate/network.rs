//! A VMI's interfaces and networks: checked whole (bindings, names, MACs, ports), though the
//! pod network is not wired yet.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Translator, OTHER_BINDINGS};
use crate::kubevirt::spec::Vmi;

impl Translator<'_> {
    pub(super) fn network(&mut self, vmi: &Vmi) {
        let spec = &vmi.spec;
        let mut networks: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, net) in spec.networks.iter().enumerate() {
            let path = format!("spec.networks[{i}]");
            self.rest(&path, "spec.networks[]", &net.rest);
            match net.name.as_deref().filter(|n| !n.is_empty()) {
                None => self.error(&format!("{path}.name"), "missing"),
                Some(n) => {
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
            for (j, port) in iface.ports.iter().enumerate() {
                let number = port.get("port").and_then(Value::as_u64);
                if !number.is_some_and(|p| (1..=65535).contains(&p)) {
                    self.error(
                        &format!("{path}.ports[{j}].port"),
                        "missing, or not a port number (1-65535)",
                    );
                }
            }
            if let Some(model) = iface.model.as_deref().filter(|m| *m != "virtio") {
                self.error(
                    &format!("{path}.model"),
                    format!("'{model}' is not supported (virtio)"),
                );
            }
            if let Some(mac) = &iface.mac_address {
                if !is_mac(mac) {
                    self.error(
                        &format!("{path}.macAddress"),
                        format!("'{mac}' is not a MAC address"),
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
                }
            }
        }
        if !spec.domain.devices.interfaces.is_empty() {
            if self.options.no_network {
                self.warnings.push(
                    "spec.domain.devices.interfaces: left out (--no-network): the VM has no NICs"
                        .into(),
                );
            } else {
                self.limit(
                    "spec.domain.devices.interfaces",
                    "the pod network is not wired by podvisor yet; start with --no-network to \
                     run the VM without NICs",
                );
            }
        }
    }
}

/// `52:54:00:12:34:56`: six pairs of hex digits.
fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}
