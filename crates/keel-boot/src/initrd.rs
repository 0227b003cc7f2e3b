//! Placing an initrd (initramfs) where the kernel can reach it.

use std::io::{Read, Seek, SeekFrom};

use keel_memory::{GuestLayout, GuestMemoryMmap};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use crate::{Error, KernelImage, Result};

/// Highest initrd address a kernel without a setup header (ELF vmlinux)
/// is assumed to accept: 2 GiB, what 64-bit bzImages declare.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Where an initrd of `size` bytes goes: as high as possible, page aligned,
/// below the RAM top under 4 GiB and the kernel's `initrd_addr_max`, and
/// above the kernel.
pub fn initrd_address(layout: &GuestLayout, kernel: &KernelImage, size: u64) -> Result<GuestAddress> {
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let top = layout.low_ram_end().0.min(addr_max.saturating_add(1));
    let too_large = || Error::InitrdTooLarge {
        size,
        max_addr: top,
        kernel_end: kernel.end.0,
    };
    let start = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel.end.0 {
        return Err(too_large());
    }
    Ok(GuestAddress(start))
}

/// Copies the initrd from `image` into guest memory; returns where and how
/// large it is.
pub fn load_initrd<F>(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel: &KernelImage,
    image: &mut F,
) -> Result<(GuestAddress, u64)>
where
    F: Read + ReadVolatile + Seek,
{
    let size = image.seek(SeekFrom::End(0)).map_err(Error::ReadInitrd)?;
    image.seek(SeekFrom::Start(0)).map_err(Error::ReadInitrd)?;
    let addr = initrd_address(layout, kernel, size)?;
    mem.read_exact_volatile_from(addr, image, size as usize)
        .map_err(|source| Error::GuestMemory {
            what: "initrd",
            addr: addr.0,
            source,
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BootProtocol;
    use keel_memory::MIB;

    fn kernel_ending_at(end: u64) -> KernelImage {
        KernelImage {
            entry: GuestAddress(0x100_0000),
            protocol: BootProtocol::Linux64,
            end: GuestAddress(end),
            setup_header: None,
            pvh_entry: None,
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let layout = GuestLayout::new(128 * MIB).unwrap();
        let addr = initrd_address(&layout, &kernel_ending_at(0x200_0000), 5000).unwrap();
        assert_eq!(addr.0, (128 * MIB - 5000) & !0xfff);
    }

    #[test]
    fn initrd_respects_the_kernels_initrd_addr_max() {
        let layout = GuestLayout::new(2048 * MIB).unwrap();
        let mut k = kernel_ending_at(0x200_0000);
        let hdr = linux_loader::loader::bootparam::setup_header {
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        };
        k.setup_header = Some(hdr);
        let addr = initrd_address(&layout, &k, 4096).unwrap();
        assert_eq!(addr.0, 0x3800_0000 - 4096);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        let layout = GuestLayout::new(32 * MIB).unwrap();
        let err = initrd_address(&layout, &kernel_ending_at(0x180_0000), 16 * MIB).unwrap_err();
        assert!(matches!(err, Error::InitrdTooLarge { size, .. } if size == 16 * MIB));
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let layout = GuestLayout::new(32 * MIB).unwrap();
        assert!(initrd_address(&layout, &kernel_ending_at(0x100_0000), 64 * MIB).is_err());
    }

    #[test]
    fn loads_initrd_bytes() {
        let layout = GuestLayout::new(32 * MIB).unwrap();
        let mem = layout.create_memory().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (addr, size) = load_initrd(
            &mem,
            &layout,
            &kernel_ending_at(0x100_0000),
            &mut std::io::Cursor::new(data.clone()),
        )
        .unwrap();
        assert_eq!(size, 10_000);
        let mut back = vec![0u8; 10_000];
        mem.read_slice(&mut back, addr).unwrap();
        assert_eq!(back, data);
    }
}
