//! The e820 memory map reported to the guest.

use keel_memory::{GuestLayout, EBDA_START, HIMEM_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The map for `layout`: low RAM up to the EBDA, the legacy hole reserved,
/// then RAM from 1 MiB up to the MMIO gap and above 4 GiB.
pub fn e820_map(layout: &GuestLayout) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START.0,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START.0,
            size: HIMEM_START.0 - EBDA_START.0,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in layout.ram_ranges() {
        let end = start.0 + len;
        let start = start.0.max(HIMEM_START.0);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::{GIB, MIB, MMIO_GAP_START};

    #[test]
    fn small_guest_map_has_low_ram_hole_and_high_ram() {
        let map = e820_map(&GuestLayout::new(128 * MIB).unwrap());
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_guest_map_skips_the_mmio_gap() {
        let map = e820_map(&GuestLayout::new(6 * GIB).unwrap());
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: MMIO_GAP_START - 0x10_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 * GIB,
                size: 6 * GIB - MMIO_GAP_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn no_ram_entry_overlaps_another() {
        let map = e820_map(&GuestLayout::new(3 * GIB + 4096).unwrap());
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:x?}");
        }
    }
}
