//! A virtio device type of your own, attached through `VmBuilder` and driven
//! by the built-in guest's generic `virtio-request` program.
//!
//! ```text
//! cargo run --release --example custom_virtio_device
//! ```
//!
//! The device answers each request with the request's text in upper case.
//! All it implements is `keel_virtio::RequestHandler` (what one request
//! gets back); `keel_virtio::RequestDevice` does the virtio part
//! (negotiation, queues, interrupts, resets, hostile descriptor chains) and
//! `VmBuilder::add_virtio_device` places it on the VM's transport (PCI with
//! MSI-X by default, or virtio-mmio) with ioeventfds and irqfds.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use keel_virtio::{RequestDevice, RequestHandler};
use keel_vmm::{ExitReason, VmBuilder, VmConfig};

/// A device type ID no guest driver claims, within the 0–63 that
/// virtio-pci device IDs (0x1040 + type) can carry.
const UPPER_CASE_DEVICE: u32 = 0x3f;

/// Replies with the request in upper case.
#[derive(Debug, Default)]
struct UpperCase {
    bytes_seen: usize,
}

impl RequestHandler for UpperCase {
    fn device_type(&self) -> u32 {
        UPPER_CASE_DEVICE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }

    fn handle(&mut self, _queue: usize, request: &[u8], reply: &mut [u8]) -> usize {
        self.bytes_seen += request.len();
        for (out, byte) in reply.iter_mut().zip(request) {
            *out = byte.to_ascii_uppercase();
        }
        request.len().min(reply.len())
    }
}

/// The serial console, kept for checking.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> ExitCode {
    let serial = Capture::default();
    let device = match RequestDevice::new(UpperCase::default()) {
        Ok(device) => Arc::new(Mutex::new(device)),
        Err(e) => {
            eprintln!("custom_virtio_device: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = VmConfig::default();
    config.memory_mib = 64;
    let result = VmBuilder::new(config).and_then(|builder| {
        let mut builder = builder.serial_output(serial.clone()).cmdline(format!(
            "virtio-request type={UPPER_CASE_DEVICE:#x} send=hello-from-the-guest count=3"
        ));
        builder.add_virtio_device("upper-case device", device.clone())?;
        builder.build()?.run()
    });
    let text = String::from_utf8_lossy(&serial.0.lock().unwrap()).into_owned();
    let device = device.lock().unwrap();
    let replies = text.matches("\"HELLO-FROM-THE-GUEST\"").count();
    match result {
        Ok(ExitReason::GuestExit(0)) if replies == 3 && device.requests() == 3 => {
            println!(
                "custom_virtio_device: the guest got 3 upper-case replies; the device answered {} requests ({} bytes)",
                device.requests(),
                device.handler().bytes_seen
            );
            ExitCode::SUCCESS
        }
        other => {
            eprintln!(
                "custom_virtio_device: guest ended with {other:?}, {replies} replies seen, {} requests answered; serial console:\n{text}",
                device.requests()
            );
            ExitCode::FAILURE
        }
    }
}
