//! Descriptor chains as a device may trust them: walked once, checked
//! against guest memory, and split into the bytes the device may read and
//! the bytes it may write.
//!
//! `virtio-queue`'s [`DescriptorChain`] iterator follows `next` links and
//! indirect tables but simply stops on anything it cannot follow (an index
//! out of range, a loop, an unreadable table). [`RequestBuffers::parse`]
//! turns every such stop into a [`ChainError`], so a truncated chain is never
//! mistaken for a complete one, and reads each descriptor exactly once, so a
//! guest rewriting its descriptors while the device works cannot change what
//! the device checked.

use std::ops::Deref;

use crate::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Why a descriptor chain cannot be used. Any of these means the driver
/// broke the virtqueue rules; the device answers with `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// The head led nowhere (an index past the table, an empty or invalid
    /// indirect table).
    #[error("the chain has no descriptors")]
    Empty,
    /// The walk stopped at a descriptor that still says "next".
    #[error(
        "the chain breaks off after {descriptors} descriptors: a next index past the table, a \
         loop, an invalid indirect table or more than 4 GiB in total"
    )]
    Unterminated {
        /// Descriptors read before the walk stopped.
        descriptors: usize,
    },
    /// More descriptors than the queue has entries.
    #[error("the chain is longer than the queue size {max}")]
    TooLong {
        /// The queue size.
        max: u16,
    },
    /// A buffer is not entirely inside guest RAM.
    #[error("descriptor {index} points at {len:#x} bytes at {addr:#x}, outside guest memory")]
    OutsideMemory {
        /// Position of the descriptor in the chain.
        index: usize,
        /// The buffer's guest physical address.
        addr: u64,
        /// The buffer's length.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Position of the descriptor in the chain.
        index: usize,
    },
}

/// One guest buffer of a chain, inside guest memory and non-empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The buffers of one descriptor chain, checked: every buffer lies in guest
/// memory, readable ones come before writable ones, and the chain ended
/// properly. Zero-length descriptors are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestBuffers {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl RequestBuffers {
    /// Walks `chain` once and checks it. `max_descriptors` is the queue size:
    /// no chain, indirect tables included, may be longer.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        max_descriptors: u16,
    ) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut buffers = Self {
            head,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut count = 0usize;
        let mut last_has_next = false;
        for desc in chain {
            if count == usize::from(max_descriptors) {
                return Err(ChainError::TooLong { max: max_descriptors });
            }
            let index = count;
            // Below `max_descriptors`, a u16, after the check above.
            count = count.saturating_add(1);
            last_has_next = desc.has_next();
            if desc.len() == 0 {
                continue;
            }
            let access = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(desc.addr(), desc.len() as usize, access) {
                return Err(ChainError::OutsideMemory {
                    index,
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.is_write_only() {
                buffers.writable.push(segment);
            } else if buffers.writable.is_empty() {
                buffers.readable.push(segment);
            } else {
                return Err(ChainError::ReadableAfterWritable { index });
            }
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            return Err(ChainError::Unterminated { descriptors: count });
        }
        Ok(buffers)
    }

    /// The descriptor index of the chain's head, for the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }

    /// The longest single buffer, readable or writable.
    pub fn longest_segment(&self) -> u32 {
        self.readable
            .iter()
            .chain(&self.writable)
            .map(|s| s.len)
            .max()
            .unwrap_or(0)
    }

    /// A cursor over the readable bytes.
    pub fn reader<'a>(&'a self, mem: &'a GuestMemoryMmap) -> GuestReader<'a> {
        GuestReader {
            mem,
            cursor: SegmentCursor::new(&self.readable, u64::MAX),
        }
    }

    /// A cursor over the first `limit` writable bytes (all of them if there
    /// are fewer).
    pub fn writer<'a>(&'a self, mem: &'a GuestMemoryMmap, limit: u64) -> GuestWriter<'a> {
        GuestWriter {
            mem,
            cursor: SegmentCursor::new(&self.writable, limit),
        }
    }

    /// Every buffer of the chain, readable ones first: for devices that act
    /// on the guest memory a chain names rather than on its bytes (the
    /// balloon's free page reports).
    pub fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.readable.iter().chain(&self.writable)
    }

    /// The address of the last writable byte, where request formats such as
    /// virtio-blk put their status.
    pub fn last_writable_byte(&self) -> Option<GuestAddress> {
        let last = self.writable.last()?;
        // Segments are never empty (parse drops zero-length descriptors).
        last.addr.checked_add(u64::from(last.len.checked_sub(1)?))
    }
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// A position in a list of segments, with a byte budget.
#[derive(Debug)]
struct SegmentCursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
    remaining: u64,
    consumed: u64,
}

impl<'a> SegmentCursor<'a> {
    fn new(segments: &'a [Segment], limit: u64) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
            remaining: total(segments).min(limit),
            consumed: 0,
        }
    }

    /// The next contiguous guest span of at most `max` bytes; advances past it.
    fn next_span(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        if self.remaining == 0 || max == 0 {
            return None;
        }
        let segment = self.segments.get(self.index)?;
        // `offset` stays below `segment.len`: it goes back to 0 at the end
        // of a segment.
        let left_in_segment = segment.len.checked_sub(self.offset)?;
        let wanted = self.remaining.min(u64::try_from(max).unwrap_or(u64::MAX));
        let len = left_in_segment.min(u32::try_from(wanted).unwrap_or(u32::MAX));
        // Never fails: parse checked that the whole segment is in memory.
        let addr = segment.addr.checked_add(u64::from(self.offset))?;
        if len == left_in_segment {
            // `index` is below `segments.len()`, a usize.
            self.index = self.index.saturating_add(1);
            self.offset = 0;
        } else {
            // Below `segment.len`, a u32.
            self.offset = self.offset.saturating_add(len);
        }
        // `len` is at most `remaining`, and `consumed + remaining` at most
        // the segments' total, a u64.
        self.remaining = self.remaining.saturating_sub(u64::from(len));
        self.consumed = self.consumed.saturating_add(u64::from(len));
        // A u32 fits in a usize on every target this crate runs on (64-bit).
        Some((addr, len as usize))
    }
}

/// Reads the device-readable bytes of a chain in order.
#[derive(Debug)]
pub(crate) struct GuestReader<'a> {
    mem: &'a GuestMemoryMmap,
    cursor: SegmentCursor<'a>,
}

impl GuestReader<'_> {
    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining
    }

    /// Fills as much of `buf` as there are bytes left; returns how many.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, GuestMemoryError> {
        let wanted = buf.len();
        let mut rest = buf;
        while let Some((addr, len)) = self.cursor.next_span(rest.len()) {
            // `next_span` returns at most `rest.len()` bytes: the split
            // always succeeds.
            let Some((span, tail)) = std::mem::take(&mut rest).split_at_mut_checked(len) else {
                break;
            };
            self.mem.read_slice(span, addr)?;
            rest = tail;
        }
        // `rest` is a suffix of `buf`.
        Ok(wanted.saturating_sub(rest.len()))
    }

    /// Fills all of `buf`, or fails (having consumed what was there).
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let read = self.read(buf)?;
        if read < buf.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: buf.len(),
                completed: read,
            });
        }
        Ok(())
    }
}

/// Writes the device-writable bytes of a chain in order, never past its
/// limit.
#[derive(Debug)]
pub(crate) struct GuestWriter<'a> {
    mem: &'a GuestMemoryMmap,
    cursor: SegmentCursor<'a>,
}

impl GuestWriter<'_> {
    /// Bytes that may still be written.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.cursor.consumed
    }

    /// Writes as much of `buf` as fits; returns how many bytes.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, GuestMemoryError> {
        let mut rest = buf;
        while let Some((addr, len)) = self.cursor.next_span(rest.len()) {
            // `next_span` returns at most `rest.len()` bytes: the split
            // always succeeds.
            let Some((span, tail)) = rest.split_at_checked(len) else {
                break;
            };
            self.mem.write_slice(span, addr)?;
            rest = tail;
        }
        // `rest` is a suffix of `buf`.
        Ok(buf.len().saturating_sub(rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};

    use super::*;

    const QUEUE_SIZE: u16 = 16;
    const MEM_SIZE: u64 = 0x10_0000;
    const DATA: u64 = 0x8_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Stores `descs` at table indices 0.., publishes index 0 and parses it.
    fn parse(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<RequestBuffers, ChainError> {
        let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), QUEUE_SIZE);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        RequestBuffers::parse(chain, mem, QUEUE_SIZE)
    }

    #[test]
    fn splits_a_well_formed_chain_into_readable_and_writable_buffers() {
        let mem = memory();
        let buffers = parse(
            &mem,
            &[
                desc(DATA, 16, NEXT, 1),
                desc(DATA + 0x100, 512, NEXT | WRITE, 2),
                desc(DATA + 0x400, 1, WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(buffers.head(), 0);
        assert_eq!(buffers.readable_len(), 16);
        assert_eq!(buffers.writable_len(), 513);
        assert_eq!(buffers.last_writable_byte(), Some(GuestAddress(DATA + 0x400)));
        assert_eq!(buffers.longest_segment(), 512);
    }

    #[test]
    fn rejects_descriptor_chain_past_end_of_memory() {
        let mem = memory();
        let err = parse(&mem, &[desc(DATA, 16, NEXT, 1), desc(MEM_SIZE - 8, 16, WRITE, 0)]).unwrap_err();
        assert_eq!(
            err,
            ChainError::OutsideMemory {
                index: 1,
                addr: MEM_SIZE - 8,
                len: 16
            }
        );
    }

    #[test]
    fn rejects_descriptor_whose_address_wraps_around_the_address_space() {
        let mem = memory();
        let err = parse(&mem, &[desc(u64::MAX - 7, 16, WRITE, 0)]).unwrap_err();
        assert!(
            matches!(err, ChainError::OutsideMemory { index: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_descriptor_claiming_gigabytes() {
        let mem = memory();
        let err = parse(&mem, &[desc(DATA, u32::MAX, WRITE, 0)]).unwrap_err();
        assert!(
            matches!(err, ChainError::OutsideMemory { len: u32::MAX, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_looping_descriptor_chain() {
        let mem = memory();
        let err = parse(&mem, &[desc(DATA, 16, NEXT, 1), desc(DATA + 16, 16, NEXT, 0)]).unwrap_err();
        assert_eq!(
            err,
            ChainError::Unterminated {
                descriptors: QUEUE_SIZE as usize
            }
        );
    }

    #[test]
    fn rejects_next_index_past_the_descriptor_table() {
        let mem = memory();
        let err = parse(&mem, &[desc(DATA, 16, NEXT, QUEUE_SIZE)]).unwrap_err();
        assert_eq!(err, ChainError::Unterminated { descriptors: 1 });
    }

    #[test]
    fn rejects_head_index_past_the_descriptor_table() {
        let mem = memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        vq.avail().ring().ref_at(0).unwrap().store(QUEUE_SIZE + 3);
        vq.avail().idx().store(1);
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(
            RequestBuffers::parse(chain, &mem, QUEUE_SIZE).unwrap_err(),
            ChainError::Empty
        );
    }

    #[test]
    fn rejects_indirect_chain_longer_than_the_queue_size() {
        let mem = memory();
        let table = 0x4_0000;
        let entries = QUEUE_SIZE + 1;
        for i in 0..entries {
            let flags = if i + 1 < entries { NEXT } else { 0 };
            mem.write_obj(
                desc(DATA, 8, flags, i + 1),
                GuestAddress(table + 16 * u64::from(i)),
            )
            .unwrap();
        }
        let err = parse(&mem, &[desc(table, 16 * u32::from(entries), INDIRECT, 0)]).unwrap_err();
        assert_eq!(err, ChainError::TooLong { max: QUEUE_SIZE });
    }

    #[test]
    fn follows_a_valid_indirect_table() {
        let mem = memory();
        let table = 0x4_0000;
        mem.write_obj(desc(DATA, 16, NEXT, 1), GuestAddress(table))
            .unwrap();
        mem.write_obj(desc(DATA + 0x100, 8, WRITE, 0), GuestAddress(table + 16))
            .unwrap();
        let buffers = parse(&mem, &[desc(table, 32, INDIRECT, 0)]).unwrap();
        assert_eq!((buffers.readable_len(), buffers.writable_len()), (16, 8));
    }

    #[test]
    fn rejects_indirect_table_outside_memory() {
        let mem = memory();
        let err = parse(&mem, &[desc(MEM_SIZE + 0x1000, 32, INDIRECT, 0)]).unwrap_err();
        assert_eq!(err, ChainError::Empty);
    }

    #[test]
    fn rejects_indirect_table_with_a_length_that_is_not_a_whole_number_of_descriptors() {
        let mem = memory();
        let err = parse(&mem, &[desc(0x4_0000, 24, INDIRECT, 0)]).unwrap_err();
        assert_eq!(err, ChainError::Empty);
    }

    #[test]
    fn rejects_nested_indirect_tables() {
        let mem = memory();
        let table = 0x4_0000;
        mem.write_obj(desc(DATA, 16, NEXT, 1), GuestAddress(table))
            .unwrap();
        mem.write_obj(desc(0x5_0000, 16, INDIRECT, 0), GuestAddress(table + 16))
            .unwrap();
        let err = parse(&mem, &[desc(table, 32, INDIRECT, 0)]).unwrap_err();
        assert_eq!(err, ChainError::Unterminated { descriptors: 1 });
    }

    #[test]
    fn rejects_readable_descriptor_after_a_writable_one() {
        let mem = memory();
        let err = parse(
            &mem,
            &[desc(DATA, 16, NEXT | WRITE, 1), desc(DATA + 16, 16, 0, 0)],
        )
        .unwrap_err();
        assert_eq!(err, ChainError::ReadableAfterWritable { index: 1 });
    }

    #[test]
    fn zero_length_descriptors_are_skipped_even_at_hostile_addresses() {
        let mem = memory();
        let buffers = parse(
            &mem,
            &[
                desc(u64::MAX, 0, NEXT, 1),
                desc(DATA, 16, NEXT, 2),
                desc(DATA + 0x100, 0, NEXT | WRITE, 3),
                desc(DATA + 0x200, 4, WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!((buffers.readable_len(), buffers.writable_len()), (16, 4));
        assert_eq!(buffers.last_writable_byte(), Some(GuestAddress(DATA + 0x203)));
    }

    #[test]
    fn a_chain_of_only_zero_length_descriptors_has_no_status_byte() {
        let mem = memory();
        let buffers = parse(&mem, &[desc(DATA, 0, WRITE, 0)]).unwrap();
        assert_eq!(buffers.last_writable_byte(), None);
    }

    #[test]
    fn reader_and_writer_cross_segment_boundaries_and_respect_the_limit() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3], GuestAddress(DATA)).unwrap();
        mem.write_slice(&[4, 5], GuestAddress(DATA + 0x100)).unwrap();
        let buffers = parse(
            &mem,
            &[
                desc(DATA, 3, NEXT, 1),
                desc(DATA + 0x100, 2, NEXT, 2),
                desc(DATA + 0x200, 2, NEXT | WRITE, 3),
                desc(DATA + 0x300, 3, WRITE, 0),
            ],
        )
        .unwrap();

        let mut reader = buffers.reader(&mem);
        let mut all = [0u8; 8];
        assert_eq!(reader.read(&mut all).unwrap(), 5);
        assert_eq!(&all[..5], &[1, 2, 3, 4, 5]);
        assert!(reader.read_exact(&mut [0u8; 1]).is_err());

        // Limit 4 of the 5 writable bytes: the last one stays untouched.
        mem.write_slice(&[0xee], GuestAddress(DATA + 0x302)).unwrap();
        let mut writer = buffers.writer(&mem, 4);
        assert_eq!(writer.write(&[9; 10]).unwrap(), 4);
        assert_eq!(writer.written(), 4);
        assert_eq!(writer.remaining(), 0);
        let mut check = [0u8; 3];
        mem.read_slice(&mut check, GuestAddress(DATA + 0x300)).unwrap();
        assert_eq!(check, [9, 9, 0xee]);
    }
}
