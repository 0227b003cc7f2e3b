//! The contract between a virtio device and the transport that exposes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::DeviceState;
use crate::{Error, Result};

/// A virtio device, as a transport (virtio-mmio or virtio-pci) sees it.
///
/// # Lifecycle
///
/// 1. While the driver negotiates, the transport reports
///    [`device_type`](Self::device_type), [`features`](Self::features) and
///    [`queue_max_sizes`](Self::queue_max_sizes), and calls
///    [`ack_features`](Self::ack_features) with what the driver accepted.
/// 2. The driver may access the configuration space at any time:
///    [`read_config`](Self::read_config) and
///    [`write_config`](Self::write_config).
/// 3. When the driver sets `DRIVER_OK`, the transport checks the queues the
///    driver configured and calls [`activate`](Self::activate) with guest
///    memory, those queues, one notification eventfd per queue and the
///    interrupt to signal the guest with. From then on the device processes
///    its queues.
/// 4. When the driver writes 0 to the status, the transport calls
///    [`reset`](Self::reset); a device that can go back to step 1 returns
///    `true`.
///
/// # Threads
///
/// A transport calls these methods on a vCPU thread, with the device behind a
/// mutex that the event-loop thread also takes to process the queues. So
/// [`activate`](Self::activate) and [`reset`](Self::reset) only hand state
/// over and return; the devices in this crate pick the activation up on the
/// event loop (see [`crate::Block`] for the pattern).
///
/// # Hostile guests
///
/// Everything that comes from the guest — config offsets and lengths, the
/// feature bits it acks, the contents of the queues — is untrusted. A device
/// must not panic on any of it: out-of-range config accesses read as zero
/// and are dropped on write ([`read_config_space`] does the reading), and a
/// bad request gets an error status in the guest's buffer or puts the device
/// in `DEVICE_NEEDS_RESET` ([`VirtioInterrupt::signal_needs_reset`]).
pub trait VirtioDevice: Send {
    /// The device type ID (one of [`crate::device_type`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each of the device's queues, in queue index order;
    /// its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers, device-independent ones
    /// ([`crate::features`]) included. Constant for the device's lifetime.
    fn features(&self) -> u64;

    /// Records the features the driver accepted. The transport calls it when
    /// the driver sets `FEATURES_OK` and the transport accepted the set;
    /// implementations still keep only `acked & self.features()`.
    fn ack_features(&mut self, acked: u64);

    /// Fills `data` from the configuration space at `offset`. Bytes past the
    /// end of the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes `data` to the configuration space at `offset`. Writes to
    /// read-only fields or past the end are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The configuration space, for transports to read without the
    /// device's lock. A device whose event loop can block in its backend
    /// (a disk on a stalled file) offers one, so a driver reading the
    /// configuration — the capacity, say — never waits for a request in
    /// progress. A transport asks once, when it is built; with `Some`, it
    /// reads from the [`SharedConfig`] and no longer calls
    /// [`read_config`](Self::read_config). `None` (the default): every
    /// read takes the device's lock.
    fn shared_config(&self) -> Option<SharedConfig> {
        None
    }

    /// Starts the device with what the driver set up; see [`Activation`].
    ///
    /// Fails if the activation does not match the device
    /// ([`check_queue_count`]), if the device is already active, or if its
    /// backend cannot start; the transport then puts the device in
    /// `DEVICE_NEEDS_RESET`.
    fn activate(&mut self, activation: Activation) -> Result<()>;

    /// Returns the device to its state before negotiation: drops the queues,
    /// memory, eventfds and interrupt it was given and forgets the acked
    /// features. When this returns, the device no longer touches guest
    /// memory. Returns `false` if the device cannot be reset; the transport
    /// then keeps it out of service rather than activating it again.
    fn reset(&mut self) -> bool;

    /// For a snapshot, taken while the VM is paused: how far each active
    /// queue has got and the device's own state. `None` (the default)
    /// means the device cannot be saved, and the snapshot is refused
    /// naming it.
    fn save_state(&self) -> Option<DeviceState> {
        None
    }

    /// Puts back the `data` of a [`DeviceState`] this device type saved,
    /// on a new device, before the transport re-activates it with the
    /// saved queues. The default accepts only empty data.
    fn restore_state(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            Ok(())
        } else {
            Err(Error::StateMismatch {
                transport: format!("device type {}", self.device_type()),
                reason: format!("{} bytes of device state, but the device keeps none", data.len()),
            })
        }
    }
}

/// What a transport hands a device when the driver sets `DRIVER_OK`.
pub struct Activation {
    /// Guest memory, for the rings and the buffers in them.
    pub mem: GuestMemoryMmap,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], in index
    /// order, as the driver configured them (size, ring addresses, `EVENT_IDX`
    /// enabled if negotiated), already checked against `mem`.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies the queue
    /// (through a KVM ioeventfd, or by the transport itself).
    pub queue_events: Vec<EventFd>,
    /// How the device signals the guest.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Raised by the transport while the driver is resetting the device.
    pub stop: StopSignal,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("queues", &self.queues.len())
            .field("queue_events", &self.queue_events.len())
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

/// A flag a transport raises while it waits to reset a device, so that a
/// device busy with a long batch of requests stops between two requests and
/// lets the reset in, instead of finishing the whole batch first.
///
/// # Example
///
/// ```
/// use keel_virtio::StopSignal;
///
/// let transport_side = StopSignal::new();
/// let device_side = transport_side.clone();
/// assert!(!device_side.is_raised());
/// transport_side.raise();
/// assert!(device_side.is_raised());
/// transport_side.lower();
/// assert!(!device_side.is_raised());
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A lowered signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the device to stop taking new requests.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Lets the device take requests again.
    pub fn lower(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    /// Whether the device should stop taking new requests.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How a device signals the guest; provided by the transport.
///
/// Over MMIO all signals set a bit in the interrupt status register and
/// raise the device's interrupt line; over PCI with MSI-X each may be its own
/// vector. A device only says *why* it interrupts.
pub trait VirtioInterrupt: Send + Sync {
    /// Tells the guest that queue `queue` has new used buffers.
    fn signal_used_queue(&self, queue: u16) -> Result<()>;

    /// Tells the guest that the configuration space changed.
    fn signal_config_change(&self) -> Result<()>;

    /// Puts the device in `DEVICE_NEEDS_RESET` and tells the guest (with a
    /// configuration change notification): the device hit an error it cannot
    /// recover from without a reset, such as a driver breaking the ring's
    /// rules.
    fn signal_needs_reset(&self) -> Result<()>;
}

/// One signal sent through a [`RecordingInterrupt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioSignal {
    /// [`VirtioInterrupt::signal_used_queue`] for this queue.
    UsedQueue(u16),
    /// [`VirtioInterrupt::signal_config_change`].
    ConfigChange,
    /// [`VirtioInterrupt::signal_needs_reset`].
    NeedsReset,
}

/// A test double for [`VirtioInterrupt`] that records every signal in order.
///
/// # Example
///
/// ```
/// use keel_virtio::{RecordingInterrupt, VirtioInterrupt, VirtioSignal};
///
/// let interrupt = RecordingInterrupt::new();
/// interrupt.signal_used_queue(1).unwrap();
/// interrupt.signal_config_change().unwrap();
/// assert_eq!(
///     interrupt.signals(),
///     [VirtioSignal::UsedQueue(1), VirtioSignal::ConfigChange]
/// );
/// ```
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    signals: Mutex<Vec<VirtioSignal>>,
}

impl RecordingInterrupt {
    /// A recorder with no signals yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every signal so far, oldest first.
    pub fn signals(&self) -> Vec<VirtioSignal> {
        self.signals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, signal: VirtioSignal) {
        self.signals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(signal);
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn signal_used_queue(&self, queue: u16) -> Result<()> {
        self.record(VirtioSignal::UsedQueue(queue));
        Ok(())
    }

    fn signal_config_change(&self) -> Result<()> {
        self.record(VirtioSignal::ConfigChange);
        Ok(())
    }

    fn signal_needs_reset(&self) -> Result<()> {
        self.record(VirtioSignal::NeedsReset);
        Ok(())
    }
}

/// A device's configuration space behind a lock of its own, shared with
/// the transports: see [`VirtioDevice::shared_config`]. Clones share the
/// bytes. The lock is held only to copy bytes in or out, never across I/O.
///
/// # Example
///
/// ```
/// let config = keel_virtio::SharedConfig::new(vec![0; 8]);
/// let transport_view = config.clone();
/// config.write(0, &2048u64.to_le_bytes());
/// let mut capacity = [0u8; 8];
/// transport_view.read(0, &mut capacity);
/// assert_eq!(u64::from_le_bytes(capacity), 2048);
/// ```
#[derive(Clone, Debug, Default)]
pub struct SharedConfig(Arc<Mutex<Vec<u8>>>);

impl SharedConfig {
    /// A configuration space holding `bytes`; its size never changes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Arc::new(Mutex::new(bytes)))
    }

    fn space(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // Copying bytes cannot leave the space half-updated in a way a
        // panic elsewhere would matter to; keep serving it.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fills `data` from `offset`, zeros past the end: [`read_config_space`].
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.space(), offset, data);
    }

    /// Writes `bytes` at `offset` as one update (a reader sees all of it or
    /// none). Bytes that would fall past the end are dropped.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        let mut space = self.space();
        let end = space.len();
        if let Some(field) = space.get_mut(offset.min(end)..) {
            let len = field.len().min(bytes.len());
            if let (Some(dst), Some(src)) = (field.get_mut(..len), bytes.get(..len)) {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// Fills `data` from `space` (a device's configuration space) at `offset`,
/// with zeros for every byte past its end: the read half of
/// [`VirtioDevice::read_config`] for any offset and length a guest sends.
///
/// # Example
///
/// ```
/// let space = [1u8, 2, 3, 4];
/// let mut data = [0xaa; 4];
/// keel_virtio::read_config_space(&space, 2, &mut data);
/// assert_eq!(data, [3, 4, 0, 0]);
/// keel_virtio::read_config_space(&space, u64::MAX, &mut data);
/// assert_eq!(data, [0; 4]);
/// ```
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(available) = usize::try_from(offset).ok().and_then(|start| space.get(start..)) else {
        return;
    };
    let len = available.len().min(data.len());
    if let (Some(dst), Some(src)) = (data.get_mut(..len), available.get(..len)) {
        dst.copy_from_slice(src);
    }
}

/// Checks that `activation` has one queue and one queue eventfd per entry of
/// `device`'s [`queue_max_sizes`](VirtioDevice::queue_max_sizes); for the
/// start of [`VirtioDevice::activate`].
pub fn check_queue_count<D: VirtioDevice + ?Sized>(device: &D, activation: &Activation) -> Result<()> {
    let expected = device.queue_max_sizes().len();
    let provided = activation.queues.len().min(activation.queue_events.len());
    if activation.queues.len() != expected || activation.queue_events.len() != expected {
        return Err(Error::WrongQueueCount {
            device_type: device.device_type(),
            expected,
            provided,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{device_type, features};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const DEVICE_FEATURE: u64 = 1 << 5;

    /// A two-queue device with a writable 4-byte config field at offset 4.
    #[derive(Default)]
    struct TwoQueueDevice {
        config: [u8; 8],
        acked: u64,
        active: Option<Activation>,
    }

    impl VirtioDevice for TwoQueueDevice {
        fn device_type(&self) -> u32 {
            device_type::CONSOLE
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64, 128]
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | DEVICE_FEATURE
        }
        fn ack_features(&mut self, acked: u64) {
            self.acked = acked & self.features();
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_space(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if offset == 4 && data.len() == 4 {
                self.config[4..].copy_from_slice(data);
            }
        }
        fn activate(&mut self, activation: Activation) -> Result<()> {
            if self.active.is_some() {
                return Err(Error::AlreadyActive {
                    device_type: self.device_type(),
                });
            }
            check_queue_count(self, &activation)?;
            activation.interrupt.signal_config_change()?;
            self.active = Some(activation);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.active = None;
            self.acked = 0;
            true
        }
    }

    fn activation(sizes: &[u16], interrupt: Arc<dyn VirtioInterrupt>) -> Activation {
        Activation {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
            queues: sizes.iter().map(|&s| Queue::new(s).unwrap()).collect(),
            queue_events: sizes.iter().map(|_| EventFd::new(0).unwrap()).collect(),
            interrupt,
            stop: StopSignal::new(),
        }
    }

    #[test]
    fn config_reads_inside_the_space_return_its_bytes() {
        let space = [10u8, 11, 12, 13, 14, 15, 16, 17];
        let mut data = [0u8; 4];
        read_config_space(&space, 4, &mut data);
        assert_eq!(data, [14, 15, 16, 17]);
        let mut byte = [0u8];
        read_config_space(&space, 0, &mut byte);
        assert_eq!(byte, [10]);
    }

    #[test]
    fn config_reads_past_the_end_are_zero_filled() {
        let space = [1u8, 2];
        let mut data = [0xffu8; 4];
        read_config_space(&space, 1, &mut data);
        assert_eq!(data, [2, 0, 0, 0]);
        read_config_space(&space, 2, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn config_reads_at_hostile_offsets_and_lengths_do_not_panic() {
        let space = [1u8; 8];
        for offset in [8, 9, u64::from(u32::MAX), u64::MAX - 3, u64::MAX] {
            let mut data = vec![0xffu8; 4096];
            read_config_space(&space, offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "offset {offset:#x}");
        }
        read_config_space(&space, 0, &mut []);
        read_config_space(&[], 0, &mut [0u8; 4]);
    }

    #[test]
    fn ack_features_keeps_only_offered_bits() {
        let mut device = TwoQueueDevice::default();
        device.ack_features(u64::MAX);
        assert_eq!(device.acked, features::VERSION_1 | DEVICE_FEATURE);
    }

    #[test]
    fn activation_hands_the_device_its_queues_memory_and_interrupt() {
        let mut device = TwoQueueDevice::default();
        let interrupt = Arc::new(RecordingInterrupt::new());

        device
            .activate(activation(&[64, 128], interrupt.clone()))
            .unwrap();

        let active = device.active.as_ref().unwrap();
        let sizes: Vec<u16> = active.queues.iter().map(|q| q.max_size()).collect();
        assert_eq!(sizes, [64, 128]);
        assert_eq!(interrupt.signals(), [VirtioSignal::ConfigChange]);
    }

    #[test]
    fn activation_with_the_wrong_number_of_queues_names_both_counts() {
        let mut device = TwoQueueDevice::default();
        let err = device
            .activate(activation(&[64], Arc::new(RecordingInterrupt::new())))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "device type 3 has 2 queues but was activated with 1"
        );
        assert!(device.active.is_none());
    }

    #[test]
    fn activation_without_an_eventfd_per_queue_is_refused() {
        let mut device = TwoQueueDevice::default();
        let mut activation = activation(&[64, 128], Arc::new(RecordingInterrupt::new()));
        activation.queue_events.pop();
        let err = device.activate(activation).unwrap_err();
        assert!(matches!(err, Error::WrongQueueCount { provided: 1, .. }));
    }

    #[test]
    fn reactivation_needs_a_reset_in_between() {
        let mut device = TwoQueueDevice::default();
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(RecordingInterrupt::new());
        device
            .activate(activation(&[64, 128], interrupt.clone()))
            .unwrap();

        let err = device
            .activate(activation(&[64, 128], interrupt.clone()))
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyActive { device_type: 3 }), "{err:?}");

        assert!(device.reset());
        device.activate(activation(&[64, 128], interrupt)).unwrap();
    }

    #[test]
    fn devices_are_usable_as_trait_objects() {
        let mut device: Box<dyn VirtioDevice> = Box::new(TwoQueueDevice::default());
        device.write_config(4, &[1, 2, 3, 4]);
        device.write_config(6, &[9; 100]); // ignored, must not panic
        let mut data = [0u8; 8];
        device.read_config(0, &mut data);
        assert_eq!(data, [0, 0, 0, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn interrupt_failures_from_the_irq_layer_convert_into_virtio_errors() {
        let err: Error = keel_irq::Error::InjectedFailure.into();
        assert!(err.to_string().starts_with("cannot signal the guest: "), "{err}");
    }

    #[test]
    fn recording_interrupt_records_needs_reset() {
        let interrupt = RecordingInterrupt::new();
        interrupt.signal_needs_reset().unwrap();
        assert_eq!(interrupt.signals(), [VirtioSignal::NeedsReset]);
    }
}
