//! Enabling interrupts for ring 3 and reading what the ring-0 stubs counted.

use core::sync::atomic::Ordering;

use crate::ring0::{BREAKPOINTS, IRQ_COUNTS};
use crate::service::{self, Request};

/// Sets RFLAGS.IF, through ring 0 (see [`Request::EnableInterrupts`]).
pub fn enable() {
    service::call(Request::EnableInterrupts);
}

/// Interrupts taken so far on IOAPIC pin `irq` (0–23; 0 for any other).
pub fn irq_count(irq: u8) -> u64 {
    IRQ_COUNTS
        .get(usize::from(irq))
        .map_or(0, |count| count.load(Ordering::SeqCst))
}

/// `#BP` exceptions taken so far.
pub fn breakpoint_count() -> u64 {
    BREAKPOINTS.load(Ordering::SeqCst)
}
