//! Rate-limited logging for events a guest can trigger at will.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines each call site may log per window.
pub const LINES_PER_WINDOW: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 5_000;

static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Log lines suppressed so far by every [`LogLimit`] in the process: the
/// metric a control plane publishes (Firecracker's `logger.missed_log_count`
/// counts the same kind of loss).
pub fn suppressed_log_lines() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let ms = EPOCH.get_or_init(Instant::now).elapsed().as_millis();
    // Saturates after 584 million years.
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The budget of one log call site: at most [`LINES_PER_WINDOW`] lines per
/// [`WINDOW_MS`]; the rest are counted, and the first line of the next
/// window says how many were dropped.
///
/// A guest that makes a device complain a million times a second then
/// costs two lines per site per window instead of a full disk. Use it
/// through [`warn_limited!`](crate::warn_limited) and
/// [`info_limited!`](crate::info_limited), which keep one `static LogLimit`
/// per call site:
///
/// ```
/// use keel_ratelimit::{LogLimit, LINES_PER_WINDOW};
///
/// // What `warn_limited!("notification for missing queue {queue}")` does
/// // at one call site, 1000 times in a row:
/// static LIMIT: LogLimit = LogLimit::new();
/// let logged = (0..1000).filter(|_| LIMIT.admit().is_some()).count();
/// assert_eq!(logged as u64, LINES_PER_WINDOW);
/// assert_eq!(LIMIT.suppressed(), 1000 - LINES_PER_WINDOW);
/// assert!(keel_ratelimit::suppressed_log_lines() >= 990);
/// ```
#[derive(Debug)]
pub struct LogLimit {
    window_start_ms: AtomicU64,
    lines_in_window: AtomicU64,
    suppressed_in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    /// A fresh budget (`const`, for statics).
    pub const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            lines_in_window: AtomicU64::new(0),
            suppressed_in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Lines this site has suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Whether a line may be logged now. `Some(n)`: log it, and say first
    /// that `n` lines were suppressed in the previous window if `n > 0`.
    /// `None`: drop it (counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let mut dropped_before = 0;
        if now.saturating_sub(start) >= WINDOW_MS || self.lines_in_window.load(Ordering::Relaxed) == 0 {
            // A new window; the thread that wins the swap reports the losses
            // of the old one.
            if self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.lines_in_window.store(0, Ordering::Relaxed);
                dropped_before = self.suppressed_in_window.swap(0, Ordering::Relaxed);
            }
        }
        if self.lines_in_window.fetch_add(1, Ordering::Relaxed) < LINES_PER_WINDOW {
            return Some(dropped_before);
        }
        self.suppressed_in_window.fetch_add(1, Ordering::Relaxed);
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        SUPPRESSED_TOTAL.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `log::warn!` through a per-call-site [`LogLimit`]: for events a guest
/// triggers.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::log::Level::Warn, $($arg)+) };
}

/// `log::info!` through a per-call-site [`LogLimit`].
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::log::Level::Info, $($arg)+) };
}

/// `log::log!` at `level` through a per-call-site [`LogLimit`].
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::LogLimit = $crate::LogLimit::new();
        // Lines below the logger's level cost nothing and are not counted.
        if $crate::log::log_enabled!($level) {
            if let Some(dropped) = LIMIT.admit() {
                if dropped > 0 {
                    $crate::log::log!($level, "({dropped} similar lines suppressed)");
                }
                $crate::log::log!($level, $($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_its_budget_per_window_then_counts() {
        let limit = LogLimit::new();
        let t0 = 1_000_000;
        let admitted = (0..100).filter(|_| limit.admit_at(t0).is_some()).count();
        assert_eq!(admitted as u64, LINES_PER_WINDOW);
        assert_eq!(limit.suppressed(), 100 - LINES_PER_WINDOW);
    }

    #[test]
    fn the_next_window_reports_what_the_last_one_dropped() {
        let limit = LogLimit::new();
        let t0 = 1_000_000;
        for _ in 0..25 {
            limit.admit_at(t0);
        }
        assert_eq!(limit.admit_at(t0 + WINDOW_MS - 1), None);
        assert_eq!(limit.admit_at(t0 + WINDOW_MS), Some(16));
        assert_eq!(limit.admit_at(t0 + WINDOW_MS + 1), Some(0));
    }

    #[test]
    fn suppressed_lines_add_up_process_wide() {
        let before = suppressed_log_lines();
        let limit = LogLimit::new();
        for _ in 0..(LINES_PER_WINDOW + 7) {
            limit.admit_at(42);
        }
        assert!(suppressed_log_lines() >= before + 7);
    }
}
