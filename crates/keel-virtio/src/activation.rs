//! The hand-over between a transport (on a vCPU thread) and a device's queue
//! processing (on the event-loop thread), shared by the devices in this
//! crate.
//!
//! A transport activates and resets a device on a vCPU thread, where there is
//! no `EventOps` to start or stop watching the queue eventfds. So
//! [`ActivationState`] stores what the transport handed over and signals a
//! `changed` eventfd that the device's subscriber watches from `init`; on the
//! event loop, [`ActivationState::sync`] then watches the new queue eventfds
//! and forgets the old ones. An eventfd is only closed after it has left the
//! epoll set, so `event-manager`'s bookkeeping never holds a stale fd.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{ChainError, RequestBuffers};
use crate::device::{Activation, StopSignal, VirtioInterrupt};
use crate::{Error, Result};

/// What a device owns between activation and reset.
pub(crate) struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub stop: StopSignal,
    /// Set once the device has signalled `DEVICE_NEEDS_RESET`: it then leaves
    /// the queues alone until the driver resets it.
    pub failed: bool,
}

impl Active {
    /// Queue `queue` (see [`queue_ref`]).
    pub fn queue_mut(&mut self, queue: usize) -> std::result::Result<&mut Queue, QueueError> {
        queue_mut(&mut self.queues, queue)
    }

    /// The size of queue `queue`: the budget of a pass over it.
    pub fn queue_size(&self, queue: usize) -> std::result::Result<usize, QueueError> {
        Ok(usize::from(queue_ref(&self.queues, queue)?.size()))
    }
}

/// Queue `queue` of `queues`. Devices name their queues with constants
/// below the count [`check_queue_count`](crate::check_queue_count) holds
/// them to at activation, so a missing queue is a bug in the device; it is
/// reported like a broken queue (the device needs a reset), never a panic.
fn queue_ref(queues: &[Queue], queue: usize) -> std::result::Result<&Queue, QueueError> {
    queues.get(queue).ok_or(QueueError::NoSuchQueue { queue })
}

/// [`queue_ref`], mutable.
fn queue_mut(queues: &mut [Queue], queue: usize) -> std::result::Result<&mut Queue, QueueError> {
    queues.get_mut(queue).ok_or(QueueError::NoSuchQueue { queue })
}

/// Where an event the subscriber received came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventSource {
    /// The transport activated or reset the device.
    Changed,
    /// The driver notified this queue.
    Queue(usize),
    /// Not one of ours: the device's own fds (console input).
    Other,
}

pub(crate) struct ActivationState {
    device: &'static str,
    changed: EventFd,
    active: Option<Active>,
    /// Queue eventfds from the latest activation, not watched yet.
    incoming_events: Vec<EventFd>,
    /// Queue eventfds in the epoll set, by queue index.
    watched_events: Vec<EventFd>,
}

impl ActivationState {
    pub fn new(device: &'static str) -> Result<Self> {
        let changed = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd)?;
        Ok(Self {
            device,
            changed,
            active: None,
            incoming_events: Vec::new(),
            watched_events: Vec::new(),
        })
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// For a snapshot: how far each active queue has got (empty while
    /// inactive).
    pub fn queue_progress(&self) -> Vec<crate::QueueProgress> {
        self.active
            .as_ref()
            .map(|a| {
                a.queues
                    .iter()
                    .map(|q| crate::QueueProgress::new(q.next_avail(), q.next_used()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn active_mut(&mut self) -> Option<&mut Active> {
        self.active.as_mut().filter(|a| !a.failed)
    }

    /// For a pass over queue `queue`: the active device and the pass's
    /// budget, the queue's size. `None` while inactive or failed, and for a
    /// queue the device does not have (then the device fails, see
    /// [`Active::queue_size`]).
    pub fn start_pass(&mut self, ops: &mut EventOps, queue: usize) -> Option<(&mut Active, usize)> {
        match self.active_mut()?.queue_size(queue) {
            Ok(budget) => Some((self.active_mut()?, budget)),
            Err(e) => {
                self.fail(ops, &e);
                None
            }
        }
    }

    /// Called on the transport's thread: keeps the activation for the event
    /// loop.
    pub fn activate(&mut self, device_type: u32, activation: Activation) -> Result<()> {
        if self.active.is_some() {
            return Err(Error::AlreadyActive { device_type });
        }
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
            stop,
        } = activation;
        self.incoming_events = queue_events;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            stop,
            failed: false,
        });
        self.notify_changed();
        Ok(())
    }

    /// Called on the transport's thread: drops the activation. The device is
    /// behind a mutex the event loop holds while it processes, so when this
    /// runs no request is in flight, and none will start.
    pub fn reset(&mut self) {
        self.active = None;
        self.incoming_events.clear();
        self.notify_changed();
    }

    fn notify_changed(&self) {
        if let Err(e) = self.changed.write(1) {
            log::error!("{}: cannot wake the event loop: {e}", self.device);
        }
    }

    /// From the subscriber's `init`.
    pub fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.changed, EventSet::IN)) {
            log::error!("{}: cannot watch the activation eventfd: {e:?}", self.device);
        }
    }

    pub fn classify(&self, fd: RawFd) -> EventSource {
        if fd == self.changed.as_raw_fd() {
            return EventSource::Changed;
        }
        match self.watched_events.iter().position(|e| e.as_raw_fd() == fd) {
            Some(index) => EventSource::Queue(index),
            None => EventSource::Other,
        }
    }

    /// On the event loop, after [`EventSource::Changed`]: watch the queue
    /// eventfds of the current activation, if any, and only those.
    pub fn sync(&mut self, ops: &mut EventOps) {
        // Reset the counter; several changes may have been folded into one.
        let _ = self.changed.read();
        let replace = !self.incoming_events.is_empty() || self.active.is_none();
        if !replace {
            return;
        }
        self.unwatch_queues(ops);
        if self.active.is_some() {
            for event in std::mem::take(&mut self.incoming_events) {
                if let Err(e) = ops.add(Events::new(&event, EventSet::IN)) {
                    log::error!("{}: cannot watch a queue eventfd: {e:?}", self.device);
                }
                self.watched_events.push(event);
            }
        }
    }

    fn unwatch_queues(&mut self, ops: &mut EventOps) {
        for event in self.watched_events.drain(..) {
            // Fails only if it was never added, which was logged then.
            let _ = ops.remove(Events::new(&event, EventSet::IN));
        }
    }

    /// Consumes a queue notification (the eventfd's counter).
    pub fn take_queue_event(&self, index: usize) {
        if let Some(event) = self.watched_events.get(index) {
            let _ = event.read();
        }
    }

    /// Makes the event loop come back to queue `index` later: for a device
    /// that stopped mid-queue to let other work in.
    pub fn requeue(&self, index: usize) {
        if let Some(event) = self.watched_events.get(index) {
            if let Err(e) = event.write(1) {
                log::error!("{}: cannot re-arm queue {index}: {e}", self.device);
            }
        }
    }

    /// The whole event handling of a device whose every event means "look
    /// at the queues": follows activation changes, consumes a queue
    /// notification, and says whether to serve the queues (not for an fd
    /// that is not the device's, which is logged).
    pub fn queue_event(&mut self, fd: RawFd, ops: &mut EventOps) -> bool {
        match self.classify(fd) {
            EventSource::Changed => {
                self.sync(ops);
                true
            }
            EventSource::Queue(index) => {
                self.take_queue_event(index);
                true
            }
            EventSource::Other => {
                keel_ratelimit::warn_limited!("{}: event on unknown fd {fd}", self.device);
                false
            }
        }
    }

    /// Acts on how a pass over queue `index` ended: comes back to the queue
    /// later if the pass stopped at its budget, puts the device in
    /// `DEVICE_NEEDS_RESET` ([`fail`](Self::fail)) if the driver broke the
    /// rules. Returns whether the device failed.
    pub(crate) fn end_pass(
        &mut self,
        ops: &mut EventOps,
        index: usize,
        run: std::result::Result<QueueRun, QueueError>,
    ) -> bool {
        match run {
            Ok(QueueRun::BudgetSpent) => {
                self.requeue(index);
                false
            }
            // A throttled queue is resumed by its rate limiter's timer.
            Ok(QueueRun::Drained | QueueRun::Stopped | QueueRun::Throttled) => false,
            Err(e) => {
                self.fail(ops, &e);
                true
            }
        }
    }

    /// Puts the device in `DEVICE_NEEDS_RESET` after the driver broke the
    /// rules, and stops listening to its notifications until the reset.
    pub fn fail(&mut self, ops: &mut EventOps, error: &QueueError) {
        keel_ratelimit::warn_limited!(
            "{}: the driver broke the virtqueue rules, device needs reset: {error}",
            self.device
        );
        self.unwatch_queues(ops);
        if let Some(active) = self.active.as_mut() {
            active.failed = true;
            if let Err(e) = active.interrupt.signal_needs_reset() {
                log::error!("{}: cannot signal DEVICE_NEEDS_RESET: {e}", self.device);
            }
        }
    }
}

/// A queue-level failure: the device cannot go on without a reset.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    #[error("queue {queue}: the device has no such queue")]
    NoSuchQueue { queue: usize },
    #[error("queue {queue}: cannot read the available ring: {source}")]
    AvailRing {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: cannot write used entry for head {head}: {source}")]
    UsedRing {
        queue: usize,
        head: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: cannot update notification suppression: {source}")]
    Notification {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: descriptor chain at head {head}: {source}")]
    Chain {
        queue: usize,
        head: u16,
        #[source]
        source: ChainError,
    },
    #[error("queue {queue}: request at head {head} cannot be answered: {reason}")]
    Unanswerable {
        queue: usize,
        head: u16,
        reason: &'static str,
    },
}

/// How a run over a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueRun {
    /// The available ring is empty and notifications are enabled again.
    Drained,
    /// The budget ran out with chains left; come back later.
    BudgetSpent,
    /// The transport is resetting the device.
    Stopped,
    /// The device's rate limiter refused a request, which is left on the
    /// available ring; the limiter's timer brings the device back.
    Throttled,
}

/// What a device does with one request.
pub(crate) enum Handled {
    /// Return the chain with this many bytes written into it.
    Used(u32),
    /// Return the chain like `Used`, and end the pass here: the device's
    /// own budget for this pass (bytes, a rate limiter) is spent. The pass
    /// ends as [`QueueRun::BudgetSpent`].
    UsedAndSpent(u32),
    /// The request cannot be answered (for instance no room for a status);
    /// the device needs a reset.
    Unanswerable(&'static str),
    /// The device's rate limiter refused the request: it is not consumed
    /// (it goes back on the available ring, untouched) and the pass ends as
    /// [`QueueRun::Throttled`]. The handler must not have written into the
    /// chain.
    Throttled,
}

/// Takes the next chain off a queue, if there is one.
pub(crate) fn pop_chain(
    active: &mut Active,
    queue: usize,
) -> std::result::Result<Option<RequestBuffers>, QueueError> {
    let Active { mem, queues, .. } = active;
    let q = queue_mut(queues, queue)?;
    let max = q.size();
    let chain = q
        .iter(&*mem)
        .map_err(|source| QueueError::AvailRing { queue, source })?
        .next();
    let Some(chain) = chain else {
        return Ok(None);
    };
    let head = chain.head_index();
    RequestBuffers::parse(chain, mem, max)
        .map(Some)
        .map_err(|source| QueueError::Chain { queue, head, source })
}

/// Puts a chain in the used ring.
pub(crate) fn complete(
    active: &mut Active,
    queue: usize,
    head: u16,
    len: u32,
) -> std::result::Result<(), QueueError> {
    queue_mut(&mut active.queues, queue)?
        .add_used(&active.mem, head, len)
        .map_err(|source| QueueError::UsedRing { queue, head, source })
}

/// Interrupts the guest for `queue` if the driver asked to be told now
/// (`EVENT_IDX`), or always without it.
pub(crate) fn notify_guest(active: &mut Active, queue: usize) -> std::result::Result<(), QueueError> {
    let q = queue_mut(&mut active.queues, queue)?;
    let needed = q
        .needs_notification(&active.mem)
        .map_err(|source| QueueError::Notification { queue, source })?;
    log::trace!(
        "queue {queue}: used index {}, interrupt {}",
        q.next_used(),
        if needed {
            "sent"
        } else {
            "suppressed by the driver's used_event"
        }
    );
    if needed {
        // Queue indices fit in u16: transports have at most 65536 queues.
        if let Err(e) = active.interrupt.signal_used_queue(queue as u16) {
            keel_ratelimit::warn_limited!("cannot signal used buffers on queue {queue}: {e}");
        }
    }
    Ok(())
}

/// Asks the driver to notify again once it adds buffers; returns whether
/// some arrived meanwhile (then the caller should look again).
pub(crate) fn rearm_notification(active: &mut Active, queue: usize) -> std::result::Result<bool, QueueError> {
    queue_mut(&mut active.queues, queue)?
        .enable_notification(&active.mem)
        .map_err(|source| QueueError::Notification { queue, source })
}

/// Processes up to `budget` chains of `queue` with `handle`, the usual way:
/// notifications off while working, back on when the ring looks empty, and
/// one interrupt for the batch if the driver wants it.
pub(crate) fn process_queue<F>(
    active: &mut Active,
    queue: usize,
    budget: usize,
    mut handle: F,
) -> std::result::Result<QueueRun, QueueError>
where
    F: FnMut(&GuestMemoryMmap, &RequestBuffers) -> Handled,
{
    // Chains handled, plus rounds of re-checking the ring.
    let mut processed = 0usize;
    let mut used = 0usize;
    let run = 'run: loop {
        queue_mut(&mut active.queues, queue)?
            .disable_notification(&active.mem)
            .map_err(|source| QueueError::Notification { queue, source })?;
        loop {
            if active.stop.is_raised() {
                break 'run QueueRun::Stopped;
            }
            if processed == budget {
                break 'run QueueRun::BudgetSpent;
            }
            let Some(buffers) = pop_chain(active, queue)? else {
                break;
            };
            let head = buffers.head();
            match handle(&active.mem, &buffers) {
                Handled::Used(len) => complete(active, queue, head, len)?,
                Handled::UsedAndSpent(len) => {
                    complete(active, queue, head, len)?;
                    used = used.saturating_add(1);
                    break 'run QueueRun::BudgetSpent;
                }
                Handled::Unanswerable(reason) => {
                    return Err(QueueError::Unanswerable { queue, head, reason })
                }
                Handled::Throttled => {
                    // Un-pop: the chain is served when the limiter allows.
                    // Notifications stay off, the timer brings us back.
                    queue_mut(&mut active.queues, queue)?.go_to_previous_position();
                    break 'run QueueRun::Throttled;
                }
            }
            // Both at most `budget`, a usize.
            processed = processed.saturating_add(1);
            used = used.saturating_add(1);
        }
        if !rearm_notification(active, queue)? {
            break QueueRun::Drained;
        }
        // More arrived while notifications were off. Each such round counts
        // against the budget, so a driver that keeps moving its index
        // without adding chains cannot keep the device spinning here.
        if processed == budget {
            break QueueRun::BudgetSpent;
        }
        processed = processed.saturating_add(1);
    };
    if used > 0 {
        notify_guest(active, queue)?;
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{RecordingInterrupt, VirtioSignal};
    use crate::guest_driver::{Buf, DriverQueue};

    fn active(mem: &GuestMemoryMmap, queue: Queue, interrupt: Arc<RecordingInterrupt>) -> Active {
        Active {
            mem: mem.clone(),
            queues: vec![queue],
            interrupt,
            stop: StopSignal::new(),
            failed: false,
        }
    }

    #[test]
    fn processing_stops_at_the_budget_and_leaves_the_rest_for_later() {
        let mem = crate::guest_driver::memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        for _ in 0..5 {
            driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        }
        let interrupt = Arc::new(RecordingInterrupt::new());
        let mut active = active(&mem, driver.queue().unwrap(), interrupt.clone());

        let run = process_queue(&mut active, 0, 3, |_, _| Handled::Used(0)).unwrap();
        assert_eq!(run, QueueRun::BudgetSpent);
        assert_eq!(driver.used().len(), 3);
        assert_eq!(interrupt.signals(), [VirtioSignal::UsedQueue(0)]);

        let run = process_queue(&mut active, 0, 3, |_, _| Handled::Used(0)).unwrap();
        assert_eq!(run, QueueRun::Drained);
        assert_eq!(driver.used().len(), 5);
    }

    #[test]
    fn a_throttled_request_stays_on_the_available_ring() {
        let mem = crate::guest_driver::memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        for _ in 0..3 {
            driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        }
        let interrupt = Arc::new(RecordingInterrupt::new());
        let mut active = active(&mem, driver.queue().unwrap(), interrupt.clone());

        let mut calls = 0;
        let run = process_queue(&mut active, 0, 16, |_, _| {
            calls += 1;
            if calls == 2 {
                Handled::Throttled
            } else {
                Handled::Used(0)
            }
        })
        .unwrap();
        assert_eq!(run, QueueRun::Throttled);
        assert_eq!(driver.used().len(), 1, "only the first request was served");
        assert_eq!(active.queues[0].next_avail(), 1, "the refused chain was put back");

        let mut heads = Vec::new();
        let run = process_queue(&mut active, 0, 16, |_, chain| {
            heads.push(chain.head());
            Handled::Used(0)
        })
        .unwrap();
        assert_eq!(run, QueueRun::Drained);
        assert_eq!(heads.len(), 2, "the refused chain is served next, then the last");
        assert_eq!(driver.used().len(), 3);
    }

    #[test]
    fn a_raised_stop_signal_ends_processing_before_the_next_request() {
        let mem = crate::guest_driver::memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        let mut active = active(&mem, driver.queue().unwrap(), Arc::new(RecordingInterrupt::new()));
        let stop = active.stop.clone();

        let run = process_queue(&mut active, 0, 16, |_, _| {
            stop.raise();
            Handled::Used(0)
        })
        .unwrap();
        assert_eq!(run, QueueRun::Stopped);
        assert_eq!(driver.used().len(), 1);
    }

    #[test]
    fn rejects_available_index_more_than_a_queue_size_ahead() {
        let mem = crate::guest_driver::memory().unwrap();
        let driver = DriverQueue::new(&mem, 16).unwrap();
        driver.set_avail_idx(17);
        let mut active = active(&mem, driver.queue().unwrap(), Arc::new(RecordingInterrupt::new()));
        let err = process_queue(&mut active, 0, 16, |_, _| Handled::Used(0)).unwrap_err();
        assert!(matches!(err, QueueError::AvailRing { queue: 0, .. }), "{err}");
    }

    #[test]
    fn with_event_idx_the_guest_is_interrupted_only_when_it_asked() {
        let mem = crate::guest_driver::memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        let mut queue = driver.queue().unwrap();
        queue.set_event_idx(true);
        let interrupt = Arc::new(RecordingInterrupt::new());
        let mut active = active(&mem, queue, interrupt.clone());

        // used_event = 1: interrupt when the second used entry appears.
        driver.set_used_event(1);
        driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        process_queue(&mut active, 0, 16, |_, _| Handled::Used(0)).unwrap();
        assert!(interrupt.signals().is_empty());
        // The device asked to be notified of the next buffer.
        assert_eq!(driver.avail_event(), 1);

        driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        process_queue(&mut active, 0, 16, |_, _| Handled::Used(0)).unwrap();
        assert_eq!(interrupt.signals(), [VirtioSignal::UsedQueue(0)]);
        assert_eq!(driver.avail_event(), 2);
    }

    #[test]
    fn without_event_idx_notifications_are_off_only_while_processing() {
        let mem = crate::guest_driver::memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        driver.add(&[Buf::writable(0x8_0000, 4)]).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::new());
        let mut active = active(&mem, driver.queue().unwrap(), interrupt.clone());
        let mut flags_while_working = None;
        process_queue(&mut active, 0, 16, |_, _| {
            flags_while_working = Some(driver.used_flags());
            Handled::Used(0)
        })
        .unwrap();
        assert_eq!(flags_while_working, Some(1), "VRING_USED_F_NO_NOTIFY");
        assert_eq!(driver.used_flags(), 0);
        assert_eq!(interrupt.signals(), [VirtioSignal::UsedQueue(0)]);
    }

    #[test]
    fn unanswerable_request_is_a_queue_error_naming_its_head() {
        let mem = crate::guest_driver::memory().unwrap();
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        let head = driver.add(&[Buf::readable(0x8_0000, 4)]).unwrap();
        let mut active = active(&mem, driver.queue().unwrap(), Arc::new(RecordingInterrupt::new()));
        let err = process_queue(&mut active, 0, 16, |_, _| Handled::Unanswerable("no status")).unwrap_err();
        assert!(
            matches!(err, QueueError::Unanswerable { head: h, .. } if h == head),
            "{err}"
        );
        assert!(driver.used().is_empty());
    }
}
