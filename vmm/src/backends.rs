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

use crate::config::{DiskConfig, VmConfig};
use crate::Error;

/// A virtio device and its ID.
pub type NamedDevice = (String, Box<dyn VirtioDevice>);

/// Host resources that outlive a guest reboot.
#[derive(Default)]
pub struct Backends {
    /// One tap and guest MAC per `config.net` entry.
    taps: Vec<(Tap, MacAddr)>,
}

impl Backends {
    /// Opens what `config`'s devices need from the host: the taps (created when not named,
    /// given their host address when asked).
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        let mut taps = Vec::new();
        for (index, net) in config.net.iter().enumerate() {
            let fail = |e: NetError| Error::Device(format!("net {index}: {e}"));
            let tap = Tap::open(net.tap.as_deref()).map_err(fail)?;
            if let Some(ip) = net.ip {
                // podvisor owns the host side: a stable MAC too, so a VM restored from a
                // snapshot (or rebooted) finds the host where its neighbour table says.
                let host_mac = MacAddr::stable_for(&format!("host/{}", tap.name()));
                tap.set_host_mac(host_mac.bytes()).map_err(fail)?;
                let mask = net.mask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
                tap.set_ip(ip, mask).map_err(fail)?;
            }
            if net.ip.is_some() || net.tap.is_none() {
                tap.up().map_err(fail)?;
            }
            let mac = match &net.mac {
                Some(m) => m
                    .parse::<MacAddr>()
                    .map_err(|e| Error::Device(format!("net {index}: {e}")))?,
                None => MacAddr::stable_for(&format!(
                    "{}/{index}",
                    net.id.as_deref().unwrap_or(tap.name())
                )),
            };
            tracing::info!("net {index}: tap {} with guest MAC {mac}", tap.name());
            taps.push((tap, mac));
        }
        Ok(Backends { taps })
    }

    /// The virtio devices of one incarnation of the VM, with their IDs, in PCI slot order:
    /// disks, network interfaces, then the entropy device. IDs are the configured ones, or
    /// `_disk<N>`, `_net<N>`, `_rng` (Cloud Hypervisor's defaults).
    pub fn virtio_devices(&self, config: &VmConfig) -> Result<Vec<NamedDevice>, Error> {
        let mut out: Vec<NamedDevice> = Vec::new();
        for (index, disk) in config.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{index}"));
            let queues = disk.queues(config.cpus.boot_vcpus);
            out.push((id, Box::new(open_blk(disk, queues)?)));
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

fn open_blk(disk: &DiskConfig, queues: u16) -> Result<VirtioBlk, Error> {
    let options = DiskOptions {
        format: disk.format.as_deref().and_then(Format::from_name),
        read_only: disk.readonly,
        direct: disk.direct,
    };
    let image = open_disk(&disk.path, options).map_err(|e| Error::Device(e.to_string()))?;
    VirtioBlk::with_queues(image, disk.serial.clone(), queues)
        .map_err(|e| Error::Device(format!("disk {}: {e}", disk.path.display())))
}
