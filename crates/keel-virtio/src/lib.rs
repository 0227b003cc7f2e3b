//! Virtio for Keel virtual machines: the device model, the MMIO and PCI
//! transports, and block, entropy, console, network and socket devices.
//!
//! A virtio device is the same device whether the guest finds it through
//! MMIO registers or on a PCI bus, and whatever stores its bytes. This crate
//! keeps those three concerns apart so each can be replaced alone:
//!
//! - **Devices** implement [`VirtioDevice`]: their type, the features they
//!   offer, their configuration space, and what they do once the driver
//!   hands them memory and queues ([`Activation`]). [`Block`], [`Rng`],
//!   [`Console`], [`Net`], [`Vsock`] and [`Balloon`] are the devices so far; a device of
//!   your own is either a [`VirtioDevice`] implementation or, for a
//!   request/reply device, a [`RequestHandler`] inside a [`RequestDevice`],
//!   which does the virtio part.
//! - **Transports** drive that trait from the guest's accesses.
//!   [`MmioTransport`] is virtio-mmio version 2 (an IOAPIC pin per device);
//!   [`PciTransport`] is modern virtio-pci with MSI-X ([`pci`]), a
//!   `keel_pci::PciDevice`. Both run the same driver-state machine, so
//!   every device works over either unchanged. Devices signal the guest
//!   through the [`VirtioInterrupt`] the transport provides, so they never
//!   know which interrupt mechanism is behind it.
//! - **Backends** hold the bytes: [`BlockBackend`] ([`FileBackend`],
//!   [`MemoryBackend`], or your own) for disks, [`ConsoleBackend`]
//!   ([`StreamBackend`], [`UnixSocketBackend`]) for consoles, [`NetBackend`]
//!   ([`TapBackend`], [`MemoryNetBackend`]) for network cards; the vsock
//!   device carries its own Unix-socket muxer (Firecracker's convention).
//!
//! Queues are `virtio-queue`'s split rings with `EVENT_IDX` and indirect
//! descriptors; guest memory is `vm-memory`'s [`GuestMemoryMmap`].
//!
//! # The driver side, for testing devices
//!
//! With the `guest-driver` feature, `guest_driver` is the other end of a
//! virtqueue: queues laid out in guest memory, chains added (honest or
//! hostile), the used ring read back, a device brought up through a
//! virtio-mmio transport's registers ([`mmio_register`]). Every operation
//! that can fail returns a `guest_driver::DriverError`; a device of your
//! own is tested in-process with it, as this crate tests its own. The
//! register offsets ([`mmio_register`]), device types ([`device_type`]),
//! status bits ([`device_status`]) and virtio-blk's request vocabulary
//! ([`block_request`]) are public constants.
//!
//! # Threads
//!
//! Register accesses arrive on vCPU threads; queue processing runs on one
//! event-loop thread (`event-manager`). A device is therefore shared as
//! `Arc<Mutex<_>>` between its transport and the `EventManager` (every device
//! here is an [`event_manager::MutEventSubscriber`]). Activation happens on a
//! vCPU thread, so it only hands state over and signals an eventfd the
//! device watches; the event loop then starts watching the queues. The
//! transport keeps interrupt status outside the device's lock, so a device
//! busy with I/O never stalls a vCPU taking an interrupt.
//!
//! # Hostile guests
//!
//! Every address, length and chain shape comes from the guest. A descriptor
//! chain is walked once and checked before a device uses it: every buffer
//! inside guest RAM, readable buffers before writable ones, no loops, no
//! more descriptors than the queue size. A chain that breaks those rules
//! puts the device in `DEVICE_NEEDS_RESET` (with a configuration change
//! interrupt) and the device leaves its queues alone until the driver resets
//! it; a well-formed chain carrying a bad request gets an error status. A
//! queue set up outside RAM, misaligned or with a bad size gets
//! `DEVICE_NEEDS_RESET` at `DRIVER_OK`. Nothing the guest does panics the
//! VMM, and devices write only into the writable buffers of the request they
//! are answering.
//!
//! # Rate limiting
//!
//! [`Block`], [`Net`] (each direction) and [`Rng`] carry a
//! [`keel_ratelimit::RateLimiter`] with Firecracker's semantics: a
//! bandwidth and an operations token bucket, no limit unless set. A request
//! the limiter refuses is left on the available ring, untouched (a received
//! frame stays in the device and the backend goes unwatched); the device
//! watches the limiter's timerfd on its event loop and resumes the queue
//! when it fires, so a throttled device costs no CPU. Limits change on a
//! running device through `update_rate_limiter` (`update_rx_rate_limiter` /
//! `update_tx_rate_limiter` for [`Net`]), called with the device's mutex
//! held from any thread; a throttled queue resumes at once under the new
//! limits, since the update fires the limiter's timer.
//!
//! # Example
//!
//! A block device on a [`MemoryBackend`] behind an [`MmioTransport`], driven
//! through its registers the way a guest driver does, with a
//! [`RecordingLine`](keel_irq::RecordingLine) standing in for the interrupt:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, SubscriberOps};
//! use keel_irq::RecordingLine;
//! use keel_virtio::device_status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
//! use keel_virtio::{features, Block, BlockOptions, MemoryBackend, MmioSlot, MmioTransport};
//! use vm_device::bus::MmioAddress;
//! use vm_device::MutDeviceMmio;
//! use vm_memory::{Bytes, GuestAddress};
//! use keel_virtio::GuestMemoryMmap;
//!
//! // 1 MiB of guest RAM, and a 64 KiB disk whose sector 1 says hello.
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let mut image = vec![0u8; 64 * 1024];
//! image[512..517].copy_from_slice(b"hello");
//! let backend = MemoryBackend::from_bytes(image);
//! let disk = Arc::new(Mutex::new(Block::new(backend, BlockOptions::default()).unwrap()));
//!
//! let line = Arc::new(RecordingLine::new());
//! let slot = MmioSlot { base: 0xd000_0000, gsi: 5 };
//! let mut regs = MmioTransport::new(disk.clone(), mem.clone(), line.clone(), slot).unwrap();
//! let mut event_loop = EventManager::new().unwrap();
//! event_loop.add_subscriber(disk.clone());
//!
//! // What the guest's 32-bit register accesses look like on the bus.
//! let base = MmioAddress(slot.base);
//! let write = |t: &mut MmioTransport, offset, value: u32| {
//!     t.mmio_write(base, offset, &value.to_le_bytes())
//! };
//! let read = |t: &mut MmioTransport, offset| {
//!     let mut value = [0u8; 4];
//!     t.mmio_read(base, offset, &mut value);
//!     u32::from_le_bytes(value)
//! };
//! assert_eq!(read(&mut regs, 0x000), 0x7472_6976); // MagicValue: "virt"
//! assert_eq!(read(&mut regs, 0x008), 2); // DeviceID: block
//!
//! // Negotiate: accept VERSION_1 (feature page 1, bit 0) and nothing else.
//! write(&mut regs, 0x070, ACKNOWLEDGE);
//! write(&mut regs, 0x070, ACKNOWLEDGE | DRIVER);
//! write(&mut regs, 0x024, 1); // DriverFeaturesSel
//! write(&mut regs, 0x020, (features::VERSION_1 >> 32) as u32); // DriverFeatures
//! write(&mut regs, 0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK);
//! assert_ne!(read(&mut regs, 0x070) & FEATURES_OK, 0, "features accepted");
//!
//! // Queue 0: 16 entries; descriptor table, available and used ring.
//! write(&mut regs, 0x030, 0); // QueueSel
//! write(&mut regs, 0x038, 16); // QueueNum
//! write(&mut regs, 0x080, 0x1000); // QueueDescLow
//! write(&mut regs, 0x090, 0x2000); // QueueDriverLow
//! write(&mut regs, 0x0a0, 0x3000); // QueueDeviceLow
//! write(&mut regs, 0x044, 1); // QueueReady
//! write(&mut regs, 0x070, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
//! event_loop.run_with_timeout(100).unwrap(); // the device takes its queue
//!
//! // A read of sector 1: a 16-byte header the device reads, then 512 bytes
//! // of data and a status byte it writes, as a chain of three descriptors.
//! mem.write_obj(0u32, GuestAddress(0x1_0000)).unwrap(); // type: VIRTIO_BLK_T_IN
//! mem.write_obj(1u64, GuestAddress(0x1_0008)).unwrap(); // sector
//! let chain = [(0x1_0000u64, 16u32, 1u16), (0x1_0100, 512, 1 | 2), (0x1_0300, 1, 2)];
//! for (i, &(addr, len, flags)) in chain.iter().enumerate() {
//!     let desc = 0x1000 + 16 * i as u64; // flags: 1 = NEXT, 2 = WRITE
//!     mem.write_obj(addr, GuestAddress(desc)).unwrap();
//!     mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
//!     mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
//!     mem.write_obj(i as u16 + 1, GuestAddress(desc + 14)).unwrap(); // next
//! }
//! mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // avail ring[0] = head 0
//! mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // avail idx = 1
//! write(&mut regs, 0x050, 0); // QueueNotify (a VMM would use an ioeventfd)
//! event_loop.run_with_timeout(100).unwrap();
//!
//! let mut data = [0u8; 5];
//! mem.read_slice(&mut data, GuestAddress(0x1_0100)).unwrap();
//! assert_eq!(&data, b"hello");
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1_0300)).unwrap(), 0); // VIRTIO_BLK_S_OK
//! assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1); // used idx
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3008)).unwrap(), 513); // bytes written
//!
//! // The interrupt: InterruptStatus says "used buffer", the guest acks it.
//! assert_eq!(line.count(), 1);
//! assert_eq!(read(&mut regs, 0x060), 1);
//! write(&mut regs, 0x064, 1);
//! assert_eq!(read(&mut regs, 0x060), 0);
//! ```
//!
//! # Wiring a device into a VMM
//!
//! For each virtio-mmio device a VMM:
//!
//! 1. allocates an MMIO window of [`MMIO_WINDOW_SIZE`] (4 KiB) and a GSI —
//!    an [`MmioSlot`];
//! 2. creates the device in an `Arc<Mutex<_>>` and an [`MmioTransport`] for
//!    it with guest memory and an [`IrqfdLine`](keel_irq::IrqfdLine) for the
//!    GSI, and registers the transport on its MMIO bus at
//!    [`MmioSlot::range`];
//! 3. registers each queue's eventfd as a KVM ioeventfd on the `QueueNotify`
//!    register with the queue index as datamatch
//!    ([`MmioTransport::queue_notifiers`]), so notifications never exit to
//!    the VMM;
//! 4. adds the device to the `EventManager` that runs on its event-loop
//!    thread;
//! 5. appends [`MmioSlot::cmdline_entry`] —
//!    `virtio_mmio.device=4K@0x<base>:<gsi>` — to the kernel command line.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use keel_irq::{create_in_kernel_irqchip, GsiAllocator, IrqfdLine};
//! use keel_virtio::{Block, BlockOptions, FileBackend, MmioSlot, MmioTransport};
//! use kvm_ioctls::{IoEventAddress, Kvm};
//! use vm_device::device_manager::{IoManager, MmioManager};
//! use vm_memory::GuestAddress;
//! use keel_virtio::GuestMemoryMmap;
//!
//! let vm = Kvm::new()?.create_vm()?;
//! create_in_kernel_irqchip(&vm)?;
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
//! // ... register `mem` with KVM (keel-memory), create vCPUs ...
//!
//! let slot = MmioSlot { base: 0xd000_0000, gsi: GsiAllocator::new().allocate()? };
//! let backend = FileBackend::open("disk.img", false)?;
//! let disk = Arc::new(Mutex::new(Block::new(backend, BlockOptions::default())?));
//! let line = Arc::new(IrqfdLine::new(&vm, slot.gsi)?);
//! let transport = MmioTransport::new(disk.clone(), mem.clone(), line, slot)?;
//!
//! for notifier in transport.queue_notifiers() {
//!     let address = IoEventAddress::Mmio(notifier.address);
//!     vm.register_ioevent(notifier.event, &address, notifier.datamatch)?;
//! }
//! let mut bus = IoManager::new();
//! bus.register_mmio(slot.range()?, Arc::new(Mutex::new(transport)))
//!     .map_err(|e| format!("{e:?}"))?;
//!
//! let mut event_loop = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
//!     .map_err(|e| format!("{e:?}"))?;
//! event_loop.add_subscriber(disk);
//!
//! let cmdline = format!("console=hvc0 {}", slot.cmdline_entry());
//! # let _ = cmdline;
//! # Ok(())
//! # }
//! ```
//!
//! # Vsock and its Unix sockets
//!
//! [`Vsock`] (device type 19) gives the guest `AF_VSOCK` stream sockets to
//! the host (CID 2) and carries them over Unix sockets with the convention
//! Firecracker's hybrid vsock uses, so host tools written for it work
//! unchanged. The device listens on one Unix socket, `PATH`:
//!
//! - **Host to guest**: a host program connects to `PATH` and writes
//!   `CONNECT <port>\n`. The device asks the guest for a connection to
//!   `<port>`; once a guest program listening there accepts, the host
//!   program reads `OK <host port>\n` and the socket is then the
//!   connection. If nothing listens in the guest, the socket is closed.
//! - **Guest to host**: a guest program connecting to host port `P`
//!   reaches whatever listens on the Unix socket `PATH_P` (for `PATH` =
//!   `/run/vm.vsock` and port 52, `/run/vm.vsock_52`); no listener means
//!   the guest's connect is refused.
//!
//! Flow control is the protocol's credit: the device never sends the guest
//! more than the buffer space it announced, stops reading a host socket
//! while the guest has no credit or rx buffers, and advertises a bounded
//! buffer (`VsockOptions::buf_alloc`) for host sockets that are slow to
//! read — a guest that sends past it is reset. [`VsockOptions`] also caps
//! the number of connections.
//!
//! ```no_run
//! use keel_virtio::{Vsock, VsockOptions};
//! // Guest CID 3; host programs connect to /run/vm.vsock.
//! let vsock = Vsock::new(3, "/run/vm.vsock", VsockOptions::default()).unwrap();
//! # let _ = vsock;
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
#![cfg_attr(docsrs, feature(doc_cfg))]

mod activation;
mod balloon;
mod block;
mod chain;
mod console;
mod device;
mod driver_state;
#[cfg(any(test, feature = "guest-driver"))]
#[cfg_attr(docsrs, doc(cfg(feature = "guest-driver")))]
pub mod guest_driver;
mod mmio;
mod net;
pub mod pci;
mod request_device;
mod rng;
mod snapshot;
mod vsock;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use event_manager;
#[doc(no_inline)]
pub use kvm_ioctls;
#[doc(no_inline)]
pub use virtio_bindings;
#[doc(no_inline)]
pub use virtio_queue;
#[doc(no_inline)]
pub use vm_device;
#[doc(no_inline)]
pub use vm_memory;
#[doc(no_inline)]
pub use vmm_sys_util;

pub use balloon::{
    Balloon, BalloonCounters, BalloonError, BalloonHandle, BalloonOptions, BalloonStats,
    BALLOON_F_DEFLATE_ON_OOM, BALLOON_F_REPORTING, BALLOON_F_STATS_VQ, BALLOON_PAGE_SIZE, MAX_BALLOON_MIB,
};
pub use block::{
    Block, BlockBackend, BlockOptions, FileBackend, MemoryBackend, DISCARD_SECTOR_ALIGNMENT, ID_BYTES,
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE,
};
pub use console::{
    Console, ConsoleBackend, ConsoleCounters, StreamBackend, UnixSocketBackend, DEFAULT_FILE_OUTPUT_LIMIT,
    MAX_OUTPUT_PASS_BYTES, MAX_OUTPUT_REQUEST_BYTES,
};
pub use device::{
    check_queue_count, read_config_space, Activation, RecordingInterrupt, SharedConfig, StopSignal,
    VirtioDevice, VirtioInterrupt, VirtioSignal,
};
/// The guest memory devices get ([`keel_memory::GuestMemoryMmap`]: its
/// bitmap records the pages devices write, for diff snapshots).
pub use keel_memory::GuestMemoryMmap;
pub use mmio::reg as mmio_register;
pub use mmio::{
    interrupt_status, MmioSlot, MmioTransport, QueueNotifier, CONFIG_SPACE_OFFSET, MMIO_MAGIC_VALUE,
    MMIO_VENDOR_ID, MMIO_VERSION, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
pub use net::{
    net_offload, MemoryNetBackend, Net, NetBackend, NetCounters, NetError, NetOptions, TapBackend,
    MAX_FRAME_LEN, VNET_HDR_LEN,
};
pub use pci::{NoIoeventfds, NotifyRegistrar, PciTransport, PciTransportState, RecordingRegistrar};
pub use request_device::{RequestDevice, RequestHandler, MAX_REQUEST_BYTES};
pub use rng::{Rng, MAX_RNG_REQUEST_BYTES};
pub use snapshot::{DeviceState, QueueProgress, QueueSetup, TransportState};
pub use virtio_queue::Queue;
pub use vsock::{Vsock, VsockError, VsockOptions};

/// virtio-blk's request vocabulary (virtio 1.2, section 5.2.6), for
/// drivers and documentation: a request is a [`block_request::RequestHeader`], the data,
/// and one status byte the device writes.
pub mod block_request {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };

    /// The header a driver puts first in every request: the request type
    /// (`VIRTIO_BLK_T_*`), a reserved word, and the first sector (512-byte
    /// units, whatever the block size). Little-endian, 16 bytes.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    #[repr(C)]
    pub struct RequestHeader {
        /// `VIRTIO_BLK_T_*`.
        pub request_type: u32,
        /// Reserved (once `ioprio`).
        pub reserved: u32,
        /// The first sector.
        pub sector: u64,
    }

    // SAFETY: plain integers with no padding (4 + 4 + 8 bytes, 8-aligned):
    // every bit pattern is a valid value.
    unsafe impl vm_memory::ByteValued for RequestHeader {}

    /// `size_of::<RequestHeader>()`.
    pub const HEADER_SIZE: usize = 16;
    const _: () = assert!(std::mem::size_of::<RequestHeader>() == HEADER_SIZE);
}

/// The largest queue a split virtqueue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Device type IDs, as the guest reads them from the transport (virtio 1.2,
/// section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon (traditional).
    pub const BALLOON: u32 = 5;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
}

/// Device-independent feature bits (virtio 1.2, section 6), as masks for
/// [`VirtioDevice::features`].
pub mod features {
    /// The driver may use indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// The `used_event` and `avail_event` fields are in use.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// The device complies with virtio 1.0 or later (not legacy).
    pub const VERSION_1: u64 = 1 << 32;
    /// The device is behind an IOMMU or similar address translation.
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
}

/// Bits of the device status field a driver writes through the transport
/// (virtio 1.2, section 2.1).
pub mod device_status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u32 = 8;
    /// The device has hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest has given up on the device.
    pub const FAILED: u32 = 128;
}

/// Errors from creating, activating or signalling a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport handed over a different number of queues (or queue
    /// eventfds) than the device has.
    #[error("device type {device_type} has {expected} queues but was activated with {provided}")]
    WrongQueueCount {
        /// The device's type ID.
        device_type: u32,
        /// How many queues the device has.
        expected: usize,
        /// How many the transport provided.
        provided: usize,
    },
    /// A snapshot asked for the state of a device that cannot save it.
    #[error("device type {device_type} ({transport}) cannot be saved in a snapshot")]
    NotSnapshottable {
        /// The device's type ID.
        device_type: u32,
        /// The transport, e.g. `virtio-mmio 0xd0001000`.
        transport: String,
    },
    /// A saved state does not fit the device it is restored into.
    #[error("{transport}: cannot restore the saved state: {reason}")]
    StateMismatch {
        /// The transport, e.g. `virtio-mmio 0xd0001000`.
        transport: String,
        /// What differs, naming both values.
        reason: String,
    },
    /// The device was activated again without a reset in between.
    #[error("device type {device_type} is already active: reset it before activating it again")]
    AlreadyActive {
        /// The device's type ID.
        device_type: u32,
    },
    /// The device refused an earlier reset and stays out of service.
    #[error("device type {device_type} could not be reset and cannot be activated again")]
    DeviceUnresettable {
        /// The device's type ID.
        device_type: u32,
    },
    /// A queue the driver set up cannot be used.
    #[error("queue {index} cannot be activated: {reason}")]
    InvalidQueue {
        /// The queue's index.
        index: usize,
        /// What is wrong, with the values the driver wrote.
        reason: String,
    },
    /// The interrupt behind a [`VirtioInterrupt`] could not be raised.
    #[error("cannot signal the guest: {0}")]
    Interrupt(#[from] keel_irq::Error),
    /// An eventfd (queue notification, activation) could not be created or
    /// duplicated.
    #[error("cannot create an eventfd: {0}")]
    CreateEventFd(#[source] std::io::Error),
    /// An MMIO window that does not fit in the address space.
    #[error("MMIO window of {size:#x} bytes at {base:#x} overflows the address space", size = MMIO_WINDOW_SIZE)]
    InvalidMmioWindow {
        /// The window's base address.
        base: u64,
    },
    /// A device with more queues than a transport can number.
    #[error("{count} queues are more than a transport can address")]
    TooManyQueues {
        /// How many queues the device has.
        count: usize,
    },
    /// A queue size a device was configured with is unusable.
    #[error("queue size {size} is not a power of two between 4 and {MAX_QUEUE_SIZE}")]
    InvalidQueueSize {
        /// The size asked for.
        size: u16,
    },
    /// A block device ID longer than `GET_ID` can return.
    #[error("block device id {id:?} is {len} bytes; at most {ID_BYTES} fit")]
    BlockIdTooLong {
        /// The ID asked for.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A block device's `size_max` smaller than a sector.
    #[error("maximum segment size {size} is smaller than a {SECTOR_SIZE}-byte sector")]
    InvalidSegmentSize {
        /// The size asked for.
        size: u32,
    },
    /// A disk image could not be opened.
    #[error("cannot open disk image {path}: {source}", path = path.display())]
    OpenDisk {
        /// The image's path.
        path: std::path::PathBuf,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// A disk image's size could not be determined.
    #[error("cannot find the size of disk image {path}: {source}", path = path.display())]
    DiskSize {
        /// The image's path.
        path: std::path::PathBuf,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// Standard input could not be duplicated for a console.
    #[error("cannot use stdin as console input: {0}")]
    ConsoleStdin(#[source] std::io::Error),
    /// The PCI side of a virtio-pci transport could not be built.
    #[error("virtio-pci: {0}")]
    Pci(#[from] keel_pci::Error),
    /// A device type that has no virtio-pci device ID (0x1040 + type must
    /// fit in 16 bits).
    #[error("device type {device_type} has no virtio-pci device ID (0x1040 + type carries types 0 to 63)")]
    NoPciDeviceId {
        /// The device's type ID.
        device_type: u32,
    },
    /// A console output file could not be opened.
    #[error("cannot open console output file {path}: {source}", path = path.display())]
    ConsoleFile {
        /// The file's path.
        path: std::path::PathBuf,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// A console socket could not be set up.
    #[error("cannot set up console socket {path}: {source}", path = path.display())]
    ConsoleSocket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
}

/// Result of the operations in this crate.
pub type Result<T> = std::result::Result<T, Error>;
