//! The Linux zero page (`struct boot_params`) the VMM hands over in RSI.

use core::ptr::read_unaligned;

use crate::ring0::IDENTITY_MAPPED;

const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
/// The zero page has room for 128 e820 entries.
const E820_MAX: usize = 128;
const E820_ENTRY_SIZE: usize = 20;
/// Longest command line read (Linux's x86 `COMMAND_LINE_SIZE`).
const CMDLINE_MAX: usize = 2048;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One e820 memory map entry.
#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Read access to the zero page.
pub struct BootParams {
    base: *const u8,
}

impl BootParams {
    /// # Safety
    ///
    /// `base` must point to a 4 KiB zero page in identity-mapped RAM, as the
    /// boot protocol promises.
    pub unsafe fn new(base: *const u8) -> Self {
        Self { base }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: every offset used is inside the 4 KiB zero page (`new`).
        unsafe { read_unaligned(self.base.add(offset).cast::<T>()) }
    }

    /// The kernel command line: empty when there is none, cut at the NUL or
    /// at `CMDLINE_MAX` bytes, and empty when the pointer is outside RAM the
    /// guest maps (a broken VMM must not fault the guest before it can say so).
    pub fn command_line(&self) -> &'static [u8] {
        let ptr = u64::from(self.read::<u32>(CMD_LINE_PTR));
        let (ram_start, ram_end) = IDENTITY_MAPPED[0];
        if ptr == 0 || ptr < ram_start || ptr + CMDLINE_MAX as u64 > ram_end {
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

    /// The e820 memory map.
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + '_ {
        let count = usize::from(self.read::<u8>(E820_ENTRIES)).min(E820_MAX);
        (0..count).map(move |i| {
            let entry = E820_TABLE + i * E820_ENTRY_SIZE;
            E820Entry {
                addr: self.read(entry),
                size: self.read(entry + 8),
                kind: self.read(entry + 16),
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
