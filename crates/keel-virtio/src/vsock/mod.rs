//! virtio-vsock, the socket device (virtio 1.2, section 5.10): stream
//! connections between guest ports and host programs, over Unix sockets
//! with Firecracker's hybrid convention (see [`Vsock`]).
//!
//! - `packet`: the 44-byte `virtio_vsock_hdr`;
//! - `conn`: one connection as a pure state machine (handshake, credit,
//!   shutdown, reset) and the checks a guest packet passes first;
//! - `muxer`: the connection table over Unix sockets;
//! - this file: the device, its queues and its events.

mod conn;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::activation::{
    complete, notify_guest, pop_chain, process_queue, rearm_notification, ActivationState, EventSource,
    Handled, QueueError,
};
use crate::device::{Activation, VirtioDevice};
use crate::{check_queue_count, device_type, features, read_config_space};

use packet::HOST_CID;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;

/// Limits of a [`Vsock`] device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockOptions {
    /// Most connections open at once (handshakes in progress included);
    /// more are refused with RST (guest) or a closed socket (host).
    pub max_connections: usize,
    /// Guest bytes buffered per connection for a host socket that is not
    /// reading: the `buf_alloc` advertised to the guest.
    pub buf_alloc: u32,
    /// Host socket bytes staged per connection for the guest; reading a
    /// socket stops while this is full.
    pub rx_buffer_bytes: usize,
    /// Largest payload of one packet either way.
    pub max_packet_bytes: u32,
    /// How long a host program may take to send its `CONNECT` line, and
    /// the guest to answer the REQUEST that follows, before the socket is
    /// closed (and the guest's half-open connection reset).
    pub connect_timeout: Duration,
}

impl Default for VsockOptions {
    fn default() -> Self {
        Self {
            max_connections: 256,
            buf_alloc: 256 * 1024,
            rx_buffer_bytes: 64 * 1024,
            max_packet_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Errors from creating a [`Vsock`] device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0 to 2 and above `u32::MAX - 1` are reserved.
    #[error("guest CID {0} is reserved")]
    InvalidCid(u64),
    /// Limits that cannot work (zero connections or buffers).
    #[error("invalid vsock options: {0:?}")]
    InvalidOptions(VsockOptions),
    /// The listening socket could not be created.
    #[error("cannot listen on vsock socket {path}: {source}", path = path.display())]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// The device's eventfd could not be created.
    #[error("{0}")]
    Device(#[from] crate::Error),
}

/// A virtio socket device (device type 19) with Firecracker-compatible
/// hybrid Unix sockets.
///
/// The guest has CID `guest_cid`; it reaches the host at CID 2. For a
/// listening socket path `PATH`:
///
/// - a host program connects to `PATH`, writes `CONNECT <port>\n`, and
///   reads `OK <host port>\n` once a guest program listening on `<port>`
///   accepts; the socket is then the connection (closed if the guest
///   refuses);
/// - a guest program connecting to host port `P` reaches whatever listens
///   on the Unix socket `PATH_P` (a refused or missing socket resets the
///   guest's connection).
///
/// Queues: rx (0), tx (1), event (2, never used: no transport resets).
/// Guest packets are hostile input: headers shorter than 44 bytes, lengths
/// past the chain, foreign CIDs, unknown ops or non-stream types are
/// dropped or answered with RST, and the device writes only into rx
/// buffers. Offers `VERSION_1`, `RING_INDIRECT_DESC` and `RING_EVENT_IDX`.
pub struct Vsock {
    activation: ActivationState,
    queue_sizes: [u16; 3],
    guest_cid: u64,
    muxer: muxer::Muxer,
    needs_clear: bool,
    /// Restored from a snapshot: the driver still believes in connections
    /// this device never had; it gets `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`
    /// on the event queue as soon as a buffer is there.
    transport_reset_pending: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("path", &self.muxer.path())
            .field("active", &self.activation.is_active())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host
    /// programs on the Unix socket `path` (which must not exist yet).
    pub fn new(guest_cid: u64, path: impl AsRef<Path>, options: VsockOptions) -> Result<Self, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if options.max_connections == 0
            || options.buf_alloc == 0
            || options.rx_buffer_bytes == 0
            || options.max_packet_bytes == 0
            || options.connect_timeout.is_zero()
        {
            return Err(VsockError::InvalidOptions(options));
        }
        let path = path.as_ref();
        let muxer = muxer::Muxer::new(guest_cid, path, options).map_err(|source| VsockError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            activation: ActivationState::new("virtio-vsock")?,
            queue_sizes: [QUEUE_SIZE; 3],
            guest_cid,
            muxer,
            needs_clear: false,
            transport_reset_pending: false,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listening socket's path.
    pub fn path(&self) -> &Path {
        self.muxer.path()
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some((active, budget)) = self.activation.start_pass(ops, TX_QUEUE) else {
            return;
        };
        let muxer = &mut self.muxer;
        let result = process_queue(active, TX_QUEUE, budget, |mem, chain| {
            muxer.handle_tx_chain(mem, chain, ops);
            Handled::Used(0)
        });
        self.activation.end_pass(ops, TX_QUEUE, result);
    }

    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some((active, budget)) = self.activation.start_pass(ops, RX_QUEUE) else {
            return;
        };
        let muxer = &mut self.muxer;
        let mut rounds = 0usize;
        let mut used = 0usize;
        let result = (|| -> Result<bool, QueueError> {
            loop {
                if active.stop.is_raised() || !muxer.has_rx() {
                    return Ok(false);
                }
                if rounds == budget {
                    return Ok(true);
                }
                // At most `budget`, a usize.
                rounds = rounds.saturating_add(1);
                match pop_chain(active, RX_QUEUE)? {
                    Some(chain) => {
                        let len = muxer.fill_rx(&active.mem, &chain, ops);
                        complete(active, RX_QUEUE, chain.head(), len)?;
                        used = used.saturating_add(1);
                    }
                    // No buffers: the driver notifies when it adds some.
                    None if !rearm_notification(active, RX_QUEUE)? => return Ok(false),
                    None => {}
                }
            }
        })();
        let result = result.and_then(|more| {
            if used > 0 {
                notify_guest(active, RX_QUEUE)?;
            }
            Ok(more)
        });
        match result {
            Ok(true) => self.activation.requeue(RX_QUEUE),
            Ok(false) => {}
            Err(e) => self.activation.fail(ops, &e),
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    fn ack_features(&mut self, _acked: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, activation: Activation) -> crate::Result<()> {
        check_queue_count(self, &activation)?;
        self.activation.activate(device_type::VSOCK, activation)
    }

    fn reset(&mut self) -> bool {
        // The connections die with the driver; their sockets leave the
        // epoll set on the event loop (see `process`).
        self.needs_clear = true;
        self.transport_reset_pending = false;
        self.activation.reset();
        true
    }

    fn save_state(&self) -> Option<crate::DeviceState> {
        // Connections are not saved: a restored device starts with none
        // and tells the driver so (virtio 1.2, 5.10.6.6), as Firecracker
        // does.
        Some(crate::DeviceState::new(
            self.activation.queue_progress(),
            Vec::new(),
        ))
    }

    fn restore_state(&mut self, data: &[u8]) -> crate::Result<()> {
        if !data.is_empty() {
            return Err(crate::Error::StateMismatch {
                transport: "virtio-vsock".into(),
                reason: format!("{} bytes of device state, but vsock keeps none", data.len()),
            });
        }
        self.transport_reset_pending = true;
        Ok(())
    }
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

impl Vsock {
    /// Sends the pending transport reset on the event queue, if the driver
    /// has put a buffer there.
    fn send_transport_reset(&mut self) {
        if !self.transport_reset_pending {
            return;
        }
        let Some(active) = self.activation.active_mut() else {
            return;
        };
        let buffers = match pop_chain(active, EVENT_QUEUE) {
            Ok(Some(buffers)) => buffers,
            Ok(None) => return,
            Err(e) => {
                keel_ratelimit::warn_limited!("virtio-vsock: event queue: {e}");
                return;
            }
        };
        let mut writer = buffers.writer(&active.mem, 4);
        let written = match writer.write(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
            Ok(4) => 4,
            _ => {
                keel_ratelimit::warn_limited!("virtio-vsock: event buffer too small for a transport reset");
                0
            }
        };
        if let Err(e) = complete(active, EVENT_QUEUE, buffers.head(), written) {
            keel_ratelimit::warn_limited!("virtio-vsock: event queue: {e}");
            return;
        }
        if let Err(e) = notify_guest(active, EVENT_QUEUE) {
            keel_ratelimit::warn_limited!("virtio-vsock: event queue: {e}");
        }
        self.transport_reset_pending = false;
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.activation.classify(events.fd()) {
            EventSource::Changed => {
                if std::mem::take(&mut self.needs_clear) {
                    self.muxer.clear(ops);
                }
                self.activation.sync(ops);
                self.send_transport_reset();
                self.process_tx(ops);
                self.process_rx(ops);
            }
            EventSource::Queue(index) => {
                self.activation.take_queue_event(index);
                if index == EVENT_QUEUE {
                    self.send_transport_reset();
                }
                if index == TX_QUEUE {
                    self.process_tx(ops);
                }
                if index != EVENT_QUEUE {
                    self.process_rx(ops);
                }
            }
            EventSource::Other => {
                let active = self.activation.active_mut().is_some();
                self.muxer
                    .handle_event(events.fd(), events.event_set(), active, ops);
                self.process_rx(ops);
            }
        }
    }
}
