//! A device the guest writes to when it reaches user space, so the host
//! can measure boot time (as Firecracker's boot timer does).

use std::time::{Duration, Instant};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

/// The byte a guest writes at offset 0 to say "user space is up"
/// (`devmem <addr> 8 123` from init).
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Records the first time the guest writes [`BOOT_TIMER_MAGIC`], relative
/// to a start instant chosen by the VMM (e.g. process start).
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    reached: Option<Duration>,
}

impl BootTimer {
    /// A timer counting from `start`.
    pub fn new(start: Instant) -> Self {
        BootTimer { start, reached: None }
    }

    /// How long after `start` the guest signalled, if it has.
    pub fn reached(&self) -> Option<Duration> {
        self.reached
    }
}

impl MutDeviceMmio for BootTimer {
    fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) && self.reached.is_none() {
            let elapsed = self.start.elapsed();
            self.reached = Some(elapsed);
            log::info!(
                "guest reached user space {:.1} ms after start",
                elapsed.as_secs_f64() * 1e3
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_first_magic_write() {
        let mut t = BootTimer::new(Instant::now());
        t.mmio_write(MmioAddress(0), 0, &[1]);
        assert!(t.reached().is_none());
        t.mmio_write(MmioAddress(0), 4, &[BOOT_TIMER_MAGIC]);
        assert!(t.reached().is_none(), "only offset 0 counts");
        t.mmio_write(MmioAddress(0), 0, &[BOOT_TIMER_MAGIC]);
        let first = t.reached().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.mmio_write(MmioAddress(0), 0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.reached(), Some(first));
    }

    #[test]
    fn ignores_empty_writes_and_reads_zero() {
        let mut t = BootTimer::new(Instant::now());
        t.mmio_write(MmioAddress(0), 0, &[]);
        let mut buf = [0xffu8; 8];
        t.mmio_read(MmioAddress(0), 0, &mut buf);
        assert_eq!(buf, [0; 8]);
        assert!(t.reached().is_none());
    }
}
