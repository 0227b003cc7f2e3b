//! Ending the VM: a status byte on the exit port, or a reset through the i8042.

use core::hint::spin_loop;

use crate::abi::EXIT_PORT;
use crate::port::outb;

/// Ends the VM with `status` (see the `STATUS_*` constants).
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    // A VMM without the exit port lets us continue; there is nothing left to do.
    loop {
        spin_loop();
    }
}

/// Asks the i8042 keyboard controller to pulse the CPU reset line. Returns
/// only if the VMM did not reset the VM within a bounded wait.
pub fn reset() {
    outb(0x64, 0xfe);
    for _ in 0..10_000_000 {
        spin_loop();
    }
}
