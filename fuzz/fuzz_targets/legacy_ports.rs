//! The 16550 serial console, the i8042 reset line and the CMOS RTC under
//! arbitrary port accesses of any width, and host input queued between
//! them.
#![no_main]

use std::sync::Arc;

use keel_devices::{I8042Reset, RecordingPowerControl, Rtc, SerialConsole};
use keel_irq::RecordingLine;
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

fuzz_target!(|data: &[u8]| {
    let mut serial = SerialConsole::new(Arc::new(RecordingLine::new()), Vec::new()).unwrap();
    let mut i8042 = I8042Reset::new(Arc::new(RecordingPowerControl::new()));
    let mut rtc = Rtc::new();
    for op in data.chunks_exact(4) {
        let offset = u16::from(op[1] % 16);
        let len = 1 + usize::from(op[0] >> 5) % 4;
        let value = [op[2], op[3], op[2], op[3]];
        let mut out = [0u8; 4];
        let device: &mut dyn MutDevicePio = match op[0] % 3 {
            0 => &mut serial,
            1 => &mut i8042,
            _ => &mut rtc,
        };
        if op[0] & 0x10 == 0 {
            device.pio_read(PioAddress(0), offset, &mut out[..len]);
        } else {
            device.pio_write(PioAddress(0), offset, &value[..len]);
        }
        if op[0] & 0x08 != 0 {
            let _ = serial.enqueue_input(&op[2..]);
        }
        // Keep the output from growing without bound.
        if serial.output().len() > 1 << 16 {
            serial.output_mut().clear();
        }
    }
    let _ = SerialConsole::from_state(Arc::new(RecordingLine::new()), Vec::new(), &serial.save_state());
    let _ = Rtc::new().restore_state(&rtc.save_state());
});
