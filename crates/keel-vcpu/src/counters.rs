//! Exit counts by reason, shared with whoever reports metrics while the
//! vCPU thread runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why one vCPU left `KVM_RUN`, counted; read from any thread with
/// [`VcpuCounters::snapshot`]. Names follow Firecracker's `vcpu` metrics.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub(crate) io_in: AtomicU64,
    pub(crate) io_out: AtomicU64,
    pub(crate) mmio_read: AtomicU64,
    pub(crate) mmio_write: AtomicU64,
    pub(crate) ioapic_eoi: AtomicU64,
    pub(crate) hlt: AtomicU64,
    pub(crate) interrupted: AtomicU64,
    pub(crate) shutdown: AtomicU64,
    pub(crate) system_event: AtomicU64,
    pub(crate) internal_error: AtomicU64,
    pub(crate) completed_instructions: AtomicU64,
    pub(crate) failures: AtomicU64,
}

impl VcpuCounters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter by name: `exit_io_in`, `exit_io_out`,
    /// `exit_mmio_read`, `exit_mmio_write`, `exit_ioapic_eoi`, `exit_hlt`,
    /// `exit_interrupted`, `exit_shutdown`, `exit_system_event`,
    /// `exit_internal_error`, `completed_instructions`, `failures`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("exit_io_in", get(&self.io_in)),
            ("exit_io_out", get(&self.io_out)),
            ("exit_mmio_read", get(&self.mmio_read)),
            ("exit_mmio_write", get(&self.mmio_write)),
            ("exit_ioapic_eoi", get(&self.ioapic_eoi)),
            ("exit_hlt", get(&self.hlt)),
            ("exit_interrupted", get(&self.interrupted)),
            ("exit_shutdown", get(&self.shutdown)),
            ("exit_system_event", get(&self.system_event)),
            ("exit_internal_error", get(&self.internal_error)),
            ("completed_instructions", get(&self.completed_instructions)),
            ("failures", get(&self.failures)),
        ]
    }
}
