//! What KVM itself costs a VM's life on this host, before any VMM logic:
//! each configuration is created, given 128 MiB and a vCPU, and closed at
//! once; the bench times the set-up and the `close` of the VM file
//! descriptor (where KVM tears the VM down).
//!
//! ```text
//! cargo bench --bench kvm_teardown            # 15 runs per configuration
//! cargo bench --bench kvm_teardown -- 40      # runs per configuration
//! ```
//!
//! On the development host the teardown of a VM that registered anything
//! on a KVM I/O bus (the in-kernel PIC and IOAPIC do, so does an
//! ioeventfd) waits for an SRCU grace period of about 14 ms counted from
//! that registration, and a PIT left in its default "reinject" mode adds
//! more grace periods at teardown. `docs/performance.md` explains how Keel
//! arranges its start-up around both; this bench is the evidence, and the
//! check for another host.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 128 << 20;

#[derive(Clone, Copy)]
enum Config {
    Bare,
    Ioeventfd,
    Irqchip,
    IrqchipPitReinject,
    IrqchipPitDiscard,
    SplitIrqchip,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::Bare,
        Config::Ioeventfd,
        Config::Irqchip,
        Config::IrqchipPitReinject,
        Config::IrqchipPitDiscard,
        Config::SplitIrqchip,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::Bare => "memory + vCPU only",
            Config::Ioeventfd => "+ one ioeventfd",
            Config::Irqchip => "+ in-kernel irqchip",
            Config::IrqchipPitReinject => "+ irqchip + PIT (reinject, KVM default)",
            Config::IrqchipPitDiscard => "+ irqchip + PIT (discard, set in line)",
            Config::SplitIrqchip => "+ split irqchip (LAPIC only)",
        }
    }
}

struct Sample {
    setup: Duration,
    close: Duration,
}

fn one(kvm: &Kvm, config: Config) -> Sample {
    let start = Instant::now();
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = keel_memory::GuestLayout::new(MEM_SIZE as u64)
        .and_then(|layout| layout.create_memory())
        .expect("guest memory");
    keel_memory::register_with_kvm(&vm, &mem).expect("KVM_SET_USER_MEMORY_REGION");
    let _event = add_devices(&vm, config);
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let setup = start.elapsed();
    drop(vcpu);
    let closing = Instant::now();
    drop(vm);
    let close = closing.elapsed();
    drop(mem);
    Sample { setup, close }
}

fn add_devices(vm: &VmFd, config: Config) -> Option<EventFd> {
    let pit = |vm: &VmFd| {
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit_config).expect("KVM_CREATE_PIT2");
    };
    match config {
        Config::Bare => None,
        Config::Ioeventfd => {
            let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
            vm.register_ioevent(
                &event,
                &IoEventAddress::Mmio(0xd000_0050),
                kvm_ioctls::NoDatamatch,
            )
            .expect("KVM_IOEVENTFD");
            Some(event)
        }
        Config::Irqchip => {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
            None
        }
        Config::IrqchipPitReinject => {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
            pit(vm);
            None
        }
        Config::IrqchipPitDiscard => {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
            pit(vm);
            keel_irq::set_pit_ticks(vm, keel_irq::PitTicks::Discard).expect("KVM_REINJECT_CONTROL");
            None
        }
        Config::SplitIrqchip => {
            let mut cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = 24;
            vm.enable_cap(&cap).expect("KVM_CAP_SPLIT_IRQCHIP");
            None
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo test --benches` runs this too: keep that short.
    let testing = !std::env::args().any(|a| a == "--bench");
    let runs: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(|a| a.parse().expect("runs: a number"))
        .unwrap_or(if testing { 1 } else { 15 });
    let kvm = Kvm::new().expect("/dev/kvm");
    println!("KVM VM set-up and teardown, median of {runs} runs (1 vCPU, 128 MiB, closed at once)");
    println!("{:<42} {:>10} {:>12}", "configuration", "set-up", "close(vm)");
    for config in Config::ALL {
        let mut samples = Vec::with_capacity(runs);
        // Interleave nothing else: each run starts after the previous VM is
        // gone, so no grace period carries over.
        for _ in 0..runs {
            samples.push(one(&kvm, config));
        }
        let setup = median(samples.iter().map(|s| s.setup).collect());
        let close = median(samples.iter().map(|s| s.close).collect());
        println!(
            "{:<42} {:>7.2} ms {:>9.2} ms",
            config.name(),
            ms(setup),
            ms(close)
        );
    }
}
