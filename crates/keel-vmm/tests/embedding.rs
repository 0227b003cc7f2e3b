//! What an embedder does with `VmBuilder`: attach devices and backends of
//! its own, and get errors that say what went wrong when it places them
//! badly.

mod common;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_virtio::{BlockOptions, MemoryBackend, RequestDevice, RequestHandler};
use keel_vmm::{Error, ExitReason, VirtioTransport, VmBuilder, VmConfig};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

fn kvm() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

fn config() -> VmConfig {
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config
}

/// Answers nothing and counts nothing: only placement matters here.
struct Inert;

impl MutDeviceMmio for Inert {
    fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {}
}

impl MutDevicePio for Inert {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {}
}

fn inert() -> Arc<Mutex<Inert>> {
    Arc::new(Mutex::new(Inert))
}

fn message(result: keel_vmm::Result<()>) -> String {
    match result {
        Ok(()) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_mmio_device_on_a_taken_address_names_the_address_size_and_holder() {
    let mut builder = VmBuilder::new(config()).unwrap();
    builder.add_mmio_device_at(0xd010_0000, 0x1000, inert()).unwrap();
    let e = message(builder.add_mmio_device_at(0xd010_0800, 0x1000, inert()));
    assert!(
        e.contains("0xd0100800")
            && e.contains("0x1000 bytes")
            && e.contains("the MMIO device added at 0xd0100000"),
        "{e}"
    );
    let e = message(builder.add_mmio_device_at(keel_memory::IOAPIC_START, 0x100, inert()));
    assert!(e.contains("the IOAPIC"), "{e}");
    let e = message(builder.add_mmio_device_at(keel_vmm::BOOT_TIMER_ADDR, 4, inert()));
    assert!(e.contains("the boot timer"), "{e}");
    let e = message(builder.add_mmio_device_at(0xe000_1000, 0x1000, inert()));
    assert!(e.contains("the 32-bit PCI BAR window"), "{e}");
}

#[test]
fn an_mmio_device_inside_guest_ram_is_refused() {
    let mut builder = VmBuilder::new(config()).unwrap();
    let e = message(builder.add_mmio_device_at(0x10_0000, 0x1000, inert()));
    assert!(e.contains("0x100000") && e.contains("guest RAM"), "{e}");
    // Just past the end of the 32 MiB of RAM is free.
    builder.add_mmio_device_at(32 << 20, 0x1000, inert()).unwrap();
}

#[test]
fn a_port_device_on_a_port_keel_uses_names_the_port_and_its_owner() {
    let mut builder = VmBuilder::new(config()).unwrap();
    let e = message(builder.add_pio_device(0x3f8, 1, inert()));
    assert!(
        e.contains("port 0x3f8 belongs to the serial console (COM1)"),
        "{e}"
    );
    let e = message(builder.add_pio_device(0xcf0, 16, inert()));
    assert!(
        e.contains("port 0xcf8 belongs to the PCI configuration ports"),
        "{e}"
    );
    builder.add_pio_device(0x500, 4, inert()).unwrap();
    let e = message(builder.add_pio_device(0x502, 1, inert()));
    assert!(e.contains("the port device added at 0x500"), "{e}");
}

#[test]
fn a_file_that_is_not_kvm_is_named_as_such() {
    let e = VmBuilder::new(config())
        .unwrap()
        .kvm_device("/dev/null")
        .build()
        .unwrap_err();
    assert!(matches!(e, Error::NotKvm { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "/dev/null: not a KVM device (it does not answer KVM_GET_API_VERSION)"
    );
}

#[test]
fn the_built_in_guest_needs_16_mib() {
    let mut config = config();
    config.memory_mib = 8;
    let e = VmBuilder::new(config).unwrap_err().to_string();
    assert!(
        e.contains("memory 8 MiB: the built-in guest needs at least 16 MiB"),
        "{e}"
    );
}

#[test]
fn the_library_sends_the_serial_console_nowhere_by_default() {
    assert_eq!(VmConfig::default().serial, keel_vmm::SerialMode::None);
}

/// Replies with the request in upper case, counting what it saw.
#[derive(Default)]
struct UpperCase {
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RequestHandler for UpperCase {
    fn device_type(&self) -> u32 {
        0x3f
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn handle(&mut self, _queue: usize, request: &[u8], reply: &mut [u8]) -> usize {
        self.requests.lock().unwrap().push(request.to_vec());
        for (out, byte) in reply.iter_mut().zip(request) {
            *out = byte.to_ascii_uppercase();
        }
        request.len().min(reply.len())
    }
}

fn run(builder: VmBuilder, cmdline: &str) -> (ExitReason, String) {
    let (result, console) = common::run_guest(builder, cmdline, Duration::from_secs(30));
    (result.unwrap(), console)
}

fn a_device_of_the_embedders_own_is_driven_by_the_guest(transport: VirtioTransport) {
    if !kvm() {
        return;
    }
    let handler = UpperCase::default();
    let seen = handler.requests.clone();
    let device = Arc::new(Mutex::new(RequestDevice::new(handler).unwrap()));
    let mut builder = VmBuilder::new(config()).unwrap();
    builder
        .add_virtio_device_on("upper-case", device.clone(), transport)
        .unwrap();
    let (reason, serial) = run(builder, "virtio-request type=0x3f send=keel-embedded count=2");
    assert_eq!(reason, ExitReason::GuestExit(0), "{serial}");
    assert_eq!(serial.matches("virtio-request: reply").count(), 2, "{serial}");
    assert!(serial.contains("13 bytes: \"KEEL-EMBEDDED\""), "{serial}");
    assert_eq!(device.lock().unwrap().requests(), 2);
    assert_eq!(*seen.lock().unwrap(), vec![b"keel-embedded".to_vec(); 2]);
}

fn a_disk_on_the_embedders_backend_is_read_and_written(transport: VirtioTransport) {
    if !kvm() {
        return;
    }
    let mut config = config();
    config.transport = transport;
    let mut builder = VmBuilder::new(config).unwrap();
    let disk = builder
        .add_disk(MemoryBackend::new(1 << 20), BlockOptions::default())
        .unwrap();
    let (reason, serial) = run(builder, "virtio-blk pattern=5");
    assert_eq!(reason, ExitReason::GuestExit(0), "{serial}");
    let mut expected = [0u8; 512];
    keel_guest::blk_pattern_sector(5, 0, 0, &mut expected);
    let disk = disk.lock().unwrap();
    assert_eq!(&disk.backend().data()[..512], &expected[..]);
    assert!(disk.backend().flushes() > 0);
}

over_both_transports!(
    a_device_of_the_embedders_own_is_driven_by_the_guest,
    a_disk_on_the_embedders_backend_is_read_and_written
);

#[test]
fn two_devices_of_one_name_are_refused() {
    let mut builder = VmBuilder::new(config()).unwrap();
    let device = || Arc::new(Mutex::new(RequestDevice::new(UpperCase::default()).unwrap()));
    builder.add_virtio_device("mine", device()).unwrap();
    let e = builder
        .add_virtio_device("mine", device())
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"mine\"") && e.contains("already added"), "{e}");
}
