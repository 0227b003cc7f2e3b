//! Getting a guest started: put a kernel and its boot information into
//! guest memory.
//!
//! The boot path is independent of how the guest will run: this crate only
//! writes memory. It loads a kernel image with `linux-loader` (ELF `vmlinux`
//! or `bzImage`, recognised by content), writes the command line, and fills
//! Linux's zero page (`boot_params`) with the e820 map derived from a
//! [`keel_memory::GuestLayout`]. Setting up the vCPU for the 64-bit entry is
//! `keel-vcpu`'s job; it starts at [`KernelImage::entry`] with `RSI` pointing
//! at [`keel_memory::ZERO_PAGE_START`].
//!
//! # Example
//!
//! ```
//! use keel_boot::{load_kernel, BootConfig};
//! use keel_memory::{GuestLayout, MIB, ZERO_PAGE_START};
//! use vm_memory::Bytes;
//!
//! let layout = GuestLayout::new(32 * MIB).unwrap();
//! let mem = layout.create_memory().unwrap();
//!
//! // Any ELF or bzImage works; Keel's built-in test guest is an ELF.
//! let mut image = std::io::Cursor::new(keel_guest::elf());
//! let kernel = load_kernel(&mem, &mut image).unwrap();
//! BootConfig::new("hello").write(&mem, &layout, &kernel).unwrap();
//!
//! // The zero page now points at the command line.
//! let cmd_line_ptr: u32 = mem.read_obj(ZERO_PAGE_START.unchecked_add(0x228)).unwrap();
//! assert_eq!(cmd_line_ptr as u64, keel_memory::CMDLINE_START.0);
//! # use vm_memory::GuestAddress;
//! # trait Add { fn unchecked_add(self, o: u64) -> GuestAddress; }
//! # impl Add for GuestAddress { fn unchecked_add(self, o: u64) -> GuestAddress { GuestAddress(self.0 + o) } }
//! ```

#![deny(missing_docs)]

mod acpi;
mod e820;
mod initrd;
mod kernel;
mod mptable;
mod pvh;
mod zero_page;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use acpi_tables;
#[doc(no_inline)]
pub use linux_loader;
#[doc(no_inline)]
pub use vm_memory;

pub use acpi::{
    dsdt_bytes, write_acpi_tables, AcpiPlatform, AcpiSleepRegisters, GedWindow, LegacyDevice,
    MmioDeviceWindow, PciHostBridge, ACPI_RSDP_START, ACPI_TABLES_END, DEFAULT_SLEEP_REGISTERS,
    GED_EVENT_POWER_BUTTON, GED_WINDOW_SIZE, SLEEP_TYPE_S5,
};
pub use e820::{e820_map, E820Entry, E820_RAM, E820_RESERVED};
pub use initrd::{initrd_address, load_initrd};
pub use kernel::{load_kernel, BootProtocol, KernelImage};
pub use mptable::{mptable_bytes, write_mptable, MAX_MPTABLE_CPUS};
pub use pvh::{write_pvh_start_info, XEN_HVM_START_MAGIC_VALUE};
pub use zero_page::BootConfig;

/// Errors from loading a kernel or writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image is neither an ELF nor a bzImage.
    #[error("kernel image is neither an ELF vmlinux nor a bzImage (first bytes: {head:02x?})")]
    UnknownImageFormat {
        /// The first bytes of the image.
        head: Vec<u8>,
    },
    /// The image could not be read.
    #[error("cannot read kernel image: {0}")]
    ReadImage(#[source] std::io::Error),
    /// The image looked like an ELF or bzImage but loading it failed.
    #[error("cannot load {format} kernel: {source}")]
    Load {
        /// `ELF` or `bzImage`.
        format: &'static str,
        /// What linux-loader reported.
        source: linux_loader::loader::Error,
    },
    /// The ACPI tables do not fit in the area kept for them.
    #[error("ACPI tables need {bytes} bytes; only {room} fit below 1 MiB")]
    AcpiTooLarge {
        /// Bytes the tables need.
        bytes: u64,
        /// Bytes available.
        room: u64,
    },
    /// The command line does not fit.
    #[error("kernel command line is {len} bytes: at most {} fit", keel_memory::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {offset}")]
    CmdlineNul {
        /// Where.
        offset: usize,
    },
    /// The initrd could not be read.
    #[error("cannot read initrd: {0}")]
    ReadInitrd(#[source] std::io::Error),
    /// The MP table cannot describe this many CPUs.
    #[error("MP table for {cpus} CPUs: must be between 1 and {max}", max = MAX_MPTABLE_CPUS)]
    MpTableCpus {
        /// Requested CPUs.
        cpus: u8,
    },
    /// The initrd does not fit anywhere the kernel can reach.
    #[error(
        "initrd of {size} bytes does not fit below {max_addr:#x} above the kernel (ends at {kernel_end:#x})"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Highest address the kernel accepts.
        max_addr: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
    },
    /// Writing to guest memory failed (the guest is too small for the boot
    /// structures or the kernel).
    #[error("cannot write {what} at {addr:#x}: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
