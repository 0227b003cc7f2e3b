//! A pretend guest driver, for tests and benchmarks: split queues laid out
//! in a [`GuestMemoryMmap`] with `virtio-queue`'s mock rings, chains added
//! the way a driver adds them (or the way a hostile one does), and the used
//! ring read back.
//!
//! Only built for this crate's tests and with the `test-utils` feature; it
//! is a testing aid, not part of the device model, and it panics where a
//! real driver would have to handle errors (a ring outside guest memory).
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
//! let mem = memory();
//! let mut driver = DriverQueue::new(&mem, 16);
//! let head = driver.add(&[Buf::readable(DATA, 16), Buf::writable(DATA + 0x100, 1)]);
//! assert_eq!(head, 0);
//!
//! // The device's side, as a transport would configure it.
//! let mut queue = driver.queue();
//! let chain = queue.iter(&mem).unwrap().next().unwrap();
//! assert_eq!(chain.head_index(), head);
//! assert_eq!(driver.used_idx(), 0);
//! ```

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::MmioTransport;

/// Size of the guest RAM [`memory`] makes: 16 MiB at 0. Rings live below
/// 1 MiB, data above.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Where tests put their buffers: the first address above the rings.
pub const DATA: u64 = 0x10_0000;

/// Guest RAM of [`MEM_SIZE`] bytes at guest physical address 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
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
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, GuestAddress(0x1000), size)
    }

    /// A queue of `size` entries with its rings at `base`.
    pub fn at(mem: &'a GuestMemoryMmap, base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base.0;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        Self {
            mem,
            desc_table: DescriptorTable::new(mem, GuestAddress(desc), size),
            avail: AvailRing::new(mem, GuestAddress(avail), size),
            used: UsedRing::new(mem, GuestAddress(used), size),
            addrs: [desc, avail, used],
            size,
            next_desc: 0,
        }
    }

    /// The device's view, as a transport would configure it.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.addrs[0]))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.addrs[1]))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.addrs[2]))
            .unwrap();
        queue.set_ready(true);
        queue
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
    pub fn add(&mut self, bufs: &[Buf]) -> u16 {
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
            self.store(index(pos), raw_desc(buf.addr, buf.len, flags, next));
        }
        let head = index(0);
        self.publish(head);
        head
    }

    /// Stores one raw descriptor, hostile or not.
    pub fn store(&self, index: u16, desc: RawDescriptor) {
        self.desc_table.store(index, desc).unwrap();
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&self, head: u16) {
        let idx = self.avail.idx().load();
        self.avail
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
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
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// `avail_event` (EVENT_IDX): the available index the device wants a
    /// notification after.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr() + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr())).unwrap()
    }

    /// Every (head, length) the device has returned, oldest first (at most
    /// one ring's worth).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx = self.used.idx().load();
        (0..idx.min(self.size))
            .map(|i| {
                let elem = self
                    .used
                    .ring()
                    .ref_at(usize::from(i % self.size))
                    .unwrap()
                    .load();
                (elem.id(), elem.len())
            })
            .collect()
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
        let elem = self
            .used
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .load();
        (elem.id(), elem.len())
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
/// accepted features. Panics if the device is of another type or refuses.
pub fn bring_up(transport: &mut MmioTransport, device_type: u32, queues: &[&DriverQueue<'_>]) -> u64 {
    use crate::device_status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
    use crate::mmio::reg;
    let t = transport;
    assert_eq!(read_reg(t, reg::DEVICE_ID), device_type);
    write_reg(t, reg::STATUS, ACKNOWLEDGE);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    for page in 0..2 {
        write_reg(t, reg::DEVICE_FEATURES_SEL, page);
        let offered = read_reg(t, reg::DEVICE_FEATURES);
        write_reg(t, reg::DRIVER_FEATURES_SEL, page);
        write_reg(t, reg::DRIVER_FEATURES, offered);
    }
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(read_reg(t, reg::STATUS) & FEATURES_OK, 0, "features accepted");
    for (index, driver) in queues.iter().enumerate() {
        write_reg(t, reg::QUEUE_SEL, index as u32);
        assert!(read_reg(t, reg::QUEUE_NUM_MAX) >= u32::from(driver.size()));
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
    assert!(
        status & DRIVER_OK != 0 && status & DEVICE_NEEDS_RESET == 0,
        "device live, status {status:#x}"
    );
    t.driver_features()
}
