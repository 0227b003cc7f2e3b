//! The PC's standard I/O port assignments for the devices in this crate.
//!
//! A VMM may put the devices anywhere; these are where a guest looks for
//! them without being told.

use vm_device::bus::{PioAddress, PioRange};

use crate::{Error, Result};

/// First port of the first serial port (COM1).
pub const COM1: u16 = 0x3f8;
/// First port of COM2.
pub const COM2: u16 = 0x2f8;
/// First port of COM3.
pub const COM3: u16 = 0x3e8;
/// First port of COM4.
pub const COM4: u16 = 0x2e8;
/// ISA interrupt (and GSI) of COM1 (shared with COM3 on real hardware).
pub const COM1_IRQ: u32 = 4;
/// ISA interrupt (and GSI) of COM2 (shared with COM4 on real hardware).
pub const COM2_IRQ: u32 = 3;
/// Number of ports a 16550 decodes: one per register.
pub const SERIAL_PORT_COUNT: u16 = 8;

/// First port of the i8042 controller: 0x60 (data), 0x61 (PC speaker and
/// NMI status), 0x64 (status on read, command on write).
pub const I8042: u16 = 0x60;
/// Number of ports from [`I8042`] to the command port 0x64, inclusive.
pub const I8042_PORT_COUNT: u16 = 5;

/// Default port of the [`ExitPort`](crate::ExitPort), the one QEMU's
/// `isa-debug-exit` uses.
pub const EXIT_PORT: u16 = 0xf4;

/// The range `base..base + count`, checked: fails when `count` is 0 or the
/// range runs past port 0xffff.
pub fn pio_range(base: u16, count: u16) -> Result<PioRange> {
    PioRange::new(PioAddress(base), count).map_err(|_| Error::InvalidPortRange { base, count })
}

/// COM1's eight ports, 0x3f8..=0x3ff.
pub fn com1_range() -> PioRange {
    fixed_range(COM1, SERIAL_PORT_COUNT)
}

/// The i8042's ports, 0x60..=0x64.
pub fn i8042_range() -> PioRange {
    fixed_range(I8042, I8042_PORT_COUNT)
}

/// The exit port, 0xf4.
pub fn exit_port_range() -> PioRange {
    PioRange::unit(PioAddress(EXIT_PORT))
}

// Cannot panic: only called with the constants above, which are neither
// empty nor wrap (the tests build each of them).
#[allow(clippy::expect_used)]
fn fixed_range(base: u16, count: u16) -> PioRange {
    pio_range(base, count).expect("standard port ranges are valid")
}

/// The CMOS real-time clock's index port (the data port follows).
pub const RTC: u16 = 0x70;
/// The CMOS clock's two ports.
pub const RTC_PORT_COUNT: u16 = 2;
/// The ACPI sleep control register (the status register follows).
pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
/// The ACPI sleep registers' two ports.
pub const ACPI_SLEEP_PORT_COUNT: u16 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_ranges_cover_their_ports() {
        let com1 = com1_range();
        assert_eq!((com1.base().0, com1.last().0), (0x3f8, 0x3ff));
        let i8042 = i8042_range();
        assert_eq!((i8042.base().0, i8042.last().0), (0x60, 0x64));
        let exit = exit_port_range();
        assert_eq!((exit.base().0, exit.last().0), (0xf4, 0xf4));
    }

    #[test]
    fn rejects_empty_and_wrapping_ranges_naming_them() {
        let err = pio_range(0x3f8, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "I/O port range at 0x3f8 with 0 ports is empty or runs past port 0xffff"
        );
        assert!(pio_range(0xfffc, 8).is_err());
        assert!(pio_range(0xfff8, 8).is_ok());
    }
}
