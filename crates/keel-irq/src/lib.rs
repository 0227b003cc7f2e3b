//! Interrupt plumbing for Keel virtual machines.
//!
//! A device model needs exactly one thing from the interrupt controller: a way
//! to raise its interrupt. This crate gives devices that as an
//! [`InterruptLine`] handle, so no device ever holds a `VmFd` and every device
//! can be tested against a [`RecordingLine`] instead of a real VM. Behind the
//! handle, the policy of how a virtual machine's interrupts are wired lives
//! here, in one place:
//!
//! - [`create_in_kernel_irqchip`] sets up KVM's in-kernel PIC, IOAPIC and
//!   PIT, the x86 platform's interrupt controllers and timer;
//! - [`GsiAllocator`] hands out IOAPIC pins (GSIs) to devices, keeping the ISA
//!   interrupts that legacy devices hardwire for those who ask for them by
//!   number;
//! - [`IrqfdLine`] is an [`InterruptLine`] backed by a KVM irqfd: triggering
//!   it is one `write(2)` to an eventfd, and KVM injects the interrupt without
//!   the VMM touching the vCPU;
//! - [`enable_split_irqchip`] and [`Ioapic`] are the alternative to the
//!   in-kernel irqchip: KVM's split irqchip keeps only the local APICs in the
//!   kernel (VM teardown then skips the SRCU grace period that the in-kernel
//!   PIC and IOAPIC cost), and [`Ioapic`] is the user-space IOAPIC, an MMIO
//!   device whose redirection entries become KVM MSI routes through an
//!   [`MsiRouter`]. Devices keep their [`IrqfdLine`]s, and KVM still injects
//!   without the VMM.
//! - [`GsiRouting`] is the VM's one GSI routing table, merged from the
//!   interrupt controller's routes (the in-kernel irqchip's defaults, or the
//!   user-space [`Ioapic`]'s) and the MSI routes of PCI devices, because
//!   `KVM_SET_GSI_ROUTING` replaces the whole table; [`MsiVectors`]
//!   ([`IrqfdMsiVectors`], [`RecordingMsiVectors`]) is what an MSI-X
//!   capability raises its vectors through.
//!
//! # Example: split irqchip
//!
//! ```
//! use std::sync::Arc;
//! use keel_irq::{enable_split_irqchip, InterruptLine, Ioapic, IrqfdLine};
//!
//! let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
//! // Before any vCPU exists, instead of create_in_kernel_irqchip:
//! enable_split_irqchip(&vm).unwrap();
//! let vm = Arc::new(vm);
//! let line = IrqfdLine::new(&vm, 5).unwrap();
//! // Register this on the MMIO bus at Ioapic::BASE; the guest programs it.
//! let mut ioapic = Ioapic::new(vm.clone());
//! ioapic.write(0x00, &0x1au32.to_le_bytes()); // low dword of entry 5
//! ioapic.write(0x10, &0x31u32.to_le_bytes()); // vector 0x31, unmasked
//! assert_eq!(ioapic.route_errors(), 0);
//! line.trigger().unwrap(); // an MSI with vector 0x31 to APIC ID 0
//! ```
//!
//! # Example: in-kernel irqchip
//!
//! ```
//! use keel_irq::{create_in_kernel_irqchip, GsiAllocator, InterruptLine, IrqfdLine};
//!
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! let vm = kvm.create_vm().unwrap();
//! // Before any vCPU exists:
//! create_in_kernel_irqchip(&vm).unwrap();
//!
//! let mut gsis = GsiAllocator::new();
//! let gsi = gsis.allocate().unwrap();
//! let line = IrqfdLine::new(&vm, gsi).unwrap();
//!
//! // What a device does when it wants the guest's attention:
//! line.trigger().unwrap();
//! assert_eq!(line.gsi(), gsi);
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

mod gsi;
mod irqchip;
mod line;
mod routing;
mod split;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use kvm_bindings;
#[doc(no_inline)]
pub use kvm_ioctls;
#[doc(no_inline)]
pub use vm_device;
#[doc(no_inline)]
pub use vmm_sys_util;

pub use gsi::{GsiAllocator, IOAPIC_PINS, LEGACY_ISA_GSIS};
pub use irqchip::{create_in_kernel_irqchip, set_pit_ticks, KernelIrqchipState, PitTicks};
pub use line::{InterruptLine, IrqfdLine, RecordingLine};
pub use routing::{
    default_irqchip_routes, GsiRoute, GsiRouting, IrqfdMsiVectors, MsiMessage, MsiVectors,
    RecordingMsiVectors, RecordingRoutes, RouteInstaller, FIRST_MSI_GSI, MSI_GSI_END,
};
pub use split::{
    enable_split_irqchip, Ioapic, IoapicState, MsiRoute, MsiRouter, RecordingRouter, ROUTE_UPDATE_LIMIT,
};

/// Errors from setting up or raising interrupts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the in-kernel irqchip's state failed.
    #[error("{op} (chip {chip}) failed: {source}")]
    IrqchipState {
        /// The ioctl.
        op: &'static str,
        /// `KVM_IRQCHIP_*` (0 master PIC, 1 slave PIC, 2 IOAPIC; 3 the PIT).
        chip: u32,
        /// What KVM reported.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved IOAPIC state that does not fit.
    #[error("IOAPIC state: {0}")]
    IoapicState(String),
    /// KVM refused to create the in-kernel PIC and IOAPIC.
    #[error("KVM_CREATE_IRQCHIP failed: {0} (it must be called once per VM, before any vCPU is created)")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// KVM refused to create the in-kernel PIT.
    #[error("KVM_CREATE_PIT2 with flags {flags:#x} failed: {source}")]
    CreatePit {
        /// The `kvm_pit_config` flags that were passed.
        flags: u32,
        /// What KVM reported.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused to set the PIT's tick policy (there is no in-kernel PIT,
    /// or the host lacks `KVM_CAP_REINJECT_CONTROL`).
    #[error("KVM_REINJECT_CONTROL ({ticks:?}) failed: {source}")]
    PitTicks {
        /// The policy that was asked for.
        ticks: PitTicks,
        /// What KVM reported.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused to enable the split irqchip.
    #[error(
        "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP) with {pins} IOAPIC routes failed: {source} \
         (it must be called once per VM, before any vCPU is created, and not together with KVM_CREATE_IRQCHIP)"
    )]
    EnableSplitIrqchip {
        /// The number of GSI routes reserved for the userspace IOAPIC.
        pins: u32,
        /// What KVM reported.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Every GSI that [`GsiAllocator::allocate`] may hand out is in use.
    #[error(
        "no free GSI: every IOAPIC GSI in 0..={last} outside the legacy ISA set {legacy:?} is in use",
        last = IOAPIC_PINS - 1,
        legacy = LEGACY_ISA_GSIS
    )]
    GsiExhausted,
    /// A GSI outside the IOAPIC's pins was asked for.
    #[error("GSI {gsi} is outside the IOAPIC's range 0..={last}", last = IOAPIC_PINS - 1)]
    GsiOutOfRange {
        /// The GSI that was asked for.
        gsi: u32,
    },
    /// A GSI was reserved twice, or reserved after it had been allocated.
    #[error("GSI {gsi} is already in use")]
    GsiInUse {
        /// The GSI that was asked for.
        gsi: u32,
    },
    /// The eventfd behind an irqfd could not be created.
    #[error("cannot create the eventfd for GSI {gsi}: {source}")]
    CreateEventFd {
        /// The GSI the eventfd was for.
        gsi: u32,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused to attach an eventfd to a GSI.
    #[error("KVM_IRQFD for GSI {gsi} failed: {source} (does the VM have an in-kernel or split irqchip?)")]
    RegisterIrqfd {
        /// The GSI the irqfd was for.
        gsi: u32,
        /// What KVM reported.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Signalling an interrupt line's eventfd failed.
    #[error("cannot trigger GSI {gsi}: writing its eventfd failed: {source}")]
    Trigger {
        /// The GSI of the line.
        gsi: u32,
        /// What the host reported.
        #[source]
        source: std::io::Error,
    },
    /// Every GSI [`GsiRouting::allocate_msi_gsi`] may hand out is in use.
    #[error("no free MSI GSI: every GSI in {first}..{end} is in use")]
    MsiGsiExhausted {
        /// The first MSI GSI.
        first: u32,
        /// One past the last.
        end: u32,
    },
    /// A route for a GSI that [`GsiRouting::allocate_msi_gsi`] never gave.
    #[error("GSI {gsi} is not an allocated MSI GSI")]
    MsiGsiNotAllocated {
        /// The GSI asked for.
        gsi: u32,
    },
    /// KVM refused the merged routing table after a route changed.
    #[error("KVM_SET_GSI_ROUTING after changing the route of GSI {gsi} failed: {source}")]
    SetGsiRouting {
        /// The GSI whose route changed.
        gsi: u32,
        /// What KVM reported.
        #[source]
        source: std::io::Error,
    },
    /// An MSI vector a device does not have.
    #[error("MSI vector {vector} does not exist (the device has {count})")]
    NoSuchVector {
        /// The vector asked for.
        vector: u16,
        /// How many the device has.
        count: u16,
    },
    /// A [`RecordingLine`] was told to fail, and did.
    #[error("trigger refused: this RecordingLine was set to fail (RecordingLine::set_failing)")]
    InjectedFailure,
}

/// Result of the operations in this crate.
pub type Result<T> = std::result::Result<T, Error>;
