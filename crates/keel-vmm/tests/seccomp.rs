//! The filters keel-vmm's threads install, seen from a guest: a device
//! that makes a system call outside its thread's role ends the process
//! (naming the role and the call) at the default level, and goes through
//! at `log`. A filter stays on its thread, so each case runs in a child
//! process: this test binary again, told by an environment variable what
//! to run.

mod common;

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_virtio::{RequestDevice, RequestHandler};
use keel_vmm::{SeccompLevel, VmBuilder, VmConfig};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

const CHILD: &str = "KEEL_VMM_SECCOMP_CHILD";

/// A system call no VM thread may make: an IPv4 socket.
fn forbidden_call() -> i64 {
    // SAFETY: socket(2) with constant arguments; the descriptor leaks into
    // a process that exits soon.
    i64::from(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) })
}

/// A scratch MMIO device whose reads (on the vCPU thread) make the call.
struct CallsOnRead;

impl MutDeviceMmio for CallsOnRead {
    fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let ret = forbidden_call();
        println!("vcpu call returned {ret}");
        // The guest's `mmio-rw` program looks for its magic at +8.
        let value: u32 = if offset == 8 { 0x4b45_454c } else { 0 };
        for (out, byte) in data.iter_mut().zip(value.to_le_bytes()) {
            *out = byte;
        }
    }
    fn mmio_write(&mut self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {}
}

/// A request device whose handler (on the devices thread) makes the call.
struct CallsOnRequest;

impl RequestHandler for CallsOnRequest {
    fn device_type(&self) -> u32 {
        0x3f
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn handle(&mut self, _queue: usize, request: &[u8], reply: &mut [u8]) -> usize {
        let ret = forbidden_call();
        println!("devices call returned {ret}");
        let n = request.len().min(reply.len());
        reply[..n].copy_from_slice(&request[..n]);
        n
    }
}

fn child_body() {
    let spec = std::env::var(CHILD).unwrap();
    let (role, level) = spec.split_once(':').unwrap();
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.seccomp = level.parse().unwrap();
    let mut builder = VmBuilder::new(config).unwrap();
    let cmdline = match role {
        "vcpu" => {
            let addr = builder
                .add_mmio_device(0x1000, Arc::new(Mutex::new(CallsOnRead)))
                .unwrap();
            format!("mmio-rw mmio={addr:#x}")
        }
        "devices" => {
            let device = Arc::new(Mutex::new(RequestDevice::new(CallsOnRequest).unwrap()));
            builder.add_virtio_device("calls", device).unwrap();
            "virtio-request type=0x3f send=x count=1".to_string()
        }
        other => panic!("no role {other}"),
    };
    let (outcome, console) = common::run_guest(builder, &cmdline, Duration::from_secs(30));
    println!("VM ended: {outcome:?}");
    println!("console:\n{console}");
    std::process::exit(0);
}

fn run_child(test: &str, role: &str, level: SeccompLevel) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{role}:{level}"))
        .output()
        .unwrap()
}

fn kvm() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

#[test]
fn a_forbidden_call_on_a_vm_thread_ends_the_process_naming_the_role() {
    if std::env::var_os(CHILD).is_some() {
        return child_body();
    }
    if !kvm() {
        return;
    }
    let test = "a_forbidden_call_on_a_vm_thread_ends_the_process_naming_the_role";
    for role in ["vcpu", "devices"] {
        let out = run_child(test, role, SeccompLevel::Kill);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(keel_vmm::keel_seccomp::EXIT_FORBIDDEN_SYSCALL),
            "{role}: {out:?}"
        );
        assert!(
            stderr.contains(&format!(
                "the {role} filter forbids socket (41, arguments 0x2 0x2 0x0)"
            )),
            "{role}: {stderr}"
        );
        assert!(!stdout.contains("call returned"), "{role}: {stdout}");
    }
}

#[test]
fn at_log_level_the_call_goes_through_and_the_vm_runs_on() {
    if std::env::var_os(CHILD).is_some() {
        return child_body();
    }
    if !kvm() {
        return;
    }
    let test = "at_log_level_the_call_goes_through_and_the_vm_runs_on";
    for role in ["vcpu", "devices"] {
        let out = run_child(test, role, SeccompLevel::Log);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{role}: {out:?}");
        assert!(
            stdout.contains(&format!("{role} call returned")),
            "{role}: {stdout}"
        );
        assert!(!stdout.contains("call returned -1"), "{role}: {stdout}");
        // The VM ran to its end (the scratch device here is not the one
        // `mmio-rw` checks, so that guest reports a failure; the request
        // guest passes).
        assert!(stdout.contains("VM ended: Ok(GuestExit("), "{role}: {stdout}");
        if role == "devices" {
            assert!(stdout.contains("VM ended: Ok(GuestExit(0))"), "{stdout}");
        }
    }
}
