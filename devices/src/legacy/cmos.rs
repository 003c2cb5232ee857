//! MC146818 CMOS real-time clock and its NVRAM, at ports 0x70 (index) and 0x71 (data).
//!
//! The guest reads its wall-clock time here at boot (`mach_get_cmos_time`, the `rtc_cmos`
//! driver). The clock is the host's UTC time plus an offset the guest sets by writing the time
//! registers, so a guest-set time persists and keeps ticking. The chip never updates, so the
//! update-in-progress bit always reads 0 and a guest never waits for it. No interrupts are raised.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{BusDevice, Persist, PersistError};

/// Offset of the index port (0x70) from the device's base.
pub const INDEX_OFFSET: u64 = 0;
/// Offset of the data port (0x71) from the device's base.
pub const DATA_OFFSET: u64 = 1;
/// Number of CMOS registers, clock registers included.
pub const NVRAM_SIZE: usize = 128;

/// Register indices.
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// The registers that hold the running time.
const TIME_REGISTERS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY_OF_MONTH,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

/// Bit 7 of the index port disables NMIs; the rest selects the register.
const INDEX_MASK: u8 = 0x7f;
/// Status A: update in progress (read-only, always 0 here).
const STATUS_A_UIP: u8 = 0x80;
/// Status A at power on: 32.768 kHz time base, 1.024 kHz periodic rate.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: the guest is setting the clock; updates are frozen.
const STATUS_B_SET: u8 = 0x80;
/// Status B: update-ended interrupt enable (cleared by the chip when SET is written).
const STATUS_B_UIE: u8 = 0x10;
/// Status B: time registers are binary rather than BCD.
const STATUS_B_BINARY: u8 = 0x04;
/// Status B: hours run 0..23 rather than 1..12 with a PM flag.
const STATUS_B_24H: u8 = 0x02;
/// Status B at power on: 24-hour, BCD.
const STATUS_B_DEFAULT: u8 = STATUS_B_24H;
/// Status D: the RAM and time are valid (the battery is good).
const STATUS_D_VRT: u8 = 0x80;
/// Hours register in 12-hour mode: the time is PM.
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;
/// The registers encode years 0000..=9999; the guest's time is clamped to that span.
const MIN_TIME: i64 = days_from_civil(0, 1, 1) * SECS_PER_DAY;
const MAX_TIME: i64 = days_from_civil(9999, 12, 31) * SECS_PER_DAY + SECS_PER_DAY - 1;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
/// Days past the end of the month roll into the next one.
const fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (month, day) = (month as i64, day as i64);
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    // Both fit a u8: day is 1..=31, month 1..=12.
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u8;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u8;
    let year = year_of_era + era * 400;
    (if month <= 2 { year + 1 } else { year }, month, day)
}

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    weekday: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let secs_of_day = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (5 when Sunday is 1). All values below are small.
        Self {
            year,
            month,
            day,
            hour: (secs_of_day / 3600) as u8,
            minute: (secs_of_day / 60 % 60) as u8,
            second: (secs_of_day % 60) as u8,
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }
}

/// The host's UTC time in seconds since the UNIX epoch.
fn host_unix_time() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Source of UTC time in seconds since the UNIX epoch.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// The CMOS RTC and NVRAM.
pub struct Cmos {
    /// Selected register, without the NMI-disable bit.
    index: u8,
    /// All registers. The time registers hold meaningful bytes only while the guest holds SET;
    /// otherwise they are computed from the clock on every read.
    nvram: [u8; NVRAM_SIZE],
    /// Guest time minus clock time, in seconds.
    time_offset: i64,
    clock: Clock,
}

/// Saved state of a [`Cmos`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CmosState {
    /// Selected register.
    pub index: u8,
    /// The [`NVRAM_SIZE`] registers.
    pub nvram: Vec<u8>,
    /// Guest time minus host UTC time, in seconds.
    pub time_offset: i64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A CMOS RTC showing the host's UTC time.
    pub fn new() -> Self {
        Self::with_clock(host_unix_time)
    }

    /// A CMOS RTC whose time comes from `clock` (seconds since the UNIX epoch, UTC).
    pub fn with_clock(clock: impl Fn() -> i64 + Send + 'static) -> Self {
        Self {
            index: 0,
            nvram: Self::power_on_nvram(),
            time_offset: 0,
            clock: Box::new(clock),
        }
    }

    fn power_on_nvram() -> [u8; NVRAM_SIZE] {
        let mut nvram = [0; NVRAM_SIZE];
        nvram[usize::from(REG_STATUS_A)] = STATUS_A_DEFAULT;
        nvram[usize::from(REG_STATUS_B)] = STATUS_B_DEFAULT;
        nvram
    }

    fn status_b(&self) -> u8 {
        self.nvram[usize::from(REG_STATUS_B)]
    }

    fn binary_mode(&self) -> bool {
        self.status_b() & STATUS_B_BINARY != 0
    }

    /// The clock's time, clamped to what the registers can show.
    fn clock_time(&self) -> i64 {
        (self.clock)().clamp(MIN_TIME, MAX_TIME)
    }

    fn guest_time(&self) -> DateTime {
        let secs = self
            .clock_time()
            .saturating_add(self.time_offset)
            .clamp(MIN_TIME, MAX_TIME);
        DateTime::from_unix(secs)
    }

    /// Encodes a value 0..=99 in the guest's number format.
    fn encode(&self, value: u8) -> u8 {
        if self.binary_mode() {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// Decodes a register byte in the guest's number format; `None` for an invalid BCD digit.
    fn decode(&self, raw: u8) -> Option<u8> {
        if self.binary_mode() {
            return Some(raw);
        }
        let (tens, ones) = (raw >> 4, raw & 0x0f);
        (tens <= 9 && ones <= 9).then_some(tens * 10 + ones)
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.status_b() & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let hour12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour12) | pm
    }

    fn decode_hour(&self, raw: u8) -> Option<u8> {
        if self.status_b() & STATUS_B_24H != 0 {
            return self.decode(raw).filter(|h| *h <= 23);
        }
        let hour12 = self
            .decode(raw & !HOUR_PM)
            .filter(|h| (1..=12).contains(h))?;
        let pm = if raw & HOUR_PM != 0 { 12 } else { 0 };
        Some(hour12 % 12 + pm)
    }

    /// The guest-visible byte of time register `reg` at `time`.
    fn time_register(&self, reg: u8, time: &DateTime) -> u8 {
        // The year is clamped to 0..=9999, so both halves fit 0..=99.
        let century = (time.year / 100) as u8;
        let year = (time.year % 100) as u8;
        match reg {
            REG_SECONDS => self.encode(time.second),
            REG_MINUTES => self.encode(time.minute),
            REG_HOURS => self.encode_hour(time.hour),
            REG_DAY_OF_WEEK => self.encode(time.weekday),
            REG_DAY_OF_MONTH => self.encode(time.day),
            REG_MONTH => self.encode(time.month),
            REG_YEAR => self.encode(year),
            REG_CENTURY => self.encode(century),
            _ => 0xff,
        }
    }

    /// Copies the running time into the time registers, in the guest's current format.
    fn latch_time(&mut self) {
        let now = self.guest_time();
        for reg in TIME_REGISTERS {
            self.nvram[usize::from(reg)] = self.time_register(reg, &now);
        }
    }

    /// The time held in the time registers, in seconds since the UNIX epoch; `None` when a
    /// field is out of range. The day of week is ignored: it follows from the date.
    fn registers_time(&self) -> Option<i64> {
        let reg = |r: u8| self.nvram[usize::from(r)];
        let second = self.decode(reg(REG_SECONDS)).filter(|s| *s <= 59)?;
        let minute = self.decode(reg(REG_MINUTES)).filter(|m| *m <= 59)?;
        let hour = self.decode_hour(reg(REG_HOURS))?;
        let day = self
            .decode(reg(REG_DAY_OF_MONTH))
            .filter(|d| (1..=31).contains(d))?;
        let month = self
            .decode(reg(REG_MONTH))
            .filter(|m| (1..=12).contains(m))?;
        let year = self.decode(reg(REG_YEAR)).filter(|y| *y <= 99)?;
        let century = self.decode(reg(REG_CENTURY)).filter(|c| *c <= 99)?;
        let year = i64::from(century) * 100 + i64::from(year);
        Some(
            days_from_civil(year, month, day) * SECS_PER_DAY
                + i64::from(hour) * 3600
                + i64::from(minute) * 60
                + i64::from(second),
        )
    }

    /// Makes the time in the time registers the running time. An invalid time is dropped and
    /// the clock keeps its previous time.
    fn commit_time(&mut self) {
        match self.registers_time() {
            Some(secs) => self.time_offset = secs.saturating_sub(self.clock_time()),
            None => tracing::debug!("cmos: guest set an invalid time, ignored"),
        }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let setting = self.status_b() & STATUS_B_SET != 0;
        match reg {
            _ if TIME_REGISTERS.contains(&reg) && !setting => {
                self.time_register(reg, &self.guest_time())
            }
            REG_STATUS_A => self.nvram[usize::from(reg)] & !STATUS_A_UIP,
            // No interrupt ever becomes pending, so reading (and clearing) C yields 0.
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VRT,
            _ => self.nvram[usize::from(reg & INDEX_MASK)],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        let old_b = self.status_b();
        match reg {
            _ if TIME_REGISTERS.contains(&reg) => {
                if old_b & STATUS_B_SET != 0 {
                    self.nvram[usize::from(reg)] = value;
                } else {
                    self.latch_time();
                    self.nvram[usize::from(reg)] = value;
                    self.commit_time();
                }
            }
            REG_STATUS_A => self.nvram[usize::from(reg)] = value & !STATUS_A_UIP,
            REG_STATUS_B => {
                let new_b = if value & STATUS_B_SET != 0 {
                    value & !STATUS_B_UIE
                } else {
                    value
                };
                match (old_b & STATUS_B_SET != 0, new_b & STATUS_B_SET != 0) {
                    (false, true) => {
                        // Freeze in the format that holds while the guest sets the time.
                        self.nvram[usize::from(reg)] = new_b;
                        self.latch_time();
                    }
                    (true, false) => {
                        // The guest wrote the registers in the format it held SET with.
                        self.commit_time();
                        self.nvram[usize::from(reg)] = new_b;
                    }
                    _ => self.nvram[usize::from(reg)] = new_b,
                }
            }
            REG_STATUS_C | REG_STATUS_D => {}
            _ => self.nvram[usize::from(reg & INDEX_MASK)] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wide access touches consecutive ports, one byte each.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64) {
                Some(DATA_OFFSET) => self.read_register(self.index),
                // The index port is write-only.
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(INDEX_OFFSET) => self.index = byte & INDEX_MASK,
                Some(DATA_OFFSET) => self.write_register(self.index, byte),
                _ => {}
            }
        }
    }
}

impl Persist for Cmos {
    const NAME: &'static str = "CMOS";
    type State = CmosState;

    fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
            time_offset: self.time_offset,
        }
    }

    fn restore(&mut self, state: &CmosState) -> Result<(), PersistError> {
        if state.nvram.len() != NVRAM_SIZE {
            return Err(PersistError::mismatch(
                Self::NAME,
                format!(
                    "{} bytes of NVRAM saved, the device has {NVRAM_SIZE}",
                    state.nvram.len()
                ),
            ));
        }
        self.nvram.copy_from_slice(&state.nvram);
        self.nvram[usize::from(REG_STATUS_A)] &= !STATUS_A_UIP;
        self.index = state.index & INDEX_MASK;
        self.time_offset = state.time_offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// 2026-11-23T10:49:05Z, a Monday.
    const T0: i64 = 1_795_430_945;

    /// A CMOS whose clock the test moves by hand.
    fn cmos_at(secs: i64) -> (Cmos, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(secs));
        let clock = now.clone();
        (Cmos::with_clock(move || clock.load(Ordering::SeqCst)), now)
    }

    fn read_reg(cmos: &mut Cmos, reg: u8) -> u8 {
        cmos.write(INDEX_OFFSET, &[reg]);
        let mut data = [0];
        cmos.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn write_reg(cmos: &mut Cmos, reg: u8, value: u8) {
        cmos.write(INDEX_OFFSET, &[reg]);
        cmos.write(DATA_OFFSET, &[value]);
    }

    /// (seconds, minutes, hours, weekday, day, month, year, century).
    fn clock_regs(cmos: &mut Cmos) -> [u8; 8] {
        TIME_REGISTERS.map(|r| read_reg(cmos, r))
    }

    #[test]
    fn civil_date_conversions() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 23), T0 / SECS_PER_DAY);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        // Out-of-month days roll over.
        assert_eq!(days_from_civil(2023, 2, 29), days_from_civil(2023, 3, 1));
        let (min_days, max_days) = (MIN_TIME / SECS_PER_DAY, MAX_TIME / SECS_PER_DAY);
        for days in (min_days..=max_days).step_by(13) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(min_days), (0, 1, 1));
        assert_eq!(civil_from_days(max_days), (9999, 12, 31));
    }

    #[test]
    fn weekday_counts_from_sunday() {
        assert_eq!(DateTime::from_unix(0).weekday, 5); // Thursday
        assert_eq!(DateTime::from_unix(T0).weekday, 2); // Monday
        assert_eq!(DateTime::from_unix(-SECS_PER_DAY * 4).weekday, 1); // 1969-12-28, Sunday
        assert_eq!(DateTime::from_unix(SECS_PER_DAY * 2).weekday, 7); // Saturday
    }

    #[test]
    fn reads_bcd_time_by_default() {
        let (mut cmos, _) = cmos_at(T0);
        assert_eq!(
            clock_regs(&mut cmos),
            [0x05, 0x49, 0x10, 0x02, 0x23, 0x11, 0x26, 0x20]
        );
    }

    #[test]
    fn reads_binary_time_when_dm_is_set() {
        let (mut cmos, _) = cmos_at(T0);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_B), 0x06);
        assert_eq!(clock_regs(&mut cmos), [5, 49, 10, 2, 23, 11, 26, 20]);
    }

    #[test]
    fn reads_twelve_hour_time() {
        let day = T0 - (10 * 3600 + 49 * 60 + 5);
        let (mut cmos, now) = cmos_at(T0);
        write_reg(&mut cmos, REG_STATUS_B, 0);
        for (hour, bcd) in [(0, 0x12), (1, 0x01), (10, 0x10), (12, 0x92), (22, 0x90)] {
            now.store(day + hour * 3600, Ordering::SeqCst);
            assert_eq!(read_reg(&mut cmos, REG_HOURS), bcd, "hour {hour}");
        }
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_BINARY);
        assert_eq!(read_reg(&mut cmos, REG_HOURS), 0x8a);
        now.store(day, Ordering::SeqCst);
        assert_eq!(read_reg(&mut cmos, REG_HOURS), 12);
    }

    #[test]
    fn time_ticks_with_the_clock() {
        let (mut cmos, now) = cmos_at(T0);
        now.store(T0 + 1, Ordering::SeqCst);
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0x06);
        // 1999-12-31T23:59:59Z, a Friday, then the next second.
        now.store(946_684_799, Ordering::SeqCst);
        assert_eq!(
            clock_regs(&mut cmos),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
        );
        now.store(946_684_800, Ordering::SeqCst);
        assert_eq!(
            clock_regs(&mut cmos),
            [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn index_port_masks_the_nmi_bit() {
        let (mut cmos, _) = cmos_at(T0);
        cmos.write(INDEX_OFFSET, &[0x80 | REG_MINUTES]);
        let mut data = [0];
        cmos.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0x49]);
        cmos.write(INDEX_OFFSET, &[0x80 | 0x40]);
        cmos.write(DATA_OFFSET, &[0xab]);
        assert_eq!(read_reg(&mut cmos, 0x40), 0xab);
        assert_eq!(cmos.save().index, 0x40);
        // The index port is write-only.
        cmos.read(INDEX_OFFSET, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn status_registers() {
        let (mut cmos, _) = cmos_at(T0);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_A), 0x26);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_B), 0x02);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_C), 0);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_D), 0x80);
        // UIP is read-only and stays clear; the rest of A is the guest's.
        write_reg(&mut cmos, REG_STATUS_A, 0xa6);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_A), 0x26);
        write_reg(&mut cmos, REG_STATUS_A, 0x70);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_A), 0x70);
        // C and D are read-only.
        write_reg(&mut cmos, REG_STATUS_C, 0xff);
        write_reg(&mut cmos, REG_STATUS_D, 0x00);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_C), 0);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_D), 0x80);
        // Setting SET clears UIE.
        write_reg(&mut cmos, REG_STATUS_B, 0x80 | 0x10 | 0x02);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_B), 0x82);
    }

    #[test]
    fn nvram_and_alarm_registers_store_bytes() {
        let (mut cmos, _) = cmos_at(T0);
        let stored = |reg: u8| !TIME_REGISTERS.contains(&reg) && !(0x0a..=0x0d).contains(&reg);
        for reg in (0..0x80u8).filter(|r| stored(*r)) {
            write_reg(&mut cmos, reg, reg ^ 0x5a);
        }
        for reg in (0..0x80u8).filter(|r| stored(*r)) {
            assert_eq!(read_reg(&mut cmos, reg), reg ^ 0x5a, "register {reg:#x}");
        }
        assert_eq!(read_reg(&mut cmos, 0x01), 0x01 ^ 0x5a);
        assert_eq!(read_reg(&mut cmos, 0x03), 0x03 ^ 0x5a);
        assert_eq!(read_reg(&mut cmos, 0x05), 0x05 ^ 0x5a);
        // The clock is untouched.
        assert_eq!(read_reg(&mut cmos, REG_MINUTES), 0x49);
    }

    /// Sets 2001-02-03T04:05:06 the way Linux's `mc146818_set_time` does: SET, the registers,
    /// then SET cleared.
    #[test]
    fn guest_set_time_persists_and_ticks() {
        let (mut cmos, now) = cmos_at(T0);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_SET | STATUS_B_24H);
        let wanted = [0x06, 0x05, 0x04, 0x07, 0x03, 0x02, 0x01, 0x20];
        for (reg, value) in TIME_REGISTERS.into_iter().zip(wanted) {
            write_reg(&mut cmos, reg, value);
        }
        // Frozen while SET is held: reads show what was written, even as the host ticks.
        now.store(T0 + 30, Ordering::SeqCst);
        assert_eq!(clock_regs(&mut cmos), wanted);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_24H);
        // 2001-02-03 was a Saturday (7).
        assert_eq!(
            clock_regs(&mut cmos),
            [0x06, 0x05, 0x04, 0x07, 0x03, 0x02, 0x01, 0x20]
        );
        now.store(T0 + 40, Ordering::SeqCst);
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0x16);
        let target = days_from_civil(2001, 2, 3) * SECS_PER_DAY + 4 * 3600 + 5 * 60 + 6;
        assert_eq!(cmos.save().time_offset, target - (T0 + 30));
    }

    #[test]
    fn latch_keeps_fields_the_guest_does_not_write() {
        let (mut cmos, _) = cmos_at(T0);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_SET | STATUS_B_24H);
        // Linux writes the century only when the FADT names its register.
        write_reg(&mut cmos, REG_YEAR, 0x27);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_24H);
        assert_eq!(
            clock_regs(&mut cmos),
            [0x05, 0x49, 0x10, 0x03, 0x23, 0x11, 0x27, 0x20]
        );
    }

    #[test]
    fn guest_set_time_in_binary_twelve_hour_mode() {
        let (mut cmos, _) = cmos_at(T0);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_SET | STATUS_B_BINARY);
        write_reg(&mut cmos, REG_HOURS, HOUR_PM | 11);
        write_reg(&mut cmos, REG_MINUTES, 30);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_BINARY | STATUS_B_24H);
        assert_eq!(read_reg(&mut cmos, REG_HOURS), 23);
        assert_eq!(read_reg(&mut cmos, REG_MINUTES), 30);
        assert_eq!(read_reg(&mut cmos, REG_DAY_OF_MONTH), 23);
    }

    #[test]
    fn writing_a_time_register_without_set_applies_at_once() {
        let (mut cmos, now) = cmos_at(T0);
        write_reg(&mut cmos, REG_SECONDS, 0x30);
        assert_eq!(
            clock_regs(&mut cmos),
            [0x30, 0x49, 0x10, 0x02, 0x23, 0x11, 0x26, 0x20]
        );
        now.store(T0 + 5, Ordering::SeqCst);
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0x35);
        // The weekday follows the date; writing it changes nothing.
        write_reg(&mut cmos, REG_DAY_OF_WEEK, 0x05);
        assert_eq!(read_reg(&mut cmos, REG_DAY_OF_WEEK), 0x02);
    }

    #[test]
    fn invalid_guest_time_is_ignored() {
        let (mut cmos, _) = cmos_at(T0);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_SET | STATUS_B_24H);
        write_reg(&mut cmos, REG_SECONDS, 0x1a); // not BCD
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0x1a);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_24H);
        assert_eq!(cmos.save().time_offset, 0);
        assert_eq!(read_reg(&mut cmos, REG_SECONDS), 0x05);
        for (reg, value) in [
            (REG_MINUTES, 0x60),
            (REG_HOURS, 0x24),
            (REG_DAY_OF_MONTH, 0x00),
            (REG_MONTH, 0x13),
            (REG_CENTURY, 0xa0),
        ] {
            write_reg(&mut cmos, reg, value);
            assert_eq!(cmos.save().time_offset, 0, "register {reg:#x}");
        }
        write_reg(&mut cmos, REG_STATUS_B, 0); // 12-hour: hour 0 is invalid
        write_reg(&mut cmos, REG_HOURS, 0x00);
        write_reg(&mut cmos, REG_HOURS, 0x13);
        assert_eq!(cmos.save().time_offset, 0);
    }

    #[test]
    fn extreme_clocks_are_clamped() {
        for secs in [i64::MIN, MIN_TIME - 1, -1, MAX_TIME + 1, i64::MAX] {
            let (mut cmos, _) = cmos_at(secs);
            let regs = clock_regs(&mut cmos);
            let century = regs[7];
            assert!(
                century == 0x00 || century == 0x99 || century == 0x19,
                "{secs}"
            );
            write_reg(&mut cmos, REG_CENTURY, 0x99);
            write_reg(&mut cmos, REG_YEAR, 0x99);
            assert_eq!(read_reg(&mut cmos, REG_CENTURY), 0x99);
        }
        let (mut cmos, _) = cmos_at(T0);
        let nvram = cmos.save().nvram;
        cmos.restore(&CmosState {
            index: 0,
            nvram,
            time_offset: i64::MAX,
        })
        .unwrap();
        assert_eq!(clock_regs(&mut cmos)[6..], [0x99, 0x99]);
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut cmos, now) = cmos_at(T0);
        write_reg(&mut cmos, 0x40, 0x12);
        write_reg(&mut cmos, REG_STATUS_B, STATUS_B_24H | STATUS_B_BINARY);
        write_reg(&mut cmos, REG_YEAR, 30);
        cmos.write(INDEX_OFFSET, &[0x8e]);
        let state = cmos.save();
        let json = serde_json::to_string(&state).unwrap();
        let decoded: CmosState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, state);
        assert_eq!(decoded.index, 0x0e);
        assert_eq!(decoded.nvram.len(), NVRAM_SIZE);

        let (mut other, other_now) = cmos_at(0);
        other.restore(&decoded).unwrap();
        assert_eq!(other.save(), state);
        now.store(T0 + 100, Ordering::SeqCst);
        other_now.store(T0 + 100, Ordering::SeqCst);
        assert_eq!(clock_regs(&mut other), clock_regs(&mut cmos));
        assert_eq!(clock_regs(&mut other)[6], 30);
        assert_eq!(read_reg(&mut other, 0x40), 0x12);
    }

    #[test]
    fn restore_refuses_a_wrong_nvram_and_tolerates_odd_values() {
        let (mut cmos, _) = cmos_at(T0);
        let before = cmos.save();
        for nvram in [vec![], vec![0xff; 3], vec![0xff; 1000]] {
            let len = nvram.len();
            let err = cmos
                .restore(&CmosState {
                    index: 0,
                    nvram,
                    time_offset: 0,
                })
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("CMOS: {len} bytes of NVRAM saved, the device has {NVRAM_SIZE}")
            );
            assert_eq!(cmos.save(), before, "a refused state changes nothing");
        }
        cmos.restore(&CmosState {
            index: 0xff,
            nvram: vec![0xff; NVRAM_SIZE],
            time_offset: i64::MIN,
        })
        .unwrap();
        assert_eq!(cmos.save().index, 0x7f);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_A) & STATUS_A_UIP, 0);
        clock_regs(&mut cmos);
    }

    #[test]
    fn wide_accesses_touch_consecutive_ports() {
        let (mut cmos, _) = cmos_at(T0);
        // outw 0x70: index, then data.
        cmos.write(INDEX_OFFSET, &[0x50, 0x77]);
        assert_eq!(read_reg(&mut cmos, 0x50), 0x77);
        cmos.write(INDEX_OFFSET, &[REG_MINUTES]);
        let mut data = [0; 4];
        cmos.read(INDEX_OFFSET, &mut data);
        assert_eq!(data, [0xff, 0x49, 0xff, 0xff]);
    }

    #[test]
    fn host_clock_is_sane() {
        let mut cmos = Cmos::new();
        let century = read_reg(&mut cmos, REG_CENTURY);
        assert_eq!(century, 0x20);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_D), 0x80);
    }

    #[test]
    fn any_access_is_harmless() {
        let (mut cmos, _) = cmos_at(T0);
        for offset in (0..8).chain([u64::MAX - 3, u64::MAX]) {
            for width in 0..=8 {
                let mut data = vec![0; width];
                cmos.read(offset, &mut data);
                if offset >= 2 {
                    assert!(data.iter().all(|b| *b == 0xff));
                }
                for value in [0x00, 0x5a, 0x80, 0xff] {
                    cmos.write(offset, &vec![value; width]);
                }
            }
        }
        for index in 0..=u8::MAX {
            for value in [0x00, 0x12, 0x59, 0x80, 0x99, 0xff] {
                cmos.write(INDEX_OFFSET, &[index]);
                cmos.write(DATA_OFFSET, &[value]);
                let mut data = [0; 1];
                cmos.read(DATA_OFFSET, &mut data);
            }
        }
    }
}
