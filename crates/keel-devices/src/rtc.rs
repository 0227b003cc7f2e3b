//! The CMOS real-time clock (Motorola MC146818), so a guest's clock is right
//! at boot without a network.

use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// Register indices (MC146818 and the PC's CMOS map).
pub mod rtc_reg {
    /// Seconds.
    pub const SECONDS: u8 = 0x00;
    /// Minutes.
    pub const MINUTES: u8 = 0x02;
    /// Hours (bit 7 = PM in 12-hour mode).
    pub const HOURS: u8 = 0x04;
    /// Day of the week, 1 = Sunday.
    pub const DAY_OF_WEEK: u8 = 0x06;
    /// Day of the month.
    pub const DAY_OF_MONTH: u8 = 0x07;
    /// Month.
    pub const MONTH: u8 = 0x08;
    /// Year within the century.
    pub const YEAR: u8 = 0x09;
    /// Status register A: bit 7 is update-in-progress.
    pub const A: u8 = 0x0a;
    /// Status register B: bit 7 SET, bit 2 binary mode, bit 1 24-hour mode.
    pub const B: u8 = 0x0b;
    /// Status register C: interrupt flags, cleared by reading.
    pub const C: u8 = 0x0c;
    /// Status register D: bit 7 says the clock's RAM and time are valid.
    pub const D: u8 = 0x0d;
    /// The century, where ACPI's FADT and Linux look for it.
    pub const CENTURY: u8 = 0x32;
}

const A_UIP: u8 = 1 << 7;
/// 32.768 kHz time base, 1024 Hz periodic rate: what firmware leaves.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 1 << 7;
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;
const D_VRT: u8 = 1 << 7;
/// Bytes of CMOS (registers and NVRAM).
const CMOS_BYTES: usize = 128;
/// The update cycle at the end of each second takes this long; UIP reads 1
/// during it, and the time registers must not be trusted.
const UPDATE_CYCLE_NANOS: u32 = 244_000;
/// Where in each second the update cycle starts.
const UPDATE_CYCLE_START_NANOS: u32 = 1_000_000_000 - UPDATE_CYCLE_NANOS;

/// Where the clock's time comes from: the host's wall clock by default.
pub trait WallClock: Send {
    /// Seconds and nanoseconds since the Unix epoch.
    fn now(&self) -> (i64, u32);
}

/// The host's `CLOCK_REALTIME`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostClock;

impl WallClock for HostClock {
    fn now(&self) -> (i64, u32) {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
            Err(_) => (0, 0),
        }
    }
}

/// A civil date and time (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday.
    pub weekday: u8,
}

impl DateTime {
    /// The date and time `secs` seconds after the Unix epoch.
    // Cannot overflow, whatever `secs`: |days| <= 2^63 / 86400 < 1.1e14, so
    // |era| < 7.4e8 and |year| < 3e11; doe, yoe, doy, mp, day and month are
    // bounded by one era (146097 days), rem by one day.
    #[allow(clippy::arithmetic_side_effects)]
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month: month as u8,
            day: day as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// Seconds since the Unix epoch (fields out of range are taken as
    /// they come, as a guest may write them).
    pub fn to_unix(&self) -> i64 {
        // Howard Hinnant's days_from_civil.
        // A year, and so a time, too far out for an i64 saturates.
        let month = i64::from(self.month.clamp(1, 12));
        let year = self.year.saturating_sub(i64::from(month <= 2));
        let era = year.div_euclid(400);
        let yoe = year.rem_euclid(400);
        // Cannot overflow: month is 1..=12, yoe 0..=399, and day, hour,
        // minute and second at most 255, so these stay below 10^6.
        #[allow(clippy::arithmetic_side_effects)]
        let (doe, second_of_day) = {
            let mp = (month + 9) % 12;
            let doy = (153 * mp + 2) / 5 + i64::from(self.day) - 1;
            (
                yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468,
                i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second),
            )
        };
        let days = era.saturating_mul(146_097).saturating_add(doe);
        days.saturating_mul(86_400).saturating_add(second_of_day)
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).saturating_mul(10).saturating_add(v & 0x0f)
}

/// An MC146818 at ports 0x70 (index; bit 7 is the NMI mask, ignored) and
/// 0x71 (data).
///
/// The time registers read the host's wall clock (UTC) plus whatever offset
/// the guest set, in BCD or binary and 12- or 24-hour format as register B
/// says; register A's update-in-progress bit is set during the last 244 µs
/// of each second, as the chip's update cycle does; register D reports a
/// valid clock. The other bytes up to 127 are NVRAM the guest may use.
/// There is no interrupt (no alarm, periodic or update-ended interrupt).
///
/// ```
/// use keel_devices::{rtc_reg, Rtc};
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let mut rtc = Rtc::new();
/// let mut read = |index: u8| {
///     rtc.pio_write(PioAddress(0x70), 0, &[index]);
///     let mut value = [0u8];
///     rtc.pio_read(PioAddress(0x70), 1, &mut value);
///     value[0]
/// };
/// let century = read(rtc_reg::CENTURY); // BCD by default: 0x20 for 20xx
/// assert_eq!(century, 0x20);
/// ```
pub struct Rtc {
    clock: Box<dyn WallClock>,
    index: u8,
    cmos: [u8; CMOS_BYTES],
    /// Seconds added to the host clock (the guest set the time).
    offset: i64,
}

/// An [`Rtc`]'s state, as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct RtcState {
    /// The index register (port 0x70).
    pub index: u8,
    /// The CMOS bytes.
    pub cmos: Vec<u8>,
    /// Seconds the guest's clock is ahead of the host's.
    pub offset: i64,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc")
            .field("index", &self.index)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// A clock on the host's wall clock, in BCD, 24-hour mode.
    pub fn new() -> Self {
        Self::with_clock(Box::new(HostClock))
    }

    /// A clock reading `clock` (for tests, or a VM whose clock is shifted).
    pub fn with_clock(clock: Box<dyn WallClock>) -> Self {
        let mut rtc = Self {
            clock,
            index: 0,
            cmos: [0u8; CMOS_BYTES],
            offset: 0,
        };
        rtc.set_cmos(rtc_reg::A, A_DEFAULT);
        rtc.set_cmos(rtc_reg::B, B_24H);
        rtc.set_cmos(rtc_reg::D, D_VRT);
        rtc
    }

    /// For a snapshot: the CMOS bytes, the index register and the guest's
    /// offset from the host clock (so a restored guest's clock keeps the
    /// time it set, relative to the host's).
    pub fn save_state(&self) -> RtcState {
        RtcState {
            index: self.index,
            cmos: self.cmos.to_vec(),
            offset: self.offset,
        }
    }

    /// Puts a saved state back; one of the wrong size is refused and
    /// nothing changes.
    pub fn restore_state(&mut self, state: &RtcState) -> crate::Result<()> {
        let cmos: [u8; CMOS_BYTES] = state
            .cmos
            .as_slice()
            .try_into()
            .map_err(|_| crate::Error::State {
                device: "RTC",
                reason: format!("{} CMOS bytes saved, the RTC has {CMOS_BYTES}", state.cmos.len()),
            })?;
        self.cmos = cmos;
        self.index = state.index;
        self.offset = state.offset;
        Ok(())
    }

    /// CMOS byte `index`. The chip decodes 7 bits of the index, so every
    /// index names one of the bytes (an index restored from a snapshot
    /// may have bit 7 set).
    fn cmos(&self, index: u8) -> u8 {
        self.cmos
            .get(usize::from(index) % CMOS_BYTES)
            .copied()
            .unwrap_or(0)
    }

    /// Sets CMOS byte `index` (see [`cmos`](Self::cmos)).
    fn set_cmos(&mut self, index: u8, value: u8) {
        if let Some(byte) = self.cmos.get_mut(usize::from(index) % CMOS_BYTES) {
            *byte = value;
        }
    }

    fn b(&self) -> u8 {
        self.cmos(rtc_reg::B)
    }

    fn encode(&self, value: u8) -> u8 {
        if self.b() & B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.b() & B_BINARY != 0 {
            value
        } else {
            from_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.b() & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.b() & B_24H != 0 {
            return self.decode(value);
        }
        let h12 = self.decode(value & 0x7f) % 12;
        if value & 0x80 != 0 {
            h12.saturating_add(12)
        } else {
            h12
        }
    }

    /// The time registers as the guest sees them now.
    fn now(&self) -> (DateTime, u32) {
        let (secs, nanos) = self.clock.now();
        (DateTime::from_unix(secs.saturating_add(self.offset)), nanos)
    }

    fn read_register(&mut self, index: u8) -> u8 {
        use rtc_reg::*;
        let frozen = self.b() & B_SET != 0;
        if !frozen
            && matches!(
                index,
                SECONDS | MINUTES | HOURS | DAY_OF_WEEK | DAY_OF_MONTH | MONTH | YEAR | CENTURY
            )
        {
            let (t, _) = self.now();
            let year = t.year.rem_euclid(100) as u8;
            let century = t.year.div_euclid(100).clamp(0, 99) as u8;
            return match index {
                SECONDS => self.encode(t.second),
                MINUTES => self.encode(t.minute),
                HOURS => self.encode_hour(t.hour),
                DAY_OF_WEEK => self.encode(t.weekday),
                DAY_OF_MONTH => self.encode(t.day),
                MONTH => self.encode(t.month),
                YEAR => self.encode(year),
                _ => self.encode(century),
            };
        }
        match index {
            A => {
                let (_, nanos) = self.now();
                let uip = if nanos >= UPDATE_CYCLE_START_NANOS {
                    A_UIP
                } else {
                    0
                };
                (self.cmos(A) & !A_UIP) | uip
            }
            C => {
                let flags = self.cmos(C);
                self.set_cmos(C, 0);
                flags
            }
            _ => self.cmos(index),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        use rtc_reg::*;
        match index {
            B => {
                let was_set = self.b() & B_SET != 0;
                if value & B_SET != 0 && !was_set {
                    // Freeze: copy the running time into the registers, in
                    // the new format, for the guest to change.
                    self.set_cmos(B, value);
                    self.snapshot_time();
                } else if value & B_SET == 0 && was_set {
                    // Run again from what the guest wrote.
                    self.set_cmos(B, value | B_SET);
                    let written = self.frozen_time();
                    self.set_cmos(B, value);
                    let (host, _) = self.clock.now();
                    self.offset = written.to_unix().saturating_sub(host);
                } else {
                    self.set_cmos(B, value);
                }
            }
            // Read-only: UIP in A, C and D.
            A => self.set_cmos(A, (value & !A_UIP) | (self.cmos(A) & A_UIP)),
            C | D => {}
            _ => self.set_cmos(index, value),
        }
    }

    fn snapshot_time(&mut self) {
        use rtc_reg::*;
        let (t, _) = self.now();
        let year = t.year.rem_euclid(100) as u8;
        let century = t.year.div_euclid(100).clamp(0, 99) as u8;
        for (index, value) in [
            (SECONDS, self.encode(t.second)),
            (MINUTES, self.encode(t.minute)),
            (HOURS, self.encode_hour(t.hour)),
            (DAY_OF_WEEK, self.encode(t.weekday)),
            (DAY_OF_MONTH, self.encode(t.day)),
            (MONTH, self.encode(t.month)),
            (YEAR, self.encode(year)),
            (CENTURY, self.encode(century)),
        ] {
            self.set_cmos(index, value);
        }
    }

    fn frozen_time(&self) -> DateTime {
        use rtc_reg::*;
        let get = |index: u8| self.cmos(index);
        let century = i64::from(self.decode(get(CENTURY)));
        let year = century
            .saturating_mul(100)
            .saturating_add(i64::from(self.decode(get(YEAR)) % 100));
        DateTime {
            year,
            month: self.decode(get(MONTH)),
            day: self.decode(get(DAY_OF_MONTH)),
            hour: self.decode_hour(get(HOURS)) % 24,
            minute: self.decode(get(MINUTES)) % 60,
            second: self.decode(get(SECONDS)) % 60,
            weekday: self.decode(get(DAY_OF_WEEK)),
        }
    }
}

impl MutDevicePio for Rtc {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (offset, data) {
            (0, [value]) => *value = self.index,
            (1, [value]) => *value = self.read_register(self.index),
            (_, data) => data.fill(crate::UNDECODED_READ),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (offset, data) {
            // Bit 7 of the index port masks NMIs on a PC; there are none.
            (0, [value]) => self.index = value & 0x7f,
            (1, [value]) => self.write_register(self.index, *value),
            _ => log::debug!("rtc: ignored {}-byte write at offset {offset}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
    use std::sync::Arc;

    /// A clock the test sets.
    #[derive(Clone, Default)]
    struct FixedClock(Arc<(AtomicI64, AtomicU32)>);

    impl FixedClock {
        fn set(&self, secs: i64, nanos: u32) {
            self.0 .0.store(secs, Ordering::SeqCst);
            self.0 .1.store(nanos, Ordering::SeqCst);
        }
    }

    impl WallClock for FixedClock {
        fn now(&self) -> (i64, u32) {
            (self.0 .0.load(Ordering::SeqCst), self.0 .1.load(Ordering::SeqCst))
        }
    }

    const PORT: PioAddress = PioAddress(0x70);

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.pio_write(PORT, 0, &[index]);
        let mut v = [0u8];
        rtc.pio_read(PORT, 1, &mut v);
        v[0]
    }

    fn write(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.pio_write(PORT, 0, &[index]);
        rtc.pio_write(PORT, 1, &[value]);
    }

    /// 2026-12-04 01:02:03 UTC, a Friday.
    const WHEN: i64 = 1_796_346_123;

    fn rtc_at(secs: i64) -> (Rtc, FixedClock) {
        let clock = FixedClock::default();
        clock.set(secs, 0);
        (Rtc::with_clock(Box::new(clock.clone())), clock)
    }

    #[test]
    fn civil_dates_round_trip_through_unix_time() {
        let t = DateTime::from_unix(WHEN);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2026, 12, 4, 1, 2, 3, 6)
        );
        assert_eq!(t.to_unix(), WHEN);
        for secs in [
            0,
            951_782_400,   /* 2000-02-29 */
            4_102_444_800, /* 2100-01-01 */
            -1,
        ] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        assert_eq!(DateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn extreme_times_convert_without_overflow() {
        for secs in [i64::MIN, i64::MAX] {
            let t = DateTime::from_unix(secs);
            assert!((1..=12).contains(&t.month) && (1..=31).contains(&t.day));
        }
        let far = |year| DateTime {
            year,
            month: 0,
            day: 255,
            hour: 255,
            minute: 255,
            second: 255,
            weekday: 0,
        };
        assert_eq!(far(i64::MAX).to_unix(), i64::MAX);
        // Saturated at the start of the day, plus the time of day.
        assert!(far(i64::MIN).to_unix() < i64::MIN + 1_000_000);
    }

    #[test]
    fn reads_the_host_time_in_bcd_24_hour_by_default() {
        let (mut rtc, _) = rtc_at(WHEN);
        assert_eq!(read(&mut rtc, rtc_reg::SECONDS), 0x03);
        assert_eq!(read(&mut rtc, rtc_reg::MINUTES), 0x02);
        assert_eq!(read(&mut rtc, rtc_reg::HOURS), 0x01);
        assert_eq!(read(&mut rtc, rtc_reg::DAY_OF_MONTH), 0x04);
        assert_eq!(read(&mut rtc, rtc_reg::MONTH), 0x12);
        assert_eq!(read(&mut rtc, rtc_reg::YEAR), 0x26);
        assert_eq!(read(&mut rtc, rtc_reg::CENTURY), 0x20);
        assert_eq!(read(&mut rtc, rtc_reg::DAY_OF_WEEK), 0x06);
        assert_eq!(read(&mut rtc, rtc_reg::D), D_VRT, "valid RAM and time");
    }

    #[test]
    fn binary_and_12_hour_modes_follow_register_b() {
        let (mut rtc, clock) = rtc_at(WHEN + 13 * 3600); // 14:02:03
        write(&mut rtc, rtc_reg::B, B_BINARY);
        assert_eq!(read(&mut rtc, rtc_reg::YEAR), 26);
        assert_eq!(read(&mut rtc, rtc_reg::HOURS), 0x80 | 2, "2 PM");
        clock.set(WHEN - 3600, 0); // 00:02:03 is 12 AM
        assert_eq!(read(&mut rtc, rtc_reg::HOURS), 12);
        write(&mut rtc, rtc_reg::B, 0);
        clock.set(WHEN + 10 * 3600, 0); // 11 AM in BCD
        assert_eq!(read(&mut rtc, rtc_reg::HOURS), 0x11);
    }

    #[test]
    fn update_in_progress_is_set_only_at_the_end_of_each_second() {
        let (mut rtc, clock) = rtc_at(WHEN);
        assert_eq!(read(&mut rtc, rtc_reg::A) & A_UIP, 0);
        clock.set(WHEN, 999_900_000);
        assert_eq!(read(&mut rtc, rtc_reg::A) & A_UIP, A_UIP);
        assert_eq!(read(&mut rtc, rtc_reg::A) & !A_UIP, A_DEFAULT);
    }

    #[test]
    fn the_guest_sets_the_time_through_the_set_bit_and_it_keeps_running() {
        let (mut rtc, clock) = rtc_at(WHEN);
        write(&mut rtc, rtc_reg::B, B_SET | B_24H);
        write(&mut rtc, rtc_reg::YEAR, 0x30);
        write(&mut rtc, rtc_reg::HOURS, 0x05);
        assert_eq!(read(&mut rtc, rtc_reg::YEAR), 0x30, "frozen while SET");
        write(&mut rtc, rtc_reg::B, B_24H);
        clock.set(WHEN + 10, 0);
        assert_eq!(read(&mut rtc, rtc_reg::YEAR), 0x30);
        assert_eq!(read(&mut rtc, rtc_reg::HOURS), 0x05);
        assert_eq!(read(&mut rtc, rtc_reg::SECONDS), 0x13, "running: 3 + 10 s");
    }

    #[test]
    fn nvram_keeps_what_the_guest_writes_and_c_clears_on_read() {
        let (mut rtc, _) = rtc_at(WHEN);
        for index in 0x0e..0x80u8 {
            if index == rtc_reg::CENTURY {
                continue;
            }
            write(&mut rtc, index, index ^ 0x5a);
        }
        for index in 0x0e..0x80u8 {
            if index == rtc_reg::CENTURY {
                continue;
            }
            assert_eq!(read(&mut rtc, index), index ^ 0x5a);
        }
        write(&mut rtc, rtc_reg::D, 0);
        assert_eq!(read(&mut rtc, rtc_reg::D), D_VRT, "D is read-only");
        assert_eq!(read(&mut rtc, rtc_reg::C), 0);
    }

    #[test]
    fn any_access_from_a_hostile_guest_is_harmless() {
        let (mut rtc, _) = rtc_at(WHEN);
        for index in 0..=255u8 {
            for value in [0u8, 0x7f, 0x80, 0xff] {
                write(&mut rtc, index, value);
                read(&mut rtc, index);
            }
        }
        for len in [0, 2, 4] {
            let mut data = vec![0; len];
            rtc.pio_read(PORT, 0, &mut data);
            rtc.pio_write(PORT, 1, &data);
            rtc.pio_read(PORT, 7, &mut data);
        }
        // Garbage written as the time while SET is taken as it comes.
        write(&mut rtc, rtc_reg::B, B_SET);
        for index in [0u8, 2, 4, 6, 7, 8, 9, 0x32] {
            write(&mut rtc, index, 0xff);
        }
        write(&mut rtc, rtc_reg::B, 0);
        read(&mut rtc, rtc_reg::YEAR);
    }

    #[test]
    fn a_saved_rtc_keeps_the_guests_offset_and_cmos_bytes() {
        let (mut original, _) = rtc_at(WHEN);
        // The guest sets the clock an hour ahead and a CMOS byte.
        original.offset = 3600;
        original.cmos[0x40] = 0x77;
        let state = original.save_state();
        let (mut restored, _) = rtc_at(WHEN);
        restored.restore_state(&state).unwrap();
        assert_eq!(read(&mut restored, rtc_reg::HOURS), 0x02);
        assert_eq!(read(&mut restored, 0x40), 0x77);
        let bad = RtcState {
            cmos: vec![0; 3],
            ..state
        };
        assert_eq!(
            restored.restore_state(&bad).unwrap_err().to_string(),
            "RTC state: 3 CMOS bytes saved, the RTC has 128"
        );
    }
}
