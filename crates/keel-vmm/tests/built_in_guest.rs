//! KVM tests with Keel's built-in guest: each boots a VM through the full
//! stack (memory, irqchip, devices, boot path, vCPU threads) and checks how
//! it ended and what it printed. Each takes milliseconds.

mod common;
use common::Serial;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_vmm::{BootProtocolChoice, Error, ExitReason, IrqchipChoice, VmBuilder, VmConfig};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

fn config() -> VmConfig {
    {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config
    }
}

/// Runs the guest program `cmdline`, failing the test if it hangs.
fn run_guest(builder: VmBuilder, cmdline: &str) -> (keel_vmm::Result<ExitReason>, String) {
    common::run_guest(builder, cmdline, Duration::from_secs(20))
}

fn run(cmdline: &str) -> (keel_vmm::Result<ExitReason>, String) {
    run_guest(VmBuilder::new(config()).unwrap(), cmdline)
}

/// The `Y` of the guest's "serial: X bytes sent, Y interrupts, Z polled".
fn serial_interrupts(console: &str) -> u64 {
    console
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("serial: ")?;
            rest.split(", ").nth(1)?.strip_suffix(" interrupts")?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no serial interrupt count; console:\n{console}"))
}

#[test]
fn hello_prints_banner_with_serial_interrupts_and_exits_zero() {
    // The default: split irqchip, the guest's IOAPIC entries become MSI routes.
    let (result, console) = run("hello");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
    assert!(console.contains("Keel test guest: hello"), "{console}");
    assert!(serial_interrupts(&console) > 0, "{console}");
}

#[test]
fn hello_takes_serial_interrupts_through_the_in_kernel_irqchip_too() {
    let config = {
        let mut config = config();
        config.irqchip = IrqchipChoice::Kernel;
        config.pit_reinject = true;
        config
    };
    let (result, console) = run_guest(VmBuilder::new(config).unwrap(), "hello");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
    assert!(serial_interrupts(&console) > 0, "{console}");
}

/// Boots `hello` through `protocol` and checks what the guest read from the
/// boot structure (zero page or `hvm_start_info`): the command line and a
/// memory map with the VM's RAM.
fn hello_through(protocol: BootProtocolChoice) {
    let config = {
        let mut config = config();
        config.boot_protocol = protocol;
        config
    };
    let cmdline = "hello note-from=the-host";
    let (result, console) = run_guest(VmBuilder::new(config).unwrap(), cmdline);
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
    assert!(console.contains("Keel test guest: hello"), "{console}");
    assert!(
        console.contains(&format!("command line: \"{cmdline}")),
        "{console}"
    );
    // 32 MiB minus what the memory map reserves below 1 MiB.
    assert!(console.contains("RAM: 31 MiB in "), "{console}");
    assert!(serial_interrupts(&console) > 0, "{console}");
}

#[test]
fn hello_boots_through_the_pvh_entry() {
    hello_through(BootProtocolChoice::Pvh);
}

#[test]
fn hello_boots_through_the_linux_64_bit_entry() {
    hello_through(BootProtocolChoice::Linux64);
}

/// Scratch register + access counter + magic, as the guest's `mmio-rw`
/// program expects.
#[derive(Default)]
struct ScratchDevice {
    scratch: u32,
    accesses: u32,
}

impl MutDeviceMmio for ScratchDevice {
    fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let v = match offset {
            0 => {
                self.accesses += 1;
                self.scratch
            }
            4 => self.accesses,
            8 => 0x4b45_454c,
            _ => u32::MAX,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = *bytes.get(i).unwrap_or(&0xff);
        }
    }
    fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.scratch = u32::from_le_bytes(data.try_into().unwrap());
            self.accesses += 1;
        }
    }
}

#[test]
fn guest_reads_a_user_registered_mmio_device() {
    let mut builder = VmBuilder::new(config()).unwrap();
    let addr = builder
        .add_mmio_device(0x1000, Arc::new(Mutex::new(ScratchDevice::default())))
        .unwrap();
    let (result, console) = run_guest(builder, &format!("hello mmio={:#x} expect=0x4b45454c", addr + 8));
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
    assert!(console.contains("0x4b45454c"), "{console}");
}

#[test]
fn guest_drives_a_user_defined_read_write_device() {
    let device = Arc::new(Mutex::new(ScratchDevice::default()));
    let mut builder = VmBuilder::new(config()).unwrap();
    let addr = builder.add_mmio_device(0x1000, device.clone()).unwrap();
    let (result, console) = run_guest(builder, &format!("mmio-rw mmio={addr:#x}"));
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
    assert!(device.lock().unwrap().accesses > 0);
}

#[test]
fn wrong_mmio_value_makes_the_guest_fail() {
    let mut builder = VmBuilder::new(config()).unwrap();
    let addr = builder
        .add_mmio_device(0x1000, Arc::new(Mutex::new(ScratchDevice::default())))
        .unwrap();
    let (result, console) = run_guest(builder, &format!("hello mmio={:#x} expect=0x1234", addr + 8));
    assert_eq!(result.unwrap(), ExitReason::GuestExit(1), "{console}");
}

#[test]
fn exit_status_reaches_the_host() {
    let (result, _) = run("exit code=7");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(7));
}

#[test]
fn i8042_reset_is_reported_as_guest_reset() {
    let (result, console) = run("reset");
    assert_eq!(result.unwrap(), ExitReason::GuestReset, "{console}");
}

#[test]
fn int3_in_ring0_reaches_the_guest_breakpoint_handler() {
    let (result, console) = run("int3");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
}

#[test]
fn triple_fault_is_reported_with_the_vcpu() {
    let (result, console) = run("triple-fault");
    assert_eq!(result.unwrap(), ExitReason::TripleFault { vcpu: 0 }, "{console}");
}

#[test]
fn guest_page_fault_is_reported_by_the_guest() {
    let (result, console) = run("fault");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0x80 | 14), "{console}");
}

#[test]
fn unemulatable_instruction_error_names_rip_and_bytes() {
    let (result, console) = run("bad-insn");
    match result {
        // A host that runs ring 0 natively executes it and the guest goes on.
        Ok(reason) => assert_eq!(reason, ExitReason::GuestExit(0), "{console}"),
        Err(Error::Vcpu(keel_vcpu::Error::InternalError { rip, bytes, .. })) => {
            assert!(rip >= 0x10_0000, "RIP {rip:#x} is in the guest image");
            assert!(!bytes.is_empty());
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn unknown_program_exits_with_status_2() {
    let (result, _) = run("no-such-program");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(2));
}

#[test]
fn two_vms_run_at_once_in_one_process() {
    let threads: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let (result, console) = run(&format!("exit code={}", 10 + i));
                (result.unwrap(), console)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap().0).collect();
    assert_eq!(
        results,
        vec![ExitReason::GuestExit(10), ExitReason::GuestExit(11)]
    );
}

#[test]
fn two_vms_started_together_both_finish() {
    let a = VmBuilder::new(config())
        .unwrap()
        .cmdline("hello")
        .serial_output(Serial::default())
        .build()
        .unwrap();
    let b = VmBuilder::new(config())
        .unwrap()
        .cmdline("exit code=5")
        .serial_output(Serial::default())
        .build()
        .unwrap();
    let (ha, hb) = (a.start().unwrap(), b.start().unwrap());
    assert_eq!(hb.wait().unwrap(), ExitReason::GuestExit(5));
    assert_eq!(ha.wait().unwrap(), ExitReason::GuestExit(0));
}

#[test]
fn stop_from_another_thread_ends_a_busy_guest() {
    let vm = VmBuilder::new(config())
        .unwrap()
        .cmdline("pio-loop count=4000000000")
        .serial_output(Serial::default())
        .build()
        .unwrap();
    let handle = vm.start().unwrap();
    let stopper = handle.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        stopper.stop();
    });
    assert_eq!(handle.wait().unwrap(), ExitReason::Stopped);
}

#[test]
fn dropping_a_running_vm_stops_its_threads() {
    let vm = VmBuilder::new(config())
        .unwrap()
        .cmdline("pio-loop count=4000000000")
        .serial_output(Serial::default())
        .build()
        .unwrap();
    let handle = vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    drop(handle); // must not hang
}

#[test]
fn guest_with_two_vcpus_runs_on_the_boot_cpu() {
    let config = {
        let mut config = VmConfig::default();
        config.vcpus = 2;
        config.memory_mib = 32;
        config
    };
    let (result, console) = run_guest(VmBuilder::new(config).unwrap(), "hello");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
}

#[test]
fn large_guest_memory_is_not_touched_at_build() {
    // 2 GiB of guest RAM must cost almost nothing until the guest uses it.
    let before = rss_kib();
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 2048;
        config
    };
    let (result, console) = run_guest(VmBuilder::new(config).unwrap(), "exit code=0");
    assert_eq!(result.unwrap(), ExitReason::GuestExit(0), "{console}");
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn missing_kernel_file_is_a_clear_error() {
    let config = {
        let mut config = config();
        config.kernel = Some("/no/such/vmlinux".into());
        config
    };
    let err = VmBuilder::new(config).unwrap_err();
    assert!(err.to_string().contains("/no/such/vmlinux"), "{err}");
}

#[test]
fn garbage_kernel_file_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("keel-garbage-kernel-{}", std::process::id()));
    std::fs::write(&path, b"this is not a kernel").unwrap();
    let config = {
        let mut config = config();
        config.kernel = Some(path.clone());
        config
    };
    let err = VmBuilder::new(config).unwrap().build().unwrap_err();
    std::fs::remove_file(&path).unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains(path.to_str().unwrap()) && msg.contains("neither an ELF"),
        "{msg}"
    );
}
