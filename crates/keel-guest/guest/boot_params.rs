//! What the VMM hands over at boot: the Linux zero page (`struct
//! boot_params`, 64-bit entry) or the PVH `struct hvm_start_info` (PVH
//! entry), told apart by the PVH magic in the first `u32`.

use core::ptr::read_unaligned;

use crate::ring0::IDENTITY_MAPPED;

const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
/// The zero page has room for 128 e820 entries.
const E820_MAX: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
const ZERO_PAGE_SIZE: u64 = 4096;
/// Longest command line read (Linux's x86 `COMMAND_LINE_SIZE`).
const CMDLINE_MAX: usize = 2048;

/// `hvm_start_info.magic` ("xEn3" with bit 7 of the 'E' set).
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: usize = 4;
const PVH_CMDLINE_PADDR: usize = 24;
const PVH_MEMMAP_PADDR: usize = 40;
const PVH_MEMMAP_ENTRIES: usize = 48;
/// `sizeof(struct hvm_start_info)` for version 1.
const PVH_INFO_SIZE: u64 = 56;
/// `struct hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const PVH_MEMMAP_ENTRY_SIZE: usize = 24;
/// Most memory map entries read (as many as the zero page holds).
const PVH_MEMMAP_MAX: usize = E820_MAX;

/// e820 type of usable RAM (the PVH memory map uses the same types).
pub const E820_RAM: u32 = 1;

/// One e820 memory map entry.
#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

#[derive(Clone, Copy)]
enum Kind {
    /// A pointer outside mapped RAM: no command line, no memory map.
    Missing,
    ZeroPage,
    /// `hvm_start_info`; the memory map (already checked to lie in mapped
    /// RAM) at `memmap` with `entries` entries.
    Pvh {
        memmap: u64,
        entries: usize,
    },
}

/// Read access to the zero page or `hvm_start_info`.
pub struct BootParams {
    base: *const u8,
    kind: Kind,
}

/// Whether `[addr, addr + len)` lies in the RAM the guest identity-maps
/// (address 0 excluded: a null pointer is no pointer).
fn mapped_ram(addr: u64, len: u64) -> bool {
    let (ram_start, ram_end) = IDENTITY_MAPPED[0];
    addr != 0 && addr >= ram_start && addr.checked_add(len).is_some_and(|end| end <= ram_end)
}

impl BootParams {
    /// # Safety
    ///
    /// If `base` lies in identity-mapped RAM, that memory must hold what the
    /// boot protocol promises there (a 4 KiB zero page or `hvm_start_info`)
    /// and not change while the guest runs. Other pointers, and pointers in
    /// the structure to outside mapped RAM, are ignored (a broken VMM must
    /// not fault the guest before it can say so).
    pub unsafe fn new(base: *const u8) -> Self {
        let mut params = Self {
            base,
            kind: Kind::Missing,
        };
        if !mapped_ram(base as u64, PVH_INFO_SIZE) {
            return params;
        }
        if params.read::<u32>(0) == PVH_MAGIC {
            let version = params.read::<u32>(PVH_VERSION);
            let memmap = params.read::<u64>(PVH_MEMMAP_PADDR);
            let entries = (params.read::<u32>(PVH_MEMMAP_ENTRIES) as usize).min(PVH_MEMMAP_MAX);
            let entries =
                if version >= 1 && mapped_ram(memmap, (entries * PVH_MEMMAP_ENTRY_SIZE) as u64) {
                    entries
                } else {
                    0
                };
            params.kind = Kind::Pvh { memmap, entries };
        } else if mapped_ram(base as u64, ZERO_PAGE_SIZE) {
            params.kind = Kind::ZeroPage;
        }
        params
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: `new` only reads, and only keeps a kind other than
        // `Missing` for, a structure in mapped RAM; every offset used is
        // inside it (56 bytes of `hvm_start_info`, 4 KiB of zero page).
        unsafe { read_unaligned(self.base.add(offset).cast::<T>()) }
    }

    /// The kernel command line: empty when there is none, cut at the NUL or
    /// at `CMDLINE_MAX` bytes, and empty when the pointer is outside RAM the
    /// guest maps (a broken VMM must not fault the guest before it can say so).
    pub fn command_line(&self) -> &'static [u8] {
        let ptr = match self.kind {
            Kind::Missing => return &[],
            Kind::ZeroPage => u64::from(self.read::<u32>(CMD_LINE_PTR)),
            Kind::Pvh { .. } => self.read::<u64>(PVH_CMDLINE_PADDR),
        };
        if !mapped_ram(ptr, CMDLINE_MAX as u64) {
            return &[];
        }
        let ptr = ptr as *const u8;
        let mut len = 0;
        // SAFETY: [ptr, ptr + CMDLINE_MAX) is mapped (checked above) and
        // nothing writes the command line while the guest runs.
        unsafe {
            while len < CMDLINE_MAX && ptr.add(len).read_volatile() != 0 {
                len += 1;
            }
            core::slice::from_raw_parts(ptr, len)
        }
    }

    /// The memory map: the zero page's e820 table or the PVH memory map.
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + '_ {
        let count = match self.kind {
            Kind::Missing => 0,
            Kind::ZeroPage => usize::from(self.read::<u8>(E820_ENTRIES)).min(E820_MAX),
            Kind::Pvh { entries, .. } => entries,
        };
        (0..count).map(move |i| match self.kind {
            Kind::Pvh { memmap, .. } => {
                let entry = (memmap + (i * PVH_MEMMAP_ENTRY_SIZE) as u64) as *const u8;
                // SAFETY: `new` checked that all `entries` entries lie in
                // mapped RAM.
                unsafe {
                    E820Entry {
                        addr: read_unaligned(entry.cast::<u64>()),
                        size: read_unaligned(entry.add(8).cast::<u64>()),
                        kind: read_unaligned(entry.add(16).cast::<u32>()),
                    }
                }
            }
            _ => {
                let entry = E820_TABLE + i * E820_ENTRY_SIZE;
                E820Entry {
                    addr: self.read(entry),
                    size: self.read(entry + 8),
                    kind: self.read(entry + 16),
                }
            }
        })
    }

    /// Whether any usable RAM lies in `[addr, addr + len)`.
    pub fn overlaps_ram(&self, addr: u64, len: u64) -> bool {
        self.e820().any(|e| {
            e.kind == E820_RAM
                && addr < e.addr.saturating_add(e.size)
                && e.addr < addr.saturating_add(len)
        })
    }

    /// The first address past every usable RAM range.
    pub fn ram_end(&self) -> u64 {
        self.e820()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.addr.saturating_add(e.size))
            .max()
            .unwrap_or(0)
    }
}
