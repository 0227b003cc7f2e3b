//! A PCI function's configuration space: the register file, what the guest
//! may change in it, BARs and capability lists.

use crate::{Error, Result};

/// Size of a function's configuration space through ECAM (PCI Express):
/// 256 bytes of PCI-compatible space, then extended space up to 4 KiB.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// End of the PCI-compatible part (what `0xCF8`/`0xCFC` reach).
pub const LEGACY_CONFIG_SIZE: usize = 256;
/// How many BARs a type-0 header has.
pub const BAR_COUNT: usize = 6;

/// Register offsets shared by both header types.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status register (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits), then the class code (24 bits).
    pub const REVISION_ID: u16 = 0x08;
    /// Cache line size (8 bits).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Header type (8 bits; bit 7: multi-function device).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR 0; BAR n is at `BAR0 + 4 n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor ID (type 0).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (type 0).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt line (8 bits, scratch for the OS).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt pin (8 bits, 0: none).
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// Type 1: primary, secondary, subordinate bus numbers and secondary
    /// latency timer (4 × 8 bits).
    pub const PRIMARY_BUS: u16 = 0x18;
    /// Type 1: I/O base and limit (8 bits each), then secondary status.
    pub const IO_BASE: u16 = 0x1c;
    /// Type 1: memory base and limit (16 bits each).
    pub const MEMORY_BASE: u16 = 0x20;
    /// Type 1: prefetchable memory base and limit (16 bits each).
    pub const PREFETCHABLE_BASE: u16 = 0x24;
    /// Type 1: bridge control (16 bits).
    pub const BRIDGE_CONTROL: u16 = 0x3e;
}

/// Command register bits.
pub mod command {
    /// Responds to I/O space accesses (I/O BARs decode).
    pub const IO_SPACE: u16 = 1 << 0;
    /// Responds to memory space accesses (memory BARs decode).
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// May master the bus (DMA, MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// The INTx pin is disabled.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// Every bit a guest may change: I/O, memory, bus master, parity error
    /// response (6), SERR# enable (8), INTx disable.
    pub const WRITABLE: u16 = IO_SPACE | MEMORY_SPACE | BUS_MASTER | (1 << 6) | (1 << 8) | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// The function has a capability list (read-only).
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// Error bits the guest clears by writing 1 (master data parity error,
    /// signaled/received target abort, received master abort, signaled
    /// system error, detected parity error).
    pub const WRITE_1_TO_CLEAR: u16 = 0xf900;
}

/// The capability IDs this crate builds.
pub mod capability_id {
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// Vendor-specific (virtio-pci's structures).
    pub const VENDOR_SPECIFIC: u8 = 0x09;
}

/// Header layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// An endpoint: six BARs, subsystem IDs, capability list.
    Device,
    /// A PCI-to-PCI bridge: two BARs, bus numbers, forwarding windows.
    Bridge,
}

/// What kind of resource a BAR asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory space.
    Memory32,
    /// 64-bit memory space: takes this BAR and the next one (the high
    /// dword).
    Memory64,
    /// I/O space (at most 256 bytes).
    Io,
}

/// A BAR as the device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Memory or I/O, 32 or 64 bits.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 for memory (4 for I/O).
    pub size: u64,
    /// Prefetchable memory (reads have no side effects).
    pub prefetchable: bool,
}

impl BarSpec {
    /// A non-prefetchable 64-bit memory BAR of `size` bytes.
    pub fn memory64(size: u64) -> Self {
        Self {
            kind: BarKind::Memory64,
            size,
            prefetchable: false,
        }
    }

    /// A non-prefetchable 32-bit memory BAR of `size` bytes.
    pub fn memory32(size: u64) -> Self {
        Self {
            kind: BarKind::Memory32,
            size,
            prefetchable: false,
        }
    }

    /// The read-only low bits of the BAR register: the space, type and
    /// prefetchable flags.
    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 => u32::from(self.prefetchable) << 3,
            BarKind::Memory64 => 0x4 | u32::from(self.prefetchable) << 3,
        }
    }
}

/// A function's identity: what the guest reads before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface
    /// (`0x06_00_00` is a host bridge).
    pub class: u32,
    /// Subsystem vendor ID (type 0 only).
    pub subsystem_vendor: u16,
    /// Subsystem ID (type 0 only).
    pub subsystem: u16,
}

/// A configuration space with the semantics a guest expects of real
/// hardware, whatever it writes:
///
/// - read-only registers keep their value (IDs, class, header type, the
///   capability pointer and every capability's ID and next pointer);
/// - a write changes only the bits marked writable, and clears the bits
///   marked write-1-to-clear where it writes a 1 (the status register's
///   error bits);
/// - BARs keep their read-only flag bits and the address bits below their
///   size, so writing all ones and reading back gives the size (BAR
///   sizing); the high dword of a 64-bit BAR takes any value;
/// - accesses must be 1, 2 or 4 bytes, naturally aligned, inside the 4 KiB:
///   others read as all ones and are dropped on write (as a PCI host bridge
///   answers a malformed request).
///
/// The registers are stored as the guest sees them, so [`read`](Self::read)
/// is a copy; the device model changes them with the `set_*` methods,
/// which ignore the write masks.
///
/// # Example
///
/// ```
/// use keel_pci::{BarSpec, ConfigSpace, HeaderType, PciIds};
///
/// let ids = PciIds { vendor: 0x1af4, device: 0x1042, revision: 1, class: 0x01_80_00,
///                    subsystem_vendor: 0x1af4, subsystem: 0x40 };
/// let mut config = ConfigSpace::new(HeaderType::Device, ids);
/// config.set_bar(0, BarSpec::memory64(0x4000)).unwrap();
/// config.set_bar_address(0, 0xe000_0000).unwrap();
///
/// // BAR sizing, as an OS does it: all ones, read back, restore.
/// config.write(0x10, &u32::MAX.to_le_bytes());
/// assert_eq!(config.read_u32(0x10), 0xffff_c004); // 16 KiB, 64-bit memory
/// config.write(0x10, &0xe000_0000u32.to_le_bytes());
/// assert_eq!(config.bar_address(0), Some(0xe000_0000));
///
/// // The vendor ID does not change.
/// config.write(0x00, &0u16.to_le_bytes());
/// assert_eq!(config.read_u16(0x00), 0x1af4);
/// ```
#[derive(Clone)]
pub struct ConfigSpace {
    header: HeaderType,
    regs: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_1_to_clear: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarSpec>; BAR_COUNT],
    /// Where the next capability goes, and where the last one's next
    /// pointer is (the capabilities pointer before the first).
    next_capability: u16,
    last_next_pointer: u16,
}

impl ConfigSpace {
    /// For a snapshot: every register as the guest left it (BARs, command,
    /// capabilities).
    pub fn save_registers(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Puts saved registers back into a function built the same way (the
    /// same IDs, BARs and capabilities); a state of another size or of a
    /// function with other IDs is refused and nothing changes.
    pub fn restore_registers(&mut self, saved: &[u8]) -> crate::Result<()> {
        let regs: [u8; CONFIG_SPACE_SIZE] = saved.try_into().map_err(|_| {
            crate::Error::State(format!(
                "{} bytes of configuration space saved, a function has {CONFIG_SPACE_SIZE}",
                saved.len()
            ))
        })?;
        /// The identity: vendor, device; revision, class.
        fn identity(regs: &[u8]) -> [Option<&[u8]>; 2] {
            [regs.get(..4), regs.get(8..12)]
        }
        // The identity must match.
        if identity(&regs) != identity(&self.regs[..]) {
            return Err(crate::Error::State(format!(
                "the saved function is {:02x?}, this one {:02x?} (vendor, device)",
                regs.get(..4).unwrap_or_default(),
                self.regs.get(..4).unwrap_or_default()
            )));
        }
        *self.regs = regs;
        Ok(())
    }
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("header", &self.header)
            .field("vendor", &format_args!("{:#06x}", self.read_u16(reg::VENDOR_ID)))
            .field("device", &format_args!("{:#06x}", self.read_u16(reg::DEVICE_ID)))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

/// First byte past the header, where capabilities start.
const FIRST_CAPABILITY: u16 = 0x40;
/// Type 1: the secondary status register, after the I/O base and limit.
const SECONDARY_STATUS: u16 = 0x1e;

impl ConfigSpace {
    /// A function of `header` type with `ids`, no BARs and no capabilities;
    /// the command register is 0 (nothing decodes).
    pub fn new(header: HeaderType, ids: PciIds) -> Self {
        let mut space = Self {
            header,
            regs: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            write_1_to_clear: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_next_pointer: reg::CAPABILITIES_POINTER,
        };
        space.set_u16(reg::VENDOR_ID, ids.vendor);
        space.set_u16(reg::DEVICE_ID, ids.device);
        space.set_u32(reg::REVISION_ID, (ids.class << 8) | u32::from(ids.revision));
        space.mask_u16(reg::COMMAND, command::WRITABLE);
        put(
            &mut space.write_1_to_clear[..],
            reg::STATUS,
            &status::WRITE_1_TO_CLEAR.to_le_bytes(),
        );
        put(&mut space.writable[..], reg::CACHE_LINE_SIZE, &[0xff]);
        put(&mut space.writable[..], reg::INTERRUPT_LINE, &[0xff]);
        match header {
            HeaderType::Device => {
                space.set_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
                space.set_u16(reg::SUBSYSTEM_ID, ids.subsystem);
            }
            HeaderType::Bridge => {
                space.set_bytes(reg::HEADER_TYPE, &[0x01]);
                // Bus numbers and secondary latency timer.
                space.mask_u32(reg::PRIMARY_BUS, 0xffff_ffff);
                // I/O base and limit: upper nibble (4 KiB granules, 16-bit
                // decode); secondary status: error bits are W1C.
                space.mask_u16(reg::IO_BASE, 0xf0f0);
                put(
                    &mut space.write_1_to_clear[..],
                    SECONDARY_STATUS,
                    &status::WRITE_1_TO_CLEAR.to_le_bytes(),
                );
                // Memory base and limit: 1 MiB granules.
                space.mask_u32(reg::MEMORY_BASE, 0xfff0_fff0);
                // Prefetchable base and limit (64-bit: low nibble 1) and
                // their upper 32 bits.
                space.set_u32(reg::PREFETCHABLE_BASE, 0x0001_0001);
                space.mask_u32(reg::PREFETCHABLE_BASE, 0xfff0_fff0);
                space.mask_u32(0x28, u32::MAX);
                space.mask_u32(0x2c, u32::MAX);
                // Bridge control: parity, SERR, ISA, VGA, master abort
                // mode, secondary bus reset.
                space.mask_u16(reg::BRIDGE_CONTROL, 0x007f);
            }
        }
        space
    }

    /// The header layout.
    pub fn header_type(&self) -> HeaderType {
        self.header
    }

    /// How many BARs this header has.
    pub fn bar_count(&self) -> usize {
        match self.header {
            HeaderType::Device => BAR_COUNT,
            HeaderType::Bridge => 2,
        }
    }

    /// Sets or clears the multi-function bit of the header type (a bus sets
    /// it on function 0 of a slot that has more functions).
    pub fn set_multifunction(&mut self, multifunction: bool) {
        if let Some(header) = self.regs.get_mut(usize::from(reg::HEADER_TYPE)) {
            *header = (*header & 0x7f) | if multifunction { 0x80 } else { 0 };
        }
    }

    /// Declares BAR `index` (a 64-bit BAR also takes `index + 1`). Its
    /// address starts at 0.
    pub fn set_bar(&mut self, index: usize, spec: BarSpec) -> Result<()> {
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        let max = match spec.kind {
            BarKind::Io => 256,
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 => 1 << 62,
        };
        // The address bits below the size (a power of two).
        let low_bits = match spec.size.checked_sub(1) {
            Some(low_bits) if spec.size.is_power_of_two() && (min..=max).contains(&spec.size) => low_bits,
            _ => {
                return Err(Error::InvalidBarSize {
                    index,
                    size: spec.size,
                })
            }
        };
        let slots = if spec.kind == BarKind::Memory64 { 2 } else { 1 };
        let end = index
            .checked_add(slots)
            .filter(|&end| end <= self.bar_count())
            .ok_or(Error::NoSuchBar { index })?;
        if (index..end).any(|i| self.bar(i).is_some() || self.is_bar_high_half(i)) {
            return Err(Error::BarInUse { index });
        }
        *self.bars.get_mut(index).ok_or(Error::NoSuchBar { index })? = Some(spec);
        let offset = bar_offset(index);
        // The address bits at and above the size are writable.
        self.set_u32(offset, spec.flags());
        self.mask_u32(offset, !(low_bits as u32) & !0xf & !spec.flags());
        if spec.kind == BarKind::Io {
            self.mask_u32(offset, !(low_bits as u32) & !0x3);
        }
        if spec.kind == BarKind::Memory64 {
            self.mask_u32(offset.saturating_add(4), !(low_bits >> 32) as u32);
        }
        Ok(())
    }

    /// Whether BAR slot `index` holds the high dword of a 64-bit BAR.
    fn is_bar_high_half(&self, index: usize) -> bool {
        index
            .checked_sub(1)
            .and_then(|low| self.bar(low))
            .is_some_and(|spec| spec.kind == BarKind::Memory64)
    }

    /// The BAR declared at `index`, if any.
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// Programs BAR `index`'s address, as firmware does (the guest may move
    /// it later). The address must be aligned to the BAR's size and fit its
    /// kind.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<()> {
        let spec = self.bar(index).ok_or(Error::NoSuchBar { index })?;
        let fits = match spec.kind {
            BarKind::Memory64 => true,
            BarKind::Memory32 => address <= u64::from(u32::MAX),
            BarKind::Io => address <= 0xffff,
        };
        if !address.is_multiple_of(spec.size) || !fits {
            return Err(Error::MisplacedBar {
                index,
                address,
                size: spec.size,
            });
        }
        let offset = bar_offset(index);
        self.set_u32(offset, address as u32 | spec.flags());
        if spec.kind == BarKind::Memory64 {
            self.set_u32(offset.saturating_add(4), (address >> 32) as u32);
        }
        Ok(())
    }

    /// BAR `index`'s address as the guest programmed it (whether or not it
    /// decodes), or `None` if there is no such BAR.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let offset = bar_offset(index);
        let low = u64::from(self.read_u32(offset));
        Some(match spec.kind {
            BarKind::Io => low & !0x3,
            BarKind::Memory32 => low & !0xf,
            BarKind::Memory64 => (u64::from(self.read_u32(offset.saturating_add(4))) << 32) | (low & !0xf),
        })
    }

    /// The memory BARs that decode now, as `(index, address, size)`: memory
    /// space is enabled in the command register, and the range does not
    /// wrap around the address space. (I/O BARs are sized but never decode:
    /// the buses in this crate forward memory space only.)
    pub fn decoded_memory_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.read_u16(reg::COMMAND) & command::MEMORY_SPACE == 0 {
            return Vec::new();
        }
        (0..self.bar_count())
            .filter_map(|index| {
                let spec = self.bar(index).filter(|s| s.kind != BarKind::Io)?;
                let address = self.bar_address(index)?;
                address.checked_add(spec.size)?;
                Some((index, address, spec.size))
            })
            .collect()
    }

    /// Appends a capability with `id` whose body (the bytes after the ID and
    /// next pointer) is `body`; `body_writable` marks the bits of the body
    /// the guest may change (same length, or empty for a read-only body).
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], body_writable: &[u8]) -> Result<u16> {
        let offset = self.next_capability;
        let start = usize::from(offset);
        let len = body.len().saturating_add(2);
        let end = start.saturating_add(len);
        let no_room = Error::CapabilitySpace { id, len };
        if end > LEGACY_CONFIG_SIZE || (!body_writable.is_empty() && body_writable.len() != body.len()) {
            return Err(no_room);
        }
        // The ID, a next pointer of 0, then the body.
        let ([cap_id, next], regs_body) = self
            .regs
            .get_mut(start..end)
            .and_then(|cap| cap.split_first_chunk_mut::<2>())
            .ok_or(no_room)?;
        *cap_id = id;
        *next = 0;
        // end - start = 2 + body.len(): the slices are as long as the body.
        regs_body.copy_from_slice(body);
        if !body_writable.is_empty() {
            if let Some(writable_body) = self.writable.get_mut(start..end).and_then(|cap| cap.get_mut(2..)) {
                writable_body.copy_from_slice(body_writable);
            }
        }
        // Link it in; the pointer byte stays read-only. The capability ends
        // inside the first 256 bytes, so its offset fits the pointer byte.
        if let Some(pointer) = self.regs.get_mut(usize::from(self.last_next_pointer)) {
            *pointer = offset as u8;
        }
        self.last_next_pointer = offset.saturating_add(1);
        self.next_capability = end.next_multiple_of(4) as u16;
        let status = self.read_u16(reg::STATUS) | status::CAPABILITIES_LIST;
        self.set_u16(reg::STATUS, status);
        Ok(offset)
    }

    /// The guest's read of `data.len()` bytes at `offset`; see the type's
    /// documentation for what is accepted.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        match checked_range(offset, data.len()).and_then(|range| self.regs.get(range)) {
            Some(regs) => data.copy_from_slice(regs),
            None => {
                log::debug!("PCI config: {}-byte read at {offset:#x} refused", data.len());
                data.fill(0xff);
            }
        }
    }

    /// The guest's write of `data` at `offset`: writable bits change,
    /// write-1-to-clear bits clear where `data` has a 1, the rest stays.
    /// Returns whether the write was accepted (well-formed).
    pub fn write(&mut self, offset: u16, data: &[u8]) -> bool {
        let Some(range) = checked_range(offset, data.len()) else {
            log::debug!("PCI config: {}-byte write at {offset:#x} refused", data.len());
            return false;
        };
        // checked_range keeps the range inside the space, so these are all
        // there; they are as long as `data`.
        let (Some(regs), Some(writable), Some(write_1_to_clear)) = (
            self.regs.get_mut(range.clone()),
            self.writable.get(range.clone()),
            self.write_1_to_clear.get(range),
        ) else {
            return false;
        };
        for (((reg, &writable), &write_1_to_clear), &value) in
            regs.iter_mut().zip(writable).zip(write_1_to_clear).zip(data)
        {
            let cleared = value & write_1_to_clear;
            *reg = ((*reg & !writable) | (value & writable)) & !cleared;
        }
        true
    }

    /// A 16-bit register (0xffff past the end).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut data = [0u8; 2];
        self.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    /// A 32-bit register (all ones past the end).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut data = [0u8; 4];
        self.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Sets bytes regardless of the write masks (the device model's side).
    /// Out-of-range writes are ignored.
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        put(&mut self.regs[..], offset, data);
    }

    /// Sets a 16-bit register regardless of the write masks.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets a 32-bit register regardless of the write masks.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Makes the bits of `mask` in the 16-bit register at `offset` writable
    /// by the guest (and only those).
    pub fn mask_u16(&mut self, offset: u16, mask: u16) {
        put(&mut self.writable[..], offset, &mask.to_le_bytes());
    }

    /// Makes the bits of `mask` in the 32-bit register at `offset` writable
    /// by the guest (and only those).
    pub fn mask_u32(&mut self, offset: u16, mask: u32) {
        put(&mut self.writable[..], offset, &mask.to_le_bytes());
    }
}

/// The register offset of BAR `index`. An index far past the last BAR
/// gives an offset past the end of the space (where reads are all ones and
/// writes are ignored), never a wrapped-around one.
pub fn bar_offset(index: usize) -> u16 {
    let index = u16::try_from(index).unwrap_or(u16::MAX);
    reg::BAR0.saturating_add(index.saturating_mul(4))
}

/// Copies `data` into `array` at `offset`; a range past the end is ignored.
fn put(array: &mut [u8], offset: u16, data: &[u8]) {
    if let Some(dest) = array
        .get_mut(usize::from(offset)..)
        .and_then(|tail| tail.get_mut(..data.len()))
    {
        dest.copy_from_slice(data);
    }
}

/// The bytes a guest access of `len` at `offset` covers, if it is a
/// naturally aligned 1-, 2- or 4-byte access inside the space.
fn checked_range(offset: u16, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::from(offset);
    let end = start.checked_add(len)?;
    let aligned = matches!(len, 1 | 2 | 4) && start.is_multiple_of(len);
    (aligned && end <= CONFIG_SPACE_SIZE).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor: 0x1af4,
        device: 0x1041,
        revision: 1,
        class: 0x02_00_00,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    };

    fn device() -> ConfigSpace {
        ConfigSpace::new(HeaderType::Device, IDS)
    }

    #[test]
    fn identity_registers_read_back_and_ignore_writes() {
        let mut config = device();
        for offset in (0..0x40).step_by(4) {
            if !(0x04..0x08).contains(&offset)
                && !(0x10..0x28).contains(&offset)
                && offset != 0x3c
                && offset != 0x0c
            {
                let before = config.read_u32(offset);
                config.write(offset, &u32::MAX.to_le_bytes());
                config.write(offset, &0u32.to_le_bytes());
                assert_eq!(config.read_u32(offset), before, "register {offset:#x}");
            }
        }
        assert_eq!(config.read_u32(0x00), 0x1041_1af4);
        assert_eq!(config.read_u32(0x08), 0x0200_0001);
        assert_eq!(config.read_u32(0x2c), 0x0040_1af4);
    }

    #[test]
    fn command_register_takes_only_its_defined_bits() {
        let mut config = device();
        config.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(config.read_u16(reg::COMMAND), command::WRITABLE);
        config.write(reg::COMMAND, &[0]);
        assert_eq!(config.read_u16(reg::COMMAND), command::WRITABLE & 0xff00);
    }

    #[test]
    fn status_error_bits_are_write_1_to_clear_and_the_rest_read_only() {
        let mut config = device();
        config
            .add_capability(capability_id::VENDOR_SPECIFIC, &[0; 2], &[])
            .unwrap();
        config.set_u16(reg::STATUS, 0xf910);
        // Writing zeros changes nothing; ones clear exactly the error bits.
        config.write(reg::STATUS, &0u16.to_le_bytes());
        assert_eq!(config.read_u16(reg::STATUS), 0xf910);
        config.write(reg::STATUS, &0x0900u16.to_le_bytes());
        assert_eq!(config.read_u16(reg::STATUS), 0xf010);
        config.write(reg::STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(config.read_u16(reg::STATUS), status::CAPABILITIES_LIST);
    }

    #[test]
    fn a_32_bit_write_to_command_leaves_status_bits_that_were_not_written_as_ones() {
        let mut config = device();
        config.set_u16(reg::STATUS, 0x8000);
        config.write(reg::COMMAND, &0x0000_0006u32.to_le_bytes());
        assert_eq!(config.read_u16(reg::STATUS), 0x8000);
        assert_eq!(config.read_u16(reg::COMMAND), 0x6);
    }

    #[test]
    fn bar_sizing_returns_the_size_and_flags_for_every_kind() {
        let mut config = device();
        config.set_bar(0, BarSpec::memory64(0x4000)).unwrap();
        config.set_bar(2, BarSpec::memory32(0x1000)).unwrap();
        config
            .set_bar(
                3,
                BarSpec {
                    kind: BarKind::Io,
                    size: 0x20,
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .set_bar(
                4,
                BarSpec {
                    kind: BarKind::Memory64,
                    size: 1 << 33,
                    prefetchable: true,
                },
            )
            .unwrap();
        let mut sized = Vec::new();
        for index in 0..6 {
            config.write(bar_offset(index), &u32::MAX.to_le_bytes());
            sized.push(config.read_u32(bar_offset(index)));
        }
        assert_eq!(
            sized,
            [
                0xffff_c004, // 16 KiB, 64-bit
                0xffff_ffff, // its high dword
                0xffff_f000, // 4 KiB, 32-bit
                0xffff_ffe1, // 32 ports
                0x0000_000c, // 8 GiB, 64-bit prefetchable: low bits all size
                0xffff_fffe, // high dword: bit 32 is inside the size
            ]
        );
    }

    #[test]
    fn unused_bars_and_the_expansion_rom_read_zero_even_after_sizing() {
        let mut config = device();
        config.set_bar(1, BarSpec::memory32(0x100)).unwrap();
        for offset in [0x10, 0x18, 0x1c, 0x20, 0x24, 0x30] {
            config.write(offset, &u32::MAX.to_le_bytes());
            assert_eq!(config.read_u32(offset), 0, "register {offset:#x}");
        }
    }

    #[test]
    fn bar_addresses_move_with_the_guest_and_decode_only_with_memory_space_on() {
        let mut config = device();
        config.set_bar(0, BarSpec::memory64(0x4000)).unwrap();
        config.set_bar_address(0, 0x1_0000_0000).unwrap();
        assert!(config.decoded_memory_bars().is_empty());
        config.write(reg::COMMAND, &command::MEMORY_SPACE.to_le_bytes());
        assert_eq!(config.decoded_memory_bars(), [(0, 0x1_0000_0000, 0x4000)]);
        // Unaligned low bits are dropped.
        config.write(0x10, &0xe000_1234u32.to_le_bytes());
        config.write(0x14, &0u32.to_le_bytes());
        assert_eq!(config.bar_address(0), Some(0xe000_0000));
    }

    #[test]
    fn a_bar_that_would_wrap_the_address_space_does_not_decode() {
        let mut config = device();
        config.set_bar(0, BarSpec::memory64(0x4000)).unwrap();
        config.write(reg::COMMAND, &command::MEMORY_SPACE.to_le_bytes());
        config.write(0x10, &u32::MAX.to_le_bytes());
        config.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(config.bar_address(0), Some(0xffff_ffff_ffff_c000));
        assert!(config.decoded_memory_bars().is_empty());
    }

    #[test]
    fn bar_declarations_are_checked() {
        let mut config = device();
        assert!(matches!(
            config.set_bar(0, BarSpec::memory32(0x3000)),
            Err(Error::InvalidBarSize { .. })
        ));
        assert!(matches!(
            config.set_bar(0, BarSpec::memory32(8)),
            Err(Error::InvalidBarSize { .. })
        ));
        assert!(matches!(
            config.set_bar(5, BarSpec::memory64(0x1000)),
            Err(Error::NoSuchBar { index: 5 })
        ));
        config.set_bar(0, BarSpec::memory64(0x1000)).unwrap();
        assert!(matches!(
            config.set_bar(1, BarSpec::memory32(0x1000)),
            Err(Error::BarInUse { index: 1 })
        ));
        assert!(matches!(
            config.set_bar_address(0, 0x1800),
            Err(Error::MisplacedBar { .. })
        ));
        assert!(matches!(
            config.set_bar_address(3, 0),
            Err(Error::NoSuchBar { .. })
        ));
        let err = config.set_bar(6, BarSpec::memory32(16)).unwrap_err();
        assert!(err.to_string().contains("BAR 6"), "{err}");
    }

    #[test]
    fn capabilities_are_linked_in_order_with_read_only_headers() {
        let mut config = device();
        let first = config
            .add_capability(capability_id::VENDOR_SPECIFIC, &[14, 1, 2, 3], &[0, 0, 0xff, 0])
            .unwrap();
        let second = config.add_capability(capability_id::MSIX, &[0; 10], &[]).unwrap();
        assert_eq!((first, second), (0x40, 0x48));
        assert_ne!(config.read_u16(reg::STATUS) & status::CAPABILITIES_LIST, 0);
        assert_eq!(config.read_u32(0x34) & 0xff, 0x40);
        assert_eq!(config.read_u16(0x40), 0x4809);
        assert_eq!(config.read_u16(0x48), 0x0011);
        // The list cannot be rewired by the guest; only writable body bits move.
        config.write(0x34, &[0x80]);
        config.write(0x40, &u32::MAX.to_le_bytes());
        config.write(0x44, &u32::MAX.to_le_bytes());
        assert_eq!(config.read_u32(0x34) & 0xff, 0x40);
        assert_eq!(config.read_u32(0x40), 0x010e_4809);
        assert_eq!(config.read_u16(0x44), 0x03ff);
    }

    #[test]
    fn capabilities_past_the_legacy_space_are_refused() {
        let mut config = device();
        for _ in 0..3 {
            config
                .add_capability(capability_id::VENDOR_SPECIFIC, &[0; 62], &[])
                .unwrap();
        }
        let err = config
            .add_capability(capability_id::VENDOR_SPECIFIC, &[0; 62], &[])
            .unwrap_err();
        assert!(matches!(err, Error::CapabilitySpace { len: 64, .. }), "{err:?}");
    }

    #[test]
    fn malformed_accesses_read_all_ones_and_write_nothing() {
        let mut config = device();
        config.write(reg::COMMAND, &command::MEMORY_SPACE.to_le_bytes());
        let before = config.clone();
        for (offset, len) in [
            (0x01, 2),
            (0x02, 4),
            (0x04, 3),
            (0x04, 8),
            (0x04, 0),
            (0xffe, 4),
            (0xfff, 2),
            (u16::MAX, 1),
        ] {
            let mut data = vec![0u8; len];
            config.read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0xff), "{len} bytes at {offset:#x}");
            assert!(!config.write(offset, &vec![0u8; len]));
        }
        assert_eq!(before.regs, config.regs);
    }

    #[test]
    fn extended_space_reads_zero_meaning_no_extended_capabilities() {
        let mut config = device();
        config.write(0x100, &u32::MAX.to_le_bytes());
        assert_eq!(config.read_u32(0x100), 0);
        assert_eq!(config.read_u32(0xffc), 0);
    }

    #[test]
    fn bridge_header_has_two_bars_and_writable_bus_numbers_and_windows() {
        let mut config = ConfigSpace::new(HeaderType::Bridge, IDS);
        assert_eq!(config.read_u32(0x0c) >> 16 & 0x7f, 1);
        assert!(matches!(
            config.set_bar(2, BarSpec::memory32(0x1000)),
            Err(Error::NoSuchBar { index: 2 })
        ));
        config.write(reg::PRIMARY_BUS, &0x0002_0100u32.to_le_bytes());
        assert_eq!(config.read_u32(reg::PRIMARY_BUS), 0x0002_0100);
        config.write(reg::MEMORY_BASE, &u32::MAX.to_le_bytes());
        assert_eq!(config.read_u32(reg::MEMORY_BASE), 0xfff0_fff0);
        config.write(reg::PREFETCHABLE_BASE, &0u32.to_le_bytes());
        assert_eq!(
            config.read_u32(reg::PREFETCHABLE_BASE),
            0x0001_0001,
            "64-bit flag stays"
        );
        config.write(reg::IO_BASE, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(config.read_u16(reg::IO_BASE), 0xf0f0);
    }

    #[test]
    fn multifunction_bit_sets_and_clears_without_touching_the_layout() {
        let mut config = ConfigSpace::new(HeaderType::Bridge, IDS);
        config.set_multifunction(true);
        assert_eq!(config.read_u32(0x0c) >> 16 & 0xff, 0x81);
        config.set_multifunction(false);
        assert_eq!(config.read_u32(0x0c) >> 16 & 0xff, 0x01);
    }

    #[test]
    fn random_writes_never_change_read_only_bytes() {
        let mut config = device();
        config.set_bar(0, BarSpec::memory64(0x4000)).unwrap();
        config
            .add_capability(capability_id::MSIX, &[0; 10], &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let reference = config.clone();
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = [1usize, 2, 4, 3, 8][(state % 5) as usize];
            let offset = (state >> 8) as u16 % 0x1010;
            config.write(offset, &state.to_le_bytes()[..len]);
        }
        for i in 0..CONFIG_SPACE_SIZE {
            let fixed = !(reference.writable[i] | reference.write_1_to_clear[i]);
            assert_eq!(config.regs[i] & fixed, reference.regs[i] & fixed, "byte {i:#x}");
        }
    }
}
