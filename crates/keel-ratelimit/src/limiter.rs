//! A device's rate limiter: bandwidth and operations buckets, and the
//! timer that says when a throttled device may go on.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::{BucketConfig, TokenBucket};

/// What a change to one bucket of a [`RateLimiter`] does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave the bucket as it is.
    #[default]
    Keep,
    /// Remove the bucket: no limit of that kind.
    Disable,
    /// Replace the bucket's settings (a setting that limits nothing, size or
    /// refill time 0, removes it as Firecracker does).
    Set(BucketConfig),
}

/// Rate limiting for one device (or one direction of one): an optional
/// bandwidth bucket (bytes) and an optional operations bucket (requests),
/// with Firecracker's semantics.
///
/// A device asks before each request ([`consume`](Self::consume)); when a
/// bucket is short, the limiter arms its timerfd for the moment the request
/// can pass and says no. The device then leaves its queue alone and watches
/// [`timer_fd`](Self::timer_fd) on its event loop; when it fires it calls
/// [`on_timer`](Self::on_timer) and tries again. A device is never woken
/// before it can make progress, and nothing polls.
///
/// A limiter with no buckets limits nothing and costs one branch per call.
///
/// ```
/// use keel_ratelimit::{BucketConfig, RateLimiter};
///
/// // 1000 bytes per 100 ms, and 10 requests per second.
/// let mut limiter = RateLimiter::new(
///     Some(BucketConfig::new(1000, 100)),
///     Some(BucketConfig::new(10, 1000)),
/// ).unwrap();
/// assert!(limiter.consume(600));
/// assert!(!limiter.consume(600)); // 400 bytes left: throttled
/// assert!(limiter.is_blocked());
/// // The device now waits for limiter.timer_fd() to become readable,
/// // then calls limiter.on_timer() and retries the request.
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

fn limiting(config: Option<BucketConfig>) -> Option<TokenBucket> {
    config.filter(BucketConfig::is_limiting).map(TokenBucket::new)
}

impl RateLimiter {
    /// A limiter with the given buckets (`None`, or a size or refill time
    /// of 0, means no limit of that kind).
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(io::Error::from)?;
        let fd = timer.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no
        // memory is involved.
        let nonblocking = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            bandwidth: limiting(bandwidth),
            ops: limiting(ops),
            timer,
            blocked: false,
        })
    }

    /// A limiter that limits nothing (until [`update`](Self::update)).
    pub fn unlimited() -> io::Result<Self> {
        Self::new(None, None)
    }

    /// Whether any bucket is set.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// The bandwidth bucket's settings, if any.
    pub fn bandwidth(&self) -> Option<BucketConfig> {
        self.bandwidth.as_ref().map(TokenBucket::config)
    }

    /// The operations bucket's settings, if any.
    pub fn ops(&self) -> Option<BucketConfig> {
        self.ops.as_ref().map(TokenBucket::config)
    }

    /// Whether the limiter is waiting for its timer: every
    /// [`consume`](Self::consume) fails until [`on_timer`](Self::on_timer).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timerfd to watch for readability while [`is_blocked`](Self::is_blocked).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Takes one operation and `bytes` bytes for a request, both or
    /// neither. On refusal the timer is armed for when both buckets can
    /// pay, and the limiter is blocked until it fires.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if !self.is_limiting() {
            return true;
        }
        self.consume_at(1, bytes, Instant::now())
    }

    /// Takes `bytes` from the bandwidth bucket only (no operation charged):
    /// for a device that pays per byte, such as a console.
    pub fn consume_bytes(&mut self, bytes: u64) -> bool {
        if !self.is_limiting() {
            return true;
        }
        self.consume_at(0, bytes, Instant::now())
    }

    /// Charges `bytes` already moved (post-paid) to the bandwidth bucket,
    /// which may go into debt. Returns whether the caller may go on; if not,
    /// the limiter is blocked until the debt is paid back and the timer
    /// fires. For a device that cannot know a request's size before doing
    /// it.
    pub fn charge_bytes(&mut self, bytes: u64) -> bool {
        let Some(bucket) = self.bandwidth.as_mut() else {
            return !self.blocked;
        };
        let now = Instant::now();
        if bucket.charge_at(bytes, now) {
            return !self.blocked;
        }
        let wait = bucket.time_until_at(1, now);
        self.block_for(wait);
        false
    }

    fn consume_at(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let ops_ok = ops == 0 || self.ops.as_mut().is_none_or(|b| b.can_reduce_at(ops, now));
        let bytes_ok = bytes == 0
            || self
                .bandwidth
                .as_mut()
                .is_none_or(|b| b.can_reduce_at(bytes, now));
        if ops_ok && bytes_ok {
            if ops > 0 {
                if let Some(b) = self.ops.as_mut() {
                    b.reduce_at(ops, now);
                }
            }
            if bytes > 0 {
                if let Some(b) = self.bandwidth.as_mut() {
                    b.reduce_at(bytes, now);
                }
            }
            return true;
        }
        let wait_ops = match self.ops.as_mut() {
            Some(b) if ops > 0 => b.time_until_at(ops, now),
            _ => Duration::ZERO,
        };
        let wait_bytes = match self.bandwidth.as_mut() {
            Some(b) if bytes > 0 => b.time_until_at(bytes, now),
            _ => Duration::ZERO,
        };
        self.block_for(wait_ops.max(wait_bytes));
        false
    }

    fn block_for(&mut self, wait: Duration) {
        // A zero duration would disarm the timer instead of firing it.
        let wait = wait.max(Duration::from_micros(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            Err(e) => {
                // Without a timer nothing would wake the device: let it go
                // on unthrottled rather than stall it forever.
                log::error!("rate limiter: cannot arm its timer ({e}); not throttling");
                self.blocked = false;
            }
        }
    }

    /// Gives back tokens taken for a request that was not carried out (the
    /// operation too if `op`).
    pub fn replenish(&mut self, op: bool, bytes: u64) {
        if op {
            if let Some(b) = self.ops.as_mut() {
                b.replenish(1);
            }
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.replenish(bytes);
        }
    }

    /// Call when [`timer_fd`](Self::timer_fd) is readable: consumes the
    /// expiration and unblocks the limiter. Returns whether the timer had
    /// really fired (false for a spurious wake-up, the limiter stays as it
    /// was).
    pub fn on_timer(&mut self) -> bool {
        match self.timer.wait() {
            Ok(_) => {
                self.blocked = false;
                true
            }
            Err(_) => false,
        }
    }

    /// Changes the buckets of a running limiter. Tokens a kept bucket holds
    /// stay (within its new size); a blocked limiter is unblocked so the
    /// device retries under the new settings at once.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = Instant::now();
        apply(&mut self.bandwidth, bandwidth, now);
        apply(&mut self.ops, ops, now);
        if self.blocked {
            // Fire now rather than at the old deadline; the device's next
            // consume re-arms if the new buckets are short too.
            self.block_for(Duration::ZERO);
        }
    }
}

fn apply(bucket: &mut Option<TokenBucket>, update: BucketUpdate, now: Instant) {
    match update {
        BucketUpdate::Keep => {}
        BucketUpdate::Disable => *bucket = None,
        BucketUpdate::Set(config) if !config.is_limiting() => *bucket = None,
        BucketUpdate::Set(config) => match bucket {
            Some(b) => b.update_at(config, now),
            None => *bucket = Some(TokenBucket::new_at(config, now)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, as poll's contract asks.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn an_unlimited_limiter_lets_everything_through() {
        let mut l = RateLimiter::unlimited().unwrap();
        assert!(!l.is_limiting());
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX));
        }
        assert!(!l.is_blocked());
    }

    #[test]
    fn settings_that_limit_nothing_are_no_bucket() {
        let l = RateLimiter::new(Some(BucketConfig::new(0, 100)), Some(BucketConfig::new(10, 0))).unwrap();
        assert!(!l.is_limiting());
    }

    #[test]
    fn a_refused_request_arms_the_timer_for_when_it_can_pass() {
        // 1000 bytes per 100 ms: after 1000 bytes, 500 more need 50 ms.
        let mut l = RateLimiter::new(Some(BucketConfig::new(1000, 100)), None).unwrap();
        assert!(l.consume(1000));
        let start = Instant::now();
        assert!(!l.consume(500));
        assert!(l.is_blocked());
        assert!(!l.consume(1), "blocked until the timer fires");
        // Not before its time (a thread preempted past it sees it fired).
        let early = readable(l.timer_fd(), 20);
        assert!(
            !early || start.elapsed() >= Duration::from_millis(45),
            "fired after {:?}",
            start.elapsed()
        );
        assert!(readable(l.timer_fd(), 1000));
        assert!(
            start.elapsed() >= Duration::from_millis(45),
            "{:?}",
            start.elapsed()
        );
        assert!(l.on_timer());
        assert!(!l.is_blocked());
        assert!(l.consume(500));
    }

    #[test]
    fn a_spurious_timer_event_leaves_the_limiter_blocked() {
        let mut l = RateLimiter::new(Some(BucketConfig::new(10, 10_000)), None).unwrap();
        assert!(l.consume(10));
        assert!(!l.consume(10));
        assert!(!l.on_timer(), "the timer has not fired; nonblocking read");
        assert!(l.is_blocked());
    }

    #[test]
    fn a_request_is_charged_to_both_buckets_or_neither() {
        let mut l = RateLimiter::new(
            Some(BucketConfig::new(100, 1000)),
            Some(BucketConfig::new(1, 1000)),
        )
        .unwrap();
        assert!(l.consume(10));
        // The ops bucket is empty: the bytes must not be taken either.
        assert!(!l.consume(10));
        l.update(BucketUpdate::Keep, BucketUpdate::Disable);
        assert!(readable(l.timer_fd(), 100));
        assert!(l.on_timer());
        assert!(l.consume(90), "the refused request took no bytes");
    }

    #[test]
    fn bytes_only_consumption_leaves_the_ops_bucket_alone() {
        let mut l = RateLimiter::new(None, Some(BucketConfig::new(1, 1000))).unwrap();
        assert!(l.consume_bytes(1 << 20));
        assert!(l.consume_bytes(1 << 20));
        assert!(l.consume(0));
        assert!(!l.consume(0));
    }

    #[test]
    fn post_paid_bytes_block_until_the_debt_is_paid() {
        let mut l = RateLimiter::new(Some(BucketConfig::new(1000, 100)), None).unwrap();
        assert!(l.charge_bytes(600));
        let start = Instant::now();
        assert!(!l.charge_bytes(900)); // 500 in debt: 50 ms
        assert!(l.is_blocked());
        assert!(readable(l.timer_fd(), 1000));
        assert!(
            start.elapsed() >= Duration::from_millis(45),
            "{:?}",
            start.elapsed()
        );
        assert!(l.on_timer());
        assert!(l.charge_bytes(1));
    }

    #[test]
    fn replenish_gives_back_what_an_abandoned_request_took() {
        let mut l = RateLimiter::new(
            Some(BucketConfig::new(100, 100_000)),
            Some(BucketConfig::new(1, 100_000)),
        )
        .unwrap();
        assert!(l.consume(100));
        l.replenish(true, 100);
        assert!(l.consume(100));
    }

    #[test]
    fn an_update_while_blocked_wakes_the_device_at_once() {
        let mut l = RateLimiter::new(Some(BucketConfig::new(10, 60_000)), None).unwrap();
        assert!(l.consume(10));
        assert!(!l.consume(10));
        l.update(
            BucketUpdate::Set(BucketConfig::new(1000, 100)),
            BucketUpdate::Keep,
        );
        assert!(readable(l.timer_fd(), 100), "woken for the new settings");
        assert!(l.on_timer());
        // The kept bucket still holds what it held (0), within the new size.
        assert!(!l.consume(10));
        l.update(BucketUpdate::Disable, BucketUpdate::Keep);
        assert!(readable(l.timer_fd(), 100));
        assert!(l.on_timer());
        assert!(l.consume(u64::MAX));
    }

    #[test]
    fn the_sustained_rate_is_the_configured_one() {
        // 10 ms of refill is 1000 bytes; ask for 100 bytes at a time for
        // 200 ms of simulated time.
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Some(BucketConfig::new(1000, 10)), None).unwrap();
        let mut passed = 0u64;
        for step in 0..2000u64 {
            let now = t0 + Duration::from_micros(100 * step);
            l.blocked = false; // the timer's job, simulated
            if l.consume_at(1, 100, now) {
                passed += 100;
            }
        }
        // A full bucket at start plus ~200 ms at 100 bytes/ms.
        assert!((20_800..=21_000).contains(&passed), "{passed}");
    }
}
