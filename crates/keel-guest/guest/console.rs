//! `print!`/`println!` over the serial port.

use core::fmt;

use crate::serial;

/// A `fmt::Write` sink that sends text to COM1, with `\n` as `\r\n` so a
/// terminal in raw mode shows lines properly.
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                serial::write_byte(b'\r');
            }
            serial::write_byte(byte);
        }
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        // Console::write_str never fails.
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}
