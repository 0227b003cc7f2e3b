//! Getting a vCPU thread out of `KVM_RUN` from another thread.
//!
//! A kick is a real-time signal sent to the vCPU thread. Its handler sets
//! `immediate_exit` in that thread's `kvm_run`, so the kick is not lost even
//! when it lands just before the thread enters `KVM_RUN`: KVM then returns
//! `EINTR` at once. The caller sets whatever flag it wants the vCPU to see
//! (stop, pause) *before* kicking.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{Error, Result};

/// Offset from `SIGRTMIN` of the signal used to kick vCPU threads.
pub const KICK_SIGNAL_OFFSET: c_int = 0;

thread_local! {
    // The kvm_run of the vCPU this thread is running, or null. Const-
    // initialised with no destructor, so reading it from a signal handler
    // is async-signal-safe.
    static RUNNING_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    RUNNING_KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by `RunningGuard` on this very
            // thread while its vCPU (and so the kvm_run mapping) is alive,
            // and cleared before the vCPU can be dropped. A volatile byte
            // store is all the handler does.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal number used for kicks.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick signal handler for the process. Idempotent; called by
/// [`crate::Vcpu::new`], so a vCPU thread can always be kicked safely.
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::KickHandler(std::io::Error::from_raw_os_error(errno)))
}

/// Marks the current thread as running a vCPU whose `kvm_run` is `run` until
/// dropped.
pub(crate) struct RunningGuard;

impl RunningGuard {
    pub(crate) fn new(run: *mut kvm_run) -> Self {
        RUNNING_KVM_RUN.with(|r| r.set(run));
        RunningGuard
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING_KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}

/// A handle that can kick one vCPU thread out of `KVM_RUN`.
#[derive(Clone, Copy, Debug)]
pub struct VcpuKicker {
    thread: libc::pthread_t,
}

impl VcpuKicker {
    /// A kicker for the thread `thread` (e.g. from
    /// `std::os::unix::thread::JoinHandleExt::as_pthread_t`). The thread must
    /// not have been joined yet when [`VcpuKicker::kick`] is called.
    pub fn for_thread(thread: libc::pthread_t) -> Self {
        VcpuKicker { thread }
    }

    /// A kicker for the calling thread.
    pub fn current() -> Self {
        // SAFETY: pthread_self has no preconditions.
        VcpuKicker {
            thread: unsafe { libc::pthread_self() },
        }
    }

    /// Interrupts the thread's `KVM_RUN` (or makes its next one return at
    /// once).
    pub fn kick(&self) -> Result<()> {
        install_kick_handler()?;
        // SAFETY: the handler for this signal is installed (above), so the
        // signal cannot terminate the process; the caller guarantees the
        // thread is alive.
        let ret = unsafe { libc::pthread_kill(self.thread, kick_signal()) };
        if ret != 0 {
            return Err(Error::Kick(std::io::Error::from_raw_os_error(ret)));
        }
        Ok(())
    }
}
