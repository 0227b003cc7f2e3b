//! Just enough of the PC's i8042 keyboard controller to reset the machine.

use std::convert::Infallible;
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::{I8042Device, Trigger};

use crate::{PowerControl, UNDECODED_READ};

/// Offset of the status (read) / command (write) register, port 0x64.
const COMMAND_OFFSET: PioAddressOffset = 4;

/// The i8042 keyboard controller, reduced to its one job in a VM: the CPU
/// reset line. Writing 0xFE to the command port (0x64) calls
/// [`PowerControl::request_reset`]; this is how Linux reboots with
/// `reboot=k`, and where its default reboot sequence ends up when there is
/// no ACPI.
///
/// Register it over 0x60..=0x64 ([`ports::i8042_range`](crate::ports::i8042_range));
/// the command handling is `vm_superio::I8042Device`.
///
/// # What the guest sees
///
/// - **Status register (0x64)** reads [`I8042Reset::STATUS`]: output buffer
///   full, input buffer empty. Linux's i8042 driver starts by draining the
///   output buffer; after 16 reads that keep it full it reports
///   "i8042: No controller found" and gives up, about a millisecond and 33
///   port reads in. A status of 0 (all empty, what `I8042Device` reads)
///   would instead make it send "read control register" and poll the status
///   10 000 times, 50 µs apart, for an answer that never comes: half a
///   second of boot on hardware virtualization and far longer under an
///   emulating KVM. The reset path only waits for the *input* buffer to be
///   empty, so it is unaffected.
/// - **Data port (0x60)** and 0x62, 0x63 read 0; writes are ignored.
/// - **0x61** (PC speaker, NMI status) reads 0 if the access reaches this
///   device. A VM whose PIT was created by
///   [`keel_irq::create_in_kernel_irqchip`] never sends it here: KVM
///   answers 0x61 itself, with the PIT channel 2 output Linux polls while
///   calibrating the TSC.
/// - Accesses of any size but one byte are ignored; such reads return
///   `0xff`.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use keel_devices::{I8042Reset, PowerRequest, RecordingPowerControl};
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let power = Arc::new(RecordingPowerControl::new());
/// let mut i8042 = I8042Reset::new(power.clone());
/// i8042.pio_write(PioAddress(0x60), 4, &[0xfe]);
/// assert_eq!(power.requests(), [PowerRequest::Reset]);
/// ```
pub struct I8042Reset {
    controller: I8042Device<ResetRequest>,
    ignored_accesses: u64,
}

impl I8042Reset {
    /// What the status register (port 0x64) reads: output buffer full (bit
    /// 0), input buffer empty (bit 1 clear). See the type's documentation.
    pub const STATUS: u8 = 0x01;

    /// A controller that asks `power` for a reset when the guest pulses the
    /// reset line.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self {
            controller: I8042Device::new(ResetRequest(power)),
            ignored_accesses: 0,
        }
    }

    /// Guest accesses of a size or at an offset the device does not decode.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    fn ignore(&mut self, access: &str, offset: PioAddressOffset, len: usize) {
        self.ignored_accesses = self.ignored_accesses.saturating_add(1);
        log::debug!("i8042: ignored {len}-byte {access} at offset {offset}");
    }
}

impl MutDevicePio for I8042Reset {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (offset, data) {
            (COMMAND_OFFSET, [byte]) => *byte = Self::STATUS,
            (0..COMMAND_OFFSET, [byte]) => *byte = self.controller.read(offset as u8),
            (_, data) => {
                data.fill(UNDECODED_READ);
                self.ignore("read", offset, data.len());
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(register), [value]) if offset <= COMMAND_OFFSET => {
                let Ok(()) = self.controller.write(register, *value);
            }
            _ => self.ignore("write", offset, data.len()),
        }
    }
}

/// Turns the i8042's reset trigger into a [`PowerControl`] request.
struct ResetRequest(Arc<dyn PowerControl>);

impl Trigger for ResetRequest {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        log::info!("i8042: guest pulsed the CPU reset line");
        self.0.request_reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PowerRequest, RecordingPowerControl};

    const BASE: PioAddress = PioAddress(0x60);
    const DATA_OFFSET: PioAddressOffset = 0;
    const SPEAKER_OFFSET: PioAddressOffset = 1;
    const CMD_RESET_CPU: u8 = 0xfe;
    const STATUS_OUTPUT_FULL: u8 = 0x01;
    const STATUS_INPUT_FULL: u8 = 0x02;

    fn i8042() -> (I8042Reset, Arc<RecordingPowerControl>) {
        let power = Arc::new(RecordingPowerControl::new());
        (I8042Reset::new(power.clone()), power)
    }

    fn read(i8042: &mut I8042Reset, offset: PioAddressOffset) -> u8 {
        let mut byte = [0x55];
        i8042.pio_read(BASE, offset, &mut byte);
        byte[0]
    }

    #[test]
    fn reset_command_requests_a_machine_reset() {
        let (mut i8042, power) = i8042();
        i8042.pio_write(BASE, COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(power.requests(), [PowerRequest::Reset]);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let (mut i8042, power) = i8042();
        for value in (0..=u8::MAX).filter(|&v| v != CMD_RESET_CPU) {
            i8042.pio_write(BASE, COMMAND_OFFSET, &[value]);
        }
        for offset in 0..COMMAND_OFFSET {
            i8042.pio_write(BASE, offset, &[CMD_RESET_CPU]);
        }
        assert_eq!(power.requests(), []);
    }

    #[test]
    fn status_reads_input_empty_so_the_reset_path_never_waits() {
        let (mut i8042, _) = i8042();
        assert_eq!(read(&mut i8042, COMMAND_OFFSET) & STATUS_INPUT_FULL, 0);
    }

    #[test]
    fn status_reads_output_full_so_linux_gives_up_probing_quickly() {
        // Linux's i8042_flush(): read data while the status says the output
        // buffer is full, at most 16 times, then "No controller found".
        let (mut i8042, _) = i8042();
        let mut data_reads = 0;
        while read(&mut i8042, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 && data_reads <= 16 {
            read(&mut i8042, DATA_OFFSET);
            data_reads += 1;
        }
        assert_eq!(data_reads, 17, "the flush never sees an empty buffer");
    }

    #[test]
    fn speaker_port_reads_zero() {
        let (mut i8042, _) = i8042();
        assert_eq!(read(&mut i8042, SPEAKER_OFFSET), 0);
        assert_eq!(read(&mut i8042, DATA_OFFSET), 0);
    }

    #[test]
    fn wide_or_empty_accesses_are_ignored() {
        let (mut i8042, power) = i8042();
        i8042.pio_write(BASE, COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        i8042.pio_write(BASE, COMMAND_OFFSET, &[]);
        let mut wide = [0u8; 4];
        i8042.pio_read(BASE, COMMAND_OFFSET, &mut wide);
        i8042.pio_read(BASE, DATA_OFFSET, &mut []);

        assert_eq!(wide, [0xff; 4]);
        assert_eq!(power.requests(), []);
        assert_eq!(i8042.ignored_accesses(), 4);
    }

    #[test]
    fn offsets_past_the_command_port_are_ignored() {
        let (mut i8042, power) = i8042();
        for offset in [5, 0x104, u16::MAX] {
            i8042.pio_write(BASE, offset, &[CMD_RESET_CPU]);
            assert_eq!(read(&mut i8042, offset), 0xff, "offset {offset}");
        }
        assert_eq!(power.requests(), []);
    }
}
