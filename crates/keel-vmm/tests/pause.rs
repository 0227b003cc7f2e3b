//! Pausing and resuming a running VM: a paused guest makes no progress, a
//! resumed one continues, and the calls that do not fit the VM's state say
//! so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_vmm::{Error, ExitReason, VmBuilder, VmConfig};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// Counts the guest's writes to its port: the guest's progress.
#[derive(Default)]
struct Progress(AtomicU64);

impl DevicePio for Progress {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn busy_vm(vcpus: u8) -> (keel_vmm::VmHandle, Arc<Progress>) {
    let progress = Arc::new(Progress::default());
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.vcpus = vcpus;
    let mut builder = VmBuilder::new(config).unwrap();
    builder.add_pio_device(0x80, 1, progress.clone()).unwrap();
    let handle = builder
        .cmdline("pio-loop count=4000000000 port=0x80")
        .build()
        .unwrap()
        .start()
        .unwrap();
    (handle, progress)
}

fn a_paused_guest_makes_no_progress_and_a_resumed_one_goes_on(vcpus: u8) {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let (handle, progress) = busy_vm(vcpus);
    let count = || progress.0.load(Ordering::Relaxed);
    wait_for("the guest's first writes", || count() > 1000);
    for round in 0..3 {
        handle.pause().unwrap();
        assert!(handle.is_paused());
        let at_pause = count();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(count(), at_pause, "round {round}: the guest ran while paused");
        handle.resume().unwrap();
        assert!(!handle.is_paused());
        wait_for("progress after resuming", || count() > at_pause + 1000);
    }
    handle.stop_handle().stop();
    assert_eq!(handle.wait().unwrap(), ExitReason::Stopped);
}

#[test]
fn a_paused_guest_makes_no_progress_and_a_resumed_one_goes_on_one_vcpu() {
    a_paused_guest_makes_no_progress_and_a_resumed_one_goes_on(1);
}

#[test]
fn a_paused_guest_makes_no_progress_and_a_resumed_one_goes_on_two_vcpus() {
    a_paused_guest_makes_no_progress_and_a_resumed_one_goes_on(2);
}

#[test]
fn pause_and_resume_say_when_they_do_not_fit_the_state() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let (handle, _progress) = busy_vm(1);
    let e = handle.resume().unwrap_err();
    assert!(matches!(e, Error::InvalidState(_)), "{e:?}");
    assert_eq!(e.to_string(), "the VM is not paused");
    handle.pause().unwrap();
    handle.pause().unwrap(); // pausing a paused VM does nothing
    let controller = handle.controller();
    controller.resume().unwrap();
    controller.stop();
    assert!(controller.is_finished());
    let e = controller.pause().unwrap_err();
    assert!(e.to_string().contains("has ended"), "{e}");
    assert_eq!(handle.wait().unwrap(), ExitReason::Stopped);
}

#[test]
fn a_paused_vm_can_be_stopped() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let (handle, _progress) = busy_vm(2);
    handle.pause().unwrap();
    handle.stop_handle().stop();
    assert_eq!(
        handle
            .wait_timeout(Duration::from_secs(10))
            .ok()
            .unwrap()
            .unwrap(),
        ExitReason::Stopped
    );
}
