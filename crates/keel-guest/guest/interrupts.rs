//! Enabling interrupts from ring 3 and reading what the ring-0 stubs counted.

use core::arch::asm;
use core::sync::atomic::Ordering;

use crate::ring0::{BREAKPOINTS, IRQ_COUNTS};

/// Sets RFLAGS.IF; IOPL 3 lets ring 3 do that.
pub fn enable() {
    // SAFETY: `sti` only changes IF; the IDT is loaded before ring 3 runs.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Interrupts taken so far on PIC IRQ line `irq` (0–15).
pub fn irq_count(irq: u8) -> u64 {
    IRQ_COUNTS[usize::from(irq & 15)].load(Ordering::SeqCst)
}

/// `#BP` exceptions taken so far.
pub fn breakpoint_count() -> u64 {
    BREAKPOINTS.load(Ordering::SeqCst)
}
