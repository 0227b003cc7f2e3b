//! Volatile access to a device's MMIO registers.

use core::ptr::{read_volatile, write_volatile};

/// A device register window at a guest-physical address, which the guest's
/// identity map makes the same virtual address.
#[derive(Clone, Copy)]
pub struct MmioRegion {
    base: u64,
}

impl MmioRegion {
    /// # Safety
    ///
    /// `base` and every offset later used must be identity-mapped (see
    /// `ring0::IDENTITY_MAPPED`) and must not be RAM this guest uses; the
    /// caller checks both for addresses it got from the command line.
    pub unsafe fn new(base: u64) -> Self {
        Self { base }
    }

    /// Base address of the window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads the 32-bit register at `offset` (4-byte aligned).
    pub fn read32(&self, offset: u64) -> u32 {
        // SAFETY: `new`'s contract: mapped device memory, not Rust-owned RAM.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    /// Writes the 32-bit register at `offset` (4-byte aligned).
    pub fn write32(&self, offset: u64, value: u32) {
        // SAFETY: `new`'s contract: mapped device memory, not Rust-owned RAM.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }
}
