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

// `_IO`, not `_IOW`, in <linux/kvm.h>, although it takes a pointer to a
// `struct kvm_reinject_control`.
vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// What KVM's in-kernel PIT does with timer ticks the guest has not
/// acknowledged yet (`KVM_REINJECT_CONTROL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PitTicks {
    /// Reinject them later, so a guest that counts PIT interrupts to keep
    /// time catches up (KVM's default when the PIT is created). Only guests
    /// that keep time by counting PIT ticks need it (Linux 2.4 and older);
    /// on its way out KVM must unhook the acknowledgement tracker this mode
    /// installs, which waits for an SRCU grace period (8–16 ms on the
    /// development host) inside VM teardown.
    Reinject,
    /// Drop them ("!reinject mode", which the KVM API documentation
    /// recommends unless the guest keeps time with the PIT; QEMU's
    /// `lost_tick_policy=discard`). The default.
    #[default]
    Discard,
}

/// Sets the in-kernel PIT's tick policy (`KVM_REINJECT_CONTROL`).
///
/// Switching to [`PitTicks::Discard`] unhooks KVM's acknowledgement
/// tracker, and KVM then waits for an SRCU grace period before returning:
/// milliseconds (about 14 ms on the development host). Nothing else waits
/// for it, so a VMM can make this call on a thread of its own while the
/// guest starts, as `keel-vmm` does, and join that thread before the VM is
/// torn down. Setting the policy the PIT already has returns at once.
///
/// # Example
///
/// ```
/// use keel_irq::PitTicks;
/// let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
/// keel_irq::create_in_kernel_irqchip(&vm).unwrap();
/// keel_irq::set_pit_ticks(&vm, PitTicks::Discard).unwrap();
/// ```
pub fn set_pit_ticks(vm: &impl std::os::fd::AsRawFd, ticks: PitTicks) -> Result<()> {
    let control = kvm_bindings::kvm_reinject_control {
        pit_reinject: u8::from(ticks == PitTicks::Reinject),
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads one `kvm_reinject_control`, which
    // `control` is, and keeps no reference to it.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_REINJECT_CONTROL(), &control) };
    if ret < 0 {
        return Err(Error::PitTicks {
            ticks,
            source: std::io::Error::last_os_error(),
        });
    }
    log::debug!("in-kernel PIT tick policy: {ticks:?}");
    Ok(())
}

#[cfg(test)]
mod state_tests {
    use super::*;

    #[test]
    fn kernel_irqchip_state_survives_a_trip_into_another_vm() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        create_in_kernel_irqchip(&vm).unwrap();
        let mut state = KernelIrqchipState::save(&vm).unwrap();
        // Mask everything on the master PIC (IMR at byte 1 of its state).
        // Writing a union field is safe; chip_id 0 makes `pic` the live one.
        state.pic_master.chip.pic.imr = 0xfb;
        let bytes = serde_json::to_vec(&state).unwrap();
        let state: KernelIrqchipState = serde_json::from_slice(&bytes).unwrap();
        let other = kvm.create_vm().unwrap();
        create_in_kernel_irqchip(&other).unwrap();
        state.restore(&other).unwrap();
        let back = KernelIrqchipState::save(&other).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { back.pic_master.chip.pic.imr }, 0xfb);
        assert_eq!(back.pit.channels[0].count, state.pit.channels[0].count);
    }
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
    fn pit_tick_policy_can_be_switched_both_ways() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        create_in_kernel_irqchip(&vm).unwrap();
        set_pit_ticks(&vm, PitTicks::Discard).unwrap();
        set_pit_ticks(&vm, PitTicks::Reinject).unwrap();
        set_pit_ticks(&vm, PitTicks::Discard).unwrap();
    }

    #[test]
    fn pit_tick_policy_without_a_pit_is_an_error_naming_the_policy() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        let err = set_pit_ticks(&vm, PitTicks::Discard).unwrap_err();
        assert!(err.to_string().contains("Discard"), "{err}");
        assert!(err.to_string().contains("KVM_REINJECT_CONTROL"), "{err}");
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

/// KVM's in-kernel interrupt controllers and PIT, as a snapshot keeps
/// them (`KVM_GET_IRQCHIP` for both PICs and the IOAPIC, `KVM_GET_PIT2`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct KernelIrqchipState {
    /// The master 8259 PIC.
    pub pic_master: kvm_bindings::kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_bindings::kvm_irqchip,
    /// KVM's IOAPIC.
    pub ioapic: kvm_bindings::kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_bindings::kvm_pit_state2,
}

impl KernelIrqchipState {
    /// Reads the state of a VM made with [`create_in_kernel_irqchip`],
    /// while its vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self> {
        let chip = |id: u32| {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(|source| Error::IrqchipState {
                    op: "KVM_GET_IRQCHIP",
                    chip: id,
                    source,
                })
        };
        Ok(Self {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(|source| Error::IrqchipState {
                op: "KVM_GET_PIT2",
                chip: 3,
                source,
            })?,
        })
    }

    /// Puts the state into a new VM made with [`create_in_kernel_irqchip`],
    /// before its vCPUs run.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(|source| Error::IrqchipState {
                op: "KVM_SET_IRQCHIP",
                chip: chip.chip_id,
                source,
            })?;
        }
        vm.set_pit2(&self.pit).map_err(|source| Error::IrqchipState {
            op: "KVM_SET_PIT2",
            chip: 3,
            source,
        })
    }
}
