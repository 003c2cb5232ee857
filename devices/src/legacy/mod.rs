//! Legacy PC devices: the UART, the i8042 reset line, the CMOS RTC and the ACPI power controls.

pub mod cmos;
pub mod i8042;
pub mod power;
pub mod serial;

pub use cmos::Cmos;
pub use i8042::I8042;
pub use power::AcpiPowerControl;
pub use serial::Serial;
