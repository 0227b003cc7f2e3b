//! One token bucket.

use std::time::{Duration, Instant};

/// The settings of one token bucket, as Firecracker's API takes them.
///
/// The bucket holds at most `size` tokens and refills from empty to full in
/// `refill_time_ms` milliseconds, so its sustained rate is
/// `size / refill_time_ms` tokens per millisecond. `one_time_burst` tokens
/// are available once, on top of the first full bucket, and never come
/// back.
///
/// ```
/// use keel_ratelimit::BucketConfig;
/// // 10 MiB/s sustained, bursts of 1 MiB, plus 64 MiB once at start.
/// let config = BucketConfig::new(1 << 20, 100).with_one_time_burst(64 << 20);
/// assert_eq!(config.rate_per_second(), 10 * (1 << 20));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BucketConfig {
    /// Most tokens the bucket holds.
    pub size: u64,
    /// Tokens available once, before the bucket's own budget.
    pub one_time_burst: u64,
    /// Milliseconds to refill the bucket from empty to `size`.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    /// A bucket of `size` tokens refilled in `refill_time_ms`, with no
    /// one-time burst.
    pub const fn new(size: u64, refill_time_ms: u64) -> Self {
        Self {
            size,
            one_time_burst: 0,
            refill_time_ms,
        }
    }

    /// The same bucket with `tokens` available once on top.
    pub const fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time_burst = tokens;
        self
    }

    /// Sustained tokens per second (saturating).
    pub fn rate_per_second(&self) -> u64 {
        if self.refill_time_ms == 0 {
            return u64::MAX;
        }
        let rate = u128::from(self.size) * 1000 / u128::from(self.refill_time_ms);
        u64::try_from(rate).unwrap_or(u64::MAX)
    }

    /// Whether the settings describe a bucket that limits anything: Firecracker
    /// treats a size or refill time of 0 as "no limit".
    pub fn is_limiting(&self) -> bool {
        self.size != 0 && self.refill_time_ms != 0
    }
}

/// A token bucket with Firecracker's semantics.
///
/// Tokens are consumed first from the one-time burst, then from the
/// budget, which refills continuously at the configured rate up to `size`.
/// A request larger than everything the bucket can ever hold is let through
/// once (over-consumption, as Firecracker allows it) and leaves the bucket
/// in debt: nothing more passes until the refill has paid it back, so the
/// long-run rate still holds.
///
/// ```
/// use std::time::{Duration, Instant};
/// use keel_ratelimit::{BucketConfig, TokenBucket};
///
/// let start = Instant::now();
/// let mut bucket = TokenBucket::new_at(BucketConfig::new(1000, 1000), start);
/// assert!(bucket.reduce_at(600, start));
/// assert!(!bucket.reduce_at(600, start)); // only 400 left
/// let later = start + Duration::from_millis(200); // 200 tokens refilled
/// assert!(bucket.reduce_at(600, later));
/// ```
#[derive(Clone, Debug)]
pub struct TokenBucket {
    config: BucketConfig,
    one_time_burst: u64,
    /// Tokens available; negative after an over-consumption.
    budget: i128,
    /// Token-nanoseconds accrued towards the next whole token.
    carry: u128,
    last_update: Instant,
}

const NANOS_PER_MS: u128 = 1_000_000;

impl TokenBucket {
    /// A full bucket, now.
    pub fn new(config: BucketConfig) -> Self {
        Self::new_at(config, Instant::now())
    }

    /// A full bucket at `now` (for deterministic tests).
    pub fn new_at(config: BucketConfig, now: Instant) -> Self {
        Self {
            config,
            one_time_burst: config.one_time_burst,
            budget: i128::from(config.size),
            carry: 0,
            last_update: now,
        }
    }

    /// The bucket's settings.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// One-time burst tokens left.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Tokens available from the refilling budget at `now` (0 while in debt).
    pub fn budget_at(&mut self, now: Instant) -> u64 {
        self.refill(now);
        u64::try_from(self.budget.max(0)).unwrap_or(u64::MAX)
    }

    fn refill_ns(&self) -> u128 {
        (u128::from(self.config.refill_time_ms) * NANOS_PER_MS).max(1)
    }

    fn refill(&mut self, now: Instant) {
        let size = i128::from(self.config.size);
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        self.last_update = now;
        if self.budget >= size || !self.config.is_limiting() {
            self.budget = self.budget.min(size);
            self.carry = 0;
            return;
        }
        // Tokens accrue at size per refill_ns: count in token-nanoseconds
        // and keep the remainder, so no fraction of a token is ever lost
        // or gained however often this runs.
        let refill_ns = self.refill_ns();
        let units = elapsed
            .saturating_mul(u128::from(self.config.size))
            .saturating_add(self.carry);
        let new_tokens = i128::try_from(units / refill_ns).unwrap_or(i128::MAX);
        self.carry = units % refill_ns;
        self.budget = self.budget.saturating_add(new_tokens);
        if self.budget >= size {
            self.budget = size;
            self.carry = 0;
        }
    }

    /// Whether `tokens` could be taken at `now`, without taking them.
    pub fn can_reduce_at(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let tokens = i128::from(tokens);
        let burst = i128::from(self.one_time_burst);
        if tokens <= burst {
            return true;
        }
        let rest = tokens - burst;
        if self.budget < 0 {
            return false;
        }
        // A request no full bucket could ever hold passes when the bucket is
        // full (over-consumption) rather than never.
        rest <= self.budget
            || (rest > i128::from(self.config.size) && self.budget >= i128::from(self.config.size))
    }

    /// Takes `tokens` at `now` if the bucket has them (see the type's
    /// documentation for over-consumption); returns whether it did.
    pub fn reduce_at(&mut self, tokens: u64, now: Instant) -> bool {
        if !self.can_reduce_at(tokens, now) {
            return false;
        }
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget = self.budget.saturating_sub(i128::from(tokens - from_burst));
        true
    }

    /// Takes `tokens` at `now` whether or not the bucket has them, leaving it
    /// in debt if not: for work that was already done (bytes written) and
    /// must be paid for afterwards. Returns whether the bucket is out of
    /// debt.
    pub fn charge_at(&mut self, tokens: u64, now: Instant) -> bool {
        self.refill(now);
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget = self.budget.saturating_sub(i128::from(tokens - from_burst));
        self.budget >= 0
    }

    /// [`reduce_at`](Self::reduce_at) now.
    pub fn reduce(&mut self, tokens: u64) -> bool {
        self.reduce_at(tokens, Instant::now())
    }

    /// Gives back `tokens` taken for something that did not happen (capped
    /// at a full bucket; burst tokens do not come back).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self
            .budget
            .saturating_add(i128::from(tokens))
            .min(i128::from(self.config.size));
    }

    /// How long after `now` `tokens` can be taken (zero if they can now).
    pub fn time_until_at(&mut self, tokens: u64, now: Instant) -> Duration {
        if self.can_reduce_at(tokens, now) {
            return Duration::ZERO;
        }
        let size = i128::from(self.config.size);
        let rest = i128::from(tokens).saturating_sub(i128::from(self.one_time_burst));
        // The budget needed: `rest`, or a full bucket for an over-consumption.
        let target = rest.min(size);
        let missing = u128::try_from(target.saturating_sub(self.budget)).unwrap_or(0);
        // `refill` just ran, so `carry` token-nanoseconds are already in.
        let units = missing
            .saturating_mul(self.refill_ns())
            .saturating_sub(self.carry);
        let wait = units.div_ceil(u128::from(self.config.size.max(1))).max(1);
        Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
    }

    /// Replaces the settings, keeping the tokens the bucket holds (capped at
    /// the new size) and the one-time burst left (capped at the new one).
    pub fn update_at(&mut self, config: BucketConfig, now: Instant) {
        self.refill(now);
        self.config = config;
        self.one_time_burst = self.one_time_burst.min(config.one_time_burst);
        self.budget = self.budget.min(i128::from(config.size));
        self.carry = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_new_bucket_is_full_and_refuses_more_than_it_holds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(100, 1000), t0);
        assert!(b.reduce_at(100, t0));
        assert!(!b.reduce_at(1, t0));
        assert_eq!(b.budget_at(t0), 0);
    }

    #[test]
    fn refill_is_proportional_to_elapsed_time_and_stops_at_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(1000, 1000), t0);
        assert!(b.reduce_at(1000, t0));
        assert_eq!(b.budget_at(t0 + ms(250)), 250);
        assert_eq!(b.budget_at(t0 + ms(500)), 500);
        assert_eq!(b.budget_at(t0 + ms(10_000)), 1000);
    }

    #[test]
    fn fractions_of_tokens_are_not_lost_across_many_small_refills() {
        // 3 tokens per 1000 ms: checking every millisecond must still give
        // exactly 3 tokens after a second.
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(3, 1000), t0);
        assert!(b.reduce_at(3, t0));
        for i in 1..=1000 {
            b.budget_at(t0 + ms(i));
        }
        assert_eq!(b.budget_at(t0 + ms(1000)), 3);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_comes_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(10, 1000).with_one_time_burst(50), t0);
        assert!(b.reduce_at(55, t0)); // 50 burst + 5 budget
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.budget_at(t0), 5);
        assert_eq!(b.budget_at(t0 + ms(60_000)), 10);
        assert_eq!(b.one_time_burst(), 0);
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_once_and_leaves_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(100, 1000), t0);
        assert!(b.reduce_at(300, t0)); // over-consumption from a full bucket
        assert!(!b.reduce_at(1, t0 + ms(1000))); // still 100 tokens in debt
        assert_eq!(b.time_until_at(1, t0 + ms(1000)), ms(1010));
        assert!(b.reduce_at(1, t0 + ms(2010)));
    }

    #[test]
    fn an_oversized_request_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(100, 1000), t0);
        assert!(b.reduce_at(50, t0));
        assert!(!b.reduce_at(300, t0));
        assert_eq!(b.time_until_at(300, t0), ms(500));
        assert!(b.reduce_at(300, t0 + ms(500)));
    }

    #[test]
    fn time_until_counts_time_already_elapsed() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(1000, 1000), t0);
        assert!(b.reduce_at(1000, t0));
        assert_eq!(b.time_until_at(100, t0), ms(100));
        assert_eq!(b.time_until_at(100, t0 + ms(40)), ms(60));
        assert_eq!(b.time_until_at(100, t0 + ms(100)), Duration::ZERO);
    }

    #[test]
    fn charges_may_leave_debt_that_the_refill_pays_back() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(100, 1000), t0);
        assert!(b.charge_at(60, t0));
        assert!(!b.charge_at(90, t0)); // 50 in debt
        assert_eq!(b.time_until_at(1, t0), ms(510));
        assert!(!b.reduce_at(1, t0 + ms(500)));
        assert!(b.reduce_at(1, t0 + ms(510)));
    }

    #[test]
    fn replenish_gives_back_up_to_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(100, 1000), t0);
        assert!(b.reduce_at(60, t0));
        b.replenish(1000);
        assert_eq!(b.budget_at(t0), 100);
    }

    #[test]
    fn updates_keep_what_the_bucket_holds_within_the_new_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(BucketConfig::new(1000, 1000), t0);
        assert!(b.reduce_at(200, t0));
        b.update_at(BucketConfig::new(500, 100), t0);
        assert_eq!(b.budget_at(t0), 500);
        assert!(b.reduce_at(500, t0));
        assert_eq!(b.budget_at(t0 + ms(50)), 250);
    }

    #[test]
    fn extreme_settings_do_not_overflow() {
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
        for config in [
            BucketConfig::new(u64::MAX, 1),
            BucketConfig::new(1, u64::MAX),
            BucketConfig::new(u64::MAX, u64::MAX).with_one_time_burst(u64::MAX),
            BucketConfig::new(0, 0),
        ] {
            let mut b = TokenBucket::new_at(config, t0);
            b.reduce_at(u64::MAX, t0);
            b.reduce_at(u64::MAX, t0);
            b.time_until_at(u64::MAX, t0);
            b.budget_at(far);
            b.replenish(u64::MAX);
            b.time_until_at(u64::MAX, far);
        }
    }
}
