//! Exit round trip: what one port-I/O or MMIO exit costs through Keel's
//! full vCPU loop and bus (`keel-vmm`: `Vcpu::run`, `ExitHandler` for
//! `vm-device`'s `IoManager`, a device behind a `Mutex`), next to a raw
//! `kvm-ioctls` `KVM_RUN` loop with a `match` on the exit, running the same
//! guest program in the same process, alternately.
//!
//! ```text
//! cargo bench --bench exit_roundtrip            # 5 rounds of 200k exits each way
//! cargo bench --bench exit_roundtrip -- 3 50000 # rounds, exits per round
//! ```
//!
//! The guest (`keel-guest`'s `pio-loop` / `mmio-loop`) times its own loop
//! with the TSC and prints ticks per write; that is the figure compared, so
//! VM creation and teardown are not part of it. It prints the median of
//! each and the ratio Keel / raw.

use std::io::Write;
use std::sync::{Arc, Mutex};

use keel_memory::{GuestLayout, MIB, ZERO_PAGE_START};
use keel_vcpu::{boot_fpu, boot_msrs, lint_pins_as_pc, long_mode_regs, long_mode_sregs, CpuidConfig};
use keel_vmm::{ExitReason, VmBuilder, VmConfig};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

/// The device the MMIO loop writes to: does nothing, as cheaply as a device
/// can.
struct Noop;

impl MutDeviceMmio for Noop {
    fn mmio_read(&mut self, _: MmioAddress, _: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _: MmioAddress, _: MmioAddressOffset, _: &[u8]) {}
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// "… N TSC ticks each" from the guest's output.
fn ticks_each(console: &str) -> u64 {
    console
        .lines()
        .find_map(|l| {
            l.split(", ")
                .nth(1)?
                .strip_suffix(" TSC ticks each")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no figure in the guest's output:\n{console}"))
}

fn keel_run(program: &str, count: u64) -> u64 {
    let console = Console::default();
    let mut builder = VmBuilder::new(VmConfig {
        memory_mib: 32,
        ..Default::default()
    })
    .unwrap();
    let addr = builder
        .add_mmio_device(0x1000, Arc::new(Mutex::new(Noop)))
        .unwrap();
    let cmdline = match program {
        "pio" => format!("pio-loop count={count}"),
        _ => format!("mmio-loop mmio={addr:#x} count={count}"),
    };
    let vm = builder
        .cmdline(cmdline)
        .serial_output(console.clone())
        .build()
        .unwrap();
    assert_eq!(vm.run().unwrap(), ExitReason::GuestExit(0));
    let text = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    ticks_each(&text)
}

/// The same guest on a bare `KVM_RUN` loop: Keel's boot layers put it in
/// memory, then a `match` handles every exit inline. The serial port is
/// a minimal polled stand-in (no interrupts), which the guest tolerates.
fn raw_run(program: &str, count: u64) -> u64 {
    const MMIO_ADDR: u64 = 0xd000_1000;
    let layout = GuestLayout::new(32 * MIB).unwrap();
    let mem = layout.create_memory().unwrap();
    let kernel = keel_boot::load_kernel(&mem, &mut std::io::Cursor::new(keel_guest::elf())).unwrap();
    let cmdline = match program {
        "pio" => format!("pio-loop count={count}"),
        _ => format!("mmio-loop mmio={MMIO_ADDR:#x} count={count}"),
    };
    keel_boot::BootConfig::new(cmdline)
        .write(&mem, &layout, &kernel)
        .unwrap();
    keel_vcpu::write_boot_tables(&mem).unwrap();

    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    keel_memory::register_with_kvm(&vm, &mem).unwrap();
    keel_irq::create_in_kernel_irqchip(&vm).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    CpuidConfig::new(0, 1).apply(&mut cpuid);
    vcpu.set_cpuid2(&cpuid).unwrap();
    vcpu.set_msrs(&boot_msrs()).unwrap();
    vcpu.set_sregs(&long_mode_sregs(vcpu.get_sregs().unwrap()))
        .unwrap();
    let mut regs = long_mode_regs(kernel.entry);
    regs.rsi = ZERO_PAGE_START.0;
    vcpu.set_regs(&regs).unwrap();
    vcpu.set_fpu(&boot_fpu()).unwrap();
    vcpu.set_lapic(&lint_pins_as_pc(vcpu.get_lapic().unwrap()))
        .unwrap();

    let mut console = Vec::new();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x80, _) => {}
            VcpuExit::MmioWrite(MMIO_ADDR, _) => {}
            VcpuExit::IoOut(0x3f8, data) => console.push(data[0]),
            VcpuExit::IoOut(0xf4, data) => {
                assert_eq!(data[0], 0, "guest failed:\n{}", String::from_utf8_lossy(&console));
                break;
            }
            VcpuExit::IoOut(..) => {}
            // LSR: transmitter empty; IIR: no interrupt pending.
            VcpuExit::IoIn(0x3fd, data) => data.fill(0x60),
            VcpuExit::IoIn(0x3fa, data) => data.fill(0x01),
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    ticks_each(&String::from_utf8_lossy(&console))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too,
    // so keep that run short.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let testing = !std::env::args().any(|a| a == "--bench");
    let rounds: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(if testing { 1 } else { 5 });
    let count: u64 =
        args.get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(if testing { 2_000 } else { 200_000 });
    println!("exit round trip: {rounds} rounds of {count} exits, guest-measured TSC ticks per exit");
    for program in ["pio", "mmio"] {
        let (mut keel, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            keel.push(keel_run(program, count));
            raw.push(raw_run(program, count));
        }
        let (k, r) = (median(keel.clone()), median(raw.clone()));
        println!(
            "{program:>4}: keel {k} ticks (runs {keel:?}), raw KVM_RUN loop {r} ticks (runs {raw:?}), keel/raw = {:.3}",
            k as f64 / r as f64
        );
    }
}
