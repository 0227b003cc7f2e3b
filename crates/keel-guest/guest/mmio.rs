//! Volatile access to a device's MMIO registers.

use core::ptr::{read_volatile, write_volatile};

use crate::boot_params::BootParams;
use crate::ring0::IDENTITY_MAPPED;

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

    /// Reads the 16-bit register at `offset` (2-byte aligned).
    pub fn read16(&self, offset: u64) -> u16 {
        // SAFETY: `new`'s contract: mapped device memory, not Rust-owned RAM.
        unsafe { read_volatile((self.base + offset) as *const u16) }
    }

    /// Writes the 16-bit register at `offset` (2-byte aligned).
    pub fn write16(&self, offset: u64, value: u16) {
        // SAFETY: `new`'s contract: mapped device memory, not Rust-owned RAM.
        unsafe { write_volatile((self.base + offset) as *mut u16, value) }
    }

    /// Reads the 8-bit register at `offset`.
    pub fn read8(&self, offset: u64) -> u8 {
        // SAFETY: `new`'s contract: mapped device memory, not Rust-owned RAM.
        unsafe { read_volatile((self.base + offset) as *const u8) }
    }

    /// Writes the 8-bit register at `offset`.
    pub fn write8(&self, offset: u64, value: u8) {
        // SAFETY: `new`'s contract: mapped device memory, not Rust-owned RAM.
        unsafe { write_volatile((self.base + offset) as *mut u8, value) }
    }

    /// The region `offset` bytes further on.
    pub fn offset(&self, offset: u64) -> MmioRegion {
        MmioRegion {
            base: self.base + offset,
        }
    }
}

/// The register window of `len` bytes at `addr`, checked to be 4-byte
/// aligned, identity-mapped and not guest RAM; the error says why not.
pub fn checked_window(
    params: &BootParams,
    addr: u64,
    len: u64,
) -> Result<MmioRegion, &'static str> {
    if !addr.is_multiple_of(4) {
        return Err("is not 4-byte aligned");
    }
    let end = addr.saturating_add(len);
    if !IDENTITY_MAPPED
        .iter()
        .any(|&(start, stop)| start <= addr && end <= stop)
    {
        return Err("is outside the guest's identity map (0-1 GiB and 3-4 GiB)");
    }
    if params.overlaps_ram(addr, len) {
        return Err("is guest RAM according to the e820 map");
    }
    // SAFETY: identity-mapped and not RAM, checked just above.
    Ok(unsafe { MmioRegion::new(addr) })
}
