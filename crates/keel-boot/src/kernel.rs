//! Recognising and loading kernel images.

use std::io::{Read, Seek, SeekFrom};

use keel_memory::{GuestMemoryMmap, HIMEM_START};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{GuestAddress, ReadVolatile};

use crate::{Error, Result};

/// How the vCPU must enter the loaded kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, paging on, `RSI` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, `EBX` = `hvm_start_info`.
    Pvh,
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct KernelImage {
    /// Where the vCPU starts.
    pub entry: GuestAddress,
    /// How it must be entered.
    pub protocol: BootProtocol,
    /// First address past the loaded image (initrd and friends go above).
    pub end: GuestAddress,
    /// A bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// The 32-bit PVH entry point, if the ELF has one (XEN_ELFNOTE_PHYS32_ENTRY).
    pub pvh_entry: Option<GuestAddress>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// Offset of the 64-bit entry from a bzImage's protected-mode load address.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;

/// Loads an ELF `vmlinux` or a `bzImage`, told apart by content.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<KernelImage>
where
    F: Read + ReadVolatile + Seek,
{
    let mut head = [0u8; BZIMAGE_MAGIC_OFFSET + 4];
    image.seek(SeekFrom::Start(0)).map_err(Error::ReadImage)?;
    let got = read_up_to(image, &mut head).map_err(Error::ReadImage)?;
    let head = &head[..got];
    image.seek(SeekFrom::Start(0)).map_err(Error::ReadImage)?;

    if head.starts_with(ELF_MAGIC) {
        let loaded = Elf::load(mem, None, image, Some(HIMEM_START)).map_err(|source| Error::Load {
            format: "ELF",
            source,
        })?;
        let pvh_entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
            _ => None,
        };
        Ok(KernelImage {
            entry: loaded.kernel_load,
            protocol: BootProtocol::Linux64,
            end: GuestAddress(loaded.kernel_end),
            setup_header: None,
            pvh_entry,
        })
    } else if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        let loaded = BzImage::load(mem, None, image, Some(HIMEM_START)).map_err(|source| Error::Load {
            format: "bzImage",
            source,
        })?;
        Ok(KernelImage {
            entry: GuestAddress(loaded.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
            protocol: BootProtocol::Linux64,
            end: GuestAddress(loaded.kernel_end),
            setup_header: loaded.setup_header,
            pvh_entry: None,
        })
    } else {
        Err(Error::UnknownImageFormat {
            head: head[..head.len().min(8)].to_vec(),
        })
    }
}

impl KernelImage {
    /// This kernel entered through PVH, if it has a PVH entry point.
    pub fn with_pvh_entry(self) -> Option<KernelImage> {
        self.pvh_entry.map(|entry| KernelImage {
            entry,
            protocol: BootProtocol::Pvh,
            ..self
        })
    }
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::{GuestLayout, MIB};
    use std::io::Cursor;

    fn memory() -> GuestMemoryMmap {
        GuestLayout::new(32 * MIB).unwrap().create_memory().unwrap()
    }

    #[test]
    fn loads_the_built_in_guest_elf_at_its_entry() {
        let mem = memory();
        let k = load_kernel(&mem, &mut Cursor::new(keel_guest::elf())).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert!(k.entry.0 >= HIMEM_START.0);
        assert!(k.end.0 > k.entry.0);
        assert!(k.setup_header.is_none());
    }

    #[test]
    fn rejects_garbage_naming_its_first_bytes() {
        let err = load_kernel(&memory(), &mut Cursor::new(b"garbage!!".to_vec())).unwrap_err();
        assert!(matches!(err, Error::UnknownImageFormat { .. }));
        assert!(err.to_string().contains("67, 61, 72"), "{err}");
    }

    #[test]
    fn rejects_an_empty_file() {
        let err = load_kernel(&memory(), &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, Error::UnknownImageFormat { ref head } if head.is_empty()));
    }

    #[test]
    fn rejects_a_truncated_elf() {
        let mut img = keel_guest::elf()[..100].to_vec();
        img.resize(100, 0);
        let err = load_kernel(&memory(), &mut Cursor::new(img)).unwrap_err();
        assert!(matches!(err, Error::Load { format: "ELF", .. }), "{err}");
    }

    #[test]
    fn rejects_an_elf_that_does_not_fit_in_memory() {
        let small = GuestLayout::new(2 * MIB).unwrap().create_memory().unwrap();
        // Forge a segment far above RAM: patch the first program header's p_paddr.
        let mut img = keel_guest::elf().to_vec();
        let phoff = u64::from_le_bytes(img[0x20..0x28].try_into().unwrap()) as usize;
        img[phoff + 0x18..phoff + 0x20].copy_from_slice(&(64 * MIB).to_le_bytes());
        let err = load_kernel(&small, &mut Cursor::new(img)).unwrap_err();
        assert!(matches!(err, Error::Load { .. }), "{err}");
    }
}
