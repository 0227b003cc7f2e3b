//! Virtio for Keel virtual machines: the device model, independent of how the
//! device is attached.
//!
//! A virtio device (block, net, vsock, rng, console, balloon) is the same
//! device whether the guest finds it through MMIO registers or on a PCI bus.
//! This crate separates the two: a device implements [`VirtioDevice`] —
//! its type, the features it offers, its configuration space, and what it
//! does once the driver hands it memory and queues — and a transport drives
//! that trait from the guest's register accesses. Devices signal the guest
//! through a [`VirtioInterrupt`] the transport provides, so they never know
//! which interrupt mechanism is behind it.
//!
//! Queues are `virtio-queue`'s [`Queue`], guest memory is `vm-memory`'s
//! [`GuestMemoryMmap`]; both are handed over at activation.
//!
//! For now the crate holds the model only: the MMIO transport comes next, a
//! PCI transport after it, then the devices, each behind a backend trait.
//!
//! # Example
//!
//! A device with one queue and an 8-byte configuration space (a disk
//! capacity, as virtio-blk has), driven the way a transport drives it:
//!
//! ```
//! use std::sync::Arc;
//! use keel_virtio::{
//!     device_type, features, read_config_space, RecordingInterrupt, VirtioDevice,
//!     VirtioInterrupt, VirtioSignal,
//! };
//! use virtio_queue::{Queue, QueueT};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! struct TinyDisk {
//!     capacity_sectors: u64,
//!     acked_features: u64,
//!     interrupt: Option<Arc<dyn VirtioInterrupt>>,
//! }
//!
//! impl VirtioDevice for TinyDisk {
//!     fn device_type(&self) -> u32 {
//!         device_type::BLOCK
//!     }
//!     fn queue_max_sizes(&self) -> &[u16] {
//!         &[256]
//!     }
//!     fn features(&self) -> u64 {
//!         features::VERSION_1
//!     }
//!     fn ack_features(&mut self, acked: u64) {
//!         self.acked_features = acked & self.features();
//!     }
//!     fn read_config(&self, offset: u64, data: &mut [u8]) {
//!         read_config_space(&self.capacity_sectors.to_le_bytes(), offset, data);
//!     }
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {
//!         // The capacity is read-only.
//!     }
//!     fn activate(
//!         &mut self,
//!         _mem: GuestMemoryMmap,
//!         queues: Vec<Queue>,
//!         interrupt: Arc<dyn VirtioInterrupt>,
//!     ) -> keel_virtio::Result<()> {
//!         keel_virtio::check_queue_count(self, &queues)?;
//!         self.interrupt = Some(interrupt);
//!         Ok(())
//!     }
//!     fn reset(&mut self) -> bool {
//!         self.interrupt = None;
//!         self.acked_features = 0;
//!         true
//!     }
//! }
//!
//! let mut disk = TinyDisk { capacity_sectors: 2048, acked_features: 0, interrupt: None };
//!
//! // The driver reads the capacity, byte by byte if it likes.
//! let mut capacity = [0u8; 8];
//! disk.read_config(0, &mut capacity);
//! assert_eq!(u64::from_le_bytes(capacity), 2048);
//!
//! // It accepts the features, sets up the queue, and sets DRIVER_OK.
//! disk.ack_features(features::VERSION_1);
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let interrupt = Arc::new(RecordingInterrupt::new());
//! disk.activate(mem, vec![Queue::new(256).unwrap()], interrupt.clone()).unwrap();
//!
//! // Later, having completed a request, the device tells the guest.
//! disk.interrupt.as_ref().unwrap().signal_used_queue(0).unwrap();
//! assert_eq!(interrupt.signals(), [VirtioSignal::UsedQueue(0)]);
//! ```

#![deny(missing_docs)]

mod device;

pub use device::{
    check_queue_count, read_config_space, RecordingInterrupt, VirtioDevice, VirtioInterrupt,
    VirtioSignal,
};
pub use virtio_queue::Queue;
pub use vm_memory::GuestMemoryMmap;

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

/// Errors from activating or signalling a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport handed over a different number of queues than the
    /// device has.
    #[error("device type {device_type} has {expected} queues but was activated with {provided}")]
    WrongQueueCount {
        /// The device's type ID.
        device_type: u32,
        /// How many queues the device has.
        expected: usize,
        /// How many the transport provided.
        provided: usize,
    },
    /// The device was activated again without a reset in between.
    #[error("device type {device_type} is already active: reset it before activating it again")]
    AlreadyActive {
        /// The device's type ID.
        device_type: u32,
    },
    /// The interrupt behind a [`VirtioInterrupt`] could not be raised.
    #[error("cannot signal the guest: {0}")]
    Interrupt(#[from] keel_irq::Error),
    /// A device's backend (its disk, tap, socket) failed during activation.
    #[error("device type {device_type} cannot start its backend: {source}")]
    Backend {
        /// The device's type ID.
        device_type: u32,
        /// What the backend reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result of the operations in this crate.
pub type Result<T> = std::result::Result<T, Error>;
