//! Handing out the IOAPIC's pins (GSIs) to devices.

use crate::{Error, Result};

/// Number of pins on the IOAPIC that KVM emulates: GSIs `0..IOAPIC_PINS`.
pub const IOAPIC_PINS: u32 = 24;

/// The GSIs that legacy ISA devices hardwire, which
/// [`GsiAllocator::allocate`] never hands out: 0 (PIT timer), 1 (i8042
/// keyboard), 2 (PIC cascade), 3 and 4 (COM2/COM4 and COM1/COM3), 8 (RTC),
/// 12 (i8042 mouse), 14 and 15 (IDE).
///
/// A device that really sits on one of them (a 16550 on COM1 uses 4) takes it
/// by number with [`GsiAllocator::reserve`].
pub const LEGACY_ISA_GSIS: [u32; 9] = [0, 1, 2, 3, 4, 8, 12, 14, 15];

/// Hands out GSIs from the IOAPIC's 24 pins.
///
/// [`allocate`](Self::allocate) returns the lowest free GSI that no legacy ISA
/// device claims (5, 6, 7, 9, 10, 11, 13, then 16 to 23: 15 in all), so a
/// virtio device never lands on the pin a guest expects its serial port or
/// clock on. [`reserve`](Self::reserve) takes a specific GSI, legacy or not,
/// for devices whose interrupt is fixed by convention.
///
/// The allocator only keeps books; wiring a GSI to an eventfd is
/// [`crate::IrqfdLine`]'s job.
///
/// # Example
///
/// ```
/// use keel_irq::GsiAllocator;
///
/// let mut gsis = GsiAllocator::new();
/// gsis.reserve(4).unwrap(); // COM1's IRQ, by convention
/// assert_eq!(gsis.allocate().unwrap(), 5); // the first non-legacy GSI
/// assert!(gsis.reserve(4).is_err()); // already taken
/// ```
#[derive(Debug, Clone, Default)]
pub struct GsiAllocator {
    /// Bit `n` set: GSI `n` is allocated or reserved.
    in_use: u32,
}

impl GsiAllocator {
    /// An allocator with every GSI free.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the lowest free GSI outside [`LEGACY_ISA_GSIS`].
    pub fn allocate(&mut self) -> Result<u32> {
        let gsi = (0..IOAPIC_PINS)
            .find(|&gsi| !is_legacy(gsi) && !self.is_in_use(gsi))
            .ok_or(Error::GsiExhausted)?;
        self.in_use |= 1 << gsi;
        log::debug!("allocated GSI {gsi}");
        Ok(gsi)
    }

    /// Takes `gsi` itself, which may be one of the [`LEGACY_ISA_GSIS`].
    ///
    /// Fails if `gsi` is not an IOAPIC pin, or if it was already reserved or
    /// allocated.
    pub fn reserve(&mut self, gsi: u32) -> Result<()> {
        if gsi >= IOAPIC_PINS {
            return Err(Error::GsiOutOfRange { gsi });
        }
        if self.is_in_use(gsi) {
            return Err(Error::GsiInUse { gsi });
        }
        self.in_use |= 1 << gsi;
        log::debug!("reserved GSI {gsi}");
        Ok(())
    }

    /// Whether `gsi` has been allocated or reserved. GSIs outside the
    /// IOAPIC's range are never in use.
    pub fn is_in_use(&self, gsi: u32) -> bool {
        gsi < IOAPIC_PINS && self.in_use & (1 << gsi) != 0
    }
}

fn is_legacy(gsi: u32) -> bool {
    LEGACY_ISA_GSIS.contains(&gsi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_non_legacy_gsis_in_order() {
        let mut gsis = GsiAllocator::new();
        let all: Vec<u32> = std::iter::from_fn(|| gsis.allocate().ok()).collect();
        assert_eq!(all, [5, 6, 7, 9, 10, 11, 13, 16, 17, 18, 19, 20, 21, 22, 23]);
    }

    #[test]
    fn never_allocates_a_legacy_isa_gsi() {
        let mut gsis = GsiAllocator::new();
        while let Ok(gsi) = gsis.allocate() {
            assert!(!LEGACY_ISA_GSIS.contains(&gsi), "allocated legacy GSI {gsi}");
        }
        for gsi in LEGACY_ISA_GSIS {
            assert!(!gsis.is_in_use(gsi), "GSI {gsi}");
        }
    }

    #[test]
    fn reports_exhaustion_naming_the_range() {
        let mut gsis = GsiAllocator::new();
        for _ in 0..15 {
            gsis.allocate().unwrap();
        }
        let err = gsis.allocate().unwrap_err();
        assert!(matches!(err, Error::GsiExhausted), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("0..=23"), "{message}");
        assert!(message.contains("[0, 1, 2, 3, 4, 8, 12, 14, 15]"), "{message}");
    }

    #[test]
    fn reserves_a_legacy_gsi_on_request() {
        let mut gsis = GsiAllocator::new();
        gsis.reserve(4).unwrap();
        assert!(gsis.is_in_use(4));
    }

    #[test]
    fn rejects_reserving_the_same_gsi_twice() {
        let mut gsis = GsiAllocator::new();
        gsis.reserve(4).unwrap();
        let err = gsis.reserve(4).unwrap_err();
        assert!(matches!(err, Error::GsiInUse { gsi: 4 }), "{err:?}");
        assert_eq!(err.to_string(), "GSI 4 is already in use");
    }

    #[test]
    fn rejects_reserving_an_allocated_gsi() {
        let mut gsis = GsiAllocator::new();
        let gsi = gsis.allocate().unwrap();
        assert!(matches!(gsis.reserve(gsi), Err(Error::GsiInUse { .. })));
    }

    #[test]
    fn allocation_skips_reserved_gsis() {
        let mut gsis = GsiAllocator::new();
        gsis.reserve(5).unwrap();
        gsis.reserve(6).unwrap();
        assert_eq!(gsis.allocate().unwrap(), 7);
    }

    #[test]
    fn rejects_reserving_a_gsi_past_the_ioapic() {
        let mut gsis = GsiAllocator::new();
        let err = gsis.reserve(24).unwrap_err();
        assert!(matches!(err, Error::GsiOutOfRange { gsi: 24 }), "{err:?}");
        assert_eq!(err.to_string(), "GSI 24 is outside the IOAPIC's range 0..=23");
        assert!(gsis.reserve(u32::MAX).is_err());
        assert!(!gsis.is_in_use(u32::MAX));
    }
}
