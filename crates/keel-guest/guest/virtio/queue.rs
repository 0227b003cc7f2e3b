//! Split virtqueues (virtio 1.2, section 2.7) in the DMA arena, and a chain
//! builder that makes well-formed chains as easily as broken ones.
//!
//! Layout of one queue, in one zeroed piece of the arena: the descriptor
//! table (16-byte aligned), right after it the available ring (2-byte
//! aligned) and, at the next 4-byte boundary, the used ring — the minimum
//! alignments the spec asks for, so a device that assumes more is caught.

use core::ptr::{read_volatile, write_volatile};

use super::{feature, status, Transport};
use crate::dma::{self, Buffer};
use crate::tsc;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Available ring flag: no interrupt wanted.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: no notification needed.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue this driver sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most descriptors a [`Chain`] holds.
pub const MAX_CHAIN: usize = 64;

/// Where a descriptor's `next` points.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The following element of the chain, or nothing for the last one.
    Following,
    /// No NEXT flag, even in the middle of a chain.
    End,
    /// NEXT to element `i` of the same chain (loops, skips).
    Element(u16),
    /// NEXT to this raw index of the table (anything, even past its end).
    Index(u16),
}

/// One descriptor as the chain builder keeps it.
#[derive(Clone, Copy)]
pub struct Entry {
    pub addr: u64,
    pub len: u32,
    /// Flags besides NEXT, which [`Next`] decides.
    pub flags: u16,
    pub next: Next,
}

/// A descriptor chain before it is written into a table.
#[derive(Clone, Copy)]
pub struct Chain {
    entries: [Entry; MAX_CHAIN],
    len: usize,
}

impl Chain {
    pub fn new() -> Self {
        Self {
            entries: [Entry {
                addr: 0,
                len: 0,
                flags: 0,
                next: Next::Following,
            }; MAX_CHAIN],
            len: 0,
        }
    }

    /// Appends any descriptor.
    pub fn push(mut self, entry: Entry) -> Self {
        assert!(self.len < MAX_CHAIN, "chain longer than {MAX_CHAIN}");
        self.entries[self.len] = entry;
        self.len += 1;
        self
    }

    /// Appends a buffer the device reads.
    pub fn readable(self, addr: u64, len: u32) -> Self {
        self.push(Entry {
            addr,
            len,
            flags: 0,
            next: Next::Following,
        })
    }

    /// Appends a buffer the device writes.
    pub fn writable(self, addr: u64, len: u32) -> Self {
        self.push(Entry {
            addr,
            len,
            flags: DESC_F_WRITE,
            next: Next::Following,
        })
    }

    /// Appends `buffer` as device-readable.
    pub fn read_buf(self, buffer: Buffer) -> Self {
        self.readable(buffer.addr(), buffer.len() as u32)
    }

    /// Appends `buffer` as device-writable.
    pub fn write_buf(self, buffer: Buffer) -> Self {
        self.writable(buffer.addr(), buffer.len() as u32)
    }

    /// Appends an indirect descriptor for a table of `entries` descriptors
    /// at `table`.
    pub fn indirect(self, table: u64, entries: usize) -> Self {
        self.push(Entry {
            addr: table,
            len: (entries * 16) as u32,
            flags: DESC_F_INDIRECT,
            next: Next::Following,
        })
    }

    /// Makes the last descriptor point at `next` instead.
    pub fn link_last(mut self, next: Next) -> Self {
        if self.len > 0 {
            self.entries[self.len - 1].next = next;
        }
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes the chain into a descriptor table at `table` as the
    /// descriptors `first .. first + len`, resolving [`Next`] links.
    pub fn write_table(&self, table: u64, first: u16) {
        for (i, entry) in self.entries[..self.len].iter().enumerate() {
            let (has_next, next) = match entry.next {
                Next::Following if i + 1 < self.len => (true, first + i as u16 + 1),
                Next::Following | Next::End => (false, 0),
                Next::Element(e) => (true, first + e),
                Next::Index(index) => (true, index),
            };
            let flags = entry.flags | if has_next { DESC_F_NEXT } else { 0 };
            let desc = table + 16 * u64::from(first + i as u16);
            // SAFETY: tables live in the DMA arena (or the caller's own
            // arena buffer); 16-byte aligned, in range by construction.
            unsafe {
                write_volatile(desc as *mut u64, entry.addr);
                write_volatile((desc + 8) as *mut u32, entry.len);
                write_volatile((desc + 12) as *mut u16, flags);
                write_volatile((desc + 14) as *mut u16, next);
            }
        }
    }
}

/// What waiting for a used buffer ended with.
#[derive(Clone, Copy)]
pub enum Wait {
    /// The device used the chain at `id`, writing `len` bytes.
    Used { id: u16, len: u32 },
    /// The device set DEVICE_NEEDS_RESET instead.
    NeedsReset { status: u32 },
    /// Neither happened in time; the ring indexes at that point.
    Timeout(RingState),
}

/// Where a queue stood, for messages about a stuck request.
#[derive(Clone, Copy)]
pub struct RingState {
    pub avail_idx: u16,
    pub used_idx: u16,
    pub used_flags: u16,
    pub avail_event: u16,
}

impl core::fmt::Display for RingState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "available index {}, used index {}, used flags {:#x}, avail_event {}",
            self.avail_idx, self.used_idx, self.used_flags, self.avail_event
        )
    }
}

/// A split virtqueue owned by the driver.
pub struct Virtqueue {
    index: u16,
    size: u16,
    mem: Buffer,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    /// Always notify, ignoring the device's suppression hints.
    pub force_notify: bool,
    avail_idx: u16,
    /// avail_idx at the last notification decision.
    kicked_idx: u16,
    last_used: u16,
    next_desc: u16,
    free_descs: u16,
    /// Descriptors taken by chains in flight, one bit each.
    in_use: [u64; MAX_QUEUE_SIZE as usize / 64],
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
}

/// Bytes one queue of `size` entries takes.
fn queue_bytes(size: u16) -> usize {
    let size = usize::from(size);
    let avail_end = 16 * size + 6 + 2 * size;
    avail_end.next_multiple_of(4) + 6 + 8 * size
}

impl Virtqueue {
    /// A queue of `size` entries (a power of two, at most
    /// [`MAX_QUEUE_SIZE`]) for queue `index`, in a fresh piece of the arena.
    pub fn new(index: u16, size: u16) -> Self {
        assert!(
            size.is_power_of_two() && size <= MAX_QUEUE_SIZE,
            "queue size {size}"
        );
        let mem = dma::alloc_or_panic(queue_bytes(MAX_QUEUE_SIZE), 4096);
        let mut queue = Self {
            index,
            size,
            mem,
            desc: 0,
            avail: 0,
            used: 0,
            event_idx: false,
            force_notify: false,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            next_desc: 0,
            free_descs: 0,
            in_use: [0; MAX_QUEUE_SIZE as usize / 64],
            chain_len: [0; MAX_QUEUE_SIZE as usize],
        };
        queue.reset(size, false);
        queue
    }

    /// Back to an empty queue of `size` entries (at most the size it was
    /// made with), with or without EVENT_IDX, for a new initialisation.
    pub fn reset(&mut self, size: u16, event_idx: bool) {
        assert!(
            size.is_power_of_two() && size <= MAX_QUEUE_SIZE,
            "queue size {size}"
        );
        self.mem.fill(0);
        self.size = size;
        self.desc = self.mem.addr();
        self.avail = self.desc + 16 * u64::from(size);
        self.used = (self.avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        self.event_idx = event_idx;
        self.avail_idx = 0;
        self.kicked_idx = 0;
        self.last_used = 0;
        self.next_desc = 0;
        self.free_descs = size;
        self.in_use = [0; MAX_QUEUE_SIZE as usize / 64];
        self.chain_len = [0; MAX_QUEUE_SIZE as usize];
    }

    /// Reset for the features a device accepted.
    pub fn reset_for(&mut self, size: u16, features: u64) {
        self.reset(size, features & feature::RING_EVENT_IDX != 0);
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// (descriptor table, available ring, used ring).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The driver's available index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains made available and not yet used.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    fn write16(&self, addr: u64, value: u16) {
        // SAFETY: ring fields inside this queue's arena piece, 2-byte aligned.
        unsafe { write_volatile(addr as *mut u16, value) }
    }

    fn read16(&self, addr: u64) -> u16 {
        // SAFETY: as for write16.
        unsafe { read_volatile(addr as *const u16) }
    }

    fn read32(&self, addr: u64) -> u32 {
        // SAFETY: used ring fields, 4-byte aligned, in this queue's piece.
        unsafe { read_volatile(addr as *const u32) }
    }

    /// Sets the available ring's flags (e.g. [`AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, flags: u16) {
        self.write16(self.avail, flags);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.read16(self.used + 2)
    }

    /// Writes `chain` into free descriptors (a run of consecutive ones, so
    /// [`Next::Element`] links stay simple) and makes it available. Returns
    /// the head index, or `None` if no run of free descriptors is long
    /// enough.
    pub fn add(&mut self, chain: &Chain) -> Option<u16> {
        let len = chain.len() as u16;
        if len == 0 || len > self.free_descs {
            return None;
        }
        let head = (0..self.size)
            .map(|k| (self.next_desc + k) % self.size)
            .find(|&start| {
                start + len <= self.size && (start..start + len).all(|d| !self.taken(d))
            })?;
        chain.write_table(self.desc, head);
        for d in head..head + len {
            self.in_use[usize::from(d / 64)] |= 1 << (d % 64);
        }
        self.next_desc = (head + len) % self.size;
        self.free_descs -= len;
        self.chain_len[usize::from(head)] = len;
        self.publish(head);
        Some(head)
    }

    fn taken(&self, desc: u16) -> bool {
        self.in_use[usize::from(desc / 64)] & (1 << (desc % 64)) != 0
    }

    /// Sets the available index as it is, without adding anything (hostile
    /// tests: an index far ahead of the used one).
    pub fn set_avail_idx_raw(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write16(self.avail + 2, idx);
    }

    /// Puts `head` in the available ring without touching descriptors
    /// (hostile tests: a head that is no chain, or past the table).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.write16(self.avail + 4 + 2 * slot, head);
        dma::barrier();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write16(self.avail + 2, self.avail_idx);
    }

    /// Notifies the device through `transport` if it asked to be (or
    /// always, with `force_notify`).
    pub fn kick(&mut self, transport: &Transport) {
        // A full fence: the available index store must be visible before
        // the flags or avail_event are loaded. x86 may otherwise satisfy
        // the load from before the store leaves the store buffer, and with
        // the device re-enabling notifications at that moment, both sides
        // miss each other (Linux's virtio_mb() in virtqueue_kick_prepare).
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        let needed = if self.force_notify {
            true
        } else if self.event_idx {
            // avail_event sits after the used ring's entries.
            let event = self.read16(self.used + 4 + 8 * u64::from(self.size));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.read16(self.used) & USED_F_NO_NOTIFY == 0
        };
        if needed {
            transport.notify(self.index);
        }
    }

    /// The ring indexes and the device's notification hints.
    pub fn state(&self) -> RingState {
        RingState {
            avail_idx: self.avail_idx,
            used_idx: self.used_idx(),
            used_flags: self.read16(self.used),
            avail_event: self.read16(self.used + 4 + 8 * u64::from(self.size)),
        }
    }

    /// The next used element, if the device has returned one.
    pub fn poll(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        dma::barrier();
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used + 4 + 8 * slot;
        let id = self.read32(elem);
        let len = self.read32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // used_event: interrupt us when the next buffer is used.
            self.write16(self.avail + 4 + 2 * u64::from(self.size), self.last_used);
        }
        let id = id as u16;
        if let Some(count) = self.chain_len.get_mut(usize::from(id)) {
            let count = core::mem::take(count);
            for d in id..id + count {
                self.in_use[usize::from(d / 64)] &= !(1 << (d % 64));
            }
            self.free_descs += count;
        }
        Some((id, len))
    }

    /// Waits for the next used element, for DEVICE_NEEDS_RESET (read from
    /// the status register once the wait passes 1 ms, then every ms), or
    /// for `timeout_ms` to pass.
    pub fn wait(&mut self, transport: &Transport, timeout_ms: u64) -> Wait {
        let start = tsc::now();
        let ms = tsc::ticks_per_ms(1);
        let mut next_check = ms;
        loop {
            if let Some((id, len)) = self.poll() {
                return Wait::Used { id, len };
            }
            let elapsed = tsc::now().wrapping_sub(start);
            if elapsed > next_check {
                next_check += ms;
                let status = transport.status();
                if status & status::DEVICE_NEEDS_RESET != 0 {
                    return Wait::NeedsReset { status };
                }
                if elapsed > timeout_ms * ms {
                    return Wait::Timeout(self.state());
                }
            }
            core::hint::spin_loop();
        }
    }
}
