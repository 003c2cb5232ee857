//! Legacy PC devices: the UART, the i8042 reset line, the CMOS RTC, the ACPI power controls
//! and the ACPI generic event device (power button).

pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod power;
pub mod serial;

pub use cmos::{Cmos, CmosState};
pub use ged::{Ged, GedState, GedTrigger};
pub use i8042::{I8042State, I8042};
pub use power::{AcpiPowerControl, AcpiPowerControlState};
pub use serial::{Serial, SerialSnapshot};
