//! The x86_64 guest physical address map Keel uses.

use crate::{Error, GuestMemoryMmap, Result, GIB, MIB};
use vm_memory::GuestAddress;

/// Start of the 32-bit MMIO gap: guest RAM never lies in
/// `[MMIO_GAP_START, 4 GiB)`.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO gap; RAM above the gap starts here.
pub const MMIO_GAP_END: u64 = 4 * GIB;
/// The PCI configuration window (ECAM, PCI Express "enhanced configuration
/// access mechanism"): 4 KiB of configuration space per function, 1 MiB per
/// bus, at the start of the gap. ACPI's MCFG table points here.
pub const PCI_ECAM_START: u64 = 0xC000_0000;
/// Size of the ECAM window: buses 0–255.
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Part of the gap handed out to devices that are not on PCI (virtio-mmio,
/// user devices), right after the ECAM window.
pub const MMIO_DEVICES_START: u64 = PCI_ECAM_START + PCI_ECAM_SIZE;
/// End (exclusive) of the non-PCI device window; the 32-bit PCI window
/// follows.
pub const MMIO_DEVICES_END: u64 = 0xE000_0000;
/// The 32-bit PCI memory window: PCI BARs below 4 GiB are allocated here,
/// and the PCI host bridge forwards this range to its bus.
pub const PCI_MMIO32_START: u64 = MMIO_DEVICES_END;
/// End (exclusive) of the 32-bit PCI window: the IOAPIC sits at
/// 0xFEC0_0000 and the local APIC at 0xFEE0_0000.
pub const PCI_MMIO32_END: u64 = 0xFEC0_0000;
/// Size of the 64-bit PCI memory window, which starts above RAM (see
/// [`GuestLayout::pci_mmio64_window`]).
pub const PCI_MMIO64_SIZE: u64 = 64 * GIB;
/// Where the in-kernel IOAPIC decodes.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Where the local APIC decodes.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// The ACPI generic event device's register page (after the local APIC's
/// megabyte, below the BIOS area).
pub const ACPI_GED_START: u64 = 0xFEF0_0000;

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

    /// The 64-bit PCI memory window `(start, size)`: [`PCI_MMIO64_SIZE`]
    /// bytes from the first 1 GiB boundary at or above both 4 GiB and the
    /// end of RAM, so it never overlaps RAM or the 32-bit gap.
    ///
    /// ```
    /// use keel_memory::{GuestLayout, GIB, MIB, PCI_MMIO64_SIZE};
    /// let small = GuestLayout::new(256 * MIB).unwrap();
    /// assert_eq!(small.pci_mmio64_window(), (4 * GIB, PCI_MMIO64_SIZE));
    /// let large = GuestLayout::new(4 * GIB + 4096).unwrap(); // RAM up to 5 GiB + 4 KiB
    /// assert_eq!(large.pci_mmio64_window().0, 6 * GIB);
    /// ```
    pub fn pci_mmio64_window(&self) -> (u64, u64) {
        let end = self.ram_end().0.max(MMIO_GAP_END);
        (end.next_multiple_of(GIB), PCI_MMIO64_SIZE)
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
        const { assert!(PCI_MMIO32_END <= IOAPIC_START) };
    }

    #[test]
    fn pci_windows_do_not_overlap_each_other_or_the_device_window() {
        const { assert!(PCI_ECAM_START == MMIO_GAP_START) };
        const { assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= MMIO_DEVICES_START) };
        const { assert!(MMIO_DEVICES_END <= PCI_MMIO32_START) };
        const { assert!(PCI_MMIO32_START < PCI_MMIO32_END) };
        for size in [MIN_MEMORY, 3 * GIB, 4 * GIB, 5 * GIB + 4096, MAX_MEMORY] {
            let layout = GuestLayout::new(size).unwrap();
            let (start, len) = layout.pci_mmio64_window();
            assert!(start >= layout.ram_end().0 && start >= MMIO_GAP_END, "{size:#x}");
            assert!(start.is_multiple_of(GIB) && len == PCI_MMIO64_SIZE);
        }
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
