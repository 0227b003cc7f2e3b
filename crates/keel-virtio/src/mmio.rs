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

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_irq::InterruptLine;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset, MmioRange};
use vm_device::MutDeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Activation, StopSignal, VirtioDevice, VirtioInterrupt};
use crate::{device_status, features, Error, Result};

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
pub(crate) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
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

    /// The guest physical address of the `QueueNotify` register.
    pub fn notify_address(&self) -> u64 {
        self.base + QUEUE_NOTIFY_OFFSET
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
/// `DEVICE_NEEDS_RESET` bit and `ConfigGeneration`, all shared with the
/// device without a lock, plus the line.
#[derive(Debug)]
struct MmioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()?;
        Ok(())
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue: u16) -> Result<()> {
        self.raise(interrupt_status::USED_BUFFER)
    }

    fn signal_config_change(&self) -> Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(interrupt_status::CONFIG_CHANGE)
    }

    fn signal_needs_reset(&self) -> Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(interrupt_status::CONFIG_CHANGE)
    }
}

/// What the driver wrote for one queue, checked only at activation.
#[derive(Debug, Clone, Copy)]
struct QueueRegisters {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// The queue the driver described, or why it cannot be used.
    fn build(&self, index: usize, event_idx: bool, mem: &GuestMemoryMmap) -> Result<Queue> {
        let invalid = |reason: String| Error::InvalidQueue { index, reason };
        if !self.ready {
            return Err(invalid("QueueReady is 0 at DRIVER_OK".into()));
        }
        let mut queue =
            Queue::new(self.max_size).map_err(|e| invalid(format!("maximum size {}: {e}", self.max_size)))?;
        let size_ok = u16::try_from(self.size).is_ok_and(|size| queue.try_set_size(size).is_ok());
        if !size_ok {
            return Err(invalid(format!(
                "size {} is not a power of two between 1 and {}",
                self.size, self.max_size
            )));
        }
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| {
                invalid(format!(
                    "descriptor table at {:#x} is not 16-byte aligned",
                    self.desc
                ))
            })?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| {
                invalid(format!(
                    "available ring at {:#x} is not 2-byte aligned",
                    self.driver
                ))
            })?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| invalid(format!("used ring at {:#x} is not 4-byte aligned", self.device)))?;
        if self.driver == 0 {
            // virtio-queue treats an available ring at 0 as "not set up".
            return Err(invalid("available ring at address 0".into()));
        }
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(invalid(format!(
                "rings of {} entries at desc {:#x}, driver {:#x}, device {:#x} are not all in \
                 guest RAM",
                self.size, self.desc, self.driver, self.device
            )));
        }
        Ok(queue)
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
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    slot: MmioSlot,
    interrupt: Arc<MmioInterrupt>,
    stop: StopSignal,

    device_type: u32,
    device_features: u64,
    queue_events: Vec<EventFd>,

    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// The driver set bits in feature pages past the 64 bits a device has.
    driver_features_beyond_64: bool,
    queue_select: u32,
    queues: Vec<QueueRegisters>,
    status: u32,
    /// The device refused a reset; it stays out of service.
    device_broken: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("slot", &self.slot)
            .field("device_type", &self.device_type)
            .field("status", &self.status)
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
        let (device_type, device_features, queue_max_sizes) = {
            let d = lock(&device);
            (d.device_type(), d.features(), d.queue_max_sizes().to_vec())
        };
        if u32::try_from(queue_max_sizes.len()).is_err() {
            return Err(Error::TooManyQueues {
                count: queue_max_sizes.len(),
            });
        }
        let queue_events = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd))
            .collect::<Result<Vec<_>>>()?;
        slot.range()?;
        Ok(Self {
            device,
            mem,
            slot,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                config_generation: AtomicU32::new(0),
                line,
            }),
            stop: StopSignal::new(),
            device_type,
            device_features,
            queue_events,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            queue_select: 0,
            queues: queue_max_sizes.into_iter().map(QueueRegisters::new).collect(),
            status: 0,
            device_broken: false,
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
        self.queue_events
            .iter()
            .enumerate()
            .map(|(index, event)| QueueNotifier {
                event,
                address: self.slot.notify_address(),
                // new() checked that the queue count fits in u32.
                datamatch: index as u32,
            })
            .collect()
    }

    /// The device status as the driver reads it, `DEVICE_NEEDS_RESET`
    /// included.
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            status |= device_status::DEVICE_NEEDS_RESET;
        }
        status
    }

    /// Whether the device was activated (and not reset since).
    pub fn is_activated(&self) -> bool {
        self.status & device_status::DRIVER_OK != 0 && !self.interrupt.needs_reset.load(Ordering::SeqCst)
    }

    /// The features the driver has written so far.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            reg::STATUS => self.status(),
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation.load(Ordering::SeqCst),
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => self.with_queue_setup(|q| q.size = value),
            reg::QUEUE_READY => self.with_queue_setup_ready(value),
            reg::QUEUE_DESC_LOW => self.with_queue_setup(|q| set_low(&mut q.desc, value)),
            reg::QUEUE_DESC_HIGH => self.with_queue_setup(|q| set_high(&mut q.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.with_queue_setup(|q| set_low(&mut q.driver, value)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue_setup(|q| set_high(&mut q.driver, value)),
            reg::QUEUE_DEVICE_LOW => self.with_queue_setup(|q| set_low(&mut q.device, value)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue_setup(|q| set_high(&mut q.device, value)),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write of {value:#x} to read-only or unknown register {offset:#x}"),
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(self.queue_select as usize)
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating =
            self.status & device_status::DRIVER != 0 && self.status & device_status::FEATURES_OK == 0;
        if !negotiating {
            log::warn!(
                "virtio-mmio: driver features written in status {:#x}, ignored",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            page => {
                if value != 0 {
                    log::warn!(
                        "virtio-mmio: driver accepted features {value:#x} in page {page}, which \
                         the device never offered"
                    );
                    self.driver_features_beyond_64 = true;
                }
            }
        }
    }

    /// Queue setup registers may change only before `DRIVER_OK` and while the
    /// selected queue is not ready.
    fn with_queue_setup(&mut self, change: impl FnOnce(&mut QueueRegisters)) {
        let status = self.status;
        let select = self.queue_select;
        match self.queues.get_mut(select as usize) {
            Some(q) if status & device_status::DRIVER_OK == 0 && !q.ready => change(q),
            Some(_) => log::warn!(
                "virtio-mmio: queue {select} setup written while ready or after DRIVER_OK, \
                 ignored"
            ),
            None => log::warn!("virtio-mmio: setup written for missing queue {select}, ignored"),
        }
    }

    fn with_queue_setup_ready(&mut self, value: u32) {
        let status = self.status;
        let select = self.queue_select;
        match self.queues.get_mut(select as usize) {
            Some(q) if status & device_status::DRIVER_OK == 0 => q.ready = value == 1,
            Some(_) => {
                log::warn!("virtio-mmio: QueueReady of queue {select} written after DRIVER_OK, ignored")
            }
            None => log::warn!("virtio-mmio: QueueReady written for missing queue {select}"),
        }
    }

    fn notify_queue(&self, value: u32) {
        match self.queue_events.get(value as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    log::error!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => log::warn!("virtio-mmio: notification for missing queue {value}"),
        }
    }

    /// The device status state machine (virtio 1.2, sections 2.1 and 3.1).
    fn write_status(&mut self, value: u32) {
        use device_status::*;

        if value == 0 {
            self.reset();
            return;
        }
        if self.status & FAILED != 0 {
            log::warn!("virtio-mmio: status {value:#x} written after FAILED; reset first");
            return;
        }
        if value & FAILED != 0 {
            log::info!(
                "virtio-mmio: the driver gave up on device type {}",
                self.device_type
            );
            self.status |= FAILED;
            return;
        }
        if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            log::warn!("virtio-mmio: status {value:#x} written while the device needs a reset");
            return;
        }
        let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        let value = value & known;
        let old = self.status & known;
        // The driver sets bits one step at a time and clears them only by a
        // reset; each step needs the ones before it.
        let valid_ladder = [
            ACKNOWLEDGE,
            ACKNOWLEDGE | DRIVER,
            ACKNOWLEDGE | DRIVER | FEATURES_OK,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        ];
        if value & old != old || !valid_ladder.contains(&value) {
            log::warn!("virtio-mmio: status change {old:#x} -> {value:#x} is not allowed, ignored");
            return;
        }
        let added = value & !old;
        if added & FEATURES_OK != 0 && !self.accept_features() {
            // The driver reads the status back and finds FEATURES_OK unset.
            self.status = (self.status & !known) | (value & !FEATURES_OK & !DRIVER_OK);
            return;
        }
        self.status = (self.status & !known) | value;
        if added & DRIVER_OK != 0 {
            log::info!(
                "virtio-mmio {:#x}: driver ready for device type {} (features {:#x})",
                self.slot.base,
                self.device_type,
                self.driver_features
            );
            if let Err(e) = self.activate() {
                log::warn!(
                    "virtio-mmio: cannot activate device type {}: {e}; device needs reset",
                    self.device_type
                );
                if let Err(e) = self.interrupt.signal_needs_reset() {
                    log::error!("virtio-mmio: cannot signal DEVICE_NEEDS_RESET: {e}");
                }
            }
        }
    }

    fn accept_features(&mut self) -> bool {
        let unoffered = self.driver_features & !self.device_features;
        if unoffered != 0 || self.driver_features_beyond_64 {
            log::warn!(
                "virtio-mmio: driver accepted features {:#x} the device never offered; \
                 FEATURES_OK refused",
                unoffered
            );
            return false;
        }
        if self.driver_features & features::VERSION_1 == 0 {
            log::warn!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not \
                 supported); FEATURES_OK refused"
            );
            return false;
        }
        lock(&self.device).ack_features(self.driver_features);
        true
    }

    fn activate(&mut self) -> Result<()> {
        if self.device_broken {
            return Err(Error::DeviceUnresettable {
                device_type: self.device_type,
            });
        }
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| q.build(index, event_idx, &self.mem))
            .collect::<Result<Vec<_>>>()?;
        let queue_events = self
            .queue_events
            .iter()
            .map(|e| e.try_clone().map_err(Error::CreateEventFd))
            .collect::<Result<Vec<_>>>()?;
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        lock(&self.device).activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt,
            stop: self.stop.clone(),
        })
    }

    /// Writing 0 to `Status`: back to the state after power-on.
    fn reset(&mut self) {
        // Ask a device busy on the event loop to stop between requests, then
        // wait for it: once reset() returns, it touches no guest memory.
        self.stop.raise();
        let reset = lock(&self.device).reset();
        self.stop.lower();
        if !reset {
            log::error!(
                "virtio-mmio: device type {} cannot be reset; it stays out of service",
                self.device_type
            );
            self.device_broken = true;
        }
        for event in &self.queue_events {
            // Drop notifications from before the reset (non-blocking read).
            let _ = event.read();
        }
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueRegisters::new(q.max_size);
        }
        self.status = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
    }
}

fn set_low(field: &mut u64, value: u32) {
    *field = (*field & !0xffff_ffff) | u64::from(value);
}

fn set_high(field: &mut u64, value: u32) {
    *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A device whose lock was poisoned by a panic elsewhere still has
    // consistent registers; keep serving the guest.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
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
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
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
