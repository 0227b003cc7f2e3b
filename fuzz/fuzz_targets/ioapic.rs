//! Keel's user-space IOAPIC under arbitrary register accesses and
//! end-of-interrupt notifications, its routes going to a recording router.
#![no_main]

use keel_irq::{Ioapic, RecordingRouter};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;

fuzz_target!(|data: &[u8]| {
    let mut ioapic = Ioapic::new(RecordingRouter::new());
    for op in data.chunks_exact(6) {
        let offset = u64::from(op[1]);
        let value = [op[2], op[3], op[4], op[5]];
        let len = 1 + usize::from(op[0] >> 4) % 8;
        match op[0] % 3 {
            0 => {
                let mut out = [0u8; 8];
                ioapic.mmio_read(
                    MmioAddress(Ioapic::<RecordingRouter>::BASE),
                    offset,
                    &mut out[..len],
                );
            }
            1 => {
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(&value);
                ioapic.mmio_write(
                    MmioAddress(Ioapic::<RecordingRouter>::BASE),
                    offset,
                    &bytes[..len],
                );
            }
            _ => ioapic.end_of_interrupt(op[2]),
        }
    }
    let state = ioapic.save_state();
    let _ = Ioapic::new(RecordingRouter::new()).restore_state(&state);
});
