//! The time-stamp counter, the guest's only clock (read natively in ring 3),
//! and its frequency.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::port::{inb, outb};

/// Current TSC value.
pub fn now() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: rdtsc touches no memory; CR4.TSD is clear, so ring 3 may use it.
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    }
    u64::from(high) << 32 | u64::from(low)
}

/// Where a TSC frequency came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// CPUID leaf 0x40000010 (hypervisor timing information), EAX in kHz.
    HypervisorLeaf,
    /// CPUID leaf 0x15: crystal frequency times the TSC/crystal ratio.
    Cpuid15,
    /// CPUID leaf 0x16: the processor base frequency in MHz.
    Cpuid16,
    /// Counted against 10 ms of PIT channel 2.
    Pit,
}

impl Source {
    pub fn describe(self) -> &'static str {
        match self {
            Self::HypervisorLeaf => "CPUID 0x40000010",
            Self::Cpuid15 => "CPUID 0x15",
            Self::Cpuid16 => "CPUID 0x16 base frequency",
            Self::Pit => "calibrated against the PIT",
        }
    }
}

/// The TSC frequency in Hz and where it came from, or `None` when no source
/// gave a plausible value (100 MHz – 20 GHz). Determined once.
pub fn frequency() -> Option<(u64, Source)> {
    static CACHED: AtomicU64 = AtomicU64::new(0);
    const SOURCES: [Source; 4] = [
        Source::HypervisorLeaf,
        Source::Cpuid15,
        Source::Cpuid16,
        Source::Pit,
    ];
    let cached = CACHED.load(Ordering::Relaxed);
    if cached == u64::MAX {
        return None;
    }
    if cached != 0 {
        return Some((cached >> 3, SOURCES[(cached & 7) as usize]));
    }
    let plausible = |hz: u64| (100_000_000..=20_000_000_000).contains(&hz);
    let found = SOURCES
        .iter()
        .enumerate()
        .find_map(|(i, &source)| probe(source).filter(|&hz| plausible(hz)).map(|hz| (hz, i)));
    match found {
        Some((hz, i)) => {
            CACHED.store(hz << 3 | i as u64, Ordering::Relaxed);
            Some((hz, SOURCES[i]))
        }
        None => {
            CACHED.store(u64::MAX, Ordering::Relaxed);
            None
        }
    }
}

/// TSC ticks in `ms` milliseconds, assuming 3 GHz when the frequency is
/// unknown (for timeouts, where being off by a small factor is fine).
pub fn ticks_per_ms(ms: u64) -> u64 {
    let hz = frequency().map_or(3_000_000_000, |(hz, _)| hz);
    hz / 1000 * ms
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid touches no memory. RBX is reserved by LLVM, so it is
    // saved in another register around the instruction.
    unsafe {
        asm!(
            "mov {b:r}, rbx",
            "cpuid",
            "xchg {b:r}, rbx",
            b = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0 => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags),
        );
    }
    (a, b, c, d)
}

fn probe(source: Source) -> Option<u64> {
    match source {
        Source::HypervisorLeaf => {
            // CPUID.1:ECX bit 31: running under a hypervisor.
            if cpuid(1).2 & (1 << 31) == 0 || cpuid(0x4000_0000).0 < 0x4000_0010 {
                return None;
            }
            Some(u64::from(cpuid(0x4000_0010).0) * 1000)
        }
        Source::Cpuid15 => {
            if cpuid(0).0 < 0x15 {
                return None;
            }
            let (denominator, numerator, crystal_hz, _) = cpuid(0x15);
            if denominator == 0 || numerator == 0 || crystal_hz == 0 {
                return None;
            }
            Some(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator))
        }
        Source::Cpuid16 => {
            if cpuid(0).0 < 0x16 {
                return None;
            }
            Some(u64::from(cpuid(0x16).0 & 0xffff) * 1_000_000)
        }
        Source::Pit => calibrate_with_pit(),
    }
}

/// Counts TSC ticks over 10 ms of PIT channel 2 in mode 0 (gate through
/// port 0x61, output read back in its bit 5), as Linux's early calibration
/// does. Bounded: `None` if the output never rises.
fn calibrate_with_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const LATCH: u64 = PIT_HZ / 100;
    // Gate high, speaker off.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, (LATCH & 0xff) as u8);
    outb(0x42, (LATCH >> 8) as u8);
    let start = now();
    loop {
        let elapsed = now().wrapping_sub(start);
        if inb(0x61) & 0x20 != 0 {
            return Some(elapsed * 100);
        }
        // 10 ms at 20 GHz: no plausible TSC takes longer.
        if elapsed > 200_000_000 {
            return None;
        }
    }
}
