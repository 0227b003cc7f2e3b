//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2): a
//! device's registers in a window of guest physical address space.
//!
//! [`MmioTransport`] decodes the guest's register accesses — identification,
//! feature negotiation in 32-bit pages, queue setup, the status state
//! machine, interrupt status and acknowledgement, and the device's
//! configuration space at 0x100 — and drives a [`VirtioDevice`] through
//! them. It implements `vm-device`'s [`MutDeviceMmio`], so a VMM puts it on
//! its MMIO bus like any other device.
//!
//! Two things never go through a vCPU exit to the transport in a VMM that
//! wires it properly: queue notifications reach the device through one
//! eventfd per queue that the VMM registers as a KVM ioeventfd
//! ([`MmioTransport::queue_notifiers`]), and interrupts leave through an
//! [`InterruptLine`] (an irqfd). A `QueueNotify` write that reaches the
//! transport anyway signals the same eventfd.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use keel_irq::InterruptLine;
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{VirtioDevice, VirtioInterrupt};
use crate::driver_state::{lock, set_high, set_low, DriverState, SignalState};
use crate::{Error, Result};

/// The value of the `MagicValue` register: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version this crate implements (modern, not legacy).
pub const MMIO_VERSION: u32 = 2;
/// The `VendorID` this transport reports: "KEEL" in little endian.
pub const MMIO_VENDOR_ID: u32 = u32::from_le_bytes(*b"KEEL");
/// The size of the MMIO window a VMM should give each device: registers and
/// configuration space fit in 0x200 bytes, and 4 KiB keeps devices on
/// separate pages.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the `QueueNotify` register, where ioeventfds go.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets (virtio 1.2, table 4.1).
/// The virtio-mmio register offsets (virtio 1.2, section 4.2.2), from
/// the start of a device's window. The configuration space starts at
/// [`CONFIG_SPACE_OFFSET`].
pub mod reg {
    /// `MagicValue`: "virt" ([`super::MMIO_MAGIC_VALUE`]), read-only.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version`: 2 for virtio 1.x, read-only.
    pub const VERSION: u64 = 0x004;
    /// `DeviceID`: the device type, read-only.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID`, read-only.
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures`: 32 feature bits of the page `DeviceFeaturesSel` selects.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures`: the driver's accepted bits of the selected page.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel`.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel`: the queue the queue registers below act on.
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax`: the selected queue's largest size.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum`: the size the driver chose.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady`.
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify`: the queue index written here notifies the device.
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    /// `InterruptStatus` (bits in [`super::interrupt_status`]).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK`.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status`: the device status (bits in [`crate::device_status`]).
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow`.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh`.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (the available ring).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh`.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (the used ring).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh`.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `SHMSel`.
    pub const SHM_SEL: u64 = 0x0ac;
    /// `SHMLenLow`.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHMLenHigh`.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHMBaseLow`.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHMBaseHigh`.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `ConfigGeneration`.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Bits of `InterruptStatus`.
pub mod interrupt_status {
    /// The device used buffers in at least one queue.
    pub const USED_BUFFER: u32 = 1;
    /// The device's configuration changed (or it needs a reset).
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Where a device sits in the guest: its MMIO window and its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest physical address of the register window
    /// ([`MMIO_WINDOW_SIZE`] bytes).
    pub base: u64,
    /// The GSI the device's interrupt line raises.
    pub gsi: u32,
}

impl MmioSlot {
    /// The window on the MMIO bus, for registering the transport.
    pub fn range(&self) -> Result<MmioRange> {
        MmioRange::new(MmioAddress(self.base), MMIO_WINDOW_SIZE)
            .map_err(|_| Error::InvalidMmioWindow { base: self.base })
    }

    /// The guest physical address of the `QueueNotify` register. (For a
    /// window that does not fit in the address space, which
    /// [`range`](Self::range) and [`MmioTransport::new`] refuse, it wraps.)
    pub fn notify_address(&self) -> u64 {
        self.base.wrapping_add(QUEUE_NOTIFY_OFFSET)
    }

    /// What to add to a Linux guest's kernel command line so it finds the
    /// device: `virtio_mmio.device=4K@0x<base>:<gsi>`.
    ///
    /// ```
    /// let slot = keel_virtio::MmioSlot { base: 0xd000_0000, gsi: 5 };
    /// assert_eq!(slot.cmdline_entry(), "virtio_mmio.device=4K@0xd0000000:5");
    /// ```
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_WINDOW_SIZE / 1024,
            self.base,
            self.gsi
        )
    }
}

/// One queue's notification eventfd, with what a VMM needs to register it
/// as a KVM ioeventfd:
/// `vm.register_ioevent(n.event, &IoEventAddress::Mmio(n.address), n.datamatch)`.
#[derive(Debug, Clone, Copy)]
pub struct QueueNotifier<'a> {
    /// Signalled when the driver notifies the queue.
    pub event: &'a EventFd,
    /// The `QueueNotify` register's guest physical address.
    pub address: u64,
    /// The value the driver writes for this queue: its index.
    pub datamatch: u32,
}

/// The transport's side of [`VirtioInterrupt`]: `InterruptStatus`, the
/// `DEVICE_NEEDS_RESET` bit and `ConfigGeneration` (all shared with the
/// device without a lock), plus the line.
#[derive(Debug)]
struct MmioInterrupt {
    signals: Arc<SignalState>,
    line: Arc<dyn InterruptLine>,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> Result<()> {
        self.signals.isr.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()?;
        Ok(())
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue: u16) -> Result<()> {
        self.raise(interrupt_status::USED_BUFFER)
    }

    fn signal_config_change(&self) -> Result<()> {
        self.signals.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(interrupt_status::CONFIG_CHANGE)
    }

    fn signal_needs_reset(&self) -> Result<()> {
        self.signals.needs_reset.store(true, Ordering::SeqCst);
        self.raise(interrupt_status::CONFIG_CHANGE)
    }
}

/// A virtio device on the MMIO bus: the register window of one device,
/// version 2 of the virtio-mmio layout.
///
/// The transport owns the registers the driver programs (features, queue
/// setup, status) and checks them itself; it takes the device's lock only
/// for configuration space accesses, feature acknowledgement, activation
/// and reset. Interrupt status and acknowledgement never wait for the
/// device, so a device busy with I/O on the event loop does not stall a
/// vCPU handling an interrupt.
///
/// Register accesses must be 32 bits wide and aligned; configuration space
/// accesses 1, 2, 4 or 8 bytes wide. Anything else is ignored (reads return
/// zeros). A driver that sets up a queue the device cannot use — a size that
/// is not a power of two or exceeds the maximum, misaligned rings, rings
/// outside guest RAM — gets `DEVICE_NEEDS_RESET` at `DRIVER_OK` instead of an
/// active device.
///
/// See the crate documentation for an example that drives a block device
/// through these registers.
pub struct MmioTransport {
    state: DriverState,
    slot: MmioSlot,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("slot", &self.slot)
            .field("device_type", &self.state.device_type)
            .field("status", &self.state.status())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Exposes `device` in `slot`, with `mem` as guest RAM (where the queues
    /// must lie) and `line` as its interrupt.
    ///
    /// Creates one eventfd per queue; see
    /// [`queue_notifiers`](Self::queue_notifiers).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
        slot: MmioSlot,
    ) -> Result<Self> {
        slot.range()?;
        let state = DriverState::new(format!("virtio-mmio {:#x}", slot.base), device, mem)?;
        let interrupt = Arc::new(MmioInterrupt {
            signals: state.signals.clone(),
            line,
        });
        Ok(Self {
            state,
            slot,
            interrupt,
        })
    }

    /// Where the device sits.
    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// The kernel command-line entry that tells Linux about this device;
    /// see [`MmioSlot::cmdline_entry`].
    pub fn cmdline_entry(&self) -> String {
        self.slot.cmdline_entry()
    }

    /// The queue notification eventfds, to register as KVM ioeventfds so a
    /// driver's notification never exits to the VMM:
    /// `vm.register_ioevent(n.event, &IoEventAddress::Mmio(n.address), n.datamatch)`
    /// for each (see "Wiring a device into a VMM" in the crate documentation).
    pub fn queue_notifiers(&self) -> Vec<QueueNotifier<'_>> {
        self.state
            .queue_events
            .iter()
            .enumerate()
            .map(|(index, event)| QueueNotifier {
                event,
                address: self.slot.notify_address(),
                // new() checked that the queue count fits in u16.
                datamatch: index as u32,
            })
            .collect()
    }

    /// The device status as the driver reads it, `DEVICE_NEEDS_RESET`
    /// included.
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    /// Whether the device was activated (and not reset since).
    pub fn is_activated(&self) -> bool {
        self.state.is_activated()
    }

    /// For a snapshot, while the VM is paused: the registers the driver
    /// programmed and the device's state. Fails, naming the device, for a
    /// device that cannot be saved ([`VirtioDevice::save_state`]).
    pub fn save_state(&self) -> Result<crate::TransportState> {
        self.state.save_state()
    }

    /// Puts a saved state into this new transport (same device type, same
    /// slot) and re-activates the device with its queues where they were.
    /// Nothing changes if the state does not fit.
    pub fn restore_state(&mut self, state: &crate::TransportState) -> Result<()> {
        self.state.restore_state(state, &self.interrupt)
    }

    /// The features the driver has written so far.
    pub fn driver_features(&self) -> u64 {
        self.state.driver_features
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.state.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => self.state.device_features_page(),
            reg::QUEUE_NUM_MAX => self.state.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.state.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.state.signals.isr.load(Ordering::SeqCst),
            reg::STATUS => self.status(),
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.state.signals.config_generation.load(Ordering::SeqCst),
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let state = &mut self.state;
        match offset {
            reg::DEVICE_FEATURES_SEL => state.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => state.driver_features_select = value,
            reg::DRIVER_FEATURES => state.write_driver_features(value),
            reg::QUEUE_SEL => state.queue_select = value,
            reg::QUEUE_NUM => state.with_queue_setup(|q| q.size = value),
            reg::QUEUE_READY => state.set_queue_ready(value == 1),
            reg::QUEUE_DESC_LOW => state.with_queue_setup(|q| set_low(&mut q.desc, value)),
            reg::QUEUE_DESC_HIGH => state.with_queue_setup(|q| set_high(&mut q.desc, value)),
            reg::QUEUE_DRIVER_LOW => state.with_queue_setup(|q| set_low(&mut q.driver, value)),
            reg::QUEUE_DRIVER_HIGH => state.with_queue_setup(|q| set_high(&mut q.driver, value)),
            reg::QUEUE_DEVICE_LOW => state.with_queue_setup(|q| set_low(&mut q.device, value)),
            reg::QUEUE_DEVICE_HIGH => state.with_queue_setup(|q| set_high(&mut q.device, value)),
            reg::QUEUE_NOTIFY => state.notify_queue(value),
            reg::INTERRUPT_ACK => {
                state.signals.isr.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => {
                state.write_status(value, &self.interrupt);
            }
            reg::SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write of {value:#x} to read-only or unknown register {offset:#x}"),
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if let Some(config_offset) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.state.read_config(config_offset, data);
            } else {
                log::debug!("virtio-mmio: {}-byte config read ignored", data.len());
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored (registers are 32-bit aligned)",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some(config_offset) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.state.device).write_config(config_offset, data);
            } else {
                log::debug!("virtio-mmio: {}-byte config write ignored", data.len());
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            log::debug!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
