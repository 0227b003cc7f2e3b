//! PCI for Keel virtual machines: what a guest's PCI enumeration finds, and
//! the plumbing that lets a device model sit behind it.
//!
//! A stock kernel finds its devices by walking a PCI bus: it reads each
//! function's configuration space (through the PCI Express ECAM window an
//! ACPI MCFG table points at, or through the PC's ports `0xCF8`/`0xCFC`),
//! sizes and maybe moves its BARs, enables memory decoding, and programs
//! MSI-X vectors. This crate is that hardware, written against a guest that
//! may write anything anywhere:
//!
//! - [`ConfigSpace`]: a type-0 (device) or type-1 (bridge) header with
//!   read-only, writable and write-1-to-clear bits as real hardware has
//!   them, BARs that size correctly, and a capability list;
//! - [`PciBus`]: the [`HostBridge`] at 00:00.0 and up to 247 more
//!   functions, configuration access through ECAM ([`PciEcam`]) and ports
//!   `0xCF8`–`0xCFF` ([`PciConfigPorts`]), and the memory windows
//!   ([`PciMemoryWindow`]) whose accesses go to the BAR decoding them,
//!   wherever the guest moved it (a [`PciDevice`] is told, to move its
//!   ioeventfds);
//! - [`BarAllocator`]: BAR addresses from the windows below and above
//!   4 GiB (`vm-allocator`), as firmware would assign them;
//! - [`Msix`]: the MSI-X capability, vector table and pending-bit array,
//!   with per-vector and function masking and pending bits, delivering
//!   through `keel-irq`'s [`MsiVectors`](keel_irq::MsiVectors) (KVM MSI
//!   routes and irqfds in a VMM, a recorder in tests).
//!
//! The buses here implement `vm-device`'s `DeviceMmio` and `DevicePio`, so
//! a VMM registers them on its `IoManager` like any other device. The
//! virtio-pci transport in `keel-virtio` is a [`PciDevice`].
//!
//! # Example
//!
//! A bus with one function whose 4 KiB BAR holds a counter, probed the way
//! Linux's `pci=conf1` does it, then sized, moved and used:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use keel_pci::{BarAllocator, BarSpec, ConfigSpace, HeaderType, PciBus, PciDevice, PciIds};
//!
//! struct Counter { config: ConfigSpace, count: u32 }
//!
//! impl PciDevice for Counter {
//!     fn config(&self) -> &ConfigSpace { &self.config }
//!     fn config_mut(&mut self) -> &mut ConfigSpace { &mut self.config }
//!     fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
//!         self.count += 1;
//!         let bytes = self.count.to_le_bytes();
//!         let n = data.len().min(4);
//!         data[..n].copy_from_slice(&bytes[..n]);
//!     }
//!     fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
//! }
//!
//! let mut config = ConfigSpace::new(HeaderType::Device, PciIds {
//!     vendor: 0x1234, device: 0x5678, revision: 0, class: 0xff_00_00,
//!     subsystem_vendor: 0x1234, subsystem: 1 });
//! config.set_bar(0, BarSpec::memory32(0x1000)).unwrap();
//! let low = (0xe000_0000, 0x1000_0000);
//! let high = (1 << 32, 1 << 36);
//! let mut bus = PciBus::new(0xc000_0000, &[low, high]);
//! let mut bars = BarAllocator::new(low, high).unwrap();
//! let at = bus.add_device(Arc::new(Mutex::new(Counter { config, count: 0 })), &mut bars).unwrap();
//! assert_eq!(at.to_string(), "00:01.0");
//!
//! // Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, data at 0xCFC.
//! let cf8 = |register: u32| 0x8000_0000u32 | (1 << 11) | register; // 00:01.0
//! let read = |bus: &PciBus, register: u32| {
//!     bus.write_port(0, &cf8(register).to_le_bytes());
//!     let mut data = [0u8; 4];
//!     bus.read_port(4, &mut data);
//!     u32::from_le_bytes(data)
//! };
//! let write = |bus: &PciBus, register: u32, value: u32| {
//!     bus.write_port(0, &cf8(register).to_le_bytes());
//!     bus.write_port(4, &value.to_le_bytes());
//! };
//! assert_eq!(read(&bus, 0x00), 0x5678_1234);
//! assert_eq!(read(&bus, 0x10), 0xe000_0000); // where firmware put BAR 0
//!
//! // Size it, move it to 0xe010_0000, and read the counter there.
//! write(&bus, 0x10, u32::MAX);
//! assert_eq!(read(&bus, 0x10), 0xffff_f000); // 4 KiB
//! write(&bus, 0x10, 0xe010_0000);
//! let mut data = [0u8; 4];
//! bus.read_memory(0xe010_0000, &mut data);
//! assert_eq!(u32::from_le_bytes(data), 1);
//! bus.read_memory(0xe000_0000, &mut data); // the old place: nothing
//! assert_eq!(data, [0xff; 4]);
//! ```

#![deny(missing_docs)]
// Guest-facing code: no panic a guest could reach (issue 13). Tests may
// unwrap; the crate itself handles every failure or says why it cannot happen.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

mod bus;
mod config;
mod msix;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use vm_allocator;
#[doc(no_inline)]
pub use vm_device;

pub use bus::{
    BarAllocator, HostBridge, PciAddress, PciBus, PciConfigPorts, PciDevice, PciEcam, PciMemoryWindow,
    SharedPciDevice, CONFIG_ADDRESS_PORT, CONFIG_PORTS, DEVICES_PER_BUS, FUNCTIONS_PER_DEVICE,
};
pub use config::{
    bar_offset, capability_id, command, reg, status, BarKind, BarSpec, ConfigSpace, HeaderType, PciIds,
    BAR_COUNT, CONFIG_SPACE_SIZE, LEGACY_CONFIG_SIZE,
};
pub use msix::{Msix, MsixLayout, MsixState, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS};

/// Errors from building a PCI topology.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A saved state that does not fit this function.
    #[error("PCI state: {0}")]
    State(String),
    /// A BAR size that is not a power of two in the range its kind allows.
    #[error("BAR {index}: size {size:#x} is not a power of two between the minimum (16 bytes of memory, 4 ports) and the maximum of its kind")]
    InvalidBarSize {
        /// The BAR.
        index: usize,
        /// The size asked for.
        size: u64,
    },
    /// A BAR index past the header's BARs (a 64-bit BAR takes two).
    #[error("BAR {index} does not exist in this header (a 64-bit BAR also takes the next slot)")]
    NoSuchBar {
        /// The BAR.
        index: usize,
    },
    /// A BAR slot already declared, or holding a 64-bit BAR's high half.
    #[error("BAR {index} is already in use")]
    BarInUse {
        /// The BAR.
        index: usize,
    },
    /// A BAR address not aligned to the BAR's size, or out of its reach.
    #[error("BAR {index}: address {address:#x} is not aligned to its size {size:#x} or out of its range")]
    MisplacedBar {
        /// The BAR.
        index: usize,
        /// The address asked for.
        address: u64,
        /// The BAR's size.
        size: u64,
    },
    /// A capability that does not fit in the 256-byte configuration space
    /// (or whose write mask has the wrong length).
    #[error("capability {id:#04x} of {len} bytes does not fit in configuration space (or its write mask has another length)")]
    CapabilitySpace {
        /// The capability ID.
        id: u8,
        /// Its length, header included.
        len: usize,
    },
    /// A memory window that cannot be an allocator's range.
    #[error("PCI memory window {start:#x}+{size:#x}: {reason}")]
    InvalidWindow {
        /// Its start.
        start: u64,
        /// Its size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// No room for a BAR in the windows.
    #[error("no room for a BAR of {size:#x} bytes: {reason}")]
    BarSpaceExhausted {
        /// The BAR's size.
        size: u64,
        /// What the allocator said.
        reason: String,
    },
    /// Every address on bus 0 is taken.
    #[error("PCI bus 0 is full: devices 1-31, functions 0-7 are all taken")]
    BusFull,
    /// A device signalled an MSI-X vector its table does not have.
    #[error("MSI-X vector {vector} does not exist (the table has {count})")]
    NoSuchVector {
        /// The vector.
        vector: u16,
        /// The table's size.
        count: u16,
    },
    /// The interrupt layer failed to deliver.
    #[error("cannot send an MSI-X message: {0}")]
    Interrupt(#[from] keel_irq::Error),
}

/// Result of the operations in this crate.
pub type Result<T> = std::result::Result<T, Error>;
