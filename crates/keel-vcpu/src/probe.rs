//! Finding out, at run time, whether this host's KVM runs guest ring 0 in
//! hardware or in its instruction emulator.
//!
//! Some hosts (a KVM that is itself a software hypervisor, e.g. inside
//! another VM without nested virtualisation) execute guest ring-0 code in
//! KVM's emulator. The emulator lacks a few instructions Linux uses
//! (`popcnt`, `xsave`, `cmpxchg16b`, `clac`, `int3`) and hypercalls may
//! hang, so a VMM must steer the guest away from them. The probe runs three
//! real-mode instructions in a scratch VM: `popcnt` runs natively on VT-x /
//! AMD-V and fails to emulate otherwise.

use keel_memory::{GuestLayout, MIB};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// How the host runs guest ring 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring0Execution {
    /// In hardware (VT-x / AMD-V): everything works.
    Hardware,
    /// In KVM's instruction emulator: slow, and some instructions fail.
    Emulated,
}

// popcnt eax, ecx ; out 0x80, al ; hlt
const PROBE_CODE: [u8; 7] = [0xf3, 0x0f, 0xb8, 0xc1, 0xe6, 0x80, 0xf4];
const PROBE_ADDR: u64 = 0x1000;

fn probe_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, vcpu: 0, source }
}

/// Runs the probe in a throw-away VM. Takes about a millisecond.
pub fn probe_ring0_execution(kvm: &Kvm) -> Result<Ring0Execution> {
    let vm = kvm.create_vm().map_err(probe_err("KVM_CREATE_VM"))?;
    let mem = GuestLayout::new(2 * MIB)
        .and_then(|l| l.create_memory())
        .map_err(|e| Error::Probe(e.to_string()))?;
    mem.write_slice(&PROBE_CODE, GuestAddress(PROBE_ADDR))
        .map_err(|e| Error::Probe(e.to_string()))?;
    keel_memory::register_with_kvm(&vm, &mem).map_err(|e| Error::Probe(e.to_string()))?;
    let mut vcpu = vm.create_vcpu(0).map_err(probe_err("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(probe_err("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(probe_err("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: PROBE_ADDR,
        rflags: 2,
        rcx: 0xff,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(probe_err("KVM_SET_REGS"))?;
    // A bounded number of exits: the probe needs one.
    for _ in 0..4 {
        match vcpu.run().map_err(probe_err("KVM_RUN"))? {
            VcpuExit::IoOut(0x80, _) => return Ok(Ring0Execution::Hardware),
            VcpuExit::InternalError => return Ok(Ring0Execution::Emulated),
            VcpuExit::Hlt => break,
            _ => {}
        }
    }
    Err(Error::Probe(
        "the probe guest neither ran popcnt nor failed to emulate it".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_gives_a_stable_answer() {
        let kvm = Kvm::new().unwrap();
        let first = probe_ring0_execution(&kvm).unwrap();
        assert_eq!(probe_ring0_execution(&kvm).unwrap(), first);
    }
}

#[cfg(test)]
mod report {
    #[test]
    #[ignore = "prints this host's answer"]
    fn print_ring0_execution() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let t = std::time::Instant::now();
        let r = super::probe_ring0_execution(&kvm).unwrap();
        println!("ring 0: {r:?} ({:?})", t.elapsed());
    }
}
