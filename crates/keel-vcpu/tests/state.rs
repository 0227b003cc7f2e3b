//! A vCPU's state saved in one VM continues the guest exactly in another.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use keel_memory::{GuestLayout, MIB};
use keel_vcpu::{ExitHandler, RunOutcome, Vcpu, VcpuState, VcpuStop};
use vm_memory::{Bytes, GuestAddress};

#[derive(Default)]
struct Ports(Mutex<Vec<u8>>);

impl ExitHandler for Ports {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0)
    }
    fn pio_write(&self, _: u16, data: &[u8]) {
        self.0.lock().unwrap().push(data[0])
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn kvm() -> Option<kvm_ioctls::Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return None;
    }
    Some(kvm_ioctls::Kvm::new().unwrap())
}

/// Real-mode code: `xor ax, ax; l: out 0x80, al; inc ax; jmp l`.
const COUNTER: [u8; 7] = [0x31, 0xc0, 0xe6, 0x80, 0x40, 0xeb, 0xfb];

fn vm_with_counter(kvm: &kvm_ioctls::Kvm) -> (kvm_ioctls::VmFd, keel_memory::GuestMemoryMmap) {
    let mem = GuestLayout::new(2 * MIB).unwrap().create_memory().unwrap();
    mem.write_slice(&COUNTER, GuestAddress(0x1000)).unwrap();
    let vm = kvm.create_vm().unwrap();
    keel_memory::register_with_kvm(&vm, &mem).unwrap();
    (vm, mem)
}

#[test]
fn a_saved_vcpu_continues_in_a_new_vm_exactly_where_it_stopped() {
    let Some(kvm) = kvm() else { return };
    let msrs = keel_vcpu::msrs_to_save(&kvm).unwrap();
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();

    let (vm, mem) = vm_with_counter(&kvm);
    let mut vcpu = Vcpu::new(&vm, 0, mem.clone()).unwrap();
    vcpu.configure_cpuid(&supported, &keel_vcpu::CpuidConfig::new(0, 1))
        .unwrap();
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd().set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        rbx: 0x5eed,
        ..Default::default()
    };
    vcpu.fd().set_regs(&regs).unwrap();
    let ports = Ports::default();
    for _ in 0..5 {
        assert_eq!(vcpu.run_once(&ports).unwrap(), RunOutcome::Continue);
    }
    // The fifth `out` is handled, but KVM has not yet been re-entered:
    // `run` with the stop flag set completes it before returning.
    let stop = AtomicBool::new(true);
    assert_eq!(vcpu.run(&ports, &stop).unwrap(), VcpuStop::Requested);
    assert_eq!(*ports.0.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    let state = vcpu.save_state(&vm, &msrs).unwrap();
    assert_eq!(state.regs.rbx, 0x5eed);
    assert!(
        state.msrs.iter().any(|m| m.index == 0x10),
        "the TSC is among the saved MSRs"
    );

    // Through serde, into a second VM with a copy of the memory.
    let bytes = postcard::to_allocvec(&state).unwrap();
    let state: VcpuState = postcard::from_bytes(&bytes).unwrap();
    let (vm2, mem2) = vm_with_counter(&kvm);
    let mut page = vec![0u8; 0x1000];
    mem.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
    mem2.write_slice(&page, GuestAddress(0x1000)).unwrap();
    let mut restored = Vcpu::new(&vm2, 0, mem2).unwrap();
    restored.restore_state(&vm2, &supported, &state).unwrap();
    let ports2 = Ports::default();
    for _ in 0..3 {
        assert_eq!(restored.run_once(&ports2).unwrap(), RunOutcome::Continue);
    }
    assert_eq!(
        *ports2.0.lock().unwrap(),
        vec![5, 6, 7],
        "the counter goes on, nothing repeated"
    );
    assert_eq!(restored.fd().get_regs().unwrap().rbx, 0x5eed);
}

#[test]
fn a_state_of_another_vcpu_or_a_missing_cpu_feature_is_refused_before_anything_changes() {
    let Some(kvm) = kvm() else { return };
    let msrs = keel_vcpu::msrs_to_save(&kvm).unwrap();
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let (vm, mem) = vm_with_counter(&kvm);
    let vcpu = Vcpu::new(&vm, 0, mem.clone()).unwrap();
    vcpu.configure_cpuid(&supported, &keel_vcpu::CpuidConfig::new(0, 1))
        .unwrap();
    let mut state = vcpu.save_state(&vm, &msrs).unwrap();

    let other = Vcpu::new(&vm, 1, mem).unwrap();
    let err = other
        .restore_state(&vm, &supported, &state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vCPU 1") && err.contains("vCPU 0's"), "{err}");

    // A feature bit no host has (leaf 7 EBX bit 31 is AVX-512VL; pick one
    // this host lacks).
    let leaf7 = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 7 && e.index == 0)
        .copied();
    let Some(leaf7) = leaf7 else { return };
    let Some(bit) = (0..32).find(|b| leaf7.ebx & (1 << b) == 0) else {
        return;
    };
    let entry = state
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .unwrap();
    entry.ebx |= 1 << bit;
    let err = vcpu
        .restore_state(&vm, &supported, &state)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lacks a CPU feature")
            && err.contains("leaf 0x7")
            && err.contains(&format!("{:#010x}", 1u32 << bit)),
        "{err}"
    );
}
