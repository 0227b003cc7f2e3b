//! Boot Keel's built-in test guest and watch it say hello.
//!
//! ```text
//! cargo run --release --example hello
//! ```
//!
//! The guest enters through the same 64-bit Linux boot path Keel uses for a
//! real kernel, prints a banner on the 16550 serial port (interrupt-driven,
//! through the in-kernel irqchip), reads an ID register from a device this
//! example registers on the MMIO bus, and ends by writing its status to the
//! exit port. The example exits with that status.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use keel_vmm::{ExitReason, VmBuilder, VmConfig};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;

/// A read-only register holding "KEEL".
struct IdRegister;

const ID: u32 = 0x4b45_454c;

impl DeviceMmio for IdRegister {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let bytes = ID.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn mmio_write(&self, _base: MmioAddress, _offset: MmioAddressOffset, _data: &[u8]) {}
}

fn main() -> ExitCode {
    let started = Instant::now();
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 128;
        config
    };
    let result = VmBuilder::new(config).and_then(|mut builder| {
        let addr = builder.add_mmio_device(4, Arc::new(IdRegister))?;
        builder
            .cmdline(format!("hello mmio={addr:#x} expect={ID:#x}"))
            .build()?
            .run()
    });
    let elapsed = started.elapsed();
    match result {
        Ok(ExitReason::GuestExit(0)) => {
            eprintln!("hello: guest passed in {:.1} ms", elapsed.as_secs_f64() * 1e3);
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("hello: guest ended unexpectedly: {other}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hello: error: {e}");
            ExitCode::FAILURE
        }
    }
}
