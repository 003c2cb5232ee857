//! Every device of a VM, held by type: the legacy PC devices on the port I/O bus (COM1, the
//! i8042, the CMOS RTC, the ACPI power controls and the GED) and the PCI segment with its virtio
//! functions. The VM owns the [`DeviceManager`]; the vCPUs reach the devices only through the
//! two buses it builds.
//!
//! It pauses, resumes, counts, saves and restores them all, always in this order: COM1, i8042,
//! CMOS, ACPI power control, GED, then the PCI segment (CONFIG_ADDRESS, the host bridge, then
//! each virtio function by device number). Saving needs the vCPUs parked and the devices
//! paused ([`DeviceManager::pause`]); restoring happens on a machine built from the same
//! configuration that has not run yet.

mod legacy;
pub mod pci;
mod persist;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPowerControl, Cmos, Ged, GedTrigger, Serial, I8042};
use devices::{Bus, GuestMemoryMmap};
use kvm_ioctls::VmFd;

use crate::backends::Backends;
use crate::config::VmConfig;
use crate::console::Console;
use crate::vstate::interrupts::GsiRouter;
use crate::vstate::vcpu::VmEvents;
use crate::Error;
pub use pci::PciSegment;
pub use persist::DevicesState;

/// The VM's devices and the buses that reach them.
pub struct DeviceManager {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    power: Arc<Mutex<AcpiPowerControl>>,
    ged: Arc<Mutex<Ged>>,
    ged_trigger: GedTrigger,
    /// The PCI functions (and their worker threads).
    pci: PciSegment,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceManager {
    /// Builds every device `config` names, wires their interrupts into the VM `fd` and places
    /// them on new port I/O and MMIO buses.
    pub fn new(
        fd: &Arc<VmFd>,
        memory: &GuestMemoryMmap,
        events: &VmEvents,
        console: &Console,
        backends: &Backends,
        config: &VmConfig,
    ) -> Result<Self, Error> {
        let pio = Bus::new();
        let legacy = legacy::LegacyDevices::new(fd, events, console, &pio)?;
        let mmio = Arc::new(Bus::new());
        let router = Arc::new(GsiRouter::new(fd.clone()));
        let mut pci = PciSegment::new(fd.clone(), &pio, mmio.clone(), memory.clone(), router)?;
        for (name, device) in backends.virtio_devices(config)? {
            pci.add_virtio(name, device)?;
        }
        Ok(DeviceManager {
            pio: Arc::new(pio),
            mmio,
            serial: console.serial.clone(),
            i8042: legacy.i8042,
            cmos: legacy.cmos,
            power: legacy.power,
            ged: legacy.ged,
            ged_trigger: legacy.ged_trigger,
            pci,
        })
    }

    /// The port I/O bus.
    pub fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) -> Result<(), Error> {
        self.ged_trigger.power_button().map_err(Error::EventFd)
    }

    /// Stops every device worker; the legacy devices have none (they run on vCPU exits).
    pub fn pause(&self) {
        self.pci.pause_devices();
    }

    /// Makes every disk durable on the host (while paused): what another VMM opening the same
    /// files next must find.
    pub fn flush(&self) -> Result<(), Error> {
        self.pci.flush_devices()
    }

    /// Has every device read its backend again: another VMM wrote it since this one was
    /// built (the source of a live migration, now paused and flushed).
    pub fn set_backend_locks(&self, mode: devices::block::LockMode) -> Result<(), Error> {
        self.pci.set_backend_locks(mode)
    }

    pub fn reload_backends(&self) -> Result<(), Error> {
        self.pci.reload_backends()
    }

    /// Restarts what [`DeviceManager::pause`] stopped.
    pub fn resume(&self) -> Result<(), Error> {
        self.pci.resume_devices()
    }

    /// Every virtio device's counters, by device ID.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.pci.counters()
    }
}
