//! What a snapshot keeps of a virtio device and its transport: the
//! registers the driver programmed, how far each active queue has got, and
//! the device's own state.
//!
//! A device opts in by implementing [`VirtioDevice::save_state`] and
//! [`VirtioDevice::restore_state`] (the devices of this crate do, but for
//! vsock and the balloon so far); a transport's `save_state` refuses a
//! device that has not, naming its type. Saving is only meaningful while
//! the VM is paused: no request half-processed, no chain popped and not
//! yet used.
//!
//! [`VirtioDevice::save_state`]: crate::VirtioDevice::save_state
//! [`VirtioDevice::restore_state`]: crate::VirtioDevice::restore_state

use serde::{Deserialize, Serialize};

/// The registers of one queue, as the driver programmed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueSetup {
    /// `QueueNum`.
    pub size: u32,
    /// `QueueReady`.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc: u64,
    /// The available ring's guest address.
    pub driver: u64,
    /// The used ring's guest address.
    pub device: u64,
}

/// How far the device has got in one active queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueProgress {
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueueProgress {
    /// Progress at `next_avail` and `next_used`.
    pub fn new(next_avail: u16, next_used: u16) -> Self {
        Self {
            next_avail,
            next_used,
        }
    }
}

/// A device's part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeviceState {
    /// Each queue's progress, in index order, while the device is active;
    /// empty while it is not.
    pub queues: Vec<QueueProgress>,
    /// The device's own state, in a format of its own choosing.
    pub data: Vec<u8>,
}

impl DeviceState {
    /// A device's state: its queues' progress and its own bytes.
    pub fn new(queues: Vec<QueueProgress>, data: Vec<u8>) -> Self {
        Self { queues, data }
    }
}

/// A virtio transport's part of a snapshot, with its device's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TransportState {
    /// The device type, checked on restore.
    pub device_type: u32,
    /// The device status (without `DEVICE_NEEDS_RESET`, kept below).
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// The driver wrote features past the first 64 bits.
    pub driver_features_beyond_64: bool,
    /// `QueueSel`.
    pub queue_select: u32,
    /// Every queue's registers, in index order.
    pub queues: Vec<QueueSetup>,
    /// `InterruptStatus`.
    pub isr: u32,
    /// `DEVICE_NEEDS_RESET` was signalled.
    pub needs_reset: bool,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// The device refused a reset and is out of service.
    pub device_broken: bool,
    /// The device's own state.
    pub device: DeviceState,
}
