//! The saved state of every device of a VM, in the device manager's fixed order.

use devices::legacy::{AcpiPowerControlState, CmosState, GedState, I8042State, SerialSnapshot};
use devices::Persist;
use serde::{Deserialize, Serialize};

use super::pci::PciSegmentState;
use super::{lock, DeviceManager};
use crate::Error;

/// Every device's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub i8042: I8042State,
    pub cmos: CmosState,
    pub power: AcpiPowerControlState,
    pub ged: GedState,
    pub pci: PciSegmentState,
}

fn restore<P: Persist>(device: &std::sync::Mutex<P>, state: &P::State) -> Result<(), Error> {
    lock(device)
        .restore(state)
        .map_err(|e| Error::Device(e.to_string()))
}

impl DeviceManager {
    /// Saves every device; the devices must be paused and the vCPUs parked.
    pub fn save(&self) -> Result<DevicesState, Error> {
        Ok(DevicesState {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            cmos: lock(&self.cmos).save(),
            power: lock(&self.power).save(),
            ged: lock(&self.ged).save(),
            pci: self.pci.save()?,
        })
    }

    /// Puts every device back, in the same order, into a machine built from the same
    /// configuration that has not run yet; stops at the first device whose state does not fit.
    pub fn restore(&self, state: &DevicesState) -> Result<(), Error> {
        restore(&self.serial, &state.serial)?;
        restore(&self.i8042, &state.i8042)?;
        restore(&self.cmos, &state.cmos)?;
        restore(&self.power, &state.power)?;
        restore(&self.ged, &state.ged)?;
        self.pci.restore(&state.pci)
    }
}
