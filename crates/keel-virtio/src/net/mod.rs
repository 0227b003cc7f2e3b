//! virtio-net (virtio 1.2, section 5.1): an Ethernet card for the guest, on
//! any [`NetBackend`] — a Linux tap ([`TapBackend`]) or memory
//! ([`MemoryNetBackend`]).

mod backend;

use std::io::{ErrorKind, IoSlice};

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use keel_ratelimit::{BucketUpdate, RateLimiter};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::QueueT;

pub use backend::{net_offload, MemoryNetBackend, NetBackend, TapBackend};

use crate::activation::{
    complete, notify_guest, pop_chain, process_queue, rearm_notification, ActivationState, Active,
    EventSource, Handled, QueueError,
};
use crate::chain::RequestBuffers;
use crate::device::{read_config_space, Activation, VirtioDevice};
use crate::{check_queue_count, device_type, features, Result};

/// Length of the `virtio_net_hdr_v1` in front of every frame, in both
/// directions: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset and num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Longest frame (without its header) the device moves: 64 KiB, what a
/// segmentation offload may hand over at once.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Length of an Ethernet header: frames shorter than this are malformed.
const ETH_HLEN: usize = 14;
/// Room past the longest frame in the receive buffer: a read that fills
/// it may have been truncated, and is dropped.
const RX_SLACK: usize = 64;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// The receive queue (host to guest).
const RXQ: usize = 0;
/// The transmit queue (guest to host).
const TXQ: usize = 1;
/// `mac`, `status`, `max_virtqueue_pairs`.
const CONFIG_SPACE_SIZE: usize = 10;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The receive offloads a tap is asked for when the device probes it.
const PROBE_OFFLOADS: u32 = net_offload::CSUM | net_offload::TSO4 | net_offload::TSO6 | net_offload::UFO;
/// The same without UDP fragmentation offload, asked for when a backend
/// (a kernel without UFO) refuses [`PROBE_OFFLOADS`].
const PROBE_OFFLOADS_NO_UFO: u32 = PROBE_OFFLOADS & !net_offload::UFO;

/// Errors from creating a [`Net`] device or its backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The device itself could not be created.
    #[error(transparent)]
    Device(#[from] crate::Error),
    /// The backend refused the `virtio_net_hdr_v1` header length.
    #[error("the network backend refused a {VNET_HDR_LEN}-byte virtio-net header: {0}")]
    VnetHeader(#[source] std::io::Error),
    /// A tap interface could not be opened or configured.
    #[error("cannot open tap interface {name}: {source}")]
    OpenTap {
        /// The interface name asked for.
        name: String,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// An fd handed over as a tap cannot be used as one.
    #[error("cannot adopt the tap fd: {source}")]
    AdoptTap {
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
}

/// How a [`Net`] device presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// The MAC address the guest reads from the configuration space. Give
    /// every card on a network its own (the default is QEMU's usual
    /// locally administered 52:54:00:12:34:56).
    pub mac: [u8; 6],
    /// Entries in each queue: a power of two from 4 to 32768.
    pub queue_size: u16,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_size: 256,
        }
    }
}

/// What a [`Net`] device has moved and dropped, for the VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames handed to the guest.
    pub rx_frames: u64,
    /// Their bytes, without headers.
    pub rx_bytes: u64,
    /// Frames from the backend dropped because the guest's buffers could
    /// never hold them (too small, or all of the ring not enough).
    pub rx_dropped_too_big: u64,
    /// Frames from the backend dropped because they were shorter than a
    /// header and an Ethernet header, or carried offloads (partial
    /// checksum, segmentation) the driver did not accept.
    pub rx_dropped_malformed: u64,
    /// Frames read but not delivered when the driver reset the device.
    pub rx_dropped_reset: u64,
    /// Failed reads from the backend (after one, the device stops reading).
    pub rx_backend_errors: u64,
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Their bytes, without headers.
    pub tx_bytes: u64,
    /// Guest frames dropped as malformed: shorter than a header and an
    /// Ethernet header, with device-writable descriptors, or using offloads
    /// (partial checksum, segmentation) the driver did not accept.
    pub tx_dropped_malformed: u64,
    /// Guest frames dropped for being longer than [`MAX_FRAME_LEN`].
    pub tx_dropped_oversized: u64,
    /// Guest frames the backend refused (its queue full, the link down).
    pub tx_backend_errors: u64,
    /// Times the receive rate limiter held a frame back.
    pub rx_throttled: u64,
    /// Times the transmit rate limiter held the transmit queue back.
    pub tx_throttled: u64,
}

/// A virtio network device with one receive and one transmit queue.
///
/// **Transmit**: each chain is a `virtio_net_hdr_v1` and a frame in
/// device-readable buffers; it is gathered and written to the backend in
/// one call. A chain with device-writable buffers, one shorter than a header
/// and an Ethernet header, one longer than [`MAX_FRAME_LEN`] after its
/// header, or one whose header asks for offloads the driver did not accept
/// is dropped and counted ([`NetCounters`]); the chain is returned to
/// the guest either way.
///
/// **Receive**: the backend's fd is watched while the guest has buffers to
/// take a frame. A frame read when the buffers have run out is kept (one
/// frame) and the fd is left unwatched — later frames wait in the backend,
/// nothing spins — until the driver adds buffers and notifies the receive
/// queue. With `MRG_RXBUF` a frame is spread over as many chains as it
/// needs and `num_buffers` says how many; without it, it must fit one chain.
/// A frame that cannot fit even the whole ring is dropped and counted, and
/// so is one whose header carries offloads the driver did not accept (a
/// "checksum valid" hint is cleared instead).
/// Every receive chain must be device-writable and at least a header long;
/// a chain breaking that, or the virtqueue rules, puts the device in
/// `DEVICE_NEEDS_RESET`.
///
/// **Features**: `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`,
/// `MAC`, `STATUS` (link up while the backend works: when it fails — a tap
/// deleted under the VM — receive stops, the link goes down and the guest
/// gets a configuration-change interrupt), `MRG_RXBUF`, `CSUM`, `HOST_TSO4`,
/// `HOST_TSO6`, and — if the backend accepts those offloads when the device
/// probes it — `GUEST_CSUM`, `GUEST_TSO4` and `GUEST_TSO6`, plus
/// `GUEST_UFO` and `HOST_UFO` if it also accepts UDP fragmentation offload
/// (`TUN_F_UFO`: a kernel that knows UFO, whose tap also takes UFO frames
/// from us). The backend's offloads ([`NetBackend::set_offload`]) follow
/// what the driver accepts.
///
/// Like every device here it is shared by its transport and the event loop:
/// see the crate documentation.
///
/// # Rate limiting
///
/// Each direction has a [`RateLimiter`] with Firecracker's semantics
/// (`rx_rate_limiter`, `tx_rate_limiter`): a frame costs one operation and
/// its length in bytes, `virtio_net_hdr_v1` included. A transmit chain the
/// limiter refuses stays on the available ring, untouched; a received frame
/// it refuses is kept by the device and the backend is left unwatched
/// meanwhile (later frames wait in the tap). Either way the device watches
/// the limiter's timerfd on its event loop and goes on when it fires,
/// never polling. [`update_rx_rate_limiter`](Self::update_rx_rate_limiter)
/// and [`update_tx_rate_limiter`](Self::update_tx_rate_limiter) change the
/// limits of a running device (from any thread holding its mutex); a
/// throttled direction resumes under the new limits at once.
///
/// # Counters
///
/// [`Net::counters`] returns frames and bytes moved each way and frames
/// dropped, by reason ([`NetCounters`]); a VMM reads them under the same
/// mutex the event loop takes.
///
/// # Wiring a network card into a VMM
///
/// Like any other virtio-mmio device (see the crate documentation), plus a
/// backend: a tap created by name (needs `CAP_NET_ADMIN`), or one a
/// privileged helper opened and passed over ([`TapBackend::from_fd`]). The
/// tap's fd joins the event loop's epoll set through the device itself; the
/// VMM only adds the device as a subscriber. Bringing the tap up, bridging
/// or routing it is the host's business, outside the VMM.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::{Arc, Mutex};
/// use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
/// use keel_irq::{create_in_kernel_irqchip, GsiAllocator, IrqfdLine};
/// use keel_virtio::{MmioSlot, MmioTransport, Net, NetOptions, TapBackend};
/// use kvm_ioctls::{IoEventAddress, Kvm};
/// use vm_device::device_manager::{IoManager, MmioManager};
/// use vm_memory::GuestAddress;
/// use keel_virtio::GuestMemoryMmap;
///
/// let vm = Kvm::new()?.create_vm()?;
/// create_in_kernel_irqchip(&vm)?;
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 << 20)])?;
///
/// let slot = MmioSlot { base: 0xd000_1000, gsi: GsiAllocator::new().allocate()? };
/// let tap = TapBackend::open("tap0")?;
/// let options = NetOptions { mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01], ..NetOptions::default() };
/// let net = Arc::new(Mutex::new(Net::new(tap, options)?));
/// let line = Arc::new(IrqfdLine::new(&vm, slot.gsi)?);
/// let transport = MmioTransport::new(net.clone(), mem.clone(), line, slot)?;
/// for notifier in transport.queue_notifiers() {
///     let address = IoEventAddress::Mmio(notifier.address);
///     vm.register_ioevent(notifier.event, &address, notifier.datamatch)?;
/// }
/// let mut bus = IoManager::new();
/// bus.register_mmio(slot.range()?, Arc::new(Mutex::new(transport)))
///     .map_err(|e| format!("{e:?}"))?;
/// let mut event_loop = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
///     .map_err(|e| format!("{e:?}"))?;
/// event_loop.add_subscriber(net.clone());
/// let cmdline = format!("console=hvc0 {}", slot.cmdline_entry());
/// # let _ = cmdline;
///
/// // Later, from the VMM's own thread:
/// let counters = net.lock().unwrap().counters();
/// println!("rx {} frames, tx {} frames", counters.rx_frames, counters.tx_frames);
/// # Ok(())
/// # }
/// ```
pub struct Net<B: NetBackend> {
    backend: B,
    activation: ActivationState,
    offered: u64,
    acked: u64,
    queue_sizes: [u16; 2],
    config: [u8; CONFIG_SPACE_SIZE],
    /// The frame being received: valid for `rx_pending` bytes.
    rx_frame: Vec<u8>,
    rx_pending: usize,
    tx_frame: Vec<u8>,
    watching_backend: bool,
    backend_failed: bool,
    counters: NetCounters,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// Whether the pending received frame was charged to `rx_limiter`.
    rx_charged: bool,
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.config[..6].to_vec())
            .field("active", &self.activation.is_active())
            .field("rx_pending", &self.rx_pending)
            .field("watching_backend", &self.watching_backend)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend> Net<B> {
    /// A network device on `backend`. Sets the backend's header length to
    /// [`VNET_HDR_LEN`] and probes which receive offloads it accepts.
    pub fn new(mut backend: B, options: NetOptions) -> std::result::Result<Self, NetError> {
        let size = options.queue_size;
        if size < 4 || !size.is_power_of_two() || size > crate::MAX_QUEUE_SIZE {
            return Err(crate::Error::InvalidQueueSize { size }.into());
        }
        backend
            .set_vnet_hdr_len(VNET_HDR_LEN)
            .map_err(NetError::VnetHeader)?;
        let mut offered = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6);
        // Receive segmentation offloads only with mergeable buffers offered
        // too, so the guest need not post 64 KiB buffers.
        let receive_offloads =
            bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
        match backend.set_offload(PROBE_OFFLOADS) {
            Ok(()) => {
                offered |= receive_offloads | bit(VIRTIO_NET_F_GUEST_UFO) | bit(VIRTIO_NET_F_HOST_UFO);
            }
            Err(e) => match backend.set_offload(PROBE_OFFLOADS_NO_UFO) {
                Ok(()) => {
                    keel_ratelimit::info_limited!(
                        "virtio-net: backend refuses UDP fragmentation offload, not offering it: {e}"
                    );
                    offered |= receive_offloads;
                }
                Err(e) => keel_ratelimit::info_limited!(
                    "virtio-net: backend refuses receive offloads, not offering them: {e}"
                ),
            },
        }
        if let Err(e) = backend.set_offload(0) {
            keel_ratelimit::warn_limited!("virtio-net: cannot clear the backend's offloads: {e}");
        }

        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..6].copy_from_slice(&options.mac);
        // The link is always up; status is a little-endian u16.
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs

        Ok(Self {
            backend,
            activation: ActivationState::new("virtio-net")?,
            offered,
            acked: 0,
            queue_sizes: [size, size],
            config,
            rx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + RX_SLACK],
            rx_pending: 0,
            tx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            watching_backend: false,
            backend_failed: false,
            counters: NetCounters::default(),
            rx_limiter: RateLimiter::unlimited().map_err(crate::Error::CreateEventFd)?,
            tx_limiter: RateLimiter::unlimited().map_err(crate::Error::CreateEventFd)?,
            rx_charged: false,
        })
    }

    /// Changes the receive rate limiter's bandwidth (bytes) and operations
    /// (frames) buckets; see the type's documentation. May be called on a
    /// running device.
    pub fn update_rx_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.rx_limiter.update(bandwidth, ops);
    }

    /// Changes the transmit rate limiter's bandwidth (bytes) and operations
    /// (frames) buckets; see the type's documentation. May be called on a
    /// running device.
    pub fn update_tx_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.tx_limiter.update(bandwidth, ops);
    }

    /// The receive rate limiter.
    pub fn rx_rate_limiter(&self) -> &RateLimiter {
        &self.rx_limiter
    }

    /// The transmit rate limiter.
    pub fn tx_rate_limiter(&self) -> &RateLimiter {
        &self.tx_limiter
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Frames and bytes moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// The features the driver accepted (0 before negotiation).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    /// Whether a frame waits for the guest to add receive buffers, with the
    /// backend left unwatched meanwhile.
    pub fn is_rx_paused(&self) -> bool {
        self.rx_pending > 0
    }

    /// Whether the backend's fd is in the event loop's epoll set.
    pub fn is_watching_backend(&self) -> bool {
        self.watching_backend
    }

    fn has(&self, feature: u32) -> bool {
        self.acked & bit(feature) != 0
    }

    /// The backend offloads the acked features allow.
    fn offload_flags(&self) -> u32 {
        if !self.has(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = net_offload::CSUM;
        if self.has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= net_offload::TSO4;
        }
        if self.has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= net_offload::TSO6;
        }
        if self.has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= net_offload::UFO;
        }
        flags
    }

    fn fail(&mut self, ops: &mut EventOps, error: &QueueError) {
        self.activation.fail(ops, error);
        self.sync_backend(ops);
    }

    /// Sends what the guest transmitted.
    fn transmit(&mut self, ops: &mut EventOps) {
        if self.tx_limiter.is_blocked() {
            // The limiter's timer brings us back.
            return;
        }
        let Some((active, budget)) = self.activation.start_pass(ops, TXQ) else {
            return;
        };
        let backend = &mut self.backend;
        let buffer = &mut self.tx_frame;
        let counters = &mut self.counters;
        let limiter = &mut self.tx_limiter;
        let acked = self.acked;
        let run = process_queue(active, TXQ, budget, |mem, chain| {
            if limiter.is_limiting() && !limiter.consume(chain.reader(mem).remaining()) {
                counters.tx_throttled = counters.tx_throttled.saturating_add(1);
                return Handled::Throttled;
            }
            send(acked, backend, buffer, counters, mem, chain);
            // The device writes nothing into transmit buffers.
            Handled::Used(0)
        });
        if self.activation.end_pass(ops, TXQ, run) {
            self.sync_backend(ops);
        }
    }

    /// Moves frames from the backend into the guest's receive buffers while
    /// both have some, then watches the backend only if the guest can take
    /// more.
    fn receive(&mut self, ops: &mut EventOps) {
        match self.receive_frames() {
            Ok(true) => self.activation.requeue(RXQ),
            Ok(false) => {}
            Err(e) => self.fail(ops, &e),
        }
        self.sync_backend(ops);
    }

    /// Returns whether it stopped at its budget.
    fn receive_frames(&mut self) -> std::result::Result<bool, QueueError> {
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let Some(active) = self.activation.active_mut() else {
            return Ok(false);
        };
        let budget = active.queue_size(RXQ)?;
        // Frames handled or dropped: bounded, so a backend that never runs
        // dry cannot keep the event loop here.
        let mut frames = 0usize;
        let mut used = 0usize;
        let mut spent = false;
        loop {
            if active.stop.is_raised() {
                break;
            }
            if frames == budget {
                spent = true;
                break;
            }
            if self.rx_pending == 0 {
                if self.backend_failed {
                    break;
                }
                match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        log::debug!("virtio-net: dropped a {n}-byte frame from the backend");
                        self.counters.rx_dropped_malformed =
                            self.counters.rx_dropped_malformed.saturating_add(1);
                        frames = frames.saturating_add(1);
                        continue;
                    }
                    // (More than the buffer is a broken backend; the frame
                    // is dropped all the same.)
                    Ok(n) if n >= self.rx_frame.len() => {
                        log::debug!("virtio-net: dropped a frame from the backend longer than {n} bytes");
                        self.counters.rx_dropped_too_big = self.counters.rx_dropped_too_big.saturating_add(1);
                        frames = frames.saturating_add(1);
                        continue;
                    }
                    Ok(n) => {
                        let header = self.rx_frame.first_chunk_mut::<VNET_HDR_LEN>();
                        if !header.is_some_and(|header| rx_header_allowed(header, self.acked)) {
                            log::debug!(
                                "virtio-net: dropped a frame whose offloads the driver did not accept"
                            );
                            self.counters.rx_dropped_malformed =
                                self.counters.rx_dropped_malformed.saturating_add(1);
                            frames = frames.saturating_add(1);
                            continue;
                        }
                        self.rx_pending = n;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        frames = frames.saturating_add(1);
                        continue;
                    }
                    Err(e) => {
                        keel_ratelimit::warn_limited!(
                            "virtio-net: cannot read from the backend, receive stops: {e}"
                        );
                        self.counters.rx_backend_errors = self.counters.rx_backend_errors.saturating_add(1);
                        // `lose_backend`, with the activation borrowed.
                        self.backend_failed = true;
                        link_down(&mut self.config);
                        if let Err(e) = active.interrupt.signal_config_change() {
                            keel_ratelimit::warn_limited!(
                                "virtio-net: cannot tell the guest the link is down: {e}"
                            );
                        }
                        break;
                    }
                }
            }
            if !self.rx_charged {
                if self.rx_limiter.is_blocked() {
                    // Keep the frame; the limiter's timer brings us back.
                    break;
                }
                if !self.rx_limiter.consume(self.rx_pending as u64) {
                    // Keep the frame; the limiter's timer brings us back.
                    self.counters.rx_throttled = self.counters.rx_throttled.saturating_add(1);
                    break;
                }
                self.rx_charged = true;
            }
            let Some(frame) = self.rx_frame.get_mut(..self.rx_pending) else {
                // Never: `rx_pending` is below `rx_frame.len()`, checked
                // when the frame was read.
                self.rx_pending = 0;
                self.rx_charged = false;
                continue;
            };
            match deliver(active, mergeable, frame)? {
                Delivery::Delivered(chains) => {
                    used = used.saturating_add(chains);
                    self.counters.rx_frames = self.counters.rx_frames.saturating_add(1);
                    // `rx_pending` is at least a header and an Ethernet header.
                    let payload = self.rx_pending.saturating_sub(VNET_HDR_LEN) as u64;
                    self.counters.rx_bytes = self.counters.rx_bytes.saturating_add(payload);
                }
                Delivery::TooBig => {
                    log::debug!(
                        "virtio-net: dropped a {}-byte frame the guest's buffers cannot hold",
                        self.rx_pending
                    );
                    self.counters.rx_dropped_too_big = self.counters.rx_dropped_too_big.saturating_add(1);
                }
                Delivery::NoBuffers => break,
                Delivery::Busy => {
                    spent = true;
                    break;
                }
            }
            self.rx_pending = 0;
            self.rx_charged = false;
            // At most `budget`, a usize.
            frames = frames.saturating_add(1);
        }
        if used > 0 {
            notify_guest(active, RXQ)?;
        }
        Ok(spent)
    }

    /// Watches the backend's fd exactly when a frame read from it can go
    /// somewhere.
    fn sync_backend(&mut self, ops: &mut EventOps) {
        let wanted = self.activation.active_mut().is_some() && self.rx_pending == 0 && !self.backend_failed;
        if wanted == self.watching_backend {
            return;
        }
        let events = Events::new_raw(self.backend.ready_fd(), EventSet::IN);
        if wanted {
            match ops.add(events) {
                Ok(()) => self.watching_backend = true,
                Err(e) => {
                    keel_ratelimit::warn_limited!(
                        "virtio-net: cannot watch the backend's fd, receive stops: {e:?}"
                    );
                    self.lose_backend();
                }
            }
        } else {
            // Fails only if it was never added.
            let _ = ops.remove(events);
            self.watching_backend = false;
        }
    }
}

/// Checks a received frame's header against the features the driver
/// accepted (virtio 1.2, 5.1.6.4.1): without `GUEST_CSUM` its flags must be
/// zero — a "checksum valid" hint is cleared, a partial checksum cannot be
/// handed over — and segmented frames need the matching `GUEST_TSO*` or `GUEST_UFO`.
/// Returns whether the frame may go to the guest.
fn rx_header_allowed(header: &mut [u8; VNET_HDR_LEN], acked: u64) -> bool {
    let has = |feature: u32| acked & bit(feature) != 0;
    let flags = u32::from(header[0]);
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return false;
        }
        header[0] = 0;
    }
    match u32::from(header[1]) & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        VIRTIO_NET_HDR_GSO_UDP => has(VIRTIO_NET_F_GUEST_UFO),
        _ => false,
    }
}

/// Checks a transmitted frame's header against the features the driver
/// accepted, so the backend never sees offloads that were not negotiated:
/// a partial checksum needs `CSUM`, segmentation the matching `HOST_TSO*` or
/// `HOST_UFO`.
fn tx_header_allowed(header: &[u8; VNET_HDR_LEN], acked: u64) -> bool {
    let has = |feature: u32| acked & bit(feature) != 0;
    if u32::from(header[0]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
        return false;
    }
    match u32::from(header[1]) & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        VIRTIO_NET_HDR_GSO_UDP => has(VIRTIO_NET_F_HOST_UFO),
        _ => false,
    }
}

/// Sends one transmit chain, or drops and counts it.
fn send<B: NetBackend>(
    acked: u64,
    backend: &mut B,
    buffer: &mut [u8],
    counters: &mut NetCounters,
    mem: &GuestMemoryMmap,
    chain: &RequestBuffers,
) {
    if chain.writable_len() > 0 {
        log::debug!("virtio-net: dropped a transmit chain with device-writable buffers");
        counters.tx_dropped_malformed = counters.tx_dropped_malformed.saturating_add(1);
        return;
    }
    let mut reader = chain.reader(mem);
    let len = reader.remaining();
    if len < (VNET_HDR_LEN + ETH_HLEN) as u64 {
        log::debug!("virtio-net: dropped a {len}-byte transmit chain, too short for its headers");
        counters.tx_dropped_malformed = counters.tx_dropped_malformed.saturating_add(1);
        return;
    }
    // `buffer` is VNET_HDR_LEN + MAX_FRAME_LEN bytes: a longer chain does
    // not fit.
    let Some(frame) = usize::try_from(len).ok().and_then(|len| buffer.get_mut(..len)) else {
        log::debug!("virtio-net: dropped a {len}-byte transmit chain, longer than {MAX_FRAME_LEN} bytes");
        counters.tx_dropped_oversized = counters.tx_dropped_oversized.saturating_add(1);
        return;
    };
    if reader.read_exact(frame).is_err() {
        counters.tx_dropped_malformed = counters.tx_dropped_malformed.saturating_add(1);
        return;
    }
    // The frame is at least a header and an Ethernet header long.
    if !frame
        .first_chunk()
        .is_some_and(|header| tx_header_allowed(header, acked))
    {
        log::debug!("virtio-net: dropped a transmitted frame using offloads the driver did not accept");
        counters.tx_dropped_malformed = counters.tx_dropped_malformed.saturating_add(1);
        return;
    }
    match backend.write_frame(&[IoSlice::new(frame)]) {
        Ok(_) => {
            counters.tx_frames = counters.tx_frames.saturating_add(1);
            let payload = frame.len().saturating_sub(VNET_HDR_LEN) as u64;
            counters.tx_bytes = counters.tx_bytes.saturating_add(payload);
        }
        Err(e) => {
            log::debug!("virtio-net: the backend dropped a transmitted frame: {e}");
            counters.tx_backend_errors = counters.tx_backend_errors.saturating_add(1);
        }
    }
}

/// What became of one received frame.
enum Delivery {
    /// Written into this many chains.
    Delivered(usize),
    /// It can never fit: drop it. The chains are left for the next frame.
    TooBig,
    /// Not enough buffers yet: keep it. The chains are left in the ring and
    /// the driver asked to notify when it adds more.
    NoBuffers,
    /// The driver kept moving its available index without the buffers
    /// showing up: keep the frame and come back later, so a driver racing
    /// its own index cannot hold the device in this loop.
    Busy,
}

/// Writes `frame` (header first) into the receive queue's next chains.
fn deliver(
    active: &mut Active,
    mergeable: bool,
    frame: &mut [u8],
) -> std::result::Result<Delivery, QueueError> {
    let ring_size = active.queue_size(RXQ)?;
    let start = active.queue_mut(RXQ)?.next_avail();
    let need = frame.len() as u64;
    let mut chains: Vec<RequestBuffers> = Vec::new();
    let mut capacity = 0u64;
    // Rounds of re-checking the ring after re-arming, bounded like every
    // other pass over a queue.
    let mut rechecks = 0usize;
    while capacity < need {
        let Some(chain) = pop_chain(active, RXQ)? else {
            // Ask for a notification first, then look again: buffers added
            // meanwhile are taken now, not missed.
            if rearm_notification(active, RXQ)? {
                // At most `ring_size + 1`.
                rechecks = rechecks.saturating_add(1);
                if rechecks > ring_size {
                    active.queue_mut(RXQ)?.set_next_avail(start);
                    return Ok(Delivery::Busy);
                }
                continue;
            }
            // Put back what was taken; the notification request stays at
            // the ring's current end, so the next buffer wakes the device.
            active.queue_mut(RXQ)?.set_next_avail(start);
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head();
        if chain.reader(&active.mem).remaining() > 0 {
            return Err(QueueError::Unanswerable {
                queue: RXQ,
                head,
                reason: "a receive buffer has device-readable descriptors",
            });
        }
        if chain.writable_len() < VNET_HDR_LEN as u64 {
            return Err(QueueError::Unanswerable {
                queue: RXQ,
                head,
                reason: "a receive buffer is shorter than the virtio-net header",
            });
        }
        // At most the queue size of chains of at most 4 GiB each.
        capacity = capacity.saturating_add(chain.writable_len());
        chains.push(chain);
        if capacity < need && (!mergeable || chains.len() == ring_size) {
            active.queue_mut(RXQ)?.set_next_avail(start);
            return Ok(Delivery::TooBig);
        }
    }
    // At most the queue size, a u16.
    let count = chains.len() as u16;
    // Received frames are at least a header and an Ethernet header long
    // (checked when read), so `num_buffers` is always there.
    if let Some(num_buffers) = frame
        .get_mut(NUM_BUFFERS_OFFSET..)
        .and_then(|rest| rest.first_chunk_mut::<2>())
    {
        *num_buffers = count.to_le_bytes();
    }
    let mut rest: &[u8] = frame;
    for chain in &chains {
        let mut writer = chain.writer(&active.mem, rest.len() as u64);
        let written = writer.write(rest).map_err(|_| QueueError::Unanswerable {
            queue: RXQ,
            head: chain.head(),
            reason: "a receive buffer is not writable",
        })?;
        // `write` returns at most `rest.len()`.
        rest = rest.get(written..).unwrap_or_default();
        // At most MAX_FRAME_LEN + VNET_HDR_LEN.
        complete(active, RXQ, chain.head(), written as u32)?;
    }
    Ok(Delivery::Delivered(chains.len()))
}

/// Clears `VIRTIO_NET_S_LINK_UP` in a configuration space's status.
fn link_down(config: &mut [u8; CONFIG_SPACE_SIZE]) {
    let status = u16::from_le_bytes([config[6], config[7]]) & !(VIRTIO_NET_S_LINK_UP as u16);
    config[6..8].copy_from_slice(&status.to_le_bytes());
}

impl<B: NetBackend> Net<B> {
    /// The backend failed: receive stops for good, and the guest is told
    /// the link is down (a configuration change, virtio 1.2, 5.1.4).
    fn lose_backend(&mut self) {
        if self.backend_failed {
            return;
        }
        self.backend_failed = true;
        link_down(&mut self.config);
        if let Some(active) = self.activation.active_mut() {
            if let Err(e) = active.interrupt.signal_config_change() {
                keel_ratelimit::warn_limited!("virtio-net: cannot tell the guest the link is down: {e}");
            }
        }
    }

    /// Whether the guest sees the link up.
    pub fn link_up(&self) -> bool {
        u16::from_le_bytes([self.config[6], self.config[7]]) & VIRTIO_NET_S_LINK_UP as u16 != 0
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked = acked & self.offered;
        let flags = self.offload_flags();
        if let Err(e) = self.backend.set_offload(flags) {
            keel_ratelimit::warn_limited!("virtio-net: cannot set the backend's offloads to {flags:#x}: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only on legacy devices; nothing else is.
        log::debug!(
            "virtio-net: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        check_queue_count(self, &activation)?;
        self.activation.activate(device_type::NET, activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        // A pending frame carries offloads the next driver may not accept.
        if self.rx_pending > 0 {
            self.rx_pending = 0;
            self.rx_charged = false;
            self.counters.rx_dropped_reset = self.counters.rx_dropped_reset.saturating_add(1);
        }
        self.acked = 0;
        if let Err(e) = self.backend.set_offload(0) {
            keel_ratelimit::warn_limited!("virtio-net: cannot clear the backend's offloads: {e}");
        }
        true
    }

    fn save_state(&self) -> Option<crate::DeviceState> {
        Some(crate::DeviceState::new(
            self.activation.queue_progress(),
            Vec::new(),
        ))
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        for limiter in [&self.rx_limiter, &self.tx_limiter] {
            if let Err(e) = ops.add(Events::new_raw(limiter.timer_fd(), EventSet::IN)) {
                log::error!("virtio-net: cannot watch a rate limiter's timer: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.activation.classify(fd) {
            EventSource::Changed => {
                self.activation.sync(ops);
                self.transmit(ops);
                self.receive(ops);
            }
            EventSource::Queue(RXQ) => {
                self.activation.take_queue_event(RXQ);
                self.receive(ops);
            }
            EventSource::Queue(_) => {
                self.activation.take_queue_event(TXQ);
                self.transmit(ops);
            }
            EventSource::Other if fd == self.rx_limiter.timer_fd() => {
                if self.rx_limiter.on_timer() {
                    self.receive(ops);
                }
            }
            EventSource::Other if fd == self.tx_limiter.timer_fd() => {
                if self.tx_limiter.on_timer() {
                    self.transmit(ops);
                }
            }
            EventSource::Other if self.watching_backend && fd == self.backend.ready_fd() => {
                if events.event_set().intersects(EventSet::ERROR | EventSet::HANG_UP)
                    && !events.event_set().contains(EventSet::IN)
                {
                    keel_ratelimit::warn_limited!(
                        "virtio-net: the backend's fd reports an error, receive stops"
                    );
                    self.counters.rx_backend_errors = self.counters.rx_backend_errors.saturating_add(1);
                    self.lose_backend();
                }
                self.receive(ops);
            }
            EventSource::Other => keel_ratelimit::warn_limited!("virtio-net: event on unknown fd {fd}"),
        }
    }
}

#[cfg(test)]
mod tests;
