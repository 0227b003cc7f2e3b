//! The time-stamp counter, the guest's only clock (read natively in ring 3).

use core::arch::asm;

/// Current TSC value.
pub fn now() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc touches no memory; CR4.TSD is clear, so ring 3 may use it.
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    u64::from(high) << 32 | u64::from(low)
}
