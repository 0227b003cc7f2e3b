//! virtio-balloon (device type 5): see [`Balloon`].

mod release;
mod stats;

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::activation::{
    complete, notify_guest, pop_chain, process_queue, rearm_notification, ActivationState, Active,
    EventSource, Handled, QueueError, QueueRun,
};
use crate::chain::RequestBuffers;
use crate::device::{read_config_space, Activation, VirtioDevice};
use crate::{check_queue_count, device_type, features, Error, Result};

pub use release::BALLOON_PAGE_SIZE;
use release::{release_inner_pages, PfnRuns, Released};
pub use stats::BalloonStats;
use stats::MAX_STATS_BYTES;

/// Feature bit: the guest may deflate the balloon when it runs out of
/// memory.
pub const BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Feature bit: the statistics queue exists.
pub const BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// Feature bit: the free page reporting queue exists.
pub const BALLOON_F_REPORTING: u64 = 1 << 5;

/// Pages per MiB.
const PAGES_PER_MIB: u32 = (1 << 20) / BALLOON_PAGE_SIZE as u32;
/// Largest target in MiB: `num_pages` is 32 bits.
pub const MAX_BALLOON_MIB: u32 = u32::MAX / PAGES_PER_MIB;
/// Most frame numbers one inflate or deflate request may carry; Linux sends
/// at most 256. The cap keeps one request from holding the event loop.
const MAX_PFNS_PER_REQUEST: usize = 1 << 16;
const QUEUE_SIZE: u16 = 256;
/// Offsets of the configuration fields.
const CONFIG_NUM_PAGES: usize = 0;
const CONFIG_ACTUAL: usize = 4;
const CONFIG_BYTES: usize = 8;

/// How a balloon is set up, with Firecracker's field names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonOptions {
    /// Target size of the balloon, in MiB (at most [`MAX_BALLOON_MIB`]).
    pub amount_mib: u32,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables statistics (no
    /// statistics queue). Cannot be switched between zero and non-zero
    /// once the device exists.
    pub stats_polling_interval_s: u16,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`: the guest reports free pages,
    /// which the host releases.
    pub free_page_reporting: bool,
}

impl BalloonOptions {
    /// A balloon of `amount_mib` MiB, without statistics, deflate-on-OOM or
    /// free page reporting.
    pub fn new(amount_mib: u32) -> Self {
        Self {
            amount_mib,
            ..Self::default()
        }
    }
}

/// Errors from a balloon's control operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalloonError {
    /// A target larger than the guest's memory (or than `num_pages` holds).
    #[error("balloon amount_mib {amount_mib}: at most {limit_mib} MiB (the guest's memory)")]
    TargetTooLarge {
        /// The target asked for.
        amount_mib: u32,
        /// The largest target possible.
        limit_mib: u64,
    },
    /// Statistics were asked for, but the device has no statistics queue.
    #[error(
        "balloon statistics are not enabled (stats_polling_interval_s was 0 when the device was created)"
    )]
    StatisticsDisabled,
    /// The polling interval cannot turn statistics on or off once the
    /// device exists: the statistics queue is part of the device.
    #[error(
        "balloon stats_polling_interval_s {requested}: statistics cannot be {} after the device is created (interval {current})",
        if *current == 0 { "enabled" } else { "disabled" }
    )]
    StatisticsToggle {
        /// The interval asked for.
        requested: u16,
        /// The interval now.
        current: u16,
    },
    /// The device's eventfds or timer could not be created.
    #[error("virtio-balloon: {0}")]
    Device(#[from] Error),
}

/// What the balloon has done so far, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonCounters {
    /// Inflate requests served.
    pub inflate_requests: u64,
    /// Pages released on the host through the inflate queue.
    pub inflated_pages: u64,
    /// Deflate requests served.
    pub deflate_requests: u64,
    /// Pages the guest took back through the deflate queue.
    pub deflated_pages: u64,
    /// Frame numbers ignored: outside guest RAM, or refused by the host.
    pub ignored_pages: u64,
    /// Statistics buffers received from the guest.
    pub stats_updates: u64,
    /// Free page reports served.
    pub reports: u64,
    /// Bytes released on the host through free page reports.
    pub reported_bytes: u64,
}

#[derive(Default)]
struct Counters {
    inflate_requests: AtomicU64,
    inflated_pages: AtomicU64,
    deflate_requests: AtomicU64,
    deflated_pages: AtomicU64,
    ignored_pages: AtomicU64,
    stats_updates: AtomicU64,
    reports: AtomicU64,
    reported_bytes: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What the handle and the device share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the device on the event loop after the handle changed
    /// something there is to act on.
    wake: EventFd,
    counters: Counters,
    deflate_on_oom: bool,
    free_page_reporting: bool,
}

struct State {
    /// Pages and the guest's latest statistics.
    stats: BalloonStats,
    stats_polling_interval_s: u16,
    /// Guest RAM in MiB, known once the device is activated.
    guest_ram_mib: Option<u64>,
    target_changed: bool,
    interval_changed: bool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_device(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("virtio-balloon: cannot wake the event loop: {e}");
        }
    }
}

/// Controls a running balloon from any thread (the control plane's):
/// changes its target and statistics interval, reads its statistics.
/// Cloning gives another handle on the same balloon.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle")
            .field("options", &self.options())
            .finish_non_exhaustive()
    }
}

impl BalloonHandle {
    /// Sets the balloon's target to `amount_mib` MiB and tells the guest
    /// (a configuration change interrupt, once its driver is up).
    pub fn update_target_mib(&self, amount_mib: u32) -> std::result::Result<(), BalloonError> {
        let mut state = self.shared.state();
        let limit_mib = state.guest_ram_mib.unwrap_or(u64::from(MAX_BALLOON_MIB));
        if amount_mib > MAX_BALLOON_MIB || u64::from(amount_mib) > limit_mib {
            return Err(BalloonError::TargetTooLarge {
                amount_mib,
                limit_mib: limit_mib.min(u64::from(MAX_BALLOON_MIB)),
            });
        }
        let actual = state.stats.actual_pages;
        // At most MAX_BALLOON_MIB (checked above): the pages fit in a u32.
        state
            .stats
            .set_pages(amount_mib.saturating_mul(PAGES_PER_MIB), actual);
        state.target_changed = true;
        drop(state);
        self.shared.wake_device();
        Ok(())
    }

    /// Changes the seconds between statistics requests (not to or from 0:
    /// see [`BalloonError::StatisticsToggle`]).
    pub fn update_stats_polling_interval(&self, seconds: u16) -> std::result::Result<(), BalloonError> {
        let mut state = self.shared.state();
        let current = state.stats_polling_interval_s;
        if (current == 0) != (seconds == 0) {
            return Err(BalloonError::StatisticsToggle {
                requested: seconds,
                current,
            });
        }
        if current != seconds {
            state.stats_polling_interval_s = seconds;
            state.interval_changed = true;
            drop(state);
            self.shared.wake_device();
        }
        Ok(())
    }

    /// The balloon's pages and the guest's latest statistics; fails if
    /// statistics are not enabled.
    pub fn statistics(&self) -> std::result::Result<BalloonStats, BalloonError> {
        let state = self.shared.state();
        if state.stats_polling_interval_s == 0 {
            return Err(BalloonError::StatisticsDisabled);
        }
        Ok(state.stats.clone())
    }

    /// Target size in MiB.
    pub fn target_mib(&self) -> u32 {
        self.shared.state().stats.target_mib
    }

    /// Pages the guest says the balloon holds.
    pub fn actual_pages(&self) -> u32 {
        self.shared.state().stats.actual_pages
    }

    /// Size in MiB the guest says the balloon has.
    pub fn actual_mib(&self) -> u32 {
        self.shared.state().stats.actual_mib
    }

    /// The balloon's settings now (`GET /balloon`): the current target and
    /// interval with the options it was created with.
    pub fn options(&self) -> BalloonOptions {
        let state = self.shared.state();
        BalloonOptions {
            amount_mib: state.stats.target_mib,
            deflate_on_oom: self.shared.deflate_on_oom,
            stats_polling_interval_s: state.stats_polling_interval_s,
            free_page_reporting: self.shared.free_page_reporting,
        }
    }

    /// What the balloon has done so far.
    pub fn counters(&self) -> BalloonCounters {
        let c = &self.shared.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BalloonCounters {
            inflate_requests: get(&c.inflate_requests),
            inflated_pages: get(&c.inflated_pages),
            deflate_requests: get(&c.deflate_requests),
            deflated_pages: get(&c.deflated_pages),
            ignored_pages: get(&c.ignored_pages),
            stats_updates: get(&c.stats_updates),
            reports: get(&c.reports),
            reported_bytes: get(&c.reported_bytes),
        }
    }
}

/// virtio-balloon, the traditional memory balloon (virtio 1.2, section 5.5),
/// with the options and statistics of Firecracker's balloon API.
///
/// The host sets a target (`num_pages` in the configuration space, set from
/// [`BalloonHandle::update_target_mib`] with a configuration change
/// interrupt); the guest driver allocates that many 4 KiB pages and posts
/// their frame numbers on the inflate queue, and the device gives the
/// pages' host memory back with `madvise(MADV_DONTNEED)`. The driver reports
/// how many pages the balloon holds in `actual`. Pages posted on the deflate
/// queue are the guest's again: they are simply faulted back in (zero-filled)
/// when the guest touches them.
///
/// Options ([`BalloonOptions`]), each a feature bit offered only when set:
///
/// - `deflate_on_oom` (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`): the guest may
///   take pages back out of the balloon when it would otherwise run out of
///   memory.
/// - `stats_polling_interval_s` > 0 (`VIRTIO_BALLOON_F_STATS_VQ`): the
///   statistics queue. The driver posts a buffer of statistics; the device
///   keeps it and, every interval (a timerfd on the event loop), hands it
///   back to ask for fresh ones, which arrive in the next buffer.
/// - `free_page_reporting` (`VIRTIO_BALLOON_F_REPORTING`): the reporting
///   queue, where the guest posts free memory it does not need right now;
///   the device releases it like inflated pages and returns the buffers.
///
/// Queues: inflate (0), deflate (1), then statistics and then reporting,
/// each only when enabled, numbered without gaps (as Linux and QEMU number
/// them). A driver must set up every queue the device has: a device with
/// statistics or reporting enabled expects the driver to accept those
/// features.
///
/// Every frame number comes from the guest and is checked: pages outside
/// guest RAM are ignored with a rate-limited warning.
///
/// [`BalloonHandle`] controls the balloon while the VM runs.
///
/// # Example
///
/// ```
/// use keel_virtio::{Balloon, BalloonOptions, VirtioDevice};
///
/// let mut options = BalloonOptions::new(64);
/// options.stats_polling_interval_s = 1;
/// let balloon = Balloon::new(options).unwrap();
/// let handle = balloon.handle(); // for the control plane's thread
///
/// let mut num_pages = [0u8; 4];
/// balloon.read_config(0, &mut num_pages);
/// assert_eq!(u32::from_le_bytes(num_pages), 64 * 256);
///
/// // Once the driver is up this also interrupts the guest.
/// handle.update_target_mib(128).unwrap();
/// assert_eq!(handle.statistics().unwrap().target_pages, 128 * 256);
/// ```
///
/// Like every device here it is shared by its transport and the event loop:
/// see the crate documentation.
pub struct Balloon {
    activation: ActivationState,
    queue_sizes: Vec<u16>,
    features: u64,
    stats_queue: Option<usize>,
    reporting_queue: Option<usize>,
    /// The statistics buffer the device holds, to return when it wants
    /// fresh statistics.
    held_stats: Option<u16>,
    timer: TimerFd,
    shared: Arc<Shared>,
    stats_bytes: Vec<u8>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("active", &self.activation.is_active())
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon with `options`. Fails if the target does not fit in
    /// `num_pages` or a timer or eventfd cannot be created.
    pub fn new(options: BalloonOptions) -> std::result::Result<Self, BalloonError> {
        if options.amount_mib > MAX_BALLOON_MIB {
            return Err(BalloonError::TargetTooLarge {
                amount_mib: options.amount_mib,
                limit_mib: u64::from(MAX_BALLOON_MIB),
            });
        }
        let mut features = features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        let mut stats_queue = None;
        let mut reporting_queue = None;
        if options.deflate_on_oom {
            features |= BALLOON_F_DEFLATE_ON_OOM;
        }
        if options.stats_polling_interval_s > 0 {
            features |= BALLOON_F_STATS_VQ;
            stats_queue = Some(queue_sizes.len());
            queue_sizes.push(QUEUE_SIZE);
        }
        if options.free_page_reporting {
            features |= BALLOON_F_REPORTING;
            reporting_queue = Some(queue_sizes.len());
            queue_sizes.push(QUEUE_SIZE);
        }
        let mut stats = BalloonStats::default();
        // At most MAX_BALLOON_MIB (checked above): the pages fit in a u32.
        stats.set_pages(options.amount_mib.saturating_mul(PAGES_PER_MIB), 0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                stats,
                stats_polling_interval_s: options.stats_polling_interval_s,
                guest_ram_mib: None,
                target_changed: false,
                interval_changed: false,
            }),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd)?,
            counters: Counters::default(),
            deflate_on_oom: options.deflate_on_oom,
            free_page_reporting: options.free_page_reporting,
        });
        Ok(Self {
            activation: ActivationState::new("virtio-balloon")?,
            queue_sizes,
            features,
            stats_queue,
            reporting_queue,
            held_stats: None,
            timer: TimerFd::new().map_err(|e| Error::CreateEventFd(e.into()))?,
            shared,
            stats_bytes: vec![0; MAX_STATS_BYTES],
        })
    }

    /// A handle that controls this balloon from any thread.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    /// Arms the statistics timer for the current interval (disarms it
    /// without statistics).
    fn arm_timer(&mut self) {
        let seconds = self.shared.state().stats_polling_interval_s;
        let result = if seconds == 0 {
            self.timer.clear()
        } else {
            let interval = Duration::from_secs(u64::from(seconds));
            self.timer.reset(interval, Some(interval))
        };
        if let Err(e) = result {
            log::error!("virtio-balloon: cannot arm the statistics timer for {seconds} s: {e}");
        }
    }

    /// The handle changed the target or the interval.
    fn handle_wake(&mut self) {
        let _ = self.shared.wake.read();
        let (target_changed, interval_changed) = {
            let mut state = self.shared.state();
            (
                std::mem::take(&mut state.target_changed),
                std::mem::take(&mut state.interval_changed),
            )
        };
        if interval_changed {
            self.arm_timer();
        }
        if target_changed {
            if let Some(active) = self.activation.active_mut() {
                if let Err(e) = active.interrupt.signal_config_change() {
                    keel_ratelimit::warn_limited!("virtio-balloon: cannot signal the new target: {e}");
                }
            }
        }
    }

    /// The statistics interval passed: hand the held buffer back, asking
    /// the driver for fresh statistics.
    fn request_stats(&mut self, ops: &mut EventOps) {
        // Consumes the expiration count; the timer is readable.
        let _ = self.timer.wait();
        let (Some(queue), Some(active)) = (self.stats_queue, self.activation.active_mut()) else {
            return;
        };
        let Some(head) = self.held_stats.take() else {
            return; // the driver has not answered the last request yet
        };
        let result = complete(active, queue, head, 0)
            .and_then(|()| notify_guest(active, queue))
            .map(|()| QueueRun::Drained);
        self.activation.end_pass(ops, queue, result);
    }

    fn process_queue_index(&mut self, ops: &mut EventOps, index: usize) {
        if Some(index) == self.stats_queue {
            self.process_stats(ops);
            return;
        }
        let Some((active, budget)) = self.activation.start_pass(ops, index) else {
            return;
        };
        let counters = &self.shared.counters;
        let result = match index {
            0 => process_queue(active, index, budget, |mem, chain| {
                let done = inflate(mem, chain);
                add(&counters.inflate_requests, 1);
                add(&counters.inflated_pages, done.pages);
                add(&counters.ignored_pages, done.ignored);
                Handled::Used(0)
            }),
            1 => process_queue(active, index, budget, |mem, chain| {
                add(&counters.deflate_requests, 1);
                add(&counters.deflated_pages, for_each_pfn(mem, chain, |_| ()));
                Handled::Used(0)
            }),
            _ if Some(index) == self.reporting_queue => process_queue(active, index, budget, |mem, chain| {
                add(&counters.reports, 1);
                add(&counters.reported_bytes, report(mem, chain));
                Handled::Used(0)
            }),
            _ => return,
        };
        self.activation.end_pass(ops, index, result);
    }

    /// Takes the driver's statistics buffers: reads each, keeps the newest
    /// (to return at the next interval) and returns any older one.
    fn process_stats(&mut self, ops: &mut EventOps) {
        let (Some(queue), Some(active)) = (self.stats_queue, self.activation.active_mut()) else {
            return;
        };
        let result = take_stats(
            active,
            queue,
            &mut self.held_stats,
            &self.shared,
            &mut self.stats_bytes,
        );
        self.activation.end_pass(ops, queue, result);
    }

    fn process_all_queues(&mut self, ops: &mut EventOps) {
        for index in 0..self.queue_sizes.len() {
            self.process_queue_index(ops, index);
        }
    }
}

/// Calls `f` with each frame number in the chain's readable bytes (at most
/// [`MAX_PFNS_PER_REQUEST`]); returns how many there were.
fn for_each_pfn(mem: &GuestMemoryMmap, chain: &RequestBuffers, mut f: impl FnMut(u32)) -> u64 {
    let mut reader = chain.reader(mem);
    let mut bytes = [0u8; 4096];
    let mut left = MAX_PFNS_PER_REQUEST * 4;
    let mut count = 0u64;
    while left > 0 {
        // At most `bytes.len()`: the chunk is always there.
        let want = left.min(bytes.len());
        let chunk = bytes.get_mut(..want).unwrap_or_default();
        let read = match reader.read(chunk) {
            Ok(0) => break,
            Ok(read) => read,
            Err(e) => {
                keel_ratelimit::warn_limited!("virtio-balloon: cannot read frame numbers: {e}");
                break;
            }
        };
        // `read` is at most `chunk.len()`, itself at most `left`.
        let pfns = chunk.get(..read).unwrap_or_default().chunks_exact(4);
        for pfn in pfns.filter_map(|pfn| <[u8; 4]>::try_from(pfn).ok()) {
            f(u32::from_le_bytes(pfn));
            count = count.saturating_add(1);
        }
        left = left.saturating_sub(read);
    }
    if reader.remaining() >= 4 {
        keel_ratelimit::warn_limited!(
            "virtio-balloon: request at head {} carries more than {MAX_PFNS_PER_REQUEST} frame numbers; the rest are ignored",
            chain.head()
        );
    }
    count
}

/// Releases the pages an inflate request names.
fn inflate(mem: &GuestMemoryMmap, chain: &RequestBuffers) -> Released {
    let mut runs = PfnRuns::default();
    let mut done = Released::default();
    for_each_pfn(mem, chain, |pfn| runs.push(mem, pfn, &mut done));
    runs.flush(mem, &mut done);
    done
}

/// Releases the memory a free page report names; returns the bytes.
fn report(mem: &GuestMemoryMmap, chain: &RequestBuffers) -> u64 {
    let mut released = 0u64;
    for segment in chain.segments() {
        match release_inner_pages(mem, segment.addr, u64::from(segment.len)) {
            Ok(bytes) => released = released.saturating_add(bytes),
            Err(e) => keel_ratelimit::warn_limited!("virtio-balloon: free page report: {e}"),
        }
    }
    released
}

fn take_stats(
    active: &mut Active,
    queue: usize,
    held: &mut Option<u16>,
    shared: &Shared,
    bytes: &mut [u8],
) -> std::result::Result<QueueRun, QueueError> {
    let budget = active.queue_size(queue)?;
    let mut returned = false;
    let mut taken = 0usize;
    let run = 'run: loop {
        while let Some(chain) = pop_chain(active, queue)? {
            if let Some(old) = held.replace(chain.head()) {
                // A driver that posts a second buffer gets the first back.
                complete(active, queue, old, 0)?;
                returned = true;
            }
            let len = chain.readable_len().min(bytes.len() as u64) as usize;
            // `len` is at most `bytes.len()`, and `read` at most `len`.
            let buffer = bytes.get_mut(..len).unwrap_or_default();
            let read = chain.reader(&active.mem).read(buffer).unwrap_or(0);
            let known = shared
                .state()
                .stats
                .update_from(buffer.get(..read).unwrap_or_default());
            log::debug!("virtio-balloon: statistics from the guest: {known} known entries in {read} bytes");
            add(&shared.counters.stats_updates, 1);
            // At most `budget`, a usize.
            taken = taken.saturating_add(1);
            if taken == budget {
                break 'run QueueRun::BudgetSpent;
            }
        }
        if !rearm_notification(active, queue)? {
            break QueueRun::Drained;
        }
    };
    if returned {
        notify_guest(active, queue)?;
    }
    Ok(run)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, _acked: u64) {
        // The queues are fixed by the options; the features only say so.
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let state = self.shared.state();
        let mut space = [0u8; CONFIG_BYTES];
        space[CONFIG_NUM_PAGES..CONFIG_ACTUAL].copy_from_slice(&state.stats.target_pages.to_le_bytes());
        space[CONFIG_ACTUAL..].copy_from_slice(&state.stats.actual_pages.to_le_bytes());
        read_config_space(&space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's; bytes elsewhere are dropped.
        let mut state = self.shared.state();
        let mut actual = state.stats.actual_pages.to_le_bytes();
        for (i, &byte) in data.iter().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|at| at.checked_sub(CONFIG_ACTUAL as u64));
            if let Some(slot) = at
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| actual.get_mut(at))
            {
                *slot = byte;
            }
        }
        let target = state.stats.target_pages;
        state.stats.set_pages(target, u32::from_le_bytes(actual));
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        check_queue_count(self, &activation)?;
        let ram: u64 = activation.mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
        self.shared.state().guest_ram_mib = Some(ram >> 20);
        self.activation.activate(device_type::BALLOON, activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        self.held_stats = None;
        // A reset driver holds no balloon.
        let mut state = self.shared.state();
        let target = state.stats.target_pages;
        state.stats.set_pages(target, 0);
        true
    }

    /// The target and actual page counts and the statistics buffer the
    /// device holds: `target` (4 bytes), `actual` (4), then 1 and the
    /// held buffer's head index (2), or 0; little endian.
    fn save_state(&self) -> Option<crate::DeviceState> {
        let state = self.shared.state();
        let mut data = Vec::with_capacity(11);
        data.extend_from_slice(&state.stats.target_pages.to_le_bytes());
        data.extend_from_slice(&state.stats.actual_pages.to_le_bytes());
        match self.held_stats {
            Some(head) => {
                data.push(1);
                data.extend_from_slice(&head.to_le_bytes());
            }
            None => data.extend_from_slice(&[0, 0, 0]),
        }
        Some(crate::DeviceState::new(self.activation.queue_progress(), data))
    }

    fn restore_state(&mut self, data: &[u8]) -> Result<()> {
        let bad = |reason: String| crate::Error::StateMismatch {
            transport: "virtio-balloon".into(),
            reason,
        };
        let Ok(bytes) = <[u8; 11]>::try_from(data) else {
            return Err(bad(format!("{} bytes of balloon state, expected 11", data.len())));
        };
        let target = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let actual = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        self.held_stats = match bytes[8] {
            0 => None,
            1 => Some(u16::from_le_bytes([bytes[9], bytes[10]])),
            other => return Err(bad(format!("held-buffer flag {other}, expected 0 or 1"))),
        };
        self.shared.state().stats.set_pages(target, actual);
        Ok(())
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        for (fd, what) in [
            (self.timer.as_raw_fd(), "statistics timer"),
            (self.shared.wake.as_raw_fd(), "control eventfd"),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-balloon: cannot watch the {what}: {e:?}");
            }
        }
        self.arm_timer();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            self.request_stats(ops);
            return;
        }
        if fd == self.shared.wake.as_raw_fd() {
            self.handle_wake();
            return;
        }
        match self.activation.classify(fd) {
            EventSource::Changed => {
                self.activation.sync(ops);
                if self.activation.is_active() {
                    self.process_all_queues(ops);
                }
            }
            EventSource::Queue(index) => {
                self.activation.take_queue_event(index);
                self.process_queue_index(ops, index);
            }
            EventSource::Other => {
                keel_ratelimit::warn_limited!("virtio-balloon: event on unknown fd {fd}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
