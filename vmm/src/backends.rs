//! The host side of the VM's devices and how the virtio devices are built from the
//! configuration.
//!
//! A guest reboot rebuilds the VM and its devices, but what the host provides for them stays:
//! the taps are opened once (a tap the VMM created lives only as long as it is open, and its
//! address with it), and each incarnation of the VM gets its own handle. Disk images are
//! opened anew by each incarnation, after the previous one flushed and closed them.

use std::fs::File;

use std::net::Ipv4Addr;

use devices::block::{open_disk, DiskOptions, Format};
use devices::virtio::net::NetError;
use devices::virtio::{MacAddr, Rng, Tap, VirtioBlk, VirtioDevice, VirtioNet};

use crate::config::{DiskConfig, NetConfig, NetRetap, VmConfig};
use crate::Error;

/// A virtio device and its ID.
pub type NamedDevice = (String, Box<dyn VirtioDevice>);

/// Host resources that outlive a guest reboot.
#[derive(Default)]
pub struct Backends {
    /// One tap and guest MAC per `config.net` entry.
    taps: Vec<(Tap, MacAddr)>,
    /// Open the disks with shared locks only: another VMM runs this VM still (the source of
    /// a live migration this one receives).
    standby_disks: bool,
}

impl Backends {
    /// Opens what `config`'s devices need from the host: the taps (created when not named,
    /// given their host address when asked). The guest MAC of each interface is written into
    /// `config` when it was left to podvisor, so that the VM keeps it wherever its
    /// configuration goes next (a snapshot, a migration), whatever its tap is then called.
    pub fn open(config: &mut VmConfig) -> Result<Self, Error> {
        let mut taps = Vec::new();
        for (index, net) in config.net.iter_mut().enumerate() {
            let fail = |e: NetError| Error::Device(format!("net {index}: {e}"));
            let tap = Tap::open(net.tap.as_deref()).map_err(fail)?;
            let mac = guest_mac(net, index, tap.name())?;
            net.mac = Some(mac.to_string());
            if let Some(ip) = net.ip {
                // podvisor owns the host side: a stable MAC too, derived from the guest's
                // (which travels with the VM), so that a VM rebooted, restored from a snapshot
                // or migrated — on another tap, too — finds the host where its neighbour
                // table says.
                let host_mac = MacAddr::stable_for(&format!("host/{mac}"));
                tap.set_host_mac(host_mac.bytes()).map_err(fail)?;
                let mask = net.mask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
                tap.set_ip(ip, mask).map_err(fail)?;
            }
            if net.ip.is_some() || net.tap.is_none() {
                tap.up().map_err(fail)?;
            }
            tracing::info!("net {index}: tap {} with guest MAC {mac}", tap.name());
            taps.push((tap, mac));
        }
        Ok(Backends {
            taps,
            standby_disks: false,
        })
    }

    /// Whether the next incarnation's disks are opened with shared locks only (see
    /// [`devices::block::LockMode::Standby`]).
    pub fn set_standby_disks(&mut self, standby: bool) {
        self.standby_disks = standby;
    }

    /// The virtio devices of one incarnation of the VM, with their IDs, in PCI slot order:
    /// disks, network interfaces, then the entropy device. IDs are the configured ones, or
    /// `_disk<N>`, `_net<N>`, `_rng` (Cloud Hypervisor's defaults).
    pub fn virtio_devices(&self, config: &VmConfig) -> Result<Vec<NamedDevice>, Error> {
        let mut out: Vec<NamedDevice> = Vec::new();
        for (index, disk) in config.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{index}"));
            let queues = disk.queues(config.cpus.boot_vcpus);
            out.push((id, Box::new(open_blk(disk, queues, self.standby_disks)?)));
        }
        for (index, (tap, mac)) in self.taps.iter().enumerate() {
            let fail = |e: String| Error::Device(format!("net {index} (tap {}): {e}", tap.name()));
            let tap = tap.try_clone().map_err(|e| fail(e.to_string()))?;
            let id = config.net[index]
                .id
                .clone()
                .unwrap_or_else(|| format!("_net{index}"));
            out.push((
                id,
                Box::new(VirtioNet::new(tap, *mac).map_err(|e| fail(e.to_string()))?),
            ));
        }
        if let Some(rng) = &config.rng {
            let src = File::open(&rng.src).map_err(|e| {
                Error::Device(format!(
                    "cannot open {} for virtio-rng: {e}",
                    rng.src.display()
                ))
            })?;
            out.push(("_rng".to_owned(), Box::new(Rng::with_source(src))));
        }
        Ok(out)
    }
}

/// The guest MAC of network interface `index`: the configured one, or one derived from its ID
/// (its tap's name without one) that stays the same across reboots.
fn guest_mac(net: &NetConfig, index: usize, tap: &str) -> Result<MacAddr, Error> {
    match &net.mac {
        Some(m) => m
            .parse::<MacAddr>()
            .map_err(|e| Error::Device(format!("net {index}: {e}"))),
        None => Ok(MacAddr::stable_for(&format!(
            "{}/{index}",
            net.id.as_deref().unwrap_or(tap)
        ))),
    }
}

/// Gives network interfaces of a VM that is brought back (restored or received) other taps:
/// each [`NetRetap`] names an interface by its ID (the configured one, or `_net<N>`). The guest
/// keeps its MAC. Unknown or repeated IDs are refused.
pub fn retap(config: &mut VmConfig, retaps: &[NetRetap]) -> Result<(), String> {
    let ids: Vec<String> = config
        .net
        .iter()
        .enumerate()
        .map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("_net{i}")))
        .collect();
    let mut moves = Vec::with_capacity(retaps.len());
    for (k, r) in retaps.iter().enumerate() {
        if retaps[..k].iter().any(|earlier| earlier.id == r.id) {
            return Err(format!("network interface '{}' is given a tap twice", r.id));
        }
        let Some(index) = ids.iter().position(|id| *id == r.id) else {
            return Err(format!(
                "the VM has no network interface '{}' (it has: {})",
                r.id,
                if ids.is_empty() {
                    "none".to_owned()
                } else {
                    ids.join(", ")
                }
            ));
        };
        moves.push((index, &r.tap));
    }
    for (index, tap) in moves {
        let net = &mut config.net[index];
        if let (None, Some(old)) = (&net.mac, &net.tap) {
            // A configuration from before MACs were written into it: the MAC its old tap gave.
            let mac = guest_mac(net, index, old).map_err(|e| e.to_string())?;
            net.mac = Some(mac.to_string());
        }
        net.tap = Some(tap.clone());
    }
    Ok(())
}

/// How the disk `disk` describes is opened.
pub(crate) fn disk_options(disk: &DiskConfig, standby: bool) -> DiskOptions {
    DiskOptions {
        format: disk.format.as_deref().and_then(Format::from_name),
        read_only: disk.readonly,
        direct: disk.direct,
        backing_files: disk.backing_files.policy(),
        standby,
    }
}

fn open_blk(disk: &DiskConfig, queues: u16, standby: bool) -> Result<VirtioBlk, Error> {
    let options = disk_options(disk, standby);
    let image = open_disk(&disk.path, options).map_err(|e| Error::Device(e.to_string()))?;
    VirtioBlk::with_queues(image, disk.serial.clone(), queues)
        .map_err(|e| Error::Device(format!("disk {}: {e}", disk.path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(net: Vec<NetConfig>) -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64u64 << 20},
            "net": net,
        }))
        .unwrap()
    }

    fn net(tap: Option<&str>, id: Option<&str>, mac: Option<&str>) -> NetConfig {
        NetConfig {
            tap: tap.map(Into::into),
            ip: None,
            mask: None,
            mac: mac.map(Into::into),
            id: id.map(Into::into),
        }
    }

    fn retaps(pairs: &[(&str, &str)]) -> Vec<NetRetap> {
        pairs
            .iter()
            .map(|(id, tap)| NetRetap {
                id: (*id).into(),
                tap: (*tap).into(),
            })
            .collect()
    }

    #[test]
    fn retap_moves_an_interface_to_another_tap_and_keeps_its_mac() {
        let mut config = config_with(vec![
            net(Some("old0"), None, None),
            net(Some("old1"), Some("data"), Some("52:54:00:00:00:07")),
        ]);
        let before = guest_mac(&config.net[0], 0, "old0").unwrap();
        retap(&mut config, &retaps(&[("_net0", "new0"), ("data", "new1")])).unwrap();
        assert_eq!(config.net[0].tap.as_deref(), Some("new0"));
        // Derived from the old tap's name before, written down now: the same MAC.
        assert_eq!(config.net[0].mac, Some(before.to_string()));
        assert_eq!(guest_mac(&config.net[0], 0, "new0").unwrap(), before);
        assert_eq!(config.net[1].tap.as_deref(), Some("new1"));
        assert_eq!(config.net[1].mac.as_deref(), Some("52:54:00:00:00:07"));
        // Nothing asked: nothing changes.
        let same = config.clone();
        retap(&mut config, &[]).unwrap();
        assert_eq!(config, same);
    }

    #[test]
    fn retap_refuses_unknown_and_repeated_interfaces() {
        let mut config = config_with(vec![net(None, Some("a"), None), net(None, None, None)]);
        let err = retap(&mut config, &retaps(&[("_net0", "t")])).unwrap_err();
        assert!(
            err.contains("no network interface '_net0' (it has: a, _net1)"),
            "{err}"
        );
        let err = retap(&mut config, &retaps(&[("a", "t1"), ("a", "t2")])).unwrap_err();
        assert!(err.contains("'a' is given a tap twice"), "{err}");
        assert_eq!(config.net[0].tap, None, "a refused retap changes nothing");
        let err = retap(&mut config_with(vec![]), &retaps(&[("a", "t")])).unwrap_err();
        assert!(err.contains("(it has: none)"), "{err}");
    }
}
