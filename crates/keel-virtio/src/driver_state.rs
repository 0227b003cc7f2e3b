//! What the driver programs into any virtio transport — feature pages, queue
//! setup, the device status — and the state machine around it, shared by
//! the MMIO and PCI transports, which differ only in where these registers
//! sit and how interrupts leave.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Activation, StopSignal, VirtioDevice, VirtioInterrupt};
use crate::snapshot::{QueueSetup, TransportState};
use crate::{device_status, features, Error, Result};

/// Interrupt-side state a transport shares with its device's interrupt
/// object, without a lock: the interrupt status bits (ISR), the
/// `DEVICE_NEEDS_RESET` flag and the configuration generation.
#[derive(Debug, Default)]
pub(crate) struct SignalState {
    pub isr: AtomicU32,
    pub needs_reset: AtomicBool,
    pub config_generation: AtomicU32,
}

/// What the driver wrote for one queue, checked only at activation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueRegisters {
    pub max_size: u16,
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
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

/// The driver-programmed state of one virtio device and the device itself:
/// feature negotiation in 32-bit pages, queue setup (writable only before
/// `DRIVER_OK` and while the queue is not ready), the status state machine
/// (virtio 1.2, sections 2.1 and 3.1), activation and reset.
pub(crate) struct DriverState {
    /// Names the transport (and where the device is) in log messages:
    /// `virtio-mmio 0xd0001000`, `virtio-pci`.
    pub transport: String,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The device's configuration space, when it offers one readable
    /// without its lock ([`VirtioDevice::shared_config`]).
    shared_config: Option<crate::SharedConfig>,
    pub mem: GuestMemoryMmap,
    pub signals: Arc<SignalState>,
    pub stop: StopSignal,

    pub device_type: u32,
    pub device_features: u64,
    pub queue_events: Vec<EventFd>,

    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub driver_features: u64,
    /// The driver set bits in feature pages past the 64 bits a device has.
    driver_features_beyond_64: bool,
    pub queue_select: u32,
    pub queues: Vec<QueueRegisters>,
    status: u32,
    /// The device refused a reset; it stays out of service.
    device_broken: bool,
}

impl DriverState {
    /// The state of `device` right after power-on, with `mem` as guest RAM
    /// and one (non-blocking) notification eventfd per queue.
    pub fn new(
        transport: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
    ) -> Result<Self> {
        let (device_type, device_features, queue_max_sizes, shared_config) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.features(),
                d.queue_max_sizes().to_vec(),
                d.shared_config(),
            )
        };
        if u16::try_from(queue_max_sizes.len()).is_err() {
            return Err(Error::TooManyQueues {
                count: queue_max_sizes.len(),
            });
        }
        let queue_events = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            transport,
            device,
            shared_config,
            mem,
            signals: Arc::new(SignalState::default()),
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

    /// A driver's read of the configuration space: from the device's
    /// [`SharedConfig`](crate::SharedConfig) when it has one (a request
    /// in progress on its event loop does not hold it up), else under the
    /// device's lock.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        match &self.shared_config {
            Some(config) => config.read(offset, data),
            None => lock(&self.device).read_config(offset, data),
        }
    }

    /// The device status as the driver reads it, `DEVICE_NEEDS_RESET`
    /// included.
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.signals.needs_reset.load(Ordering::SeqCst) {
            status |= device_status::DEVICE_NEEDS_RESET;
        }
        status
    }

    /// Whether the device was activated (and not reset or failed since).
    pub fn is_activated(&self) -> bool {
        self.status & device_status::DRIVER_OK != 0 && !self.signals.needs_reset.load(Ordering::SeqCst)
    }

    /// The 32 feature bits of the page `DeviceFeaturesSel` selects.
    pub fn device_features_page(&self) -> u32 {
        match self.device_features_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 driver feature bits of the page `DriverFeaturesSel` selects,
    /// as written so far.
    pub fn driver_features_page(&self) -> u32 {
        match self.driver_features_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    pub fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(self.queue_select as usize)
    }

    pub fn write_driver_features(&mut self, value: u32) {
        let negotiating =
            self.status & device_status::DRIVER != 0 && self.status & device_status::FEATURES_OK == 0;
        if !negotiating {
            keel_ratelimit::warn_limited!(
                "{}: driver features written in status {:#x}, ignored",
                self.transport,
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            page => {
                if value != 0 {
                    keel_ratelimit::warn_limited!(
                        "{}: driver accepted features {value:#x} in page {page}, which the device \
                         never offered",
                        self.transport
                    );
                    self.driver_features_beyond_64 = true;
                }
            }
        }
    }

    /// Queue setup registers may change only before `DRIVER_OK` and while the
    /// selected queue is not ready.
    pub fn with_queue_setup(&mut self, change: impl FnOnce(&mut QueueRegisters)) {
        let status = self.status;
        let select = self.queue_select;
        match self.queues.get_mut(select as usize) {
            Some(q) if status & device_status::DRIVER_OK == 0 && !q.ready => change(q),
            Some(_) => keel_ratelimit::warn_limited!(
                "{}: queue {select} setup written while ready or after DRIVER_OK, ignored",
                self.transport
            ),
            None => keel_ratelimit::warn_limited!(
                "{}: setup written for missing queue {select}, ignored",
                self.transport
            ),
        }
    }

    /// Marks the selected queue ready (or not), before `DRIVER_OK` only.
    pub fn set_queue_ready(&mut self, ready: bool) {
        let status = self.status;
        let select = self.queue_select;
        match self.queues.get_mut(select as usize) {
            Some(q) if status & device_status::DRIVER_OK == 0 => q.ready = ready,
            Some(_) => keel_ratelimit::warn_limited!(
                "{}: queue {select} enabled after DRIVER_OK, ignored",
                self.transport
            ),
            None => keel_ratelimit::warn_limited!("{}: missing queue {select} enabled", self.transport),
        }
    }

    /// A notification for `queue` that reached the transport instead of an
    /// ioeventfd: signals the same eventfd.
    pub fn notify_queue(&self, queue: u32) {
        match self.queue_events.get(queue as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    log::error!("{}: cannot signal queue {queue}: {e}", self.transport);
                }
            }
            None => {
                keel_ratelimit::warn_limited!("{}: notification for missing queue {queue}", self.transport)
            }
        }
    }

    /// The device status state machine (virtio 1.2, sections 2.1 and 3.1).
    /// `interrupt` is what the device gets at activation. Returns whether
    /// the write reset the device (the transport then resets its own
    /// registers too).
    pub fn write_status(&mut self, value: u32, interrupt: &Arc<dyn VirtioInterrupt>) -> bool {
        use device_status::*;

        if value == 0 {
            self.reset();
            return true;
        }
        if self.status & FAILED != 0 {
            keel_ratelimit::warn_limited!(
                "{}: status {value:#x} written after FAILED; reset first",
                self.transport
            );
            return false;
        }
        if value & FAILED != 0 {
            keel_ratelimit::info_limited!(
                "{}: the driver gave up on device type {}",
                self.transport,
                self.device_type
            );
            self.status |= FAILED;
            return false;
        }
        if self.signals.needs_reset.load(Ordering::SeqCst) {
            keel_ratelimit::warn_limited!(
                "{}: status {value:#x} written while the device needs a reset",
                self.transport
            );
            return false;
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
            keel_ratelimit::warn_limited!(
                "{}: status change {old:#x} -> {value:#x} is not allowed, ignored",
                self.transport
            );
            return false;
        }
        let added = value & !old;
        if added & FEATURES_OK != 0 && !self.accept_features() {
            // The driver reads the status back and finds FEATURES_OK unset.
            self.status = (self.status & !known) | (value & !FEATURES_OK & !DRIVER_OK);
            return false;
        }
        self.status = (self.status & !known) | value;
        if added & DRIVER_OK != 0 {
            keel_ratelimit::info_limited!(
                "{}: driver ready for device type {} (features {:#x})",
                self.transport,
                self.device_type,
                self.driver_features
            );
            if let Err(e) = self.activate(interrupt.clone()) {
                keel_ratelimit::warn_limited!(
                    "{}: cannot activate device type {}: {e}; device needs reset",
                    self.transport,
                    self.device_type
                );
                if let Err(e) = interrupt.signal_needs_reset() {
                    log::error!("{}: cannot signal DEVICE_NEEDS_RESET: {e}", self.transport);
                }
            }
        }
        false
    }

    fn accept_features(&mut self) -> bool {
        let unoffered = self.driver_features & !self.device_features;
        if unoffered != 0 || self.driver_features_beyond_64 {
            keel_ratelimit::warn_limited!(
                "{}: driver accepted features {:#x} the device never offered; FEATURES_OK refused",
                self.transport,
                unoffered
            );
            return false;
        }
        if self.driver_features & features::VERSION_1 == 0 {
            keel_ratelimit::warn_limited!(
                "{}: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported); \
                 FEATURES_OK refused",
                self.transport
            );
            return false;
        }
        lock(&self.device).ack_features(self.driver_features);
        true
    }

    fn activate(&mut self, interrupt: Arc<dyn VirtioInterrupt>) -> Result<()> {
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
        lock(&self.device).activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt,
            stop: self.stop.clone(),
        })
    }

    /// For a snapshot, while the VM is paused: the registers and the
    /// device's state. Fails for a device that cannot be saved.
    pub fn save_state(&self) -> Result<TransportState> {
        let device = lock(&self.device)
            .save_state()
            .ok_or_else(|| Error::NotSnapshottable {
                device_type: self.device_type,
                transport: self.transport.clone(),
            })?;
        Ok(TransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            driver_features_beyond_64: self.driver_features_beyond_64,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSetup {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                })
                .collect(),
            isr: self.signals.isr.load(Ordering::SeqCst),
            needs_reset: self.signals.needs_reset.load(Ordering::SeqCst),
            config_generation: self.signals.config_generation.load(Ordering::SeqCst),
            device_broken: self.device_broken,
            device,
        })
    }

    /// Puts a saved state into this freshly created transport and its
    /// device, re-activating the device with its queues where they were.
    /// Everything is checked before anything changes.
    pub fn restore_state(
        &mut self,
        state: &TransportState,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> Result<()> {
        let mismatch = |reason: String| Error::StateMismatch {
            transport: self.transport.clone(),
            reason,
        };
        if state.device_type != self.device_type {
            return Err(mismatch(format!(
                "the state is a type-{} device's, this is a type-{} device",
                state.device_type, self.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(mismatch(format!(
                "the state has {} queues, the device {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if self.status != 0 {
            return Err(mismatch(
                "the transport is in use already; restore into a new one".into(),
            ));
        }
        let active =
            state.status & device_status::DRIVER_OK != 0 && !state.needs_reset && !state.device_broken;
        if active && state.device.queues.len() != self.queues.len() {
            return Err(mismatch(format!(
                "the device was active with {} queue positions saved, but has {} queues",
                state.device.queues.len(),
                self.queues.len()
            )));
        }
        let unoffered = state.driver_features & !self.device_features;
        if unoffered != 0 && state.status & device_status::FEATURES_OK != 0 {
            return Err(mismatch(format!(
                "the driver had accepted features {unoffered:#x} this device does not offer"
            )));
        }
        let mut queues = self.queues.clone();
        for (q, saved) in queues.iter_mut().zip(&state.queues) {
            q.size = saved.size;
            q.ready = saved.ready;
            q.desc = saved.desc;
            q.driver = saved.driver;
            q.device = saved.device;
        }
        let built = if active {
            let event_idx = state.driver_features & features::RING_EVENT_IDX != 0;
            let mut built = Vec::with_capacity(queues.len());
            for (index, (q, progress)) in queues.iter().zip(&state.device.queues).enumerate() {
                let mut queue = q.build(index, event_idx, &self.mem)?;
                queue.set_next_avail(progress.next_avail);
                queue.set_next_used(progress.next_used);
                built.push(queue);
            }
            Some(built)
        } else {
            None
        };
        {
            let mut device = lock(&self.device);
            device.restore_state(&state.device.data)?;
            if state.status & device_status::FEATURES_OK != 0 {
                device.ack_features(state.driver_features);
            }
        }
        self.queues = queues;
        self.status = state.status;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.driver_features_beyond_64 = state.driver_features_beyond_64;
        self.queue_select = state.queue_select;
        self.device_broken = state.device_broken;
        self.signals.isr.store(state.isr, Ordering::SeqCst);
        self.signals
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        self.signals
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        if let Some(queues) = built {
            let queue_events = self
                .queue_events
                .iter()
                .map(|e| e.try_clone().map_err(Error::CreateEventFd))
                .collect::<Result<Vec<_>>>()?;
            lock(&self.device).activate(Activation {
                mem: self.mem.clone(),
                queues,
                queue_events,
                interrupt: interrupt.clone(),
                stop: self.stop.clone(),
            })?;
            // Notifications the driver made before the snapshot and the
            // device had not yet seen are in the available rings; a kick
            // makes the device look.
            for event in &self.queue_events {
                let _ = event.write(1);
            }
        }
        Ok(())
    }

    /// Writing 0 to the status: back to the state after power-on.
    fn reset(&mut self) {
        // Ask a device busy on the event loop to stop between requests, then
        // wait for it: once reset() returns, it touches no guest memory.
        self.stop.raise();
        let reset = lock(&self.device).reset();
        self.stop.lower();
        if !reset {
            log::error!(
                "{}: device type {} cannot be reset; it stays out of service",
                self.transport,
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
        self.signals.isr.store(0, Ordering::SeqCst);
        self.signals.needs_reset.store(false, Ordering::SeqCst);
    }
}

pub(crate) fn set_low(field: &mut u64, value: u32) {
    *field = (*field & !0xffff_ffff) | u64::from(value);
}

pub(crate) fn set_high(field: &mut u64, value: u32) {
    *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
}

pub(crate) fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A device whose lock was poisoned by a panic elsewhere still has
    // consistent registers; keep serving the guest.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}
