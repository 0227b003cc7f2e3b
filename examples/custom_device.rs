//! A user-defined MMIO device, registered on Keel's bus and driven by the
//! built-in guest.
//!
//! ```text
//! cargo run --release --example custom_device
//! ```
//!
//! The device is a scratch register plus an access counter plus an ID:
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0 | read/write, 32-bit | scratch register |
//! | 4 | read-only, 32-bit | number of accesses to offset 0 |
//! | 8 | read-only, 32-bit | magic `0x4b45454c` ("KEEL") |
//!
//! Implementing `vm_device::MutDeviceMmio` is all it takes: the VMM wraps it
//! in a `Mutex` and vCPU threads call it on every MMIO exit in its range.
//! The guest program `mmio-rw` writes patterns, reads them back and checks
//! the counter; the host then checks the device saw the same traffic.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use keel_vmm::{ExitReason, VmBuilder, VmConfig};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

#[derive(Debug, Default)]
struct ScratchDevice {
    scratch: u32,
    accesses: u32,
    writes: u32,
}

const MAGIC: u32 = 0x4b45_454c;

impl ScratchDevice {
    fn register(&mut self, offset: u64) -> Option<u32> {
        match offset {
            0 => {
                self.accesses = self.accesses.wrapping_add(1);
                Some(self.scratch)
            }
            4 => Some(self.accesses),
            8 => Some(MAGIC),
            _ => None,
        }
    }
}

impl MutDeviceMmio for ScratchDevice {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        // Only aligned 32-bit accesses mean anything; anything else reads as
        // all ones, and never panics whatever the guest does.
        let value = match (data.len(), offset % 4) {
            (4, 0) => self.register(offset),
            _ => None,
        };
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let (0, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.scratch = u32::from_le_bytes(bytes);
            self.accesses = self.accesses.wrapping_add(1);
            self.writes += 1;
        }
    }
}

fn main() -> ExitCode {
    let device = Arc::new(Mutex::new(ScratchDevice::default()));
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 64;
        config
    };
    let result = VmBuilder::new(config).and_then(|mut builder| {
        let addr = builder.add_mmio_device(0x1000, device.clone())?;
        println!("custom_device: scratch device at {addr:#x}");
        builder.cmdline(format!("mmio-rw mmio={addr:#x}")).build()?.run()
    });
    let device = device.lock().unwrap();
    match result {
        Ok(ExitReason::GuestExit(0)) if device.writes > 0 => {
            println!(
                "custom_device: guest passed; device saw {} writes, {} scratch accesses, last value {:#x}",
                device.writes, device.accesses, device.scratch
            );
            ExitCode::SUCCESS
        }
        Ok(other) => {
            eprintln!("custom_device: guest ended with {other}; device state {device:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("custom_device: error: {e}");
            ExitCode::FAILURE
        }
    }
}
