//! The x86 platform's interrupt controllers and timer, emulated by KVM.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use crate::{Error, Result};

/// Creates KVM's in-kernel interrupt controllers (the two cascaded 8259 PICs
/// and the IOAPIC, `KVM_CREATE_IRQCHIP`) and its 8254 PIT
/// (`KVM_CREATE_PIT2`).
///
/// Call it once per VM, **before any vCPU is created**: KVM builds each
/// vCPU's local APIC only when an in-kernel irqchip already exists, and it
/// refuses `KVM_CREATE_IRQCHIP` once a vCPU is there.
///
/// The PIT is created with `KVM_PIT_SPEAKER_DUMMY`, so KVM also answers port
/// 0x61 (the PC speaker and NMI status port, which carries the output of PIT
/// channel 2). Linux reads it when it calibrates the TSC against the PIT;
/// without the flag every such read would exit to the VMM.
///
/// With the irqchip in place, GSIs 0–15 reach both the PIC and the IOAPIC and
/// GSIs 16–23 the IOAPIC only (KVM's default routing); [`crate::IrqfdLine`]
/// raises them.
///
/// # Example
///
/// ```
/// let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
/// keel_irq::create_in_kernel_irqchip(&vm).unwrap();
/// // Only once:
/// assert!(keel_irq::create_in_kernel_irqchip(&vm).is_err());
/// ```
pub fn create_in_kernel_irqchip(vm: &VmFd) -> Result<()> {
    vm.create_irq_chip().map_err(Error::CreateIrqchip)?;
    let flags = KVM_PIT_SPEAKER_DUMMY;
    let pit_config = kvm_pit_config {
        flags,
        ..Default::default()
    };
    vm.create_pit2(pit_config)
        .map_err(|source| Error::CreatePit { flags, source })?;
    log::debug!("created in-kernel PIC, IOAPIC and PIT (flags {flags:#x})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
    use kvm_ioctls::Kvm;

    #[test]
    fn creates_pic_ioapic_and_pit() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        create_in_kernel_irqchip(&vm).unwrap();

        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut ioapic).unwrap();
        vm.get_pit2().unwrap();
    }

    #[test]
    fn refuses_a_second_irqchip_and_says_which_ioctl_failed() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        create_in_kernel_irqchip(&vm).unwrap();

        let err = create_in_kernel_irqchip(&vm).unwrap_err();
        assert!(matches!(err, Error::CreateIrqchip(_)), "{err:?}");
        assert!(err.to_string().contains("KVM_CREATE_IRQCHIP"), "{err}");
    }

    #[test]
    fn refuses_an_irqchip_once_a_vcpu_exists() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        let _vcpu = vm.create_vcpu(0).unwrap();

        let err = create_in_kernel_irqchip(&vm).unwrap_err();
        assert!(err.to_string().contains("before any vCPU"), "{err}");
    }
}
