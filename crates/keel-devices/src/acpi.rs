//! The ACPI platform's hardware: the sleep registers a guest powers off
//! with, and the generic event device that brings it the power button.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use keel_irq::InterruptLine;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::PowerControl;

/// `SLP_EN`: the sleep control register's "enter the sleep state" bit.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// `SLP_TYP` of S5 (soft off), as Keel's DSDT declares it in `\_S5`.
pub const SLEEP_TYPE_SOFT_OFF: u8 = 5;

/// The hardware-reduced ACPI sleep control (offset 0) and status (offset
/// 1) registers, one byte each.
///
/// Writing `SLP_EN | SLP_TYP << 2` with `SLP_TYP` 5 (S5) to the control
/// register powers the machine off ([`PowerControl::request_power_off`]).
/// Other sleep states are not supported: the write is ignored, so the
/// guest's sleep attempt fails and it carries on. The status register
/// reads 0 (never woken from sleep).
///
/// ```
/// use std::sync::Arc;
/// use keel_devices::{AcpiSleep, PowerRequest, RecordingPowerControl, SLEEP_ENABLE};
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let power = Arc::new(RecordingPowerControl::new());
/// let mut sleep = AcpiSleep::new(power.clone());
/// sleep.pio_write(PioAddress(0x600), 0, &[SLEEP_ENABLE | 5 << 2]);
/// assert_eq!(power.last(), Some(PowerRequest::PowerOff));
/// ```
pub struct AcpiSleep {
    power: Arc<dyn PowerControl>,
}

impl std::fmt::Debug for AcpiSleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiSleep").finish_non_exhaustive()
    }
}

impl AcpiSleep {
    /// Sleep registers that power off through `power`.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self { power }
    }
}

impl MutDevicePio for AcpiSleep {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (offset, data) {
            (0 | 1, [value]) => *value = 0,
            (_, data) => data.fill(crate::UNDECODED_READ),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            return;
        };
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (value >> 2) & 7;
        if sleep_type == SLEEP_TYPE_SOFT_OFF {
            keel_ratelimit::info_limited!("ACPI: guest entered S5 (soft off)");
            self.power.request_power_off();
        } else {
            keel_ratelimit::warn_limited!(
                "ACPI: guest asked for sleep type {sleep_type}, which is not supported; ignored"
            );
        }
    }
}

/// Events a [`Ged`] can signal: bits of its event register.
pub mod ged_event {
    /// The power button was pressed.
    pub const POWER_BUTTON: u32 = 1;
}

/// The generic event device (`ACPI0013`): an interrupt and a 32-bit event
/// register at offset 0 of its MMIO window that the guest's `_EVT` method
/// reads (and which reading clears) to learn which events happened.
///
/// The VMM keeps a [`GedHandle`] to raise events from any thread.
pub struct Ged {
    state: Arc<GedState>,
}

struct GedState {
    pending: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

/// Raises events on a [`Ged`] from any thread.
#[derive(Clone)]
pub struct GedHandle {
    state: Arc<GedState>,
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("pending", &self.state.pending.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for GedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GedHandle").finish_non_exhaustive()
    }
}

impl Ged {
    /// An event device interrupting through `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            state: Arc::new(GedState {
                pending: AtomicU32::new(0),
                line,
            }),
        }
    }

    /// A handle that raises events on this device.
    pub fn handle(&self) -> GedHandle {
        GedHandle {
            state: self.state.clone(),
        }
    }
}

impl GedHandle {
    /// Records `events` ([`ged_event`] bits) and interrupts the guest.
    pub fn raise(&self, events: u32) -> keel_irq::Result<()> {
        self.state.pending.fetch_or(events, Ordering::SeqCst);
        self.state.line.trigger()
    }

    /// Presses the power button: the guest's ACPI notifies its power button
    /// device (Linux then powers off in an orderly way where user space
    /// handles it).
    pub fn press_power_button(&self) -> keel_irq::Result<()> {
        self.raise(ged_event::POWER_BUTTON)
    }

    /// Events raised and not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.state.pending.load(Ordering::SeqCst)
    }
}

impl MutDeviceMmio for Ged {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let events = self.state.pending.swap(0, Ordering::SeqCst);
                data.copy_from_slice(&events.to_le_bytes());
            }
            _ => data.fill(0),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, _data: &[u8]) {
        // Read-only; the DSDT's field is WriteAsZeros and never written.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PowerRequest, RecordingPowerControl};
    use keel_irq::RecordingLine;

    #[test]
    fn s5_powers_off_and_other_sleep_states_are_ignored() {
        let power = Arc::new(RecordingPowerControl::new());
        let mut sleep = AcpiSleep::new(power.clone());
        for sleep_type in [0u8, 1, 3, 4, 6, 7] {
            sleep.pio_write(PioAddress(0x600), 0, &[SLEEP_ENABLE | sleep_type << 2]);
        }
        sleep.pio_write(PioAddress(0x600), 0, &[5 << 2]); // no SLP_EN
        sleep.pio_write(PioAddress(0x600), 1, &[SLEEP_ENABLE | 5 << 2]); // status register
        sleep.pio_write(PioAddress(0x600), 0, &[SLEEP_ENABLE | 5 << 2, 0]); // two bytes
        assert_eq!(power.requests(), []);
        sleep.pio_write(PioAddress(0x600), 0, &[SLEEP_ENABLE | 5 << 2]);
        assert_eq!(power.requests(), [PowerRequest::PowerOff]);
        let mut status = [0xaa];
        sleep.pio_read(PioAddress(0x600), 1, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn the_power_button_interrupts_and_reading_the_events_clears_them() {
        let line = Arc::new(RecordingLine::new());
        let mut ged = Ged::new(line.clone());
        let handle = ged.handle();
        handle.press_power_button().unwrap();
        assert_eq!(line.count(), 1);
        assert_eq!(handle.pending(), ged_event::POWER_BUTTON);
        let mut value = [0u8; 4];
        ged.mmio_read(MmioAddress(0), 0, &mut value);
        assert_eq!(u32::from_le_bytes(value), ged_event::POWER_BUTTON);
        ged.mmio_read(MmioAddress(0), 0, &mut value);
        assert_eq!(u32::from_le_bytes(value), 0, "read clears");
    }

    #[test]
    fn odd_ged_accesses_read_zero_and_change_nothing() {
        let line = Arc::new(RecordingLine::new());
        let mut ged = Ged::new(line);
        let handle = ged.handle();
        handle.raise(ged_event::POWER_BUTTON).unwrap();
        for (offset, len) in [(0, 1), (0, 2), (0, 8), (4, 4), (u64::MAX, 4)] {
            let mut data = vec![0xff; len];
            ged.mmio_read(MmioAddress(0), offset, &mut data);
            assert!(data.iter().all(|&b| b == 0));
            ged.mmio_write(MmioAddress(0), offset, &data);
        }
        assert_eq!(handle.pending(), ged_event::POWER_BUTTON, "still pending");
    }
}
