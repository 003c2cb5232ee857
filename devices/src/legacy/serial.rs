//! COM1: a 16550A UART (vm-superio) whose interrupt is an eventfd and whose input is fed by the
//! VMM from a host source such as stdin.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Persist, PersistError};

/// An interrupt line raised by writing to an eventfd (registered with KVM as an irqfd).
#[derive(Clone)]
pub struct EventFdTrigger(Arc<EventFd>);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals `space` each time the guest drains the receive FIFO, so an input feeder blocked on a
/// full FIFO can continue.
struct InputSpace {
    space: EventFd,
}

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // A failed write only delays input until the next drain.
        let _ = self.space.write(1);
    }
}

type Uart = vm_superio::Serial<EventFdTrigger, Arc<InputSpace>, Box<dyn Write + Send>>;

/// The COM1 UART.
pub struct Serial {
    uart: Uart,
    input_space: Arc<InputSpace>,
}

/// Saved UART registers and pending input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    /// A UART that raises `interrupt` and writes the guest's output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let input_space = Arc::new(InputSpace {
            space: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let uart = vm_superio::Serial::with_events(
            EventFdTrigger(Arc::new(interrupt)),
            input_space.clone(),
            out,
        );
        Ok(Serial { uart, input_space })
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO. When it is
    /// less than `input.len()`, wait on [`Serial::input_space_evt`] and offer the rest again.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                // The bytes are in the FIFO; only the interrupt failed to fire.
                crate::warn_limited!("serial input interrupt failed: {e}");
                input.len().min(self.uart.fifo_capacity())
            }
        }
    }

    /// Puts the UART back into its power-on state (a machine reset), keeping pending input.
    pub fn reset(&mut self) {
        let pending = self.uart.state().in_buffer;
        let mut state = SerialSnapshot::from(SerialState::default());
        state.in_buffer = pending;
        // Cannot fail: the pending input came from this FIFO.
        if let Err(e) = self.restore(&state) {
            crate::warn_limited!("serial reset: {e}");
        }
    }

    /// Becomes readable when the guest has emptied the receive FIFO.
    pub fn input_space_evt(&self) -> &EventFd {
        &self.input_space.space
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) if offset < 8 => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if offset < 8 {
                if let Err(e) = self.uart.write(offset, *byte) {
                    crate::warn_limited!("serial output failed: {e}");
                }
            }
        }
    }
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl Persist for Serial {
    const NAME: &'static str = "serial";
    type State = SerialSnapshot;

    fn save(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    fn restore(&mut self, state: &SerialSnapshot) -> Result<(), PersistError> {
        let capacity = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if state.in_buffer.len() > capacity {
            return Err(PersistError::mismatch(
                Self::NAME,
                format!(
                    "{} input bytes saved, the FIFO holds {capacity}",
                    state.in_buffer.len()
                ),
            ));
        }
        let in_buffer = state.in_buffer.clone();
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer,
        };
        // Rebuild the UART around the same interrupt, events and output.
        let trigger = self.uart.interrupt_evt().clone();
        let placeholder = vm_superio::Serial::with_events(
            trigger.clone(),
            self.input_space.clone(),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        match vm_superio::Serial::from_state(&s, trigger.clone(), self.input_space.clone(), out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(PersistError::mismatch(Self::NAME, format!("{e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, EventFd, SharedBuf) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let s = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
        (s, irq, out)
    }

    #[test]
    fn output_reaches_writer() {
        let (mut s, _irq, out) = serial();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_raises_interrupt_and_is_readable() {
        let (mut s, irq, _out) = serial();
        s.write(1, &[0x01]); // IER: received data available
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0];
        s.read(0, &mut b);
        assert_eq!(b[0], b'a');
        s.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert!(s.input_space_evt().read().is_ok(), "fifo drained");
    }

    #[test]
    fn full_fifo_accepts_part() {
        let (mut s, _irq, _out) = serial();
        let big = vec![b'x'; 100];
        let n = s.enqueue_input(&big);
        assert!(n > 0 && n < 100);
        assert_eq!(s.enqueue_input(&big), 0);
    }

    #[test]
    fn odd_widths_and_offsets_do_not_panic() {
        let (mut s, _irq, _out) = serial();
        for off in 0..16 {
            for len in 0..=8 {
                let mut buf = vec![0u8; len];
                s.read(off, &mut buf);
                s.write(off, &buf);
            }
        }
        let mut b = [0u8; 2];
        s.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut s, _irq, _out) = serial();
        s.write(3, &[0x83]); // DLAB
        s.write(0, &[0x0c]);
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]); // scratch
        s.enqueue_input(b"q");
        let saved = s.save();
        let json = serde_json::to_string(&saved).unwrap();
        let (mut t, _irq2, _out2) = serial();
        t.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(t.save(), saved);
        let mut b = [0];
        t.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
    }
}
