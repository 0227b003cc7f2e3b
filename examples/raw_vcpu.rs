//! Keel's lower layers without the orchestrator: `keel-memory` builds guest
//! RAM, `keel-vcpu` puts a vCPU in 64-bit long mode and runs hand-assembled
//! code, and a ten-line `ExitHandler` plays the part of the bus.
//!
//! ```text
//! cargo run --release --example raw_vcpu
//! ```
//!
//! The guest code counts down from 10, writing each value to port 0x80, then
//! halts. No interrupt controller, no devices, no `keel-vmm`.

use std::sync::Mutex;

use keel_memory::{GuestLayout, MIB};
use keel_vcpu::{ExitHandler, RunOutcome, Vcpu};
use vm_memory::{Bytes, GuestAddress};

/// Records port writes; nothing else is decoded.
#[derive(Default)]
struct PortLog(Mutex<Vec<u8>>);

impl ExitHandler for PortLog {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == 0x80 {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

// mov ecx, 10
// again: mov eax, ecx ; out 0x80, al ; dec ecx ; jnz again
// hlt
const CODE: &[u8] = &[
    0xb9, 0x0a, 0x00, 0x00, 0x00, // mov ecx, 10
    0x89, 0xc8, //                   again: mov eax, ecx
    0xe6, 0x80, //                   out 0x80, al
    0xff, 0xc9, //                   dec ecx
    0x75, 0xf8, //                   jnz again
    0xf4, //                         hlt
];
const ENTRY: GuestAddress = GuestAddress(0x10_0000);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layout = GuestLayout::new(16 * MIB)?;
    let mem = layout.create_memory()?;
    mem.write_slice(CODE, ENTRY)?;
    // GDT and identity page tables for the 64-bit entry.
    keel_vcpu::write_boot_tables(&mem)?;

    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    keel_memory::register_with_kvm(&vm, &mem)?;
    let mut vcpu = Vcpu::new(&vm, 0, mem)?;
    vcpu.configure_long_mode_entry(ENTRY)?;

    let ports = PortLog::default();
    let mut exits = 0;
    loop {
        match vcpu.run_once(&ports)? {
            RunOutcome::Continue => exits += 1,
            RunOutcome::Halted => break,
            other => return Err(format!("unexpected outcome {other:?}").into()),
        }
    }
    let written = ports.0.lock().unwrap().clone();
    println!("raw_vcpu: {exits} port exits, values {written:?}, then HLT");
    assert_eq!(written, (1..=10).rev().collect::<Vec<u8>>());
    Ok(())
}
