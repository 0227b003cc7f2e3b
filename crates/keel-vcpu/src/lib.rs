//! One KVM virtual CPU: its configuration, its run loop and how to stop it.
//!
//! Everything a VMM decides about a vCPU lives here, in one place each:
//! CPUID as an explicit transform ([`CpuidConfig`]), boot MSRs, the
//! architectural state for Linux's 64-bit entry (GDT, identity page tables,
//! segments), the local APIC's LINT pins, and the run loop that turns KVM
//! exits into typed outcomes ([`RunOutcome`]) and sends port and MMIO
//! accesses to an [`ExitHandler`] — `vm-device`'s `IoManager` is one.
//!
//! A vCPU runs on its own thread; another thread stops it by setting a flag
//! and kicking it with a [`VcpuKicker`] (a signal plus `immediate_exit`).
//!
//! # Signals
//!
//! [`Vcpu::new`] installs, once per process, a handler for a real-time
//! signal ([`kick_signal`]: `SIGRTMIN` unless [`set_kick_signal`] chose
//! another before the first vCPU). The handler only sets `immediate_exit`
//! in the `kvm_run` of the vCPU the receiving thread is running, and does
//! nothing on any other thread. An embedder must leave that signal alone:
//! no handler of its own, not blocked on vCPU threads. See the `kick`
//! module documentation on [`VcpuKicker`] for how kicks stay sound after a
//! vCPU thread has exited.
//!
//! On hosts whose KVM emulates ring 0 in software, `int3` and `fwait`
//! cannot be emulated; the run loop completes them as the CPU would (#BP
//! after `int3`; `fwait` is a no-op unless an unmasked x87 exception is
//! pending, then #MF). Any other emulation failure is an
//! [`Error::InternalError`] naming RIP and the instruction bytes.
//!
//! # Example
//!
//! Run sixteen bytes of real-mode code that writes to a port and halts,
//! with nothing but this crate, `keel-memory` and KVM:
//!
//! ```
//! # if !std::path::Path::new("/dev/kvm").exists() { return; }
//! use std::sync::Mutex;
//! use keel_memory::{GuestLayout, MIB};
//! use keel_vcpu::{ExitHandler, RunOutcome, Vcpu};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! #[derive(Default)]
//! struct Ports(Mutex<Vec<(u16, u8)>>);
//! impl ExitHandler for Ports {
//!     fn pio_read(&self, _: u16, data: &mut [u8]) { data.fill(0) }
//!     fn pio_write(&self, port: u16, data: &[u8]) { self.0.lock().unwrap().push((port, data[0])) }
//!     fn mmio_read(&self, _: u64, data: &mut [u8]) { data.fill(0xff) }
//!     fn mmio_write(&self, _: u64, _: &[u8]) {}
//! }
//!
//! let layout = GuestLayout::new(2 * MIB).unwrap();
//! let mem = layout.create_memory().unwrap();
//! // mov al, 0x2a; out 0x80, al; hlt
//! mem.write_slice(&[0xb0, 0x2a, 0xe6, 0x80, 0xf4], GuestAddress(0x1000)).unwrap();
//!
//! let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
//! keel_memory::register_with_kvm(&vm, &mem).unwrap();
//! let mut vcpu = Vcpu::new(&vm, 0, mem).unwrap();
//! let mut sregs = vcpu.fd().get_sregs().unwrap();
//! sregs.cs.base = 0;
//! sregs.cs.selector = 0;
//! vcpu.fd().set_sregs(&sregs).unwrap();
//! let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
//! vcpu.fd().set_regs(&regs).unwrap();
//!
//! let ports = Ports::default();
//! assert_eq!(vcpu.run_once(&ports).unwrap(), RunOutcome::Continue);
//! assert_eq!(vcpu.run_once(&ports).unwrap(), RunOutcome::Halted);
//! assert_eq!(*ports.0.lock().unwrap(), vec![(0x80, 0x2a)]);
//! ```

#![deny(missing_docs)]
// Guest-facing code: no panic a guest could reach (issue 13). Tests may
// unwrap; the crate itself handles every failure or says why it cannot happen.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

mod boot_state;
mod complete;
mod counters;
mod cpuid;
mod exit_handler;
mod kick;
mod probe;
mod state;
mod vcpu;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use kvm_bindings;
#[doc(no_inline)]
pub use kvm_ioctls;
#[doc(no_inline)]
pub use vm_device;
#[doc(no_inline)]
pub use vm_memory;
#[doc(no_inline)]
pub use vmm_sys_util;

pub use boot_state::{
    boot_fpu, boot_msrs, gdt_entry, lint_pins_as_pc, long_mode_regs, long_mode_sregs, msr_index, pvh_regs,
    pvh_sregs, segment_from_gdt, write_boot_tables, BOOT_CS, BOOT_DS, BOOT_GDT, BOOT_TSS,
};
pub use counters::VcpuCounters;
pub use cpuid::{CpuidConfig, KVM_CPUID_FEATURES, KVM_FEATURES_WITHOUT_HYPERCALLS};
pub use exit_handler::ExitHandler;
pub use kick::{
    install_kick_handler, kick_signal, set_kick_signal, KickBinding, VcpuKicker, KICK_SIGNAL_OFFSET,
};
pub use probe::{probe_ring0_execution, Ring0Execution};
pub use state::{check_cpu_features, msrs_to_save, MissingCpuFeatures, VcpuState};
pub use vcpu::{RunOutcome, Vcpu, VcpuStop};

/// Errors from configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {op}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// Which vCPU.
        vcpu: u8,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("vCPU {vcpu}: KVM rejected MSR {index:#x}")]
    MsrRejected {
        /// Which vCPU.
        vcpu: u8,
        /// The first MSR not set.
        index: u32,
    },
    /// KVM could not emulate an instruction (or another internal error).
    #[error("vCPU {vcpu}: KVM internal error (suberror {suberror}) at RIP {rip:#x}, instruction bytes [{}]",
        .bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))]
    InternalError {
        /// Which vCPU.
        vcpu: u8,
        /// `KVM_INTERNAL_ERROR_*`; 1 is an emulation failure.
        suberror: u32,
        /// Guest RIP.
        rip: u64,
        /// Up to 15 bytes at RIP (fewer if unmapped).
        bytes: Vec<u8>,
    },
    /// The hardware refused to enter the guest.
    #[error("vCPU {vcpu}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})")]
    FailEntry {
        /// Which vCPU.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// An exit this loop does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// Which vCPU.
        vcpu: u8,
        /// The exit, formatted.
        exit: String,
    },
    /// The boot tables could not be written.
    #[error("cannot write boot {what} at {addr:#x}: {source}")]
    BootTables {
        /// Which table.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
    /// The ring-0 execution probe could not run.
    #[error("ring-0 execution probe: {0}")]
    Probe(String),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(std::io::Error),
    /// Sending a kick failed.
    #[error("cannot kick vCPU thread: {0}")]
    Kick(std::io::Error),
    /// A vCPU state could not be saved or restored.
    #[error("vCPU {vcpu}: snapshot: {reason}")]
    Snapshot {
        /// Which vCPU.
        vcpu: u8,
        /// What went wrong, naming the value.
        reason: String,
    },
    /// A kick signal that cannot be used.
    #[error("kick signal {signal}: {reason}")]
    KickSignal {
        /// The signal number asked for.
        signal: i32,
        /// Why it cannot be used.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
