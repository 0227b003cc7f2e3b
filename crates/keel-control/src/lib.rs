//! Keel's control plane as a library: configure a VM, start it, pause and
//! resume it, press its power button, flush its metrics — the operations of
//! Firecracker's API, without HTTP.
//!
//! [`Vmm`] holds one VM's configuration in Firecracker's terms
//! ([`models`]: `machine-config`, `boot-source`, `drives`,
//! `network-interfaces`, `vsock`, `entropy`, `balloon`, `logger`,
//! `metrics`) and walks the state machine *Not started → Running ⇄ Paused*,
//! refusing what does not fit the state with an error that names the field
//! or the state ([`ControlError`]). `keel-api` serves it over HTTP on a Unix
//! socket; an embedder may drive it directly:
//!
//! ```
//! # if !std::path::Path::new("/dev/kvm").exists() { return; }
//! use keel_control::models::{ActionType, BootSource, MachineConfig, VmStateName};
//! use keel_control::{Vmm, VmmOptions, BUILT_IN_GUEST};
//!
//! let mut vmm = Vmm::new(VmmOptions::new("doc-vm"));
//! let mut machine = MachineConfig::default();
//! machine.mem_size_mib = 32;
//! vmm.put_machine_config(machine).unwrap();
//! vmm.put_boot_source(BootSource::new(BUILT_IN_GUEST).with_boot_args("pio-loop count=100000000")).unwrap();
//! vmm.action(ActionType::InstanceStart).unwrap();
//! vmm.set_vm_state(VmStateName::Paused).unwrap();
//! assert_eq!(vmm.instance_info().state, "Paused");
//! vmm.set_vm_state(VmStateName::Resumed).unwrap();
//! vmm.stop();
//! ```

#![deny(missing_docs)]

mod controller;
mod metrics;
pub mod models;

pub use controller::{
    ControlError, ExitCallback, ExitWatch, LogControl, Outcome, Vmm, VmmOptions, BUILT_IN_GUEST,
};
pub use metrics::MetricsRegistry;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ControlError>;
