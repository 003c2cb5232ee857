//! ACPI hardware-reduced power controls: the sleep control, sleep status and reset registers
//! that the FADT points the guest at (port 0x600).
//!
//! Writing the S5 sleep type with SLP_EN powers the VM off; writing [`RESET_VALUE`] to the
//! reset register resets it. Both are reported through event file descriptors.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Persist, PersistError};

/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT `RESET_REG`).
pub const RESET_OFFSET: u64 = 2;
/// Bytes the registers span.
pub const LEN: u64 = 3;

/// Value to write to the reset register to reset the VM (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 1;
/// The SLP_TYP of S5 (soft off): the DSDT's `_S5` package is `{ S5_SLEEP_TYPE, 0 }`.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control: enter the sleep state in SLP_TYP.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control: SLP_TYP occupies bits 2..=4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Sleep status: the system woke (write 1 to clear).
pub const WAK_STS: u8 = 1 << 7;

/// The power controls.
pub struct AcpiPowerControl {
    shutdown_evt: EventFd,
    reset_evt: EventFd,
    sleep_status: u8,
}

/// Saved state of an [`AcpiPowerControl`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AcpiPowerControlState {
    /// The sleep status register.
    pub sleep_status: u8,
}

impl AcpiPowerControl {
    /// Power controls that write 1 to `shutdown_evt` when the guest enters S5 and to
    /// `reset_evt` when it resets.
    pub fn new(shutdown_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            shutdown_evt,
            reset_evt,
            sleep_status: 0,
        }
    }

    fn sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            tracing::info!("acpi: guest requested power off");
            if let Err(e) = self.shutdown_evt.write(1) {
                tracing::error!("acpi: failed to signal the shutdown event: {e}");
            }
        } else {
            tracing::debug!("acpi: ignoring request for sleep type {sleep_type}");
        }
        // The guest waits for WAK_STS after any sleep request: wake at once, so a sleep state we
        // do not implement returns to the guest instead of spinning forever.
        self.sleep_status |= WAK_STS;
    }

    fn reset(&mut self, value: u8) {
        if value != RESET_VALUE {
            tracing::debug!("acpi: ignoring reset register write {value:#04x}");
            return;
        }
        tracing::info!("acpi: guest requested a reset");
        if let Err(e) = self.reset_evt.write(1) {
            tracing::error!("acpi: failed to signal the reset event: {e}");
        }
    }
}

impl BusDevice for AcpiPowerControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wide access touches consecutive registers, one byte each.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(SLEEP_STATUS_OFFSET) => self.sleep_status,
                // SLP_EN and the reset register are write-only.
                Some(SLEEP_CONTROL_OFFSET | RESET_OFFSET) => 0,
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(SLEEP_CONTROL_OFFSET) => self.sleep_control(byte),
                // Status bits are cleared by writing 1s.
                Some(SLEEP_STATUS_OFFSET) => self.sleep_status &= !byte,
                Some(RESET_OFFSET) => self.reset(byte),
                _ => {}
            }
        }
    }
}

impl Persist for AcpiPowerControl {
    const NAME: &'static str = "ACPI power control";
    type State = AcpiPowerControlState;

    fn save(&self) -> AcpiPowerControlState {
        AcpiPowerControlState {
            sleep_status: self.sleep_status,
        }
    }

    fn restore(&mut self, state: &AcpiPowerControlState) -> Result<(), PersistError> {
        self.sleep_status = state.sleep_status;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    /// The device and the other ends of its shutdown and reset events.
    fn power() -> (AcpiPowerControl, EventFd, EventFd) {
        let shutdown = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = AcpiPowerControl::new(shutdown.try_clone().unwrap(), reset.try_clone().unwrap());
        (dev, shutdown, reset)
    }

    fn signalled(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(count) => count > 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    fn read(dev: &mut AcpiPowerControl, offset: u64) -> u8 {
        let mut data = [0];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn s5_with_slp_en_signals_shutdown() {
        let (mut dev, shutdown, reset) = power();
        assert_eq!(SLP_EN | (S5_SLEEP_TYPE << 2), 0x34);
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(shutdown.read().unwrap(), 1);
        assert!(!signalled(&reset));
        assert!(!signalled(&shutdown));
    }

    #[test]
    fn other_sleep_requests_do_not_shut_down() {
        let (mut dev, shutdown, reset) = power();
        // S5 without SLP_EN, SLP_EN with the other types, and stray bits.
        let mut values = vec![0x14, 0x00, !SLP_EN, 0x01];
        values.extend((0..8).filter(|t| *t != 5).map(|t| SLP_EN | (t << 2)));
        for value in values {
            dev.write(SLEEP_CONTROL_OFFSET, &[value]);
            assert!(!signalled(&shutdown), "value {value:#x}");
        }
        assert!(!signalled(&reset));
        // Reserved bits around the fields do not hide an S5 request.
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34 | 0xc3]);
        assert!(signalled(&shutdown));
    }

    #[test]
    fn reset_value_signals_reset() {
        let (mut dev, shutdown, reset) = power();
        dev.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        for value in [0x00, 0x02, 0x06, 0x0e, 0xfe, 0xff] {
            dev.write(RESET_OFFSET, &[value]);
            assert!(!signalled(&reset), "value {value:#x}");
        }
        assert!(!signalled(&shutdown));
        // The reset value on another register is not a reset.
        dev.write(SLEEP_CONTROL_OFFSET, &[RESET_VALUE]);
        dev.write(SLEEP_STATUS_OFFSET, &[RESET_VALUE]);
        assert!(!signalled(&reset));
    }

    #[test]
    fn sleep_status_reports_wake_after_a_sleep_request() {
        let (mut dev, _shutdown, _reset) = power();
        assert_eq!(read(&mut dev, SLEEP_STATUS_OFFSET), 0);
        dev.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | (3 << 2)]);
        assert_eq!(read(&mut dev, SLEEP_STATUS_OFFSET), WAK_STS);
        // Writing 0 leaves it; writing 1 clears it.
        dev.write(SLEEP_STATUS_OFFSET, &[0x00]);
        assert_eq!(read(&mut dev, SLEEP_STATUS_OFFSET), WAK_STS);
        dev.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(read(&mut dev, SLEEP_STATUS_OFFSET), 0);
        // A write without SLP_EN is no request.
        dev.write(SLEEP_CONTROL_OFFSET, &[3 << 2]);
        assert_eq!(read(&mut dev, SLEEP_STATUS_OFFSET), 0);
    }

    #[test]
    fn write_only_registers_read_zero() {
        let (mut dev, _shutdown, _reset) = power();
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(read(&mut dev, SLEEP_CONTROL_OFFSET), 0);
        assert_eq!(read(&mut dev, RESET_OFFSET), 0);
        let mut data = [0; 5];
        dev.read(SLEEP_CONTROL_OFFSET, &mut data);
        assert_eq!(data, [0, WAK_STS, 0, 0xff, 0xff]);
    }

    #[test]
    fn wide_write_reaches_each_register() {
        let (mut dev, shutdown, reset) = power();
        dev.write(SLEEP_STATUS_OFFSET, &[0x00, RESET_VALUE]);
        assert!(signalled(&reset));
        assert!(!signalled(&shutdown));
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut dev, _shutdown, _reset) = power();
        dev.write(SLEEP_CONTROL_OFFSET, &[0x34]);
        let state = dev.save();
        assert_eq!(state, AcpiPowerControlState { sleep_status: 0x80 });
        let json = serde_json::to_string(&state).unwrap();
        let decoded: AcpiPowerControlState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, state);

        let (mut other, shutdown, _reset) = power();
        other.restore(&decoded).unwrap();
        assert_eq!(other.save(), state);
        assert_eq!(read(&mut other, SLEEP_STATUS_OFFSET), WAK_STS);
        // Restoring replays nothing.
        assert!(!signalled(&shutdown));
    }

    #[test]
    fn any_access_is_harmless() {
        let (mut dev, shutdown, reset) = power();
        for offset in (0..8).chain([u64::MAX - 1, u64::MAX]) {
            for width in 0..=8 {
                let mut data = vec![0; width];
                dev.read(offset, &mut data);
                for value in [0x00, 0x01, 0x34, 0x80, 0xff] {
                    dev.write(offset, &vec![value; width]);
                }
            }
        }
        for offset in LEN..8 {
            assert_eq!(read(&mut dev, offset), 0xff);
        }
        let _ = (shutdown.read(), reset.read());
    }
}
