//! A minimal i8042 PS/2 controller, at ports 0x60 (data) and 0x64 (status/command).
//!
//! There is no keyboard behind it. Its job is the CPU reset line that Linux's `reboot=k` path
//! pulses (command 0xFE), and answering the controller commands that Linux's reboot path and
//! i8042 probing send, so that none of them waits for a reply. The input buffer is always
//! empty, so a guest's `kb_wait` loop ends at once.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, Persist, PersistError};

/// Offset of the data port (0x60) from the device's base.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64) from the device's base.
pub const COMMAND_OFFSET: u64 = 4;

/// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Commands 0xF0..=0xFF pulse the output port lines whose bit is 0 in the low nibble; bit 0 is
/// the CPU reset line, so every even one (0xFE the usual) resets.
const CMD_PULSE_OUTPUT_FIRST: u8 = 0xf0;

/// Status register: the output buffer holds a byte for the guest.
const STATUS_OBF: u8 = 0x01;

/// Command byte: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 0x01;
/// Command byte: the system passed its power-on self-test.
const CTR_SYS_FLAG: u8 = 0x04;
/// Command byte: keyboard clock disabled.
const CTR_KBD_DISABLE: u8 = 0x10;
/// Command byte: aux (mouse) clock disabled.
const CTR_AUX_DISABLE: u8 = 0x20;
/// Command byte: translate set 2 scan codes to set 1.
const CTR_XLATE: u8 = 0x40;
/// Command byte at power on.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYS_FLAG | CTR_XLATE;

/// Reply to a passing controller self-test.
const SELF_TEST_PASSED: u8 = 0x55;
/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_RESET_N: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

/// The i8042 controller.
pub struct I8042 {
    reset_evt: EventFd,
    command_byte: u8,
    /// The byte in the output buffer, if any (OBF).
    output: Option<u8>,
    /// A command waiting for its data byte on the data port.
    pending_command: Option<u8>,
}

/// Saved state of an [`I8042`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct I8042State {
    /// The controller command byte.
    pub command_byte: u8,
    /// The byte in the output buffer, if any.
    pub output: Option<u8>,
    /// A command waiting for its data byte.
    pub pending_command: Option<u8>,
}

impl I8042 {
    /// An i8042 that writes 1 to `reset_evt` when the guest resets the CPU through it.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            command_byte: CTR_DEFAULT,
            output: None,
            pending_command: None,
        }
    }

    fn signal_reset(&self) {
        tracing::info!("i8042: guest requested a CPU reset");
        if let Err(e) = self.reset_evt.write(1) {
            tracing::error!("i8042: failed to signal the reset event: {e}");
        }
    }

    fn status(&self) -> u8 {
        if self.output.is_some() {
            STATUS_OBF
        } else {
            0
        }
    }

    fn command(&mut self, command: u8) {
        // A new command cancels one still waiting for its data byte.
        self.pending_command = None;
        match command {
            CMD_READ_CTR => self.output = Some(self.command_byte),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(command),
            CMD_DISABLE_AUX => self.command_byte |= CTR_AUX_DISABLE,
            CMD_ENABLE_AUX => self.command_byte &= !CTR_AUX_DISABLE,
            CMD_SELF_TEST => self.output = Some(SELF_TEST_PASSED),
            CMD_DISABLE_KBD => self.command_byte |= CTR_KBD_DISABLE,
            CMD_ENABLE_KBD => self.command_byte &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.output = Some(OUTPUT_PORT_RESET_N | OUTPUT_PORT_A20),
            CMD_PULSE_OUTPUT_FIRST..=u8::MAX if command & OUTPUT_PORT_RESET_N == 0 => {
                self.signal_reset()
            }
            _ => tracing::debug!("i8042: ignoring command {command:#04x}"),
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.command_byte = value,
            Some(CMD_WRITE_OUTPUT_PORT) if value & OUTPUT_PORT_RESET_N == 0 => self.signal_reset(),
            Some(CMD_WRITE_OUTPUT_PORT) => {}
            // No keyboard is attached: bytes meant for it go nowhere.
            _ => tracing::debug!("i8042: ignoring data {value:#04x}"),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wide access touches consecutive ports, one byte each.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(DATA_OFFSET) => self.output.take().unwrap_or(0),
                Some(COMMAND_OFFSET) => self.status(),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(DATA_OFFSET) => self.write_data(byte),
                Some(COMMAND_OFFSET) => self.command(byte),
                _ => {}
            }
        }
    }
}

impl Persist for I8042 {
    const NAME: &'static str = "i8042";
    type State = I8042State;

    fn save(&self) -> I8042State {
        I8042State {
            command_byte: self.command_byte,
            output: self.output,
            pending_command: self.pending_command,
        }
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), PersistError> {
        self.command_byte = state.command_byte;
        self.output = state.output;
        self.pending_command = state.pending_command;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    /// An i8042 and the other end of its reset event.
    fn i8042() -> (I8042, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut data = [0];
        dev.read(offset, &mut data);
        data[0]
    }

    fn reset_signalled(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(count) => count > 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    #[test]
    fn reset_command_signals_the_reset_event() {
        let (mut dev, evt) = i8042();
        assert!(!reset_signalled(&evt));
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        assert!(!reset_signalled(&evt));
    }

    #[test]
    fn only_pulses_of_the_reset_line_reset() {
        let (mut dev, evt) = i8042();
        for command in [0xff, 0xf1, 0xfd, 0x00, 0xd1, 0x01, 0xfb] {
            dev.write(COMMAND_OFFSET, &[command]);
            assert!(!reset_signalled(&evt), "command {command:#x}");
        }
        dev.write(COMMAND_OFFSET, &[0xf0]);
        assert!(reset_signalled(&evt));
        // 0xFE on the data port is a keyboard byte, not a reset.
        dev.write(DATA_OFFSET, &[0xfe]);
        assert!(!reset_signalled(&evt));
    }

    #[test]
    fn status_is_empty_until_a_reply_is_queued() {
        let (mut dev, _evt) = i8042();
        assert_eq!(read(&mut dev, COMMAND_OFFSET), 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
        for command in [0xa7, 0xa8, 0xad, 0xae, 0xd1] {
            dev.write(COMMAND_OFFSET, &[command]);
            assert_eq!(read(&mut dev, COMMAND_OFFSET), 0, "command {command:#x}");
        }
    }

    #[test]
    fn self_test_replies_0x55() {
        let (mut dev, _evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET), STATUS_OBF);
        // Reading the status does not consume the reply.
        assert_eq!(read(&mut dev, COMMAND_OFFSET), STATUS_OBF);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
        assert_eq!(read(&mut dev, COMMAND_OFFSET), 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0);
    }

    #[test]
    fn command_byte_read_write() {
        let (mut dev, _evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET), STATUS_OBF);
        assert_eq!(read(&mut dev, DATA_OFFSET), CTR_DEFAULT);
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x65]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x65);
        // The data byte went to the command byte once; the next one goes nowhere.
        dev.write(DATA_OFFSET, &[0x00]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x65);
    }

    #[test]
    fn enable_disable_commands_toggle_the_command_byte() {
        let (mut dev, _evt) = i8042();
        let ctr = |dev: &mut I8042| {
            dev.write(COMMAND_OFFSET, &[0x20]);
            read(dev, DATA_OFFSET)
        };
        dev.write(COMMAND_OFFSET, &[0xa7]);
        assert_eq!(ctr(&mut dev) & CTR_AUX_DISABLE, CTR_AUX_DISABLE);
        dev.write(COMMAND_OFFSET, &[0xa8]);
        assert_eq!(ctr(&mut dev) & CTR_AUX_DISABLE, 0);
        dev.write(COMMAND_OFFSET, &[0xad]);
        assert_eq!(ctr(&mut dev) & CTR_KBD_DISABLE, CTR_KBD_DISABLE);
        dev.write(COMMAND_OFFSET, &[0xae]);
        assert_eq!(ctr(&mut dev), CTR_DEFAULT);
    }

    #[test]
    fn output_port_write_resets_when_bit_0_clears() {
        let (mut dev, evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(DATA_OFFSET, &[0xdf]); // A20 on, reset line high
        assert!(!reset_signalled(&evt));
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert!(reset_signalled(&evt));
        // Without a pending 0xD1 the same byte does nothing.
        dev.write(DATA_OFFSET, &[0xfe]);
        assert!(!reset_signalled(&evt));
        dev.write(COMMAND_OFFSET, &[0xd0]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x03);
    }

    #[test]
    fn a_new_command_cancels_a_pending_one() {
        let (mut dev, evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(COMMAND_OFFSET, &[0xa8]);
        dev.write(DATA_OFFSET, &[0x00]);
        assert!(!reset_signalled(&evt));
        assert_eq!(dev.save().pending_command, None);
    }

    #[test]
    fn wide_accesses_touch_consecutive_ports() {
        let (mut dev, evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0xaa]);
        let mut data = [0; 5];
        dev.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0x55, 0xff, 0xff, 0xff, 0]);
        // A word write to 0x63 puts its high byte on the command port.
        dev.write(3, &[0x00, 0xfe]);
        assert!(reset_signalled(&evt));
    }

    #[test]
    fn unknown_offsets_read_ones() {
        let (mut dev, evt) = i8042();
        for offset in 1..=3 {
            assert_eq!(read(&mut dev, offset), 0xff);
            dev.write(offset, &[0xfe]);
        }
        assert!(!reset_signalled(&evt));
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut dev, _evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        dev.write(COMMAND_OFFSET, &[0xd1]);
        let state = dev.save();
        assert_eq!(
            state,
            I8042State {
                command_byte: 0x47,
                output: Some(0x55),
                pending_command: Some(0xd1),
            }
        );
        let json = serde_json::to_string(&state).unwrap();
        let decoded: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, state);

        let (mut other, evt) = i8042();
        other.restore(&decoded).unwrap();
        assert_eq!(other.save(), state);
        assert_eq!(read(&mut other, COMMAND_OFFSET), STATUS_OBF);
        assert_eq!(read(&mut other, DATA_OFFSET), 0x55);
        other.write(DATA_OFFSET, &[0x00]);
        assert!(reset_signalled(&evt));
    }

    #[test]
    fn a_full_reset_event_is_only_logged() {
        let (mut dev, evt) = i8042();
        evt.write(u64::MAX - 1).unwrap();
        // The counter cannot take another 1: the write fails and is only logged.
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(evt.read().unwrap(), u64::MAX - 1);
    }

    #[test]
    fn any_access_is_harmless() {
        let (mut dev, evt) = i8042();
        for offset in (0..8).chain([u64::MAX - 3, u64::MAX]) {
            for width in 0..=8 {
                let mut data = vec![0; width];
                dev.read(offset, &mut data);
                for value in [0x00, 0x5a, 0xaa, 0xd1, 0xff] {
                    dev.write(offset, &vec![value; width]);
                }
            }
        }
        for command in 0..=u8::MAX {
            for value in [0x00, 0xff] {
                dev.write(COMMAND_OFFSET, &[command]);
                dev.write(DATA_OFFSET, &[value]);
                read(&mut dev, DATA_OFFSET);
                read(&mut dev, COMMAND_OFFSET);
            }
        }
        let _ = evt.read();
    }
}
