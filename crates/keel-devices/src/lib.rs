//! Platform devices for Keel virtual machines, on rust-vmm's I/O buses.
//!
//! A PC guest expects a few devices at fixed I/O ports before it expects
//! anything else: a serial port to talk on, the keyboard controller's reset
//! line to reboot with. This crate provides them as `vm-device`
//! [`MutDevicePio`] devices, so a VMM — or any program embedding one —
//! registers them on a [`vm_device::device_manager::IoManager`] next to its
//! own devices and routes port I/O exits through it. No bus of Keel's own.
//!
//! Devices never see the VM: they raise interrupts through a
//! [`keel_irq::InterruptLine`] and ask for a reset or an exit through a
//! [`PowerControl`], and both have test doubles
//! ([`keel_irq::RecordingLine`], [`RecordingPowerControl`]).
//!
//! - [`SerialConsole`]: a 16550 UART (`vm-superio`) writing the guest's
//!   output to any [`std::io::Write`]; [`SerialInput`] feeds it host input
//!   from an `event-manager` loop, with backpressure.
//! - [`I8042Reset`]: the keyboard controller's CPU reset command.
//! - [`ExitPort`]: a port the guest writes its exit status to.
//! - [`Rtc`]: the CMOS real-time clock (MC146818) on the host's wall clock.
//! - [`AcpiSleep`] and [`Ged`]: the ACPI platform's sleep registers (power
//!   off) and generic event device (the power button).
//! - [`ports`]: where a PC guest looks for each of them.
//!
//! Nothing the guest does to these devices — any port, any access size, any
//! value — panics the VMM; unsupported accesses are counted and ignored.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use keel_devices::{ports, ExitPort, PowerRequest, RecordingPowerControl, SerialConsole};
//! use keel_irq::RecordingLine;
//! use vm_device::bus::PioAddress;
//! use vm_device::device_manager::{IoManager, PioManager};
//!
//! let irq = Arc::new(RecordingLine::new());
//! let power = Arc::new(RecordingPowerControl::new());
//! let console = Arc::new(Mutex::new(SerialConsole::new(irq, Vec::new()).unwrap()));
//!
//! let mut io = IoManager::new();
//! io.register_pio(ports::com1_range(), console.clone()).unwrap();
//! io.register_pio(
//!     ports::exit_port_range(),
//!     Arc::new(Mutex::new(ExitPort::new(power.clone()))),
//! )
//! .unwrap();
//!
//! // What a vCPU's port I/O exits turn into:
//! for &byte in b"hi\n" {
//!     io.pio_write(PioAddress(ports::COM1), &[byte]).unwrap();
//! }
//! io.pio_write(PioAddress(ports::EXIT_PORT), &[0]).unwrap();
//!
//! assert_eq!(console.lock().unwrap().output(), b"hi\n");
//! assert_eq!(power.requests(), [PowerRequest::Exit(0)]);
//! ```
//!
//! [`MutDevicePio`]: vm_device::MutDevicePio

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

mod acpi;
mod boot_timer;
mod exit_port;
mod i8042;
pub mod ports;
mod power;
mod rtc;
mod serial;
mod serial_input;

// The rust-vmm crates this crate's public API uses, re-exported so that
// a user's Cargo.toml needs only Keel crates (and gets the same versions).
#[doc(no_inline)]
pub use event_manager;
#[doc(no_inline)]
pub use vm_device;
#[doc(no_inline)]
pub use vm_superio;
#[doc(no_inline)]
pub use vmm_sys_util;

pub use acpi::{ged_event, AcpiSleep, Ged, GedHandle, SLEEP_ENABLE, SLEEP_TYPE_SOFT_OFF};
pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use exit_port::ExitPort;
pub use i8042::I8042Reset;
pub use power::{PowerControl, PowerRequest, RecordingPowerControl};
pub use rtc::{rtc_reg, DateTime, HostClock, Rtc, RtcState, WallClock};
pub use serial::{SerialConsole, SerialConsoleState, SERIAL_FIFO_SIZE};
pub use serial_input::SerialInput;

/// What a read returns from bytes a device does not decode: all ones, as an
/// unclaimed ISA bus reads.
const UNDECODED_READ: u8 = 0xff;

/// Errors from building or feeding the devices in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A saved device state that does not fit the device.
    #[error("{device} state: {reason}")]
    State {
        /// The device.
        device: &'static str,
        /// What is wrong, naming the value.
        reason: String,
    },
    /// The eventfd a serial console signals when its input drains could not
    /// be created.
    #[error("cannot create the serial console's input-drained eventfd: {0}")]
    CreateEventFd(#[source] std::io::Error),
    /// The serial console's input-drained eventfd could not be duplicated.
    #[error("cannot duplicate the serial console's input-drained eventfd: {0}")]
    CloneEventFd(#[source] std::io::Error),
    /// Input was queued for the guest but its interrupt could not be raised.
    #[error("queued {queued} input bytes for the guest but could not raise the serial interrupt: {source}")]
    InputInterrupt {
        /// How many bytes were queued regardless.
        queued: usize,
        /// Why the interrupt failed.
        #[source]
        source: keel_irq::Error,
    },
    /// A port range was empty or ran past the last port.
    #[error("I/O port range at {base:#x} with {count} ports is empty or runs past port 0xffff")]
    InvalidPortRange {
        /// First port of the range.
        base: u16,
        /// Number of ports asked for.
        count: u16,
    },
}

/// Result of the operations in this crate.
pub type Result<T> = std::result::Result<T, Error>;
