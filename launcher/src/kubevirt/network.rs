//! A VMI's NICs on the pod's networks: the bridge bindings to wire (see [`crate::podnet`]),
//! with what the pod knows that the guest should be told (its resolver's name servers and
//! search domains, its name).

use std::net::Ipv4Addr;

use super::layout::PodLayout;
use super::translate::PodNic;
use crate::podnet::bridge::BridgeSpec;

/// The bridge bindings for `nics`, for a guest named `hostname`.
pub fn bridge_specs(nics: &[PodNic], layout: &PodLayout, hostname: &str) -> Vec<BridgeSpec> {
    let (dns, search) = match std::fs::read_to_string(layout.resolv_conf()) {
        Ok(text) => resolver(&text),
        Err(e) => {
            if !nics.is_empty() {
                tracing::warn!(
                    "no name servers for the guest: {}: {e}",
                    layout.resolv_conf().display()
                );
            }
            (Vec::new(), Vec::new())
        }
    };
    nics.iter()
        .map(|nic| BridgeSpec {
            kind: nic.kind.clone(),
            pod_interface: nic.pod_interface.clone(),
            bridge: nic.bridge.clone(),
            guest_link: nic.tap.clone(),
            make_tap: true,
            saved: layout.pod_interface_record(&nic.pod_interface),
            guest_mac: nic.mac,
            hostname: Some(hostname.to_owned()),
            dns: dns.clone(),
            search: search.clone(),
        })
        .collect()
}

/// The IPv4 name servers and the search domains of a resolv.conf.
fn resolver(text: &str) -> (Vec<Ipv4Addr>, Vec<String>) {
    let mut dns = Vec::new();
    let mut search = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                    dns.push(ip);
                }
            }
            // The last search (or domain) line wins, as in the resolver.
            Some("search" | "domain") => search = words.map(str::to_owned).collect(),
            _ => {}
        }
    }
    (dns, search)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_told_the_pods_name_servers_and_search_domains() {
        let text =
            "# generated\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n\
                    nameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n";
        let (dns, search) = resolver(text);
        assert_eq!(dns, [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(
            search,
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/resolv.conf"), text).unwrap();
        let layout = PodLayout::new(dir.path());
        let nic = PodNic {
            kind: crate::podnet::bridge::Kind::Bridge,
            pod_interface: "eth0".into(),
            bridge: "k6t-eth0".into(),
            tap: "tap0".into(),
            mac: [2, 0, 0, 0, 0, 1],
        };
        let specs = bridge_specs(&[nic], &layout, "testvmi");
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].dns, dns);
        assert_eq!(specs[0].hostname.as_deref(), Some("testvmi"));
        assert!(specs[0].make_tap);
        assert_eq!(
            specs[0].saved,
            dir.path().join("var/run/kubevirt-private/podnet-eth0.json")
        );
    }
}
