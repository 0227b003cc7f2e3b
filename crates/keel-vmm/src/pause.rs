//! Pausing a running VM: every vCPU thread out of `KVM_RUN` and the event
//! loop between two events, all parked until resumed.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the VM's threads park while it is paused.
///
/// Each thread that runs guest code or touches guest memory (the vCPU
/// threads and the event loop) is a *participant*: it is counted in before
/// the VM starts, parks at a consistent point when a pause is requested
/// (a vCPU between two `KVM_RUN`s, the event loop between two events, so no
/// request is half-processed), and is counted out when it ends.
#[derive(Debug, Default)]
pub(crate) struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// A pause was requested and not yet undone.
    requested: bool,
    /// The VM is ending: nobody parks any more.
    closed: bool,
    /// Threads that may park.
    participants: usize,
    /// Threads parked now.
    parked: usize,
    /// Bumped by [`PauseGate::run_work`]: each parked thread runs its work
    /// once per bump.
    work: u64,
    /// Threads that ran the current work.
    work_done: usize,
}

impl PauseGate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts in one more thread; called before it is started.
    pub fn join(&self) {
        self.state().participants += 1;
    }

    /// Counts a thread out as it ends.
    pub fn leave(&self) {
        let mut state = self.state();
        state.participants = state.participants.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Parks the calling participant while a pause is requested. Returns
    /// whether it parked.
    pub fn park_if_requested(&self) -> bool {
        self.park_if_requested_with(&mut || {})
    }

    /// [`Self::park_if_requested`], running `work` on this thread each time
    /// [`Self::run_work`] asks while parked (a vCPU saving its state: KVM
    /// wants a vCPU's ioctls from the thread that runs it).
    pub fn park_if_requested_with(&self, work: &mut dyn FnMut()) -> bool {
        let mut state = self.state();
        if !state.requested || state.closed {
            return false;
        }
        state.parked += 1;
        self.changed.notify_all();
        let mut seen = state.work;
        while state.requested && !state.closed {
            if state.work != seen {
                seen = state.work;
                drop(state);
                work();
                state = self.state();
                state.work_done += 1;
                self.changed.notify_all();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
        true
    }

    /// Records a pause request; `false` if one is already in force or the
    /// VM is ending.
    pub fn request(&self) -> bool {
        let mut state = self.state();
        if state.requested || state.closed {
            return false;
        }
        state.requested = true;
        true
    }

    /// Waits until every participant is parked, at most `timeout`.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while state.parked < state.participants && !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !state.closed
    }

    /// While every participant is parked: has each run its work once (see
    /// [`Self::park_if_requested_with`]) and waits for all of them, at most
    /// `timeout`. `false` if the VM is not paused, ends meanwhile, or a
    /// thread did not finish in time.
    pub fn run_work(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        if !state.requested || state.closed || state.parked < state.participants {
            return false;
        }
        state.work += 1;
        state.work_done = 0;
        let everyone = state.participants;
        self.changed.notify_all();
        while state.work_done < everyone && !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !state.closed
    }

    /// Lifts the pause; `false` if none was in force.
    pub fn release(&self) -> bool {
        let mut state = self.state();
        let was = std::mem::replace(&mut state.requested, false);
        self.changed.notify_all();
        was
    }

    /// The VM is ending: parked threads go on to end too.
    pub fn close(&self) {
        self.state().closed = true;
        self.changed.notify_all();
    }

    /// Whether a pause is in force.
    pub fn is_paused(&self) -> bool {
        let state = self.state();
        state.requested && !state.closed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_pause_waits_for_every_participant_and_a_release_lets_them_go() {
        let gate = Arc::new(PauseGate::default());
        gate.join();
        gate.join();
        assert!(gate.request());
        assert!(!gate.request(), "a second request while paused is refused");
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.park_if_requested())
            })
            .collect();
        assert!(gate.wait_parked(Duration::from_secs(5)));
        assert!(gate.is_paused());
        assert!(gate.release());
        for t in threads {
            assert!(t.join().unwrap());
        }
        assert!(!gate.is_paused());
        assert!(!gate.release(), "nothing to release");
    }

    #[test]
    fn a_participant_that_never_parks_times_the_pause_out() {
        let gate = PauseGate::default();
        gate.join();
        assert!(gate.request());
        assert!(!gate.wait_parked(Duration::from_millis(20)));
    }

    #[test]
    fn closing_frees_parked_threads_and_ends_pausing() {
        let gate = Arc::new(PauseGate::default());
        gate.join();
        gate.request();
        let parked = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.park_if_requested())
        };
        assert!(gate.wait_parked(Duration::from_secs(5)));
        gate.close();
        assert!(parked.join().unwrap());
        assert!(!gate.is_paused());
        assert!(!gate.request());
    }

    #[test]
    fn work_runs_once_on_every_parked_thread_and_only_while_paused() {
        let gate = Arc::new(PauseGate::default());
        assert!(!gate.run_work(Duration::from_millis(10)), "not paused");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        gate.join();
        gate.join();
        assert!(gate.request());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                let runs = runs.clone();
                std::thread::spawn(move || {
                    gate.park_if_requested_with(&mut || {
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    })
                })
            })
            .collect();
        assert!(gate.wait_parked(Duration::from_secs(5)));
        assert!(gate.run_work(Duration::from_secs(5)));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(gate.run_work(Duration::from_secs(5)));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 4);
        gate.release();
        for t in threads {
            assert!(t.join().unwrap());
        }
    }
}
