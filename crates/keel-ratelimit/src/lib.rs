//! Rate limiting for Keel's devices: what a guest may cost the host per
//! second.
//!
//! Two mechanisms, both aimed at a guest that asks for more than it should
//! get:
//!
//! - [`RateLimiter`]: token buckets with Firecracker's semantics
//!   ([`BucketConfig`]: `size`, `one_time_burst`, `refill_time` in
//!   milliseconds), one for bandwidth and one for operations, and a timerfd
//!   that wakes a throttled device's event loop exactly when it may go on.
//!   Devices consult it per request; users configure it per device (and a
//!   control plane updates it on a running VM).
//! - [`warn_limited!`] / [`info_limited!`] ([`LogLimit`]): logging for
//!   events a guest triggers at will (a notification for a queue that does
//!   not exist, a read past the end of a disk), at most
//!   [`LINES_PER_WINDOW`] lines per call site per [`WINDOW_MS`], the rest
//!   counted in [`suppressed_log_lines`].
//!
//! The crate has no dependency on the rest of Keel, so any device crate can
//! use it.

#![deny(missing_docs)]

mod bucket;
mod limiter;
mod log_limit;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use vmm_sys_util;

pub use bucket::{BucketConfig, TokenBucket};
pub use limiter::{BucketUpdate, RateLimiter};
pub use log_limit::{suppressed_log_lines, LogLimit, LINES_PER_WINDOW, WINDOW_MS};

#[doc(hidden)]
pub use log;
