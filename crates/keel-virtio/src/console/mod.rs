//! virtio-console (virtio 1.2, section 5.3): one port, the guest's `hvc0`.

mod backend;

use std::io::ErrorKind;
use std::os::unix::io::RawFd;
use std::path::Path;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use keel_ratelimit::{BucketConfig, BucketUpdate, RateLimiter};

pub use backend::{ConsoleBackend, StreamBackend, UnixSocketBackend};

use crate::activation::{
    complete, notify_guest, pop_chain, process_queue, rearm_notification, ActivationState, EventSource,
    Handled, QueueError,
};
use crate::device::{read_config_space, Activation, VirtioDevice};
use crate::{check_queue_count, device_type, features, Result};

/// The port 0 receive queue (host to guest).
const RECEIVEQ: usize = 0;
/// The port 0 transmit queue (guest to host).
const TRANSMITQ: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// How much host input is read at once.
const INPUT_CHUNK: usize = 4096;
/// How much guest output is copied to the backend at once.
const OUTPUT_CHUNK: usize = 4096;
/// The scratch buffer, for input and output in turn.
const SCRATCH_BYTES: usize = if INPUT_CHUNK > OUTPUT_CHUNK {
    INPUT_CHUNK
} else {
    OUTPUT_CHUNK
};
/// Most bytes of one transmit request that reach the backend; the rest of
/// a longer chain is dropped (and counted). Linux's `hvc` driver sends at
/// most a page per request.
pub const MAX_OUTPUT_REQUEST_BYTES: u64 = 64 * 1024;
/// Most bytes one pass over the transmit queue hands the backend before it
/// lets the event loop serve others. With repeated heads, a queue of 256
/// entries could otherwise name the same 64 KiB 256 times per pass.
pub const MAX_OUTPUT_PASS_BYTES: u64 = 256 * 1024;
/// The output limit of a console whose output goes to a file
/// ([`Console::file`]): 1 MiB/s sustained after a one-time 16 MiB, so a guest
/// cannot fill the host's disk faster than that. Change it with
/// [`Console::set_output_limit`].
pub const DEFAULT_FILE_OUTPUT_LIMIT: BucketConfig =
    BucketConfig::new(1 << 20, 1000).with_one_time_burst(16 << 20);
/// `cols`, `rows`, `max_nr_ports`, `emerg_wr`: all zero, as no feature that
/// makes them valid is offered.
const CONFIG_SPACE: [u8; 12] = [0; 12];

/// A virtio console with a single port (no `MULTIPORT`, no `SIZE`): what a
/// Linux guest uses as `hvc0`.
///
/// Guest output (the transmit queue) goes to the backend as it arrives.
/// Host input is read from the backend's input fd only when the guest has
/// receive buffers to take it: when they run out, the console stops watching
/// the input (it waits in the kernel, and a writer to a pipe or socket
/// eventually blocks) and watches it again once the driver adds buffers and
/// notifies. Nothing is dropped and nothing spins.
///
/// Like every device here it is shared by its transport and the event loop:
/// see the crate documentation.
pub struct Console {
    backend: Box<dyn ConsoleBackend>,
    activation: ActivationState,
    queue_sizes: [u16; 2],
    /// Input read from the backend that the guest has no buffers for yet.
    pending: Vec<u8>,
    watched_input: Option<RawFd>,
    scratch: Box<[u8; SCRATCH_BYTES]>,
    /// Paces output (bytes per second); unlimited unless set.
    output_limiter: RateLimiter,
    counters: ConsoleCounters,
}

/// What a [`Console`] has done with guest output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsoleCounters {
    /// Bytes handed to the backend.
    pub tx_bytes: u64,
    /// Transmit requests served.
    pub tx_requests: u64,
    /// Bytes of requests longer than [`MAX_OUTPUT_REQUEST_BYTES`] that were
    /// dropped.
    pub tx_truncated_bytes: u64,
    /// Times the output rate limit held the transmit queue back.
    pub tx_throttled: u64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("active", &self.activation.is_active())
            .field("pending_input", &self.pending.len())
            .field("watched_input", &self.watched_input)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console on `backend`.
    pub fn new(backend: Box<dyn ConsoleBackend>) -> Result<Self> {
        Ok(Self {
            backend,
            activation: ActivationState::new("virtio-console")?,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            pending: Vec::new(),
            watched_input: None,
            scratch: Box::new([0; SCRATCH_BYTES]),
            output_limiter: RateLimiter::unlimited().map_err(crate::Error::CreateEventFd)?,
            counters: ConsoleCounters::default(),
        })
    }

    /// Limits guest output to `limit` (bytes; see [`BucketConfig`]), or lifts
    /// the limit with `None`. May be called on a running device.
    pub fn set_output_limit(&mut self, limit: Option<BucketConfig>) {
        let update = match limit {
            Some(config) => BucketUpdate::Set(config),
            None => BucketUpdate::Disable,
        };
        self.output_limiter.update(update, BucketUpdate::Keep);
    }

    /// The output limit in force, if any.
    pub fn output_limit(&self) -> Option<BucketConfig> {
        self.output_limiter.bandwidth()
    }

    /// What the console did with guest output so far.
    pub fn counters(&self) -> ConsoleCounters {
        self.counters
    }

    /// A console on the VMM's stdin and stdout
    /// ([`StreamBackend::stdio`]).
    pub fn stdio() -> Result<Self> {
        Self::new(Box::new(StreamBackend::stdio()?))
    }

    /// A console whose output is appended to the file at `path`; no input.
    /// Output is limited to [`DEFAULT_FILE_OUTPUT_LIMIT`].
    pub fn file(path: impl AsRef<Path>) -> Result<Self> {
        let mut console = Self::new(Box::new(StreamBackend::file(path)?))?;
        console.set_output_limit(Some(DEFAULT_FILE_OUTPUT_LIMIT));
        Ok(console)
    }

    /// A console served on a Unix socket at `path`, one client at a time.
    pub fn unix_listener(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(Box::new(UnixSocketBackend::listen(path)?))
    }

    /// A console connected to a Unix socket server at `path`.
    pub fn unix_connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(Box::new(UnixSocketBackend::connect(path)?))
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    /// Whether host input is waiting for the guest to add receive buffers
    /// (and the input is not watched meanwhile).
    pub fn is_input_paused(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Bytes of host input read but not yet given to the guest.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn fail(&mut self, ops: &mut EventOps, error: &QueueError) {
        self.activation.fail(ops, error);
        self.sync_input(ops);
    }

    /// Copies guest output to the backend, at most
    /// [`MAX_OUTPUT_PASS_BYTES`] per pass and within the output limit.
    fn transmit(&mut self, ops: &mut EventOps) {
        if self.output_limiter.is_blocked() {
            // The limiter's timer brings us back.
            return;
        }
        let Some((active, budget)) = self.activation.start_pass(ops, TRANSMITQ) else {
            return;
        };
        let backend = &mut self.backend;
        // A constant range of the array, which clippy checks against its length.
        let scratch = &mut (*self.scratch)[..OUTPUT_CHUNK];
        let limiter = &mut self.output_limiter;
        let counters = &mut self.counters;
        let mut pass_bytes = 0u64;
        let run = process_queue(active, TRANSMITQ, budget, |mem, chain| {
            let mut reader = chain.reader(mem);
            let mut sent = 0u64;
            while sent < MAX_OUTPUT_REQUEST_BYTES {
                // At most OUTPUT_CHUNK, so it fits in usize; `sent` is below
                // MAX_OUTPUT_REQUEST_BYTES.
                let want = MAX_OUTPUT_REQUEST_BYTES
                    .saturating_sub(sent)
                    .min(OUTPUT_CHUNK as u64) as usize;
                // `want` is at most `scratch.len()`: the chunk is always there.
                let chunk = scratch.get_mut(..want).unwrap_or_default();
                match reader.read(chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        sent = sent.saturating_add(n as u64);
                        // `read` returns at most `chunk.len()`.
                        if let Err(e) = backend.write_output(chunk.get(..n).unwrap_or_default()) {
                            log::debug!("virtio-console: output dropped: {e}");
                        }
                    }
                }
            }
            let dropped = reader.remaining();
            if dropped > 0 {
                counters.tx_truncated_bytes = counters.tx_truncated_bytes.saturating_add(dropped);
                keel_ratelimit::warn_limited!(
                    "virtio-console: a {}-byte transmit request was cut to {MAX_OUTPUT_REQUEST_BYTES} bytes",
                    sent.saturating_add(dropped)
                );
            }
            counters.tx_requests = counters.tx_requests.saturating_add(1);
            counters.tx_bytes = counters.tx_bytes.saturating_add(sent);
            pass_bytes = pass_bytes.saturating_add(sent);
            let paced = limiter.charge_bytes(sent);
            if !paced {
                counters.tx_throttled = counters.tx_throttled.saturating_add(1);
            }
            // The device writes nothing into transmit buffers.
            if !paced || pass_bytes >= MAX_OUTPUT_PASS_BYTES {
                Handled::UsedAndSpent(0)
            } else {
                Handled::Used(0)
            }
        });
        if self.activation.end_pass(ops, TRANSMITQ, run) {
            self.sync_input(ops);
        }
    }

    fn on_output_timer(&mut self, ops: &mut EventOps) {
        if self.output_limiter.on_timer() {
            self.transmit(ops);
            self.sync_input(ops);
        }
    }

    /// Moves pending input into the guest's receive buffers, as far as they
    /// go.
    fn receive(&mut self, ops: &mut EventOps) {
        match self.deliver_pending() {
            Ok(true) => self.activation.requeue(RECEIVEQ),
            Ok(false) => {}
            Err(e) => self.fail(ops, &e),
        }
    }

    /// Returns whether it stopped at its budget with buffers left.
    fn deliver_pending(&mut self) -> std::result::Result<bool, QueueError> {
        let Some(active) = self.activation.active_mut() else {
            return Ok(false);
        };
        let budget = active.queue_size(RECEIVEQ)?;
        let mut used = 0usize;
        // Chains used plus rounds of re-checking the ring: bounded, so a
        // driver moving its index without adding buffers cannot spin us.
        let mut rounds = 0usize;
        while !self.pending.is_empty() && rounds < budget {
            rounds = rounds.saturating_add(1);
            let Some(chain) = pop_chain(active, RECEIVEQ)? else {
                if rearm_notification(active, RECEIVEQ)? {
                    continue; // buffers arrived meanwhile
                }
                break; // wait for the driver's notification
            };
            let mut writer = chain.writer(&active.mem, self.pending.len() as u64);
            let written = writer.write(&self.pending).unwrap_or(0);
            self.pending.drain(..written);
            // At most INPUT_CHUNK bytes.
            complete(active, RECEIVEQ, chain.head(), written as u32)?;
            used = used.saturating_add(1);
        }
        if used > 0 {
            notify_guest(active, RECEIVEQ)?;
        }
        Ok(rounds == budget && !self.pending.is_empty())
    }

    fn on_input(&mut self, ops: &mut EventOps) {
        if self.pending.is_empty() {
            // A constant range of the array, which clippy checks against its length.
            let chunk = &mut (*self.scratch)[..INPUT_CHUNK];
            match self.backend.read_input(chunk) {
                Ok(0) => self.end_input(ops, "end of input"),
                Ok(n) => {
                    // A backend returning more than it was given (it must
                    // not) has its input cut to the chunk.
                    self.pending.extend_from_slice(chunk.get(..n).unwrap_or(chunk));
                    self.receive(ops);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => self.end_input(ops, &format!("read error: {e}")),
            }
        }
        self.sync_input(ops);
    }

    fn end_input(&mut self, ops: &mut EventOps, reason: &str) {
        keel_ratelimit::info_limited!("virtio-console: input stopped: {reason}");
        // Out of the epoll set before the backend may close it.
        self.unwatch_input(ops);
        self.backend.input_ended();
    }

    fn unwatch_input(&mut self, ops: &mut EventOps) {
        if let Some(fd) = self.watched_input.take() {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
    }

    /// Watches the backend's input exactly when the guest can take more.
    fn sync_input(&mut self, ops: &mut EventOps) {
        // A backend may offer another fd after an unwatchable one ends; two
        // rounds settle it.
        for _ in 0..2 {
            let wanted = if self.activation.active_mut().is_some() && self.pending.is_empty() {
                self.backend.input_fd()
            } else {
                None
            };
            if wanted == self.watched_input {
                return;
            }
            self.unwatch_input(ops);
            let Some(fd) = wanted else {
                return;
            };
            match ops.add(Events::new_raw(fd, EventSet::IN)) {
                Ok(()) => {
                    self.watched_input = Some(fd);
                    return;
                }
                Err(e) => {
                    keel_ratelimit::warn_limited!(
                        "virtio-console: cannot watch input fd {fd} (is it pollable?): {e:?}"
                    );
                    self.backend.input_ended();
                }
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    fn ack_features(&mut self, _acked: u64) {
        // No console features are offered.
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&CONFIG_SPACE, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr is only writable with VIRTIO_CONSOLE_F_EMERG_WRITE.
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        check_queue_count(self, &activation)?;
        self.activation.activate(device_type::CONSOLE, activation)
    }

    fn reset(&mut self) -> bool {
        // Pending input is kept for the next activation: it is the user's.
        self.activation.reset();
        true
    }

    fn save_state(&self) -> Option<crate::DeviceState> {
        Some(crate::DeviceState::new(
            self.activation.queue_progress(),
            Vec::new(),
        ))
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Err(e) = ops.add(Events::new_raw(self.output_limiter.timer_fd(), EventSet::IN)) {
            log::error!("virtio-console: cannot watch the output limiter's timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        match self.activation.classify(fd) {
            EventSource::Changed => {
                self.activation.sync(ops);
                self.transmit(ops);
                self.receive(ops);
                self.sync_input(ops);
            }
            EventSource::Queue(RECEIVEQ) => {
                self.activation.take_queue_event(RECEIVEQ);
                self.receive(ops);
                self.sync_input(ops);
            }
            EventSource::Queue(_) => {
                self.activation.take_queue_event(TRANSMITQ);
                self.transmit(ops);
                // Transmitting may have accepted a socket client.
                self.sync_input(ops);
            }
            EventSource::Other if fd == self.output_limiter.timer_fd() => self.on_output_timer(ops),
            EventSource::Other if Some(fd) == self.watched_input => self.on_input(ops),
            EventSource::Other => keel_ratelimit::warn_limited!("virtio-console: event on unknown fd {fd}"),
        }
    }
}

#[cfg(test)]
mod tests;
