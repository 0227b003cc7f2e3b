//! The x86_64 guest physical address map Keel uses.

use crate::{Error, GuestMemoryMmap, Result, GIB, MIB};
use vm_memory::GuestAddress;

/// Start of the 32-bit MMIO gap: guest RAM never lies in
/// `[MMIO_GAP_START, 4 GiB)`.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap; RAM above the gap starts here.
pub const MMIO_GAP_END: u64 = 4 * GIB;
/// Part of the gap handed out to devices (virtio-mmio, user devices).
/// `[MMIO_GAP_START, MMIO_DEVICES_START)` is kept free for a PCI ECAM window.
pub const MMIO_DEVICES_START: u64 = 0xD000_0000;
/// End (exclusive) of the device window: the IOAPIC sits at 0xFEC0_0000 and
/// the local APIC at 0xFEE0_0000.
pub const MMIO_DEVICES_END: u64 = 0xFEC0_0000;
/// Where the in-kernel IOAPIC decodes.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Where the local APIC decodes.
pub const LAPIC_START: u64 = 0xFEE0_0000;

/// The GDT the boot path installs for a 64-bit entry.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// The (empty) IDT the boot path installs.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// Linux's zero page (`struct boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for a 64-bit entry.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Identity page tables for the 64-bit entry: PML4, PDPT, PD.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table of the boot page tables.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// Page directory of the boot page tables (512 × 2 MiB = the first 1 GiB).
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// PVH start info (`hvm_start_info`) and its memory map.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line, NUL included (Linux x86's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table goes here and
/// `[EBDA_START, HIMEM_START)` is reported reserved.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// First address above the legacy hole; kernels load at or above it.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// Smallest guest Keel builds: room for the boot structures and a small
/// kernel at 1 MiB.
pub const MIN_MEMORY: u64 = 2 * MIB;
/// Largest guest this layout is built for.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Where a guest of a given size has RAM.
///
/// RAM fills `[0, MMIO_GAP_START)` first and continues at 4 GiB, so the
/// 32-bit MMIO gap is never RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    mem_size: u64,
}

impl GuestLayout {
    /// A layout for `mem_size` bytes of RAM. The size must be a multiple of
    /// 4 KiB within [`MIN_MEMORY`]..=[`MAX_MEMORY`].
    pub fn new(mem_size: u64) -> Result<Self> {
        if mem_size < MIN_MEMORY {
            return Err(Error::MemoryTooSmall { size: mem_size });
        }
        if mem_size > MAX_MEMORY {
            return Err(Error::MemoryTooLarge { size: mem_size });
        }
        if !mem_size.is_multiple_of(4096) {
            return Err(Error::MemoryNotAligned { size: mem_size });
        }
        Ok(GuestLayout { mem_size })
    }

    /// Total RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The RAM ranges `(start, length)`, in address order.
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, u64)> {
        let low = self.mem_size.min(MMIO_GAP_START);
        let mut ranges = vec![(GuestAddress(0), low)];
        if self.mem_size > MMIO_GAP_START {
            ranges.push((GuestAddress(MMIO_GAP_END), self.mem_size - MMIO_GAP_START));
        }
        ranges
    }

    /// First address past the end of RAM.
    pub fn ram_end(&self) -> GuestAddress {
        let (start, len) = *self.ram_ranges().last().expect("at least one range");
        GuestAddress(start.0 + len)
    }

    /// End (exclusive) of the RAM below 4 GiB.
    pub fn low_ram_end(&self) -> GuestAddress {
        GuestAddress(self.mem_size.min(MMIO_GAP_START))
    }

    /// Maps anonymous, unreserved host memory for this layout. No guest page
    /// is touched.
    pub fn create_memory(&self) -> Result<GuestMemoryMmap> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .ram_ranges()
            .into_iter()
            .map(|(start, len)| (start, len as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).map_err(|source| Error::Map {
            size: self.mem_size,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_has_one_range_from_zero() {
        let layout = GuestLayout::new(128 * MIB).unwrap();
        assert_eq!(layout.ram_ranges(), vec![(GuestAddress(0), 128 * MIB)]);
        assert_eq!(layout.ram_end(), GuestAddress(128 * MIB));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let layout = GuestLayout::new(4 * GIB).unwrap();
        assert_eq!(
            layout.ram_ranges(),
            vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(4 * GIB), GIB)]
        );
        assert_eq!(layout.ram_end(), GuestAddress(5 * GIB));
        assert_eq!(layout.low_ram_end(), GuestAddress(MMIO_GAP_START));
    }

    #[test]
    fn guest_exactly_filling_low_memory_has_no_high_range() {
        let layout = GuestLayout::new(MMIO_GAP_START).unwrap();
        assert_eq!(layout.ram_ranges().len(), 1);
    }

    #[test]
    fn rejects_zero_memory() {
        let err = GuestLayout::new(0).unwrap_err();
        assert!(matches!(err, Error::MemoryTooSmall { size: 0 }));
        assert!(err.to_string().contains("must be at least 2 MiB"), "{err}");
    }

    #[test]
    fn rejects_absurd_memory() {
        let err = GuestLayout::new(1 << 50).unwrap_err();
        assert!(matches!(err, Error::MemoryTooLarge { .. }));
        assert!(err.to_string().contains("1073741824 MiB"), "{err}");
    }

    #[test]
    fn rejects_unaligned_memory() {
        assert!(matches!(
            GuestLayout::new(4 * MIB + 1),
            Err(Error::MemoryNotAligned { .. })
        ));
    }

    #[test]
    fn device_window_is_inside_the_gap_and_below_the_ioapic() {
        const { assert!(MMIO_GAP_START <= MMIO_DEVICES_START) };
        const { assert!(MMIO_DEVICES_END <= IOAPIC_START) };
        const { assert!(IOAPIC_START < LAPIC_START && LAPIC_START < MMIO_GAP_END) };
    }

    #[test]
    fn created_memory_matches_the_layout() {
        let layout = GuestLayout::new(4 * GIB).unwrap();
        let mem = layout.create_memory().unwrap();
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, MMIO_GAP_START), (4 * GIB, GIB)]);
    }
}
