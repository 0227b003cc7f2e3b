//! Getting a vCPU thread out of `KVM_RUN` from another thread.
//!
//! A kick is a real-time signal sent to the vCPU thread. Its handler sets
//! `immediate_exit` in that thread's `kvm_run`, so the kick is not lost even
//! when it lands just before the thread enters `KVM_RUN`: KVM then returns
//! `EINTR` at once. The caller sets whatever flag it wants the vCPU to see
//! (stop, pause) *before* kicking.
//!
//! # The signal
//!
//! The first [`crate::Vcpu::new`] (or [`install_kick_handler`]) installs a
//! process-wide handler for [`kick_signal`] — `SIGRTMIN` unless the
//! embedder chose another real-time signal with [`set_kick_signal`] before
//! that. The handler only writes one byte of the current thread's
//! `kvm_run`, and does nothing on a thread that is not running a vCPU, so
//! the signal is harmless to every other thread. An embedder must not
//! install its own handler for that signal, block it on vCPU threads, or
//! use it for anything else.
//!
//! # Kicking safely
//!
//! Signalling a thread that has exited (and was joined) is undefined
//! behaviour, so a [`VcpuKicker`] never holds a bare thread handle: the
//! vCPU thread *binds* itself ([`VcpuKicker::bind_current_thread`]) and the
//! binding ends, under the same lock [`VcpuKicker::kick`] takes, when the
//! returned [`KickBinding`] is dropped on that thread — before it can
//! exit. A kick after that is a no-op that says so.

use std::cell::Cell;
use std::marker::PhantomData;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMAX, SIGRTMIN};

use crate::{Error, Result};

/// Offset from `SIGRTMIN` of the default kick signal.
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

/// The embedder's choice (0: the default).
static CHOSEN_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The signal the handler was installed for, or the errno that stopped it.
static INSTALLED: OnceLock<std::result::Result<c_int, i32>> = OnceLock::new();

/// The signal used for kicks: the one installed, else the one chosen with
/// [`set_kick_signal`], else `SIGRTMIN + KICK_SIGNAL_OFFSET`.
pub fn kick_signal() -> c_int {
    if let Some(Ok(signal)) = INSTALLED.get() {
        return *signal;
    }
    match CHOSEN_SIGNAL.load(Ordering::Acquire) {
        0 => SIGRTMIN() + KICK_SIGNAL_OFFSET,
        chosen => chosen,
    }
}

/// Chooses the real-time signal used for kicks, for an embedder whose
/// process already uses `SIGRTMIN`. Call it before the first vCPU is
/// created. Fails, naming the number, for a signal outside
/// `SIGRTMIN..=SIGRTMAX`, or if the handler is already installed for
/// another signal.
pub fn set_kick_signal(signal: c_int) -> Result<()> {
    if !(SIGRTMIN()..=SIGRTMAX()).contains(&signal) {
        return Err(Error::KickSignal {
            signal,
            reason: format!(
                "not a real-time signal (SIGRTMIN {} to SIGRTMAX {})",
                SIGRTMIN(),
                SIGRTMAX()
            ),
        });
    }
    if let Some(Ok(installed)) = INSTALLED.get() {
        if *installed != signal {
            return Err(Error::KickSignal {
                signal,
                reason: format!("the kick handler is already installed for signal {installed}"),
            });
        }
    }
    CHOSEN_SIGNAL.store(signal, Ordering::Release);
    Ok(())
}

/// Installs the kick signal handler for the process. Idempotent; called by
/// [`crate::Vcpu::new`], so a vCPU thread can always be kicked safely.
pub fn install_kick_handler() -> Result<()> {
    INSTALLED
        .get_or_init(|| {
            let signal = kick_signal();
            register_signal_handler(signal, handle_kick)
                .map(|()| signal)
                .map_err(|e| e.errno())
        })
        .map(|_| ())
        .map_err(|errno| Error::KickHandler(std::io::Error::from_raw_os_error(errno)))
}

/// Marks the current thread as running a vCPU whose `kvm_run` is `run`
/// until dropped, when the previous mark comes back (guards nest).
pub(crate) struct RunningGuard {
    previous: *mut kvm_run,
}

impl RunningGuard {
    pub(crate) fn new(run: *mut kvm_run) -> Self {
        RunningGuard {
            previous: RUNNING_KVM_RUN.with(|r| r.replace(run)),
        }
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING_KVM_RUN.with(|r| r.set(self.previous));
    }
}

/// The thread a kicker reaches, while it is bound.
#[derive(Debug, Default)]
struct KickTarget {
    thread: Mutex<Option<libc::pthread_t>>,
}

/// A handle that kicks one vCPU thread out of `KVM_RUN`, from any thread.
///
/// Make it before starting the vCPU thread, hand a clone to that thread,
/// which calls [`bind_current_thread`](Self::bind_current_thread) first
/// thing and keeps the binding while it runs the vCPU. Kicks before the
/// binding or after it ended do nothing and return `Ok(false)`.
///
/// ```
/// use keel_vcpu::VcpuKicker;
///
/// let kicker = VcpuKicker::new();
/// let for_thread = kicker.clone();
/// let thread = std::thread::spawn(move || {
///     let _bound = for_thread.bind_current_thread();
///     // ... run the vCPU until a flag set before the kick says stop ...
/// });
/// thread.join().unwrap();
/// assert!(!kicker.kick().unwrap(), "the thread is gone: nothing to kick");
/// ```
#[derive(Clone, Debug, Default)]
pub struct VcpuKicker {
    target: Arc<KickTarget>,
}

/// Keeps a [`VcpuKicker`] bound to the thread that made it; dropping it
/// (on that thread) unbinds. Not `Send`: it must end on its own thread.
#[derive(Debug)]
#[must_use = "the kicker is unbound as soon as the binding is dropped"]
pub struct KickBinding {
    target: Arc<KickTarget>,
    _on_this_thread: PhantomData<*const ()>,
}

impl Drop for KickBinding {
    fn drop(&mut self) {
        *self.target.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl VcpuKicker {
    /// A kicker not bound to any thread yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds this kicker (and its clones) to the calling thread until the
    /// returned binding is dropped.
    pub fn bind_current_thread(&self) -> KickBinding {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.target.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
        KickBinding {
            target: self.target.clone(),
            _on_this_thread: PhantomData,
        }
    }

    /// Interrupts the bound thread's `KVM_RUN` (or makes its next one
    /// return at once). `Ok(true)` if a thread was signalled, `Ok(false)` if
    /// none is bound.
    pub fn kick(&self) -> Result<bool> {
        install_kick_handler()?;
        let thread = self.target.thread.lock().unwrap_or_else(|e| e.into_inner());
        let Some(thread) = *thread else {
            return Ok(false);
        };
        // SAFETY: the handler for this signal is installed (above), so the
        // signal cannot terminate the process; the thread is alive: it is
        // bound, and it can only unbind (before exiting) by taking the lock
        // this function holds.
        let ret = unsafe { libc::pthread_kill(thread, kick_signal()) };
        if ret != 0 {
            return Err(Error::Kick(std::io::Error::from_raw_os_error(ret)));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn kicking_a_thread_that_has_exited_and_was_joined_is_a_no_op() {
        let kicker = VcpuKicker::new();
        assert!(!kicker.kick().unwrap(), "not bound yet");
        let for_thread = kicker.clone();
        std::thread::spawn(move || {
            let _bound = for_thread.bind_current_thread();
        })
        .join()
        .unwrap();
        assert!(!kicker.kick().unwrap());
    }

    #[test]
    fn a_bound_thread_is_signalled_and_survives() {
        let kicker = VcpuKicker::new();
        let for_thread = kicker.clone();
        let (bound_tx, bound_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _bound = for_thread.bind_current_thread();
            bound_tx.send(()).unwrap();
            // Sleeps through the kick: the handler does nothing off a vCPU.
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        });
        bound_rx.recv().unwrap();
        assert!(kicker.kick().unwrap());
        assert!(kicker.kick().unwrap());
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        assert!(!kicker.kick().unwrap());
    }

    #[test]
    fn only_real_time_signals_can_be_chosen_and_they_are_named() {
        let e = set_kick_signal(libc::SIGUSR1).unwrap_err().to_string();
        assert!(
            e.contains(&format!("signal {}", libc::SIGUSR1)) && e.contains("real-time"),
            "{e}"
        );
        let e = set_kick_signal(SIGRTMAX() + 1).unwrap_err().to_string();
        assert!(e.contains(&format!("signal {}", SIGRTMAX() + 1)), "{e}");
        // Choosing the signal already in use is fine; another one once the
        // handler is installed is refused.
        install_kick_handler().unwrap();
        set_kick_signal(kick_signal()).unwrap();
        let other = if kick_signal() == SIGRTMAX() {
            SIGRTMIN()
        } else {
            kick_signal() + 1
        };
        let e = set_kick_signal(other).unwrap_err().to_string();
        assert!(e.contains("already installed"), "{e}");
    }
}
