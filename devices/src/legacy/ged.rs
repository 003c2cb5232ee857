//! ACPI Generic Event Device (GED, `ACPI0013`): how a hardware-reduced ACPI machine raises
//! events such as the power button.
//!
//! The VMM sets an event bit through a [`GedTrigger`] and pulses the GED's interrupt; the
//! guest's ACPI interpreter runs the DSDT's `_EVT` method, which reads the event register
//! (reading clears it) and notifies the matching device (`\_SB.PWRB` for the power button).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Persist, PersistError};

/// Event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Bytes the event register spans.
pub const LEN: u64 = 1;

/// The GED's event register, on the port I/O bus.
pub struct Ged {
    pending: Arc<AtomicU8>,
}

/// Raises GED events from the VMM (any thread).
#[derive(Clone)]
pub struct GedTrigger {
    pending: Arc<AtomicU8>,
    irq: Arc<EventFd>,
}

impl Ged {
    /// The device and its trigger; `irq` is the eventfd bound to the GED's interrupt line.
    pub fn new(irq: EventFd) -> (Ged, GedTrigger) {
        let pending = Arc::new(AtomicU8::new(0));
        (
            Ged {
                pending: pending.clone(),
            },
            GedTrigger {
                pending,
                irq: Arc::new(irq),
            },
        )
    }
}

impl GedTrigger {
    /// Presses the power button: a guest that handles it shuts down.
    pub fn power_button(&self) -> std::io::Result<()> {
        self.raise(EVENT_POWER_BUTTON)
    }

    fn raise(&self, event: u8) -> std::io::Result<()> {
        self.pending.fetch_or(event, Ordering::AcqRel);
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.pending.swap(0, Ordering::AcqRel);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Saved state: events raised and not yet read by the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    pub pending: u8,
}

impl Persist for Ged {
    const NAME: &'static str = "ACPI GED";
    type State = GedState;

    fn save(&self) -> GedState {
        GedState {
            pending: self.pending.load(Ordering::Acquire),
        }
    }

    fn restore(&mut self, state: &GedState) -> Result<(), PersistError> {
        self.pending.store(state.pending, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_button_sets_the_event_interrupts_and_reading_clears_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut ged, trigger) = Ged::new(irq.try_clone().unwrap());
        let mut data = [0xffu8; 1];
        ged.read(0, &mut data);
        assert_eq!(data, [0], "nothing pending");
        assert!(irq.read().is_err(), "no interrupt yet");

        trigger.power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(ged.save().pending, EVENT_POWER_BUTTON);
        ged.read(0, &mut data);
        assert_eq!(data, [EVENT_POWER_BUTTON]);
        ged.read(0, &mut data);
        assert_eq!(data, [0], "reading cleared it");
    }

    #[test]
    fn any_offset_and_width_is_harmless() {
        let (mut ged, trigger) = Ged::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        trigger.power_button().unwrap();
        let mut wide = [0xffu8; 4];
        ged.read(3, &mut wide);
        assert_eq!(wide, [0; 4]);
        ged.write(0, &[0xff]);
        ged.read(0, &mut wide);
        assert_eq!(wide, [EVENT_POWER_BUTTON, 0, 0, 0]);
        ged.restore(&GedState { pending: 1 }).unwrap();
        ged.read(0, &mut wide[..0]);
        assert_eq!(ged.save().pending, 1, "an empty read consumes nothing");
    }
}
