//! Guest physical memory for Keel virtual machines.
//!
//! A VMM needs to agree with itself — and with the guest — on where RAM is.
//! This crate owns that agreement for x86_64: the [`GuestLayout`] (RAM below
//! the 32-bit MMIO gap, the rest above 4 GiB, and the fixed low-memory
//! addresses the boot path uses), building a [`GuestMemoryMmap`] for it, and
//! registering its regions with KVM as memory slots.
//!
//! Guest memory is mapped `MAP_NORESERVE` and never touched here: a 2 GiB
//! guest costs the host only the pages the guest actually uses.
//!
//! # Example
//!
//! ```
//! use keel_memory::{GuestLayout, GuestMemoryMmap, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let layout = GuestLayout::new(64 * MIB).unwrap();
//! let mem: GuestMemoryMmap = layout.create_memory().unwrap();
//! mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
//!
//! // With KVM available, hand the regions to a VM:
//! # if std::path::Path::new("/dev/kvm").exists() {
//! let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
//! keel_memory::register_with_kvm(&vm, &mem).unwrap();
//! # }
//! ```

#![deny(missing_docs)]

mod layout;
mod snapshot;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use kvm_bindings;
#[doc(no_inline)]
pub use kvm_ioctls;
#[doc(no_inline)]
pub use vm_memory;

pub use layout::*;
pub use snapshot::{
    merge_memory_diff, restore_memory, save_memory, save_memory_diff, RestoreMode, SavedMemory, SnapshotError,
};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory backed by host mappings, with a bitmap of the pages the
/// VMM wrote through it (vm-memory's `AtomicBitmap`, one bit per 4 KiB
/// page): KVM's dirty log sees only the guest's own writes, this bitmap
/// the devices' — together what a diff snapshot saves.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Errors from building or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested memory size is below the minimum.
    #[error("memory size {size} bytes ({} MiB): must be at least {} MiB", size / MIB, MIN_MEMORY / MIB)]
    MemoryTooSmall {
        /// Requested size in bytes.
        size: u64,
    },
    /// The requested memory size is above the maximum.
    #[error("memory size {size} bytes ({} MiB): must be at most {} MiB", size / MIB, MAX_MEMORY / MIB)]
    MemoryTooLarge {
        /// Requested size in bytes.
        size: u64,
    },
    /// The requested memory size is not a multiple of the page size.
    #[error("memory size {size} bytes: must be a multiple of 4 KiB")]
    MemoryNotAligned {
        /// Requested size in bytes.
        size: u64,
    },
    /// The host refused to map guest memory.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Requested size in bytes.
        size: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_addr:#x} ({size:#x} bytes): {source}")]
    SetMemoryRegion {
        /// Slot number.
        slot: u32,
        /// Guest physical start.
        guest_addr: u64,
        /// Region size.
        size: u64,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// KVM could not give a slot's dirty log (was it registered with
    /// logging?).
    #[error("KVM_GET_DIRTY_LOG for slot {slot}: {source} (dirty-page tracking must be on for the VM)")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// More regions than KVM slots.
    #[error("guest memory has {regions} regions but KVM offers only {max} slots")]
    TooManyRegions {
        /// Regions in the guest memory.
        regions: usize,
        /// Slots KVM allows.
        max: usize,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Registers every region of `mem` with `vm` as a KVM memory slot, slots
/// numbered from 0 in address order.
///
/// Returns the number of slots used.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<u32> {
    register_with_kvm_logging(vm, mem, false)
}

/// [`register_with_kvm`], with KVM's dirty-page logging on the slots when
/// `log_dirty_pages` (`KVM_MEM_LOG_DIRTY_PAGES`): then [`take_dirty_pages`]
/// can say what the guest wrote since it was last asked. Logging costs the
/// guest a fault on its first write to each page after every query.
pub fn register_with_kvm_logging(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty_pages: bool) -> Result<u32> {
    let mut slot = 0u32;
    for region in mem.iter() {
        let memory_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty_pages {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the host range belongs to `mem`'s mapping, which stays alive
        // for as long as the caller keeps `mem` (it must outlive the VM: the
        // VMM holds both together), and it is exactly `memory_size` bytes.
        unsafe { vm.set_user_memory_region(memory_region) }.map_err(|source| Error::SetMemoryRegion {
            slot,
            guest_addr: memory_region.guest_phys_addr,
            size: memory_region.memory_size,
            source,
        })?;
        slot += 1;
    }
    Ok(slot)
}

/// How many bytes of guest RAM are resident in host memory right now: the
/// pages the guest (or the VMM, loading a kernel) has touched, found with
/// `mincore(2)` over every region. Peak RSS of a VMM process minus this is
/// the VMM's own overhead.
///
/// # Example
///
/// ```
/// use keel_memory::{resident_bytes, GuestLayout};
/// use vm_memory::{Bytes, GuestAddress};
///
/// let mem = GuestLayout::new(64 << 20).unwrap().create_memory().unwrap();
/// assert_eq!(resident_bytes(&mem).unwrap(), 0); // mapped, never touched
/// mem.write_obj(1u8, GuestAddress(0x10_0000)).unwrap();
/// assert_eq!(resident_bytes(&mem).unwrap(), 4096);
/// ```
pub fn resident_bytes(mem: &GuestMemoryMmap) -> std::io::Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut resident = 0u64;
    let mut vec = Vec::new();
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        vec.clear();
        vec.resize(len.div_ceil(page as usize), 0u8);
        // SAFETY: the range is the region's own page-aligned mapping, alive
        // while `mem` is borrowed, and `vec` has one byte per page of it.
        let ret = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page;
    }
    Ok(resident)
}

/// The pages written since the last call (or since the slots were
/// registered), as ranges of offsets in the memory file's layout (regions
/// back to back): what the guest wrote (KVM's dirty log of each slot,
/// registered with [`register_with_kvm_logging`]) and what the VMM wrote
/// through `mem` (its bitmap). Both logs are cleared. Call it while the
/// guest is paused.
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<(u64, u64)>> {
    const PAGE: u64 = 4096;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut file_offset = 0u64;
    for (slot, region) in mem.iter().enumerate() {
        let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
        let slot = slot as u32;
        let kvm_bits = vm
            .get_dirty_log(slot, len)
            .map_err(|source| Error::DirtyLog { slot, source })?;
        let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
        // Both logs are one bit per page, 64 pages a word.
        let vmm_bits = mapping.bitmap().get_and_reset();
        let pages = region.len() / PAGE;
        let words = pages.div_ceil(64) as usize;
        for word in 0..words {
            let mut bits =
                kvm_bits.get(word).copied().unwrap_or(0) | vmm_bits.get(word).copied().unwrap_or(0);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let page = word as u64 * 64 + bit;
                if page >= pages {
                    break;
                }
                let at = file_offset + page * PAGE;
                match ranges.last_mut() {
                    Some((start, len)) if *start + *len == at => *len += PAGE,
                    _ => ranges.push((at, PAGE)),
                }
            }
        }
        file_offset += region.len();
    }
    Ok(ranges)
}

/// Whether `addr` lies in guest RAM (as opposed to the MMIO gap or beyond).
pub fn is_ram(mem: &GuestMemoryMmap, addr: GuestAddress) -> bool {
    mem.address_in_range(addr)
}
