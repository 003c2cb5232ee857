//! The legacy PC devices on the port I/O bus: COM1 (from the console), the i8042 (its reset
//! line), the CMOS RTC, the ACPI power controls and the GED (the power button).

use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPowerControl, Cmos, Ged, GedTrigger, I8042};
use devices::Bus;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;
use crate::layout::{irq, pio};
use crate::vstate::vcpu::VmEvents;
use crate::Error;

/// The legacy devices besides COM1, which the console owns.
pub(super) struct LegacyDevices {
    pub i8042: Arc<Mutex<I8042>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub power: Arc<Mutex<AcpiPowerControl>>,
    pub ged: Arc<Mutex<Ged>>,
    pub ged_trigger: GedTrigger,
}

impl LegacyDevices {
    /// Builds the devices, wires COM1's and the GED's interrupts into the VM and places
    /// everything (COM1 included) on `bus`.
    pub fn new(fd: &VmFd, events: &VmEvents, console: &Console, bus: &Bus) -> Result<Self, Error> {
        let dup = |e: &EventFd| e.try_clone().map_err(Error::EventFd);
        fd.register_irqfd(&console.irq, irq::COM1)
            .map_err(|e| Error::Kvm("register COM1 irqfd", e))?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        fd.register_irqfd(&ged_irq, irq::GED)
            .map_err(|e| Error::Kvm("register the GED irqfd", e))?;
        let (ged, ged_trigger) = Ged::new(ged_irq);
        let devices = LegacyDevices {
            i8042: Arc::new(Mutex::new(I8042::new(dup(&events.reset)?))),
            cmos: Arc::new(Mutex::new(Cmos::new())),
            power: Arc::new(Mutex::new(AcpiPowerControl::new(
                dup(&events.shutdown)?,
                dup(&events.reset)?,
            ))),
            ged: Arc::new(Mutex::new(ged)),
            ged_trigger,
        };
        bus.insert(console.serial.clone(), pio::COM1.0, pio::COM1.1)?;
        bus.insert(devices.i8042.clone(), pio::I8042.0, pio::I8042.1)?;
        bus.insert(devices.cmos.clone(), pio::CMOS.0, pio::CMOS.1)?;
        bus.insert(devices.power.clone(), pio::ACPI_POWER.0, pio::ACPI_POWER.1)?;
        bus.insert(devices.ged.clone(), pio::GED.0, pio::GED.1)?;
        Ok(devices)
    }
}
