//! virtio-rng, the entropy device (virtio 1.2, section 5.4): random bytes
//! from the host's `getrandom(2)` into the guest's buffers.

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use keel_ratelimit::{BucketUpdate, RateLimiter};

use crate::activation::{process_queue, ActivationState, EventSource, Handled};
use crate::chain::RequestBuffers;
use crate::device::{Activation, VirtioDevice};
use crate::{check_queue_count, device_type, features, Error, Result};

/// Most random bytes one request gets. The spec lets the device fill less
/// than the whole buffer; capping keeps one guest request from holding the
/// event loop (and the host's entropy source) for long.
pub const MAX_RNG_REQUEST_BYTES: usize = 64 * 1024;

const QUEUE_SIZE: u16 = 256;

/// A virtio entropy device.
///
/// Each chain in its one queue gets `min(writable bytes, 64 KiB)` bytes
/// from `getrandom(2)`; readable buffers in a chain are ignored. Offers
/// `VERSION_1`, `RING_INDIRECT_DESC` and `RING_EVENT_IDX`.
///
/// Like every device here it is shared by its transport and the event loop:
/// see the crate documentation.
///
/// A [`RateLimiter`] ([`update_rate_limiter`](Self::update_rate_limiter),
/// Firecracker's `entropy` `rate_limiter`) paces the requests: each costs
/// one operation and the bytes it will get. A refused request stays on the
/// available ring until the limiter's timerfd, watched on the event loop,
/// says it can pass.
pub struct Rng {
    activation: ActivationState,
    queue_sizes: [u16; 1],
    buffer: Vec<u8>,
    served: u64,
    limiter: RateLimiter,
    throttled: u64,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.activation.is_active())
            .finish_non_exhaustive()
    }
}

impl Rng {
    /// An entropy device.
    pub fn new() -> Result<Self> {
        Ok(Self {
            activation: ActivationState::new("virtio-rng")?,
            queue_sizes: [QUEUE_SIZE],
            buffer: vec![0; MAX_RNG_REQUEST_BYTES],
            served: 0,
            limiter: RateLimiter::unlimited().map_err(Error::CreateEventFd)?,
            throttled: 0,
        })
    }

    /// Changes the rate limiter's bandwidth (random bytes) and operations
    /// (requests) buckets. May be called on a running device: a throttled
    /// queue resumes under the new limits at once.
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.limiter.update(bandwidth, ops);
    }

    /// The rate limiter (its buckets, whether it is holding the queue back).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Times the rate limiter held the queue back.
    pub fn throttled_count(&self) -> u64 {
        self.throttled
    }

    /// Random bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.served
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    fn process_requests(&mut self, ops: &mut EventOps) {
        if self.limiter.is_blocked() {
            // The limiter's timer brings us back.
            return;
        }
        let Some((active, budget)) = self.activation.start_pass(ops, 0) else {
            return;
        };
        let buffer = &mut self.buffer;
        let served = &mut self.served;
        let limiter = &mut self.limiter;
        let throttled = &mut self.throttled;
        let result = process_queue(active, 0, budget, |mem, chain| {
            let want = chain.writable_len().min(MAX_RNG_REQUEST_BYTES as u64);
            if !limiter.consume(want) {
                *throttled = throttled.saturating_add(1);
                return Handled::Throttled;
            }
            let handled = fill(buffer, mem, chain);
            if let Handled::Used(n) = handled {
                if *served == 0 && n > 0 {
                    keel_ratelimit::info_limited!("virtio-rng: served the guest's first {n} random bytes");
                }
                *served = served.saturating_add(u64::from(n));
            }
            handled
        });
        self.activation.end_pass(ops, 0, result);
    }
}

fn fill(buffer: &mut [u8], mem: &GuestMemoryMmap, chain: &RequestBuffers) -> Handled {
    let want = chain.writable_len().min(buffer.len() as u64) as usize;
    // `want` is at most `buffer.len()`: the slice is always there.
    let buffer = buffer.get_mut(..want).unwrap_or_default();
    if let Err(e) = getrandom(buffer) {
        keel_ratelimit::warn_limited!("virtio-rng: getrandom failed: {e}");
        return Handled::Used(0);
    }
    let mut writer = chain.writer(mem, want as u64);
    match writer.write(buffer) {
        // `want` is at most 64 KiB.
        Ok(written) => Handled::Used(written as u32),
        Err(_) => Handled::Used(writer.written() as u32),
    }
}

/// Fills `buf` from the kernel's random source, retrying short reads and
/// interruptions.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut rest = buf;
    while !rest.is_empty() {
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; getrandom writes at most `rest.len()` bytes into it.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // ret is non-negative and at most rest.len(); were it more, the
        // buffer is full.
        let filled = usize::try_from(ret).unwrap_or(usize::MAX);
        rest = std::mem::take(&mut rest).get_mut(filled..).unwrap_or_default();
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    }

    fn ack_features(&mut self, _acked: u64) {
        // Nothing device-specific to negotiate.
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<()> {
        check_queue_count(self, &activation)?;
        self.activation.activate(device_type::RNG, activation)
    }

    fn reset(&mut self) -> bool {
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

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Err(e) = ops.add(Events::new_raw(self.limiter.timer_fd(), EventSet::IN)) {
            log::error!("virtio-rng: cannot watch the rate limiter's timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.activation.classify(fd) == EventSource::Other && fd == self.limiter.timer_fd() {
            if self.limiter.on_timer() {
                self.process_requests(ops);
            }
        } else if self.activation.queue_event(fd, ops) {
            self.process_requests(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
    use crate::guest_driver::{memory, Buf, DriverQueue, DATA};

    struct Harness<'a> {
        rng: Arc<Mutex<Rng>>,
        driver: DriverQueue<'a>,
        interrupt: Arc<RecordingInterrupt>,
        notify: EventFd,
        event_loop: EventManager<Arc<Mutex<Rng>>>,
    }

    fn activated(mem: &GuestMemoryMmap) -> Harness<'_> {
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let driver = DriverQueue::new(mem, 16).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::new());
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut event_loop = EventManager::new().unwrap();
        event_loop.add_subscriber(rng.clone());
        rng.lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![driver.queue().unwrap()],
                queue_events: vec![notify.try_clone().unwrap()],
                interrupt: interrupt.clone(),
                stop: StopSignal::new(),
            })
            .unwrap();
        event_loop.run_with_timeout(100).unwrap();
        Harness {
            rng,
            driver,
            interrupt,
            notify,
            event_loop,
        }
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = memory().unwrap();
        let mut h = activated(&mem);
        let head = h
            .driver
            .add(&[Buf::writable(DATA, 100), Buf::writable(DATA + 0x1000, 28)])
            .unwrap();
        h.notify.write(1).unwrap();
        h.event_loop.run_with_timeout(100).unwrap();

        assert_eq!(h.driver.used(), [(u32::from(head), 128)]);
        let mut bytes = [0u8; 100];
        mem.read_slice(&mut bytes, GuestAddress(DATA)).unwrap();
        assert!(bytes.iter().any(|&b| b != 0), "100 random bytes are not all zero");
        assert_eq!(h.interrupt.signals(), [VirtioSignal::UsedQueue(0)]);
    }

    #[test]
    fn caps_one_request_at_64_kib() {
        let mem = memory().unwrap();
        let mut h = activated(&mem);
        h.driver.add(&[Buf::writable(DATA, 1 << 20)]).unwrap();
        h.notify.write(1).unwrap();
        h.event_loop.run_with_timeout(100).unwrap();
        assert_eq!(h.driver.used()[0].1, MAX_RNG_REQUEST_BYTES as u32);
        let mut past = [0xffu8; 16];
        mem.read_slice(&mut past, GuestAddress(DATA + MAX_RNG_REQUEST_BYTES as u64))
            .unwrap();
        assert_eq!(past, [0; 16], "nothing written past the cap");
    }

    #[test]
    fn a_chain_without_writable_buffers_is_returned_empty() {
        let mem = memory().unwrap();
        let mut h = activated(&mem);
        mem.write_slice(&[7; 8], GuestAddress(DATA)).unwrap();
        let head = h.driver.add(&[Buf::readable(DATA, 8)]).unwrap();
        h.notify.write(1).unwrap();
        h.event_loop.run_with_timeout(100).unwrap();
        assert_eq!(h.driver.used(), [(u32::from(head), 0)]);
        let mut bytes = [0u8; 8];
        mem.read_slice(&mut bytes, GuestAddress(DATA)).unwrap();
        assert_eq!(bytes, [7; 8], "readable buffers are never written");
    }

    fn run_until_used(h: &mut Harness<'_>, used: usize) {
        let start = std::time::Instant::now();
        while h.driver.used().len() < used && start.elapsed() < std::time::Duration::from_secs(5) {
            h.event_loop.run_with_timeout(10).unwrap();
        }
    }

    #[test]
    fn the_bandwidth_bucket_paces_random_bytes_and_the_timer_resumes_the_queue() {
        use keel_ratelimit::{BucketConfig, BucketUpdate};
        let mem = memory().unwrap();
        let mut h = activated(&mem);
        h.rng.lock().unwrap().update_rate_limiter(
            BucketUpdate::Set(BucketConfig::new(1000, 100)),
            BucketUpdate::Keep,
        );
        for i in 0..3 {
            h.driver.add(&[Buf::writable(DATA + i * 0x1000, 1000)]).unwrap();
        }
        h.notify.write(1).unwrap();
        let start = std::time::Instant::now();
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 1, "1000 bytes per 100 ms");
        let mut untouched = [0u8; 16];
        mem.read_slice(&mut untouched, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(untouched, [0; 16], "the refused request was not filled");
        run_until_used(&mut h, 3);
        assert_eq!(h.driver.used().len(), 3);
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(180),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(h.rng.lock().unwrap().bytes_served(), 3000);
    }

    #[test]
    fn the_ops_bucket_limits_requests_and_disabling_it_lifts_the_limit() {
        use keel_ratelimit::{BucketConfig, BucketUpdate};
        let mem = memory().unwrap();
        let mut h = activated(&mem);
        h.rng.lock().unwrap().update_rate_limiter(
            BucketUpdate::Keep,
            BucketUpdate::Set(BucketConfig::new(2, 60_000)),
        );
        for i in 0..5 {
            h.driver.add(&[Buf::writable(DATA + i * 0x1000, 16)]).unwrap();
        }
        h.notify.write(1).unwrap();
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 2);
        assert_eq!(h.rng.lock().unwrap().throttled_count(), 1);
        h.rng
            .lock()
            .unwrap()
            .update_rate_limiter(BucketUpdate::Keep, BucketUpdate::Disable);
        run_until_used(&mut h, 5);
        assert_eq!(h.driver.used().len(), 5, "the update woke the device");
    }

    #[test]
    fn a_chain_outside_guest_memory_puts_the_device_in_needs_reset() {
        let mem = memory().unwrap();
        let mut h = activated(&mem);
        h.driver
            .add(&[Buf::writable(crate::guest_driver::MEM_SIZE - 4, 8)])
            .unwrap();
        h.notify.write(1).unwrap();
        h.event_loop.run_with_timeout(100).unwrap();
        assert!(h.driver.used().is_empty());
        assert_eq!(h.interrupt.signals(), [VirtioSignal::NeedsReset]);

        // The device no longer listens to the queue: no wake-ups, no work.
        h.driver.add(&[Buf::writable(DATA, 8)]).unwrap();
        h.notify.write(1).unwrap();
        assert_eq!(h.event_loop.run_with_timeout(50).unwrap(), 0);
        assert!(h.driver.used().is_empty());
    }
}
