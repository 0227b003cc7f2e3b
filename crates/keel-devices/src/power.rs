//! What a device may ask of the machine it sits in.

use std::sync::{Mutex, PoisonError};

/// The machine-level requests a device can make: reset the machine, or stop
/// it with a status.
///
/// Devices such as the i8042 (reset) and the exit port hold an
/// `Arc<dyn PowerControl>`; the VMM implements it by recording the reason and
/// stopping the vCPUs. Both methods are called from vCPU threads while the
/// device's lock is held, so an implementation must only record the request
/// and wake whoever acts on it — never join vCPU threads from inside.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use keel_devices::PowerControl;
///
/// #[derive(Default)]
/// struct StopFlag(AtomicBool);
///
/// impl PowerControl for StopFlag {
///     fn request_reset(&self) {
///         self.0.store(true, Ordering::SeqCst);
///     }
///     fn request_exit(&self, _status: u8) {
///         self.0.store(true, Ordering::SeqCst);
///     }
/// }
///
/// let stop = StopFlag::default();
/// stop.request_exit(0);
/// assert!(stop.0.load(Ordering::SeqCst));
/// ```
pub trait PowerControl: Send + Sync {
    /// The guest asked for a machine reset (e.g. 0xFE to the i8042 command
    /// port).
    fn request_reset(&self);

    /// The guest asked the machine to stop with `status` (e.g. a write to the
    /// exit port).
    fn request_exit(&self, status: u8);

    /// The guest powered the machine off (ACPI S5). By default the same as
    /// [`request_exit`](Self::request_exit)`(0)`; a VMM that tells the two
    /// apart overrides it.
    fn request_power_off(&self) {
        self.request_exit(0);
    }
}

/// One request made through [`PowerControl`], as recorded by
/// [`RecordingPowerControl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// [`PowerControl::request_reset`] was called.
    Reset,
    /// [`PowerControl::request_exit`] was called with this status.
    Exit(u8),
    /// [`PowerControl::request_power_off`] was called.
    PowerOff,
}

/// A test double for [`PowerControl`] that records every request in order.
///
/// # Example
///
/// ```
/// use keel_devices::{PowerControl, PowerRequest, RecordingPowerControl};
///
/// let power = RecordingPowerControl::new();
/// power.request_exit(3);
/// power.request_reset();
/// assert_eq!(power.requests(), [PowerRequest::Exit(3), PowerRequest::Reset]);
/// ```
#[derive(Debug, Default)]
pub struct RecordingPowerControl {
    requests: Mutex<Vec<PowerRequest>>,
}

impl RecordingPowerControl {
    /// A recorder with no requests yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<PowerRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The most recent request, if any.
    pub fn last(&self) -> Option<PowerRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .copied()
    }

    fn record(&self, request: PowerRequest) {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }
}

impl PowerControl for RecordingPowerControl {
    fn request_reset(&self) {
        self.record(PowerRequest::Reset);
    }

    fn request_exit(&self, status: u8) {
        self.record(PowerRequest::Exit(status));
    }

    fn request_power_off(&self) {
        self.record(PowerRequest::PowerOff);
    }
}
