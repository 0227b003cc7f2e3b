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
    /// Counted against 20 ms of PIT channel 2.
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

/// PIT input clock.
const PIT_HZ: u64 = 1_193_182;
/// PIT counts between the two samples: 20 ms.
const PIT_WINDOW: u64 = PIT_HZ / 50;
/// Longest a sample may take, in TSC ticks (100 µs at 2 GHz, 10 µs at
/// 20 GHz); a slower one was interrupted and is taken again.
const SAMPLE_MAX_TICKS: u64 = 200_000;
/// Samples after which a count that never moved means there is no PIT (a
/// split irqchip has none: its ports read as whatever the VMM answers,
/// typically 0xff). A real PIT moves every 0.84 µs, well within a sample.
const PIT_MAX_STILL_SAMPLES: u32 = 1000;

/// Reads PIT channel 2's count between two TSC reads: (TSC at the middle,
/// count), or `None` if the read took too long.
fn pit_sample() -> Option<(u64, u64)> {
    let before = now();
    outb(0x43, 0x80); // latch channel 2's count
    let low = inb(0x42);
    let high = inb(0x42);
    let after = now();
    let took = after.wrapping_sub(before);
    (took < SAMPLE_MAX_TICKS).then(|| (before + took / 2, u64::from(high) << 8 | u64::from(low)))
}

fn pit_sample_retrying() -> Option<(u64, u64)> {
    (0..100).find_map(|_| pit_sample())
}

/// Lets PIT channel 2 count down from 0xffff (mode 0, gate on through port
/// 0x61) and samples (TSC, count) twice, 20 ms apart. Both clocks run on
/// while the vCPU is preempted between the samples, so only the samples
/// themselves must be quick (they are retried when they are not). Bounded:
/// `None` if the count does not move within [`PIT_MAX_STILL_SAMPLES`]
/// samples (no PIT) or the window does not pass within 200 ms at 20 GHz.
fn calibrate_with_pit() -> Option<u64> {
    outb(0x61, (inb(0x61) & !0x02) | 0x01); // gate high, speaker off
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, 0xff);
    outb(0x42, 0xff);
    let (start_tsc, start_count) = pit_sample_retrying()?;
    let deadline = start_tsc.wrapping_add(4_000_000_000); // 200 ms at 20 GHz
    let mut still = 0;
    loop {
        let (tsc, count) = pit_sample_retrying()?;
        if count == start_count {
            still += 1;
            if still >= PIT_MAX_STILL_SAMPLES {
                return None;
            }
        }
        // The count only goes down within the window (55 ms to wrap).
        let counted = start_count.wrapping_sub(count) & 0xffff;
        if counted >= PIT_WINDOW {
            return Some(tsc.wrapping_sub(start_tsc) * PIT_HZ / counted);
        }
        if tsc.wrapping_sub(deadline) < u64::MAX / 2 {
            return None;
        }
    }
}
