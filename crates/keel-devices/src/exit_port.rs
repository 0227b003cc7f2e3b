//! A port a guest writes to stop its machine with a status.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{PowerControl, UNDECODED_READ};

/// A one-port device: a 1-byte write of `V` calls
/// [`PowerControl::request_exit`]`(V)`.
///
/// It sits where QEMU's `isa-debug-exit` does by default
/// ([`ports::EXIT_PORT`](crate::ports::EXIT_PORT), 0xf4), but passes the
/// status through unchanged (QEMU reports `(V << 1) | 1`). Test guests use it
/// to end a run with a verdict.
///
/// The port is write-only: reads of any size return `0xff`. Writes of any
/// size but one byte are ignored; the first is logged as a warning, since a
/// guest that meant to exit would otherwise hang silently.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use keel_devices::{ExitPort, PowerRequest, RecordingPowerControl};
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let power = Arc::new(RecordingPowerControl::new());
/// let mut port = ExitPort::new(power.clone());
/// port.pio_write(PioAddress(0xf4), 0, &[42]);
/// assert_eq!(power.last(), Some(PowerRequest::Exit(42)));
/// ```
pub struct ExitPort {
    power: Arc<dyn PowerControl>,
    ignored_accesses: u64,
}

impl ExitPort {
    /// An exit port that forwards the guest's status to `power`.
    pub fn new(power: Arc<dyn PowerControl>) -> Self {
        Self {
            power,
            ignored_accesses: 0,
        }
    }

    /// Guest accesses of a size or at an offset the port does not decode,
    /// and reads.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }
}

impl MutDevicePio for ExitPort {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(UNDECODED_READ);
        self.ignored_accesses = self.ignored_accesses.saturating_add(1);
        log::debug!("exit port: ignored {}-byte read at offset {offset}", data.len());
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (offset, data) {
            (0, [status]) => {
                keel_ratelimit::info_limited!("exit port: guest requested exit with status {status}");
                self.power.request_exit(*status);
            }
            _ => {
                self.ignored_accesses = self.ignored_accesses.saturating_add(1);
                let len = data.len();
                if self.ignored_accesses == 1 {
                    keel_ratelimit::warn_limited!("exit port: ignored {len}-byte write at offset {offset}: only 1-byte writes at offset 0 request an exit");
                } else {
                    log::debug!("exit port: ignored {len}-byte write at offset {offset}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PowerRequest, RecordingPowerControl};

    const PORT: PioAddress = PioAddress(0xf4);

    fn exit_port() -> (ExitPort, Arc<RecordingPowerControl>) {
        let power = Arc::new(RecordingPowerControl::new());
        (ExitPort::new(power.clone()), power)
    }

    #[test]
    fn one_byte_write_requests_exit_with_that_status_unchanged() {
        let (mut port, power) = exit_port();
        for status in [0, 1, 0x7f, 0xff] {
            port.pio_write(PORT, 0, &[status]);
            assert_eq!(power.last(), Some(PowerRequest::Exit(status)));
        }
    }

    #[test]
    fn writes_of_other_sizes_are_ignored() {
        let (mut port, power) = exit_port();
        port.pio_write(PORT, 0, &[]);
        port.pio_write(PORT, 0, &[1, 0]);
        port.pio_write(PORT, 0, &[1, 0, 0, 0]);
        assert_eq!(power.requests(), []);
        assert_eq!(port.ignored_accesses(), 3);
    }

    #[test]
    fn writes_past_the_port_are_ignored() {
        let (mut port, power) = exit_port();
        port.pio_write(PORT, 1, &[1]);
        port.pio_write(PORT, u16::MAX, &[1]);
        assert_eq!(power.requests(), []);
    }

    #[test]
    fn reads_return_all_ones_and_request_nothing() {
        let (mut port, power) = exit_port();
        for len in [0, 1, 2, 4] {
            let mut data = vec![0; len];
            port.pio_read(PORT, 0, &mut data);
            assert!(data.iter().all(|&b| b == 0xff));
        }
        assert_eq!(power.requests(), []);
    }
}
