//! The command line and Linux's zero page.

use keel_memory::{GuestLayout, GuestMemoryMmap, CMDLINE_MAX_SIZE, CMDLINE_START, ZERO_PAGE_START};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress};

use crate::{e820_map, Error, KernelImage, Result};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// What goes into the zero page besides the memory map.
#[derive(Clone, Debug, Default)]
pub struct BootConfig {
    cmdline: String,
    initrd: Option<(GuestAddress, u64)>,
    acpi_rsdp: Option<GuestAddress>,
}

impl BootConfig {
    /// Boot information carrying `cmdline`.
    pub fn new(cmdline: impl Into<String>) -> Self {
        BootConfig {
            cmdline: cmdline.into(),
            initrd: None,
            acpi_rsdp: None,
        }
    }

    /// Records an initrd already placed in guest memory.
    pub fn initrd(mut self, addr: GuestAddress, size: u64) -> Self {
        self.initrd = Some((addr, size));
        self
    }

    /// Tells the kernel where the ACPI RSDP is (see
    /// [`write_acpi_tables`](crate::write_acpi_tables)): the zero page's
    /// `acpi_rsdp_addr`, or `hvm_start_info.rsdp_paddr` for PVH.
    pub fn acpi_rsdp(mut self, rsdp: GuestAddress) -> Self {
        self.acpi_rsdp = Some(rsdp);
        self
    }

    /// The command line.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Writes the command line at [`CMDLINE_START`] and the boot
    /// information the kernel's protocol wants: the zero page at
    /// [`ZERO_PAGE_START`] (Linux 64-bit) or `hvm_start_info` (PVH).
    pub fn write(&self, mem: &GuestMemoryMmap, layout: &GuestLayout, kernel: &KernelImage) -> Result<()> {
        let bytes = self.cmdline.as_bytes();
        if let Some(offset) = bytes.iter().position(|&b| b == 0) {
            return Err(Error::CmdlineNul { offset });
        }
        if bytes.len() >= CMDLINE_MAX_SIZE {
            return Err(Error::CmdlineTooLong { len: bytes.len() });
        }
        let mut with_nul = bytes.to_vec();
        with_nul.push(0);
        mem.write_slice(&with_nul, CMDLINE_START)
            .map_err(|source| Error::GuestMemory {
                what: "command line",
                addr: CMDLINE_START.0,
                source,
            })?;
        if kernel.protocol == crate::BootProtocol::Pvh {
            crate::write_pvh_start_info(mem, layout, self.initrd, self.acpi_rsdp)?;
            return Ok(());
        }

        let mut params = boot_params::default();
        if let Some(hdr) = kernel.setup_header {
            params.hdr = hdr;
        }
        params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
        params.hdr.cmdline_size = bytes.len() as u32;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        if let Some((addr, size)) = self.initrd {
            params.hdr.ramdisk_image = addr.0 as u32;
            params.hdr.ramdisk_size = size as u32;
        }
        let map = e820_map(layout);
        for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
            *slot = boot_e820_entry {
                addr: entry.addr,
                size: entry.size,
                r#type: entry.kind,
            };
        }
        params.e820_entries = map.len().min(params.e820_table.len()) as u8;
        if let Some(rsdp) = self.acpi_rsdp {
            params.acpi_rsdp_addr = rsdp.0;
        }
        mem.write_obj(params, ZERO_PAGE_START)
            .map_err(|source| Error::GuestMemory {
                what: "zero page",
                addr: ZERO_PAGE_START.0,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BootProtocol;
    use keel_memory::MIB;

    fn setup() -> (GuestLayout, GuestMemoryMmap, KernelImage) {
        let layout = GuestLayout::new(64 * MIB).unwrap();
        let mem = layout.create_memory().unwrap();
        let kernel = KernelImage {
            entry: GuestAddress(0x100000),
            protocol: BootProtocol::Linux64,
            end: GuestAddress(0x200000),
            setup_header: None,
            pvh_entry: None,
        };
        (layout, mem, kernel)
    }

    #[test]
    fn writes_cmdline_and_zero_page() {
        let (layout, mem, kernel) = setup();
        BootConfig::new("console=ttyS0 panic=-1")
            .write(&mem, &layout, &kernel)
            .unwrap();
        let params: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        let ptr = params.hdr.cmd_line_ptr;
        assert_eq!(ptr as u64, CMDLINE_START.0);
        let mut buf = [0u8; 23];
        mem.read_slice(&mut buf, CMDLINE_START).unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=-1\0");
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!({ last.addr }, 0x100000);
        assert_eq!({ last.size }, 63 * MIB);
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
    }

    #[test]
    fn records_the_initrd() {
        let (layout, mem, kernel) = setup();
        BootConfig::new("")
            .initrd(GuestAddress(0x300_0000), 4096)
            .write(&mem, &layout, &kernel)
            .unwrap();
        let params: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 4096);
    }

    #[test]
    fn rejects_a_command_line_that_is_too_long() {
        let (layout, mem, kernel) = setup();
        let err = BootConfig::new("x".repeat(5000))
            .write(&mem, &layout, &kernel)
            .unwrap_err();
        assert!(err.to_string().contains("5000 bytes"), "{err}");
    }

    #[test]
    fn rejects_a_command_line_with_nul() {
        let (layout, mem, kernel) = setup();
        let err = BootConfig::new("a\0b").write(&mem, &layout, &kernel).unwrap_err();
        assert!(matches!(err, Error::CmdlineNul { offset: 1 }));
    }
}
