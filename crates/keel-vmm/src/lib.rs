//! The thin orchestrator: compose Keel's layers into a running VM.
//!
//! [`VmConfig`] says what the VM is (as data, from JSON or code);
//! [`VmBuilder`] validates it, takes the devices and console a caller adds,
//! and builds a [`Vm`]: KVM objects, guest memory (`keel-memory`), the
//! interrupt controller (`keel-irq`: by default a split irqchip, local APICs
//! in KVM and the IOAPIC in user space; or KVM's in-kernel one), the
//! platform devices on the I/O bus (`keel-devices`), ACPI tables, the
//! kernel and its boot information (`keel-boot`), the virtio devices on PCI
//! or MMIO (`keel-virtio`, your own included:
//! [`VmBuilder::add_virtio_device`], [`VmBuilder::add_disk`]) and the vCPUs
//! (`keel-vcpu`). [`Vm::start`] runs one thread
//! per vCPU and returns a [`VmHandle`] to wait on; [`StopHandle`] stops it
//! from anywhere. There is no global state and nothing here exits the
//! process, so one process can run many VMs.
//!
//! # The built-in test guest
//!
//! Without a kernel the VM boots Keel's built-in guest (`keel-guest`): the
//! command line names one of its programs (`hello`, `mmio-rw`,
//! `virtio-blk`, `virtio-request`, … — the list, arguments and status codes
//! are in `keel_guest`'s documentation), and the guest ends the VM with
//! [`ExitReason::GuestExit`]`(0)` when every check passed, 1 when one failed
//! (after a `FAIL:` line on the serial console), 2 for bad arguments.
//!
//! # Signals
//!
//! vCPU threads are kicked out of `KVM_RUN` with a real-time signal whose
//! handler `keel-vcpu` installs once per process; see its documentation.
//!
//! # Example
//!
//! Boot the built-in test guest and capture its serial console:
//!
//! ```
//! # if !std::path::Path::new("/dev/kvm").exists() { return; }
//! use std::sync::{Arc, Mutex};
//! use keel_vmm::{ExitReason, VmBuilder, VmConfig};
//!
//! #[derive(Clone, Default)]
//! struct Capture(Arc<Mutex<Vec<u8>>>);
//! impl std::io::Write for Capture {
//!     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> { self.0.lock().unwrap().extend_from_slice(b); Ok(b.len()) }
//!     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! let console = Capture::default();
//! let mut config = VmConfig::default();
//! config.memory_mib = 32;
//! let vm = VmBuilder::new(config).unwrap().serial_output(console.clone()).build().unwrap();
//! assert_eq!(vm.run().unwrap(), ExitReason::GuestExit(0));
//! let text = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
//! assert!(text.contains("Keel test guest"), "{text}");
//! ```

#![deny(missing_docs)]

mod boot_progress;
mod config;
mod host;
mod pause;
mod pci;
mod snapshot;
mod vm;

#[doc(no_inline)]
pub use event_manager;
#[doc(no_inline)]
pub use kvm_bindings;
/// The rate limiter behind [`RateLimiterConfig`].
// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use kvm_ioctls;
#[doc(no_inline)]
pub use vm_allocator;
#[doc(no_inline)]
pub use vm_device;
#[doc(no_inline)]
pub use vm_memory;
#[doc(no_inline)]
pub use vmm_sys_util;

pub use keel_ratelimit;
/// Seccomp filters per thread role, which the VM's threads install.
pub use keel_seccomp;
pub use keel_seccomp::SeccompLevel;
/// The virtio layer whose devices and backends [`VmBuilder`] takes.
pub use keel_virtio;

pub use boot_progress::{ConsoleWatcher, RUN_INIT_MARKER};
pub use config::{
    BalloonConfig, BootProtocolChoice, ConsoleConfig, DiskConfig, IrqchipChoice, NetConfig,
    RateLimiterConfig, Ring0Choice, SerialMode, TokenBucketConfig, VirtioTransport, VmConfig, VsockConfig,
    DEFAULT_GUEST_CMDLINE, DEFAULT_LINUX_CMDLINE, DEFAULT_LINUX_PCI_CMDLINE, MAX_VCPUS,
};
pub use keel_memory::RestoreMode;
pub use snapshot::{
    merge_diff_snapshot, IrqchipState, MemoryContents, SavedTransport, SavedVirtioDevice, Snapshot,
    SnapshotInfo, SnapshotKind, VmState, MEMORY_FILE_NAME, STATE_FILE_NAME,
};
pub use vm::{
    Counters, ExitReason, SerialSource, StopHandle, Vm, VmBuilder, VmController, VmHandle, BOOT_TIMER_ADDR,
    DEFAULT_KVM_DEVICE, EMULATED_RING0_CMDLINE,
};

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The KVM device could not be opened.
    #[error("cannot open {}: {source} (is KVM enabled and may this user open it?)", path.display())]
    OpenKvm {
        /// The device node.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The KVM device speaks another API version.
    #[error("{}: KVM reports API version {version}; Keel needs {expected}", path.display(), expected = kvm_bindings::KVM_API_VERSION)]
    KvmApiVersion {
        /// The device node opened.
        path: std::path::PathBuf,
        /// The version it reported.
        version: i32,
    },
    /// The file opened as the KVM device does not answer KVM's ioctls.
    #[error("{}: not a KVM device (it does not answer KVM_GET_API_VERSION)", path.display())]
    NotKvm {
        /// The path opened.
        path: std::path::PathBuf,
    },
    /// A VM-level KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] keel_memory::Error),
    /// The interrupt controller could not be set up.
    #[error(transparent)]
    Irq(#[from] keel_irq::Error),
    /// A device could not be placed on a bus.
    #[error("device placement: {0}")]
    DeviceRange(String),
    /// The kernel or its boot information could not be loaded.
    #[error("boot: {0}")]
    Boot(String),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] keel_vcpu::Error),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(std::io::Error),
    /// The operation does not fit the VM's state (resume while running,
    /// pause after it ended).
    #[error("{0}")]
    InvalidState(String),
    /// A snapshot could not be taken or restored (the message names the
    /// file, device or value).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A thread could not be started.
    #[error("cannot start a VM thread: {0}")]
    Thread(std::io::Error),
    /// A VM thread could not install its seccomp filter (the message
    /// names the role; `VmConfig::seccomp` set to `off` runs without).
    #[error("{0}")]
    Seccomp(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
