//! Memory shared with devices: a static arena in `.bss`, handed out in
//! aligned pieces that are never freed (a program runs once per boot).
//!
//! The guest identity-maps RAM, so a buffer's address is both the pointer
//! ring 3 uses and the guest-physical address a device is given. Devices
//! write these bytes behind the compiler's back: every access goes through
//! raw pointers, and [`barrier`] tells the compiler memory may have changed
//! (x86 keeps stores ordered, so no fence instruction is needed).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Size of the arena.
const ARENA_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the guest runs one thread; pieces are handed out once each.
unsafe impl Sync for Arena {}

/// In a section of its own (`link.ld` places it outside `__bss_start` ..
/// `__bss_end`), so boot does not zero it: [`alloc`] zeroes each piece it
/// hands out instead, and a program that uses no device touches none of
/// its pages (each first touch costs the host a page and, on a
/// shadow-paging host, an exit).
#[link_section = ".bss.keel_dma"]
static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));
static USED: AtomicUsize = AtomicUsize::new(0);

/// A compiler barrier: memory a device may have written is re-read after it.
pub fn barrier() {
    // SAFETY: an empty asm block without `nomem` only clobbers memory.
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) }
}

/// A piece of the arena: `len` bytes at guest-physical address `addr`.
#[derive(Clone, Copy)]
pub struct Buffer {
    addr: u64,
    len: usize,
}

/// Hands out `len` zeroed bytes aligned to `align` (a power of two), or
/// `None` when the arena is spent.
pub fn alloc(len: usize, align: usize) -> Option<Buffer> {
    let base = ARENA.0.get() as usize;
    let start = USED.load(Ordering::Relaxed);
    let offset = (base + start).next_multiple_of(align) - base;
    let end = offset.checked_add(len)?;
    if end > ARENA_SIZE {
        return None;
    }
    USED.store(end, Ordering::Relaxed);
    let buffer = Buffer {
        addr: (base + offset) as u64,
        len,
    };
    buffer.fill(0);
    Some(buffer)
}

/// Like [`alloc`], for buffers a program cannot do without: panics (status
/// 3, a guest bug) when the arena is too small.
pub fn alloc_or_panic(len: usize, align: usize) -> Buffer {
    match alloc(len, align) {
        Some(buffer) => buffer,
        None => panic!("DMA arena exhausted ({len} bytes wanted, {ARENA_SIZE} in all)"),
    }
}

impl Buffer {
    /// Guest-physical (= virtual) address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The sub-buffer `[offset, offset + len)`.
    pub fn slice(&self, offset: usize, len: usize) -> Buffer {
        assert!(offset + len <= self.len, "sub-buffer out of range");
        Buffer {
            addr: self.addr + offset as u64,
            len,
        }
    }

    fn ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Sets every byte to `value`.
    pub fn fill(&self, value: u8) {
        // SAFETY: the range is inside the arena, which only device DMA and
        // this module's raw pointers touch.
        unsafe { core::ptr::write_bytes(self.ptr(), value, self.len) }
        barrier();
    }

    /// Copies `data` in at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write out of range");
        // SAFETY: in range (checked), arena memory, no overlap with `data`
        // unless the caller passes a view of this very buffer, which
        // `copy` (memmove) tolerates.
        unsafe { core::ptr::copy(data.as_ptr(), self.ptr().add(offset), data.len()) }
        barrier();
    }

    /// Copies bytes out from `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "read out of range");
        barrier();
        // SAFETY: in range (checked); see `write`.
        unsafe { core::ptr::copy(self.ptr().add(offset), out.as_mut_ptr(), out.len()) }
    }

    /// The byte at `offset`.
    pub fn byte(&self, offset: usize) -> u8 {
        assert!(offset < self.len, "byte out of range");
        // SAFETY: in range; volatile, since a device may have just written it.
        unsafe { self.ptr().add(offset).read_volatile() }
    }

    /// Writes a little-endian `u32` at `offset`.
    pub fn put_u32(&self, offset: usize, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Writes a little-endian `u64` at `offset`.
    pub fn put_u64(&self, offset: usize, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    /// The bytes, for reading (after the device is done with them).
    pub fn bytes(&self) -> &[u8] {
        barrier();
        // SAFETY: arena memory in range; the caller reads it only while no
        // request that may write it is outstanding.
        unsafe { core::slice::from_raw_parts(self.ptr(), self.len) }
    }

    /// The bytes, for filling in (before handing them to a device).
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as for `bytes`; callers hold no other view meanwhile.
        unsafe { core::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }

    /// Index of the first byte that differs from `other`'s, if any.
    pub fn first_difference(&self, other: &[u8]) -> Option<usize> {
        let mine = self.bytes();
        mine.iter().zip(other).position(|(a, b)| a != b)
    }
}
