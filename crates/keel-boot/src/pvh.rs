//! The PVH boot protocol's `hvm_start_info`: the alternative to the zero
//! page for kernels with a `XEN_ELFNOTE_PHYS32_ENTRY` note.

use keel_memory::{GuestLayout, GuestMemoryMmap, CMDLINE_START, PVH_INFO_START};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use crate::{e820_map, Error, Result};

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes `hvm_start_info` at [`PVH_INFO_START`], followed by the module
/// list (the initrd) and the memory map, with the ACPI RSDP's address if
/// there are tables. `EBX` must point at it on entry.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    initrd: Option<(GuestAddress, u64)>,
    acpi_rsdp: Option<GuestAddress>,
) -> Result<GuestAddress> {
    let start_info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = GuestAddress(PVH_INFO_START.0 + start_info_size);
    let mut memmap_addr = modlist_addr;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: acpi_rsdp.map_or(0, |a| a.0),
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        mem.write_obj(module, modlist_addr)
            .map_err(|source| Error::GuestMemory {
                what: "PVH module list",
                addr: modlist_addr.0,
                source,
            })?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr.0;
        memmap_addr = GuestAddress(modlist_addr.0 + std::mem::size_of::<hvm_modlist_entry>() as u64);
    }
    let map = e820_map(layout);
    for (i, entry) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        let at = GuestAddress(memmap_addr.0 + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64);
        mem.write_obj(e, at).map_err(|source| Error::GuestMemory {
            what: "PVH memory map",
            addr: at.0,
            source,
        })?;
    }
    start_info.memmap_paddr = memmap_addr.0;
    start_info.memmap_entries = map.len() as u32;
    mem.write_obj(start_info, PVH_INFO_START)
        .map_err(|source| Error::GuestMemory {
            what: "PVH start info",
            addr: PVH_INFO_START.0,
            source,
        })?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::MIB;

    #[test]
    fn start_info_points_at_cmdline_memmap_and_initrd() {
        let layout = GuestLayout::new(64 * MIB).unwrap();
        let mem = layout.create_memory().unwrap();
        let at = write_pvh_start_info(
            &mem,
            &layout,
            Some((GuestAddress(0x300_0000), 1234)),
            Some(GuestAddress(0xe_0000)),
        )
        .unwrap();
        let info: hvm_start_info = mem.read_obj(at).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, CMDLINE_START.0);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 1234));
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!((last.addr, last.size, last.type_), (0x10_0000, 63 * MIB, 1));
    }

    #[test]
    fn start_info_without_initrd_has_no_modules() {
        let layout = GuestLayout::new(64 * MIB).unwrap();
        let mem = layout.create_memory().unwrap();
        let info: hvm_start_info = mem
            .read_obj(write_pvh_start_info(&mem, &layout, None, None).unwrap())
            .unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert_eq!(info.memmap_paddr, PVH_INFO_START.0 + 56);
    }

    #[test]
    fn start_info_and_map_stay_below_the_zero_page() {
        // 56 + 32 + 4 × 24 bytes from 0x6000 end well before 0x7000.
        let end = PVH_INFO_START.0 + 56 + 32 + 4 * 24;
        assert!(end <= keel_memory::ZERO_PAGE_START.0);
    }
}
