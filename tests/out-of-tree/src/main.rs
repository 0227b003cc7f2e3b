//! A VMM of an embedder's own, built on Keel from outside its workspace: a
//! virtio-blk disk on an in-memory backend and a virtio device type of its
//! own, attached through `VmBuilder`, each exercised by the built-in guest.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use keel_virtio::{BlockOptions, MemoryBackend, RequestDevice, RequestHandler};
use keel_vmm::{ExitReason, VmBuilder, VmConfig};

/// Echoes each request back reversed.
struct Reverse;

impl RequestHandler for Reverse {
    fn device_type(&self) -> u32 {
        0x3e
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn handle(&mut self, _queue: usize, request: &[u8], reply: &mut [u8]) -> usize {
        for (out, byte) in reply.iter_mut().zip(request.iter().rev()) {
            *out = *byte;
        }
        request.len().min(reply.len())
    }
}

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

/// Boots the built-in guest with both devices attached and runs `program`.
fn boot(program: &str) -> Result<(ExitReason, String, Vec<u8>), keel_vmm::Error> {
    let serial = Capture::default();
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    let mut builder = VmBuilder::new(config)?
        .serial_output(serial.clone())
        .cmdline(program);
    let disk = builder.add_disk(MemoryBackend::new(1 << 20), BlockOptions::default())?;
    builder.add_virtio_device("reverse", Arc::new(Mutex::new(RequestDevice::new(Reverse).map_err(|e| keel_vmm::Error::Config(e.to_string()))?)))?;
    let reason = builder.build()?.run()?;
    let text = String::from_utf8_lossy(&serial.0.lock().unwrap()).into_owned();
    let sector0 = disk.lock().unwrap().backend().data()[..512].to_vec();
    Ok((reason, text, sector0))
}

fn main() -> ExitCode {
    let checks = [
        ("virtio-blk pattern=9", "virtio-blk: PASS"),
        ("virtio-request type=0x3e send=embedded", "\"deddebme\""),
    ];
    for (program, expect) in checks {
        match boot(program) {
            Ok((ExitReason::GuestExit(0), text, sector0)) if text.contains(expect) => {
                println!("keel-embedder: `{program}` passed (sector 0 starts {:02x?})", &sector0[..4]);
            }
            other => {
                eprintln!("keel-embedder: `{program}` failed: {other:?}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
