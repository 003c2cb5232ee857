//! Legacy PC devices: the UART, the i8042 reset line, the CMOS RTC, the ACPI power controls
//! and the ACPI generic event device (power button).

pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod power;
pub mod serial;

pub use cmos::Cmos;
pub use ged::{Ged, GedTrigger};
pub use i8042::I8042;
pub use power::AcpiPowerControl;
pub use serial::Serial;
