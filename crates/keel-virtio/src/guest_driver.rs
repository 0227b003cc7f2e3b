//! The driver side of a virtio device, for testing and benchmarking
//! devices in-process: split queues laid out in a [`GuestMemoryMmap`] with
//! `virtio-queue`'s mock rings, chains added the way a driver adds them (or
//! the way a hostile one does), the used ring read back, and a device
//! brought up through a virtio-mmio transport's registers.
//!
//! Built with the `guest-driver` cargo feature (`test-utils` is its old
//! name). Every operation that can fail returns a [`DriverError`] naming
//! the value at fault: a queue size that is not a power of two, rings that
//! do not fit in guest memory, a chain longer than the queue, a device of
//! another type. Once a [`DriverQueue`] is made its rings are known to lie
//! in guest memory, so reading and writing them cannot fail.
//!
//! The rings are placed here rather than by `MockSplitQueue::create`, whose
//! layout (virtio-queue 0.18) puts the used ring over the tail of the
//! available ring — harmless for its own tests, but it clobbers `used_event`
//! and late available entries.
//!
//! # Example
//!
//! A queue whose rings start at 0x1000, one chain made available, and what
//! the device would see:
//!
//! ```
//! use keel_virtio::guest_driver::{memory, Buf, DriverQueue, DATA};
//! use virtio_queue::QueueOwnedT;
//!
//! let mem = memory().unwrap();
//! let mut driver = DriverQueue::new(&mem, 16).unwrap();
//! let head = driver.add(&[Buf::readable(DATA, 16), Buf::writable(DATA + 0x100, 1)]).unwrap();
//! assert_eq!(head, 0);
//!
//! // The device's side, as a transport would configure it.
//! let mut queue = driver.queue().unwrap();
//! let chain = queue.iter(&mem).unwrap().next().unwrap();
//! assert_eq!(chain.head_index(), head);
//! assert_eq!(driver.used_idx(), 0);
//! ```

// Test-side code: the driver end of a queue, built only for tests and the
// `guest-driver` feature, never reached by a guest. It reports bad input as
// `DriverError`s but may do arithmetic the device side must not (issue 13).
#![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use crate::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress};

use crate::MmioTransport;

/// Size of the guest RAM [`memory`] makes: 16 MiB at 0. Rings live below
/// 1 MiB, data above.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Where tests put their buffers: the first address above the rings.
pub const DATA: u64 = 0x10_0000;

/// Why a driver-side operation could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// Guest memory could not be mapped.
    #[error("guest memory of {size:#x} bytes: {reason}")]
    Memory {
        /// The size asked for.
        size: u64,
        /// Why.
        reason: String,
    },
    /// A split queue's size must be a power of two, 1 to 32768.
    #[error("queue size {size}: must be a power of two from 1 to 32768")]
    QueueSize {
        /// The size asked for.
        size: u16,
    },
    /// The rings do not fit in guest memory.
    #[error("queue of {size} entries at {base:#x}: its rings ({len} bytes) are not all in guest memory")]
    RingsOutsideMemory {
        /// Where the descriptor table would start.
        base: u64,
        /// The queue size.
        size: u16,
        /// Bytes the three rings span.
        len: u64,
    },
    /// A chain needs more descriptors than the queue has.
    #[error("a chain of {len} buffers does not fit a queue of {size} entries")]
    ChainTooLong {
        /// Buffers in the chain.
        len: usize,
        /// The queue size.
        size: u16,
    },
    /// A descriptor index past the table.
    #[error("descriptor index {index} is past the table of {size} entries")]
    DescriptorIndex {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// The device under the transport is not the expected one.
    #[error("device type {found}, expected {expected}")]
    DeviceType {
        /// What the transport reports.
        found: u32,
        /// What the caller expected.
        expected: u32,
    },
    /// The device offers a smaller queue than the driver's.
    #[error("queue {index}: the device offers at most {max} entries, the driver has {size}")]
    QueueTooLarge {
        /// The queue index.
        index: usize,
        /// `QueueNumMax`.
        max: u32,
        /// The driver's queue size.
        size: u16,
    },
    /// The device refused the features or did not go live.
    #[error("the device refused to start: status {status:#x} after {step}")]
    Refused {
        /// The status register.
        status: u32,
        /// The step that failed.
        step: &'static str,
    },
}

/// Guest RAM of [`MEM_SIZE`] bytes at guest physical address 0.
pub fn memory() -> Result<GuestMemoryMmap, DriverError> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).map_err(|e| DriverError::Memory {
        size: MEM_SIZE,
        reason: e.to_string(),
    })
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u32,
    /// Whether the device writes it (`VRING_DESC_F_WRITE`) rather than
    /// reads it.
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// A descriptor as it sits in the table: `flags` are `VRING_DESC_F_*`,
/// `next` the following descriptor's index (with `VRING_DESC_F_NEXT`).
pub fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// The driver's side of one split queue.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    desc_table: DescriptorTable<'a, GuestMemoryMmap>,
    avail: AvailRing<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
    addrs: [u64; 3],
    size: u16,
    next_desc: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue of `size` entries with its rings at 0x1000.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Result<Self, DriverError> {
        Self::at(mem, GuestAddress(0x1000), size)
    }

    /// A queue of `size` entries with its rings at `base`: the descriptor
    /// table, then the available ring, then the used ring (4-aligned).
    pub fn at(mem: &'a GuestMemoryMmap, base: GuestAddress, size: u16) -> Result<Self, DriverError> {
        if size == 0 || !size.is_power_of_two() {
            return Err(DriverError::QueueSize { size });
        }
        let n = u64::from(size);
        let desc = base.0;
        let outside = || DriverError::RingsOutsideMemory {
            base: desc,
            size,
            len: 16 * n + 6 + 2 * n + 3 + 6 + 8 * n,
        };
        let avail = desc.checked_add(16 * n).ok_or_else(outside)?;
        let used = (avail.checked_add(6 + 2 * n + 3).ok_or_else(outside)?) & !3;
        let end = used.checked_add(6 + 8 * n).ok_or_else(outside)?;
        let inside = |addr: u64, len: u64| {
            usize::try_from(len)
                .is_ok_and(|len| vm_memory::GuestMemoryBackend::check_range(mem, GuestAddress(addr), len))
        };
        // Each ring must lie in guest memory.
        if !inside(desc, avail - desc) || !inside(avail, used - avail) || !inside(used, end - used) {
            return Err(outside());
        }
        Ok(Self {
            mem,
            desc_table: DescriptorTable::new(mem, GuestAddress(desc), size),
            avail: AvailRing::new(mem, GuestAddress(avail), size),
            used: UsedRing::new(mem, GuestAddress(used), size),
            addrs: [desc, avail, used],
            size,
            next_desc: 0,
        })
    }

    /// The device's view, as a transport would configure it.
    pub fn queue(&self) -> Result<Queue, DriverError> {
        let size = self.size;
        let mut queue = Queue::new(size).map_err(|_| DriverError::QueueSize { size })?;
        queue.set_size(size);
        // Addresses of a hostile layout (misaligned) are kept as they are,
        // for the device to refuse; virtio-queue only rejects them here.
        let _ = queue.try_set_desc_table_address(GuestAddress(self.addrs[0]));
        let _ = queue.try_set_avail_ring_address(GuestAddress(self.addrs[1]));
        let _ = queue.try_set_used_ring_address(GuestAddress(self.addrs[2]));
        queue.set_ready(true);
        Ok(queue)
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest physical address of the descriptor table (`QueueDesc`).
    pub fn desc_table_addr(&self) -> u64 {
        self.addrs[0]
    }

    /// Guest physical address of the available ring (`QueueDriver`).
    pub fn avail_addr(&self) -> u64 {
        self.addrs[1]
    }

    /// Guest physical address of the used ring (`QueueDevice`).
    pub fn used_addr(&self) -> u64 {
        self.addrs[2]
    }

    /// Writes `bufs` as a chain into the next descriptor slots, round the
    /// table, and makes it available; returns its head index.
    ///
    /// Slots are handed out in turn without tracking which are free: the
    /// caller keeps no more descriptors in flight than the queue has.
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16, DriverError> {
        if bufs.is_empty() || bufs.len() > usize::from(self.size) {
            return Err(DriverError::ChainTooLong {
                len: bufs.len(),
                size: self.size,
            });
        }
        let size = u32::from(self.size);
        let first = u32::from(self.next_desc);
        // Below `size`, which is a u16.
        let index = |pos: usize| ((first + pos as u32) % size) as u16;
        self.next_desc = index(bufs.len());
        for (pos, buf) in bufs.iter().enumerate() {
            let mut flags = 0u16;
            if buf.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if pos + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                index(pos + 1)
            } else {
                0
            };
            self.store(index(pos), raw_desc(buf.addr, buf.len, flags, next))?;
        }
        let head = index(0);
        self.publish(head);
        Ok(head)
    }

    /// Stores one raw descriptor, hostile or not.
    pub fn store(&self, index: u16, desc: RawDescriptor) -> Result<(), DriverError> {
        self.desc_table
            .store(index, desc)
            .map_err(|_| DriverError::DescriptorIndex {
                index,
                size: self.size,
            })
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&self, head: u16) {
        let idx = self.avail.idx().load();
        if let Ok(slot) = self.avail.ring().ref_at(usize::from(idx % self.size)) {
            slot.store(head);
        }
        self.avail.idx().store(idx.wrapping_add(1));
    }

    /// Sets the available ring's index directly, chains or not.
    pub fn set_avail_idx(&self, idx: u16) {
        self.avail.idx().store(idx);
    }

    /// `used_event` (EVENT_IDX): the used index the driver wants an
    /// interrupt after.
    pub fn set_used_event(&self, value: u16) {
        let addr = self.avail_addr() + 4 + 2 * u64::from(self.size);
        // Inside the available ring, checked at construction.
        let _ = self.mem.write_obj(value, GuestAddress(addr));
    }

    /// `avail_event` (EVENT_IDX): the available index the device wants a
    /// notification after.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr() + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap_or_default()
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_addr()))
            .unwrap_or_default()
    }

    /// Every (head, length) the device has returned, oldest first (at most
    /// one ring's worth).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx = self.used.idx().load();
        (0..idx.min(self.size)).map(|i| self.used_entry(i)).collect()
    }

    /// The used ring's index: how many chains the device has returned, ever
    /// (wrapping at 2^16).
    pub fn used_idx(&self) -> u16 {
        self.used.idx().load()
    }

    /// The used element the device wrote when its index went from `idx` to
    /// `idx + 1`: the chain's head and the bytes written into it (valid until
    /// the ring wraps round to it again).
    pub fn used_entry(&self, idx: u16) -> (u32, u32) {
        match self.used.ring().ref_at(usize::from(idx % self.size)) {
            Ok(slot) => {
                let elem = slot.load();
                (elem.id(), elem.len())
            }
            // Inside the used ring, checked at construction.
            Err(_) => (0, 0),
        }
    }
}

fn write_reg(transport: &mut MmioTransport, offset: u64, value: u32) {
    let base = MmioAddress(transport.slot().base);
    transport.mmio_write(base, offset, &value.to_le_bytes());
}

fn read_reg(transport: &mut MmioTransport, offset: u64) -> u32 {
    let base = MmioAddress(transport.slot().base);
    let mut value = [0u8; 4];
    transport.mmio_read(base, offset, &mut value);
    u32::from_le_bytes(value)
}

/// Drives `transport` to `DRIVER_OK` through its registers, as a guest
/// driver does: checks the device type, accepts every feature the device
/// offers, and gives queue `i` the rings of `queues[i]`. Returns the
/// accepted features, or why the device did not come up.
pub fn bring_up(
    transport: &mut MmioTransport,
    device_type: u32,
    queues: &[&DriverQueue<'_>],
) -> Result<u64, DriverError> {
    use crate::device_status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
    use crate::mmio_register as reg;
    let t = transport;
    let found = read_reg(t, reg::DEVICE_ID);
    if found != device_type {
        return Err(DriverError::DeviceType {
            found,
            expected: device_type,
        });
    }
    write_reg(t, reg::STATUS, ACKNOWLEDGE);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    for page in 0..2 {
        write_reg(t, reg::DEVICE_FEATURES_SEL, page);
        let offered = read_reg(t, reg::DEVICE_FEATURES);
        write_reg(t, reg::DRIVER_FEATURES_SEL, page);
        write_reg(t, reg::DRIVER_FEATURES, offered);
    }
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let status = read_reg(t, reg::STATUS);
    if status & FEATURES_OK == 0 {
        return Err(DriverError::Refused {
            status,
            step: "FEATURES_OK",
        });
    }
    for (index, driver) in queues.iter().enumerate() {
        write_reg(t, reg::QUEUE_SEL, index as u32);
        let max = read_reg(t, reg::QUEUE_NUM_MAX);
        if max < u32::from(driver.size()) {
            return Err(DriverError::QueueTooLarge {
                index,
                max,
                size: driver.size(),
            });
        }
        write_reg(t, reg::QUEUE_NUM, u32::from(driver.size()));
        for (low, high, addr) in [
            (
                reg::QUEUE_DESC_LOW,
                reg::QUEUE_DESC_HIGH,
                driver.desc_table_addr(),
            ),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver.avail_addr()),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, driver.used_addr()),
        ] {
            write_reg(t, low, addr as u32);
            write_reg(t, high, (addr >> 32) as u32);
        }
        write_reg(t, reg::QUEUE_READY, 1);
    }
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let status = read_reg(t, reg::STATUS);
    if status & DRIVER_OK == 0 || status & DEVICE_NEEDS_RESET != 0 {
        return Err(DriverError::Refused {
            status,
            step: "DRIVER_OK",
        });
    }
    Ok(t.driver_features())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_queue_sizes_and_rings_outside_memory_are_named() {
        let mem = memory().unwrap();
        let e = DriverQueue::new(&mem, 12).err().unwrap();
        assert_eq!(
            e.to_string(),
            "queue size 12: must be a power of two from 1 to 32768"
        );
        assert!(DriverQueue::new(&mem, 0).is_err());
        let e = DriverQueue::at(&mem, GuestAddress(MEM_SIZE - 0x100), 256)
            .err()
            .unwrap();
        assert!(e.to_string().contains("are not all in guest memory"), "{e}");
        let e = DriverQueue::at(&mem, GuestAddress(u64::MAX - 16), 16)
            .err()
            .unwrap();
        assert!(matches!(e, DriverError::RingsOutsideMemory { .. }), "{e}");
    }

    #[test]
    fn chains_longer_than_the_queue_and_indices_past_it_are_refused() {
        let mem = memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 4).unwrap();
        let bufs = [Buf::readable(DATA, 1); 5];
        let e = driver.add(&bufs).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a chain of 5 buffers does not fit a queue of 4 entries"
        );
        assert!(driver.add(&[]).is_err());
        let e = driver.store(4, raw_desc(DATA, 1, 0, 0)).unwrap_err();
        assert_eq!(e.to_string(), "descriptor index 4 is past the table of 4 entries");
        assert_eq!(driver.add(&bufs[..4]).unwrap(), 0);
    }

    #[test]
    fn the_block_request_header_is_16_bytes_with_its_fields_in_place() {
        use crate::block_request::{RequestHeader, HEADER_SIZE, VIRTIO_BLK_T_OUT};
        use vm_memory::ByteValued;
        let header = RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            reserved: 0,
            sector: 0x0102_0304_0506_0708,
        };
        let bytes = header.as_slice();
        assert_eq!(bytes.len(), HEADER_SIZE);
        assert_eq!(&bytes[0..4], &1u32.to_le_bytes());
        assert_eq!(&bytes[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
    }
}
