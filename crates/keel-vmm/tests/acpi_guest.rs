//! The ACPI platform through the whole VMM, with the built-in guest: the
//! tables are in guest memory, the guest powers off through the sleep
//! registers, and the host's power button reaches it as an ACPI event.

#[macro_use]
mod common;
use common::Serial;
use std::time::{Duration, Instant};

use keel_vmm::{ExitReason, VmBuilder, VmConfig};
use vm_memory::{Bytes, GuestAddress};

fn kvm() -> bool {
    let present = std::path::Path::new("/dev/kvm").exists();
    if !present {
        eprintln!("SKIPPED: no /dev/kvm");
    }
    present
}

fn config(cmdline: &str) -> VmConfig {
    {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.cmdline = Some(cmdline.into());
        config
    }
}

#[test]
fn acpi_tables_are_in_guest_memory_by_default_and_absent_without_acpi() {
    if !kvm() {
        return;
    }
    let vm = VmBuilder::new(config("exit code=0")).unwrap().build().unwrap();
    let mut signature = [0u8; 8];
    vm.memory()
        .read_slice(&mut signature, GuestAddress(0xe_0000))
        .unwrap();
    assert_eq!(&signature, b"RSD PTR ");

    let vm = VmBuilder::new({
        let mut config = config("exit code=0");
        config.acpi = false;
        config
    })
    .unwrap()
    .build()
    .unwrap();
    vm.memory()
        .read_slice(&mut signature, GuestAddress(0xe_0000))
        .unwrap();
    assert_ne!(&signature, b"RSD PTR ");
    let mut mp = [0u8; 4];
    vm.memory().read_slice(&mut mp, GuestAddress(0x9fc00)).unwrap();
    assert_eq!(&mp, b"_MP_", "the MP table instead");
}

#[test]
fn a_guest_writing_s5_to_the_sleep_register_powers_the_vm_off() {
    if !kvm() {
        return;
    }
    let serial = Serial::default();
    let reason = VmBuilder::new(config("acpi-poweroff"))
        .unwrap()
        .serial_output(serial.clone())
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(reason, ExitReason::GuestShutdown, "{}", serial.text());
    assert_eq!(reason.to_string(), "guest powered off");
}

#[test]
fn the_power_button_reaches_the_guest_as_an_acpi_event() {
    if !kvm() {
        return;
    }
    let serial = Serial::default();
    let handle = VmBuilder::new(config("acpi-power-button"))
        .unwrap()
        .serial_output(serial.clone())
        .build()
        .unwrap()
        .start()
        .unwrap();
    let started = Instant::now();
    while !serial.text().contains("acpi: waiting for the power button") {
        assert!(started.elapsed() < Duration::from_secs(10), "{}", serial.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.press_power_button().unwrap();
    let reason = handle.wait().unwrap();
    let text = serial.text();
    assert_eq!(reason, ExitReason::GuestShutdown, "{text}");
    assert!(text.contains("acpi: power button pressed"), "{text}");
}

#[test]
fn without_acpi_there_is_no_power_button() {
    if !kvm() {
        return;
    }
    let handle = VmBuilder::new({
        let mut config = config("serial-echo timeout-ms=2000");
        config.acpi = false;
        config
    })
    .unwrap()
    .build()
    .unwrap()
    .start()
    .unwrap();
    let err = handle.press_power_button().unwrap_err();
    assert!(err.to_string().contains("needs ACPI"), "{err}");
}
