//! A vCPU's complete architectural state, to save and to restore: what a
//! snapshot needs to continue a guest exactly where it stopped.
//!
//! [`Vcpu::save_state`] must run while the vCPU is out of `KVM_RUN` (a
//! paused VM); [`Vcpu::restore_state`] on a freshly created vCPU before its
//! first run. The state serializes with serde (`kvm-bindings`' own `serde`
//! support for the KVM structures).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Vcpu};

/// Everything KVM holds for one vCPU, in the order [`Vcpu::restore_state`]
/// puts it back.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub id: u8,
    /// The CPUID the guest saw (as set by [`Vcpu::configure_cpuid`], or
    /// else `KVM_GET_CPUID2`); restored first, since MSRs and XSAVE
    /// depend on it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// `KVM_GET_MP_STATE`: running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The FPU, SSE and AVX state (the legacy 4 KiB `KVM_GET_XSAVE` area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// DR0–DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers; `None` in a VM without KVM's local
    /// APIC (no irqchip created).
    pub lapic: Option<kvm_lapic_state>,
    /// Every MSR of KVM's save list this vCPU could read (TSC and
    /// kvmclock's among them), by index.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// The TSC frequency the guest calibrated against, in kHz.
    pub tsc_khz: Option<u32>,
}

/// The MSRs KVM can save and restore on this host (`KVM_GET_MSR_INDEX_LIST`,
/// which includes KVM's own, kvmclock's among them). Ask once and hand the
/// list to every [`Vcpu::save_state`].
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().map_err(|source| Error::Kvm {
        op: "KVM_GET_MSR_INDEX_LIST",
        vcpu: 0,
        source,
    })?;
    let mut indices = list.as_slice().to_vec();
    // TSC first, so that a TSC-relative MSR (the deadline timer) restored
    // later is relative to the restored TSC.
    indices.sort_unstable();
    indices.dedup();
    Ok(indices)
}

/// Where a feature the snapshot's CPUID uses is missing on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingCpuFeatures {
    /// CPUID leaf.
    pub leaf: u32,
    /// CPUID subleaf.
    pub subleaf: u32,
    /// The register: `"eax"`, `"ebx"`, `"ecx"` or `"edx"`.
    pub register: &'static str,
    /// The bits the snapshot used that the host's KVM does not offer.
    pub bits: u32,
}

impl std::fmt::Display for MissingCpuFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPUID leaf {:#x} subleaf {} {} bits {:#010x}",
            self.leaf, self.subleaf, self.register, self.bits
        )
    }
}

/// The feature-flag registers compared between a snapshot and a host, with
/// the bits the VMM sets itself (and so need no host support) masked off.
const FEATURE_REGISTERS: &[(u32, u32, usize, u32)] = &[
    // leaf, subleaf, register (0 eax .. 3 edx), bits the VMM sets itself
    (1, 0, 2, crate::cpuid::LEAF1_ECX_HYPERVISOR),
    (1, 0, 3, crate::cpuid::LEAF1_EDX_HTT),
    (7, 0, 1, 0),
    (7, 0, 2, 0),
    (7, 0, 3, 0),
    (0xd, 0, 0, 0),
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

/// Checks that the host's KVM (`supported`, from
/// `KVM_GET_SUPPORTED_CPUID`) offers every CPU feature a saved vCPU's
/// CPUID uses; returns the first register where features are missing.
pub fn check_cpu_features(
    saved: &[kvm_cpuid_entry2],
    supported: &CpuId,
) -> std::result::Result<(), MissingCpuFeatures> {
    const NAMES: [&str; 4] = ["eax", "ebx", "ecx", "edx"];
    let regs = |e: &kvm_cpuid_entry2| [e.eax, e.ebx, e.ecx, e.edx];
    let find = |entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32| {
        entries
            .iter()
            .find(|e| {
                e.function == leaf
                    && (e.index == subleaf || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
            })
            .copied()
    };
    for &(leaf, subleaf, register, own_bits) in FEATURE_REGISTERS {
        let Some(used) = find(saved, leaf, subleaf) else {
            continue;
        };
        // FEATURE_REGISTERS names registers 0-3 (EAX-EDX).
        let bits = |e: &kvm_cpuid_entry2| regs(e).get(register).copied().unwrap_or(0);
        let offered = find(supported.as_slice(), leaf, subleaf)
            .map(|e| bits(&e))
            .unwrap_or(0);
        let missing = bits(&used) & !offered & !own_bits;
        if missing != 0 {
            return Err(MissingCpuFeatures {
                leaf,
                subleaf,
                register: NAMES.get(register).copied().unwrap_or("?"),
                bits: missing,
            });
        }
    }
    Ok(())
}

/// The largest XSAVE area `KVM_SET_XSAVE` may read for this VM: 4 KiB,
/// unless the process enabled dynamic features (AMX) for guests.
fn xsave_fits_legacy_area(vm: &VmFd) -> bool {
    let size = vm.check_extension_int(Cap::Xsave2);
    // 0: no KVM_CAP_XSAVE2, so KVM's area is the legacy struct.
    size <= 0 || usize::try_from(size).is_ok_and(|s| s <= std::mem::size_of::<kvm_xsave>())
}

impl Vcpu {
    /// Reads this vCPU's complete state. Call it only while the vCPU is
    /// out of `KVM_RUN` with no port or MMIO exit left half-done: after
    /// [`Vcpu::run`] returned [`crate::VcpuStop::Requested`] (it re-enters
    /// KVM once with `immediate_exit` set, which completes such an exit
    /// without running guest code, as the KVM API asks before saving), or
    /// before the first run. `msr_indices` comes from [`msrs_to_save`]. MSRs on the list that this vCPU cannot read
    /// (features its CPUID hides) are left out.
    pub fn save_state(&self, vm: &VmFd, msr_indices: &[u32]) -> Result<VcpuState> {
        if !xsave_fits_legacy_area(vm) {
            return Err(Error::Snapshot {
                vcpu: self.id,
                reason: "the process enabled XSAVE features larger than 4 KiB (AMX) for guests; Keel saves the 4 KiB XSAVE area only".into(),
            });
        }
        let fd = self.fd();
        let configured = self.cpuid.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cpuid = match configured {
            Some(cpuid) => cpuid,
            None => self.kvm(
                "KVM_GET_CPUID2",
                fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
            )?,
        };
        let mp_state = self.kvm("KVM_GET_MP_STATE", fd.get_mp_state())?;
        let regs = self.kvm("KVM_GET_REGS", fd.get_regs())?;
        let sregs = self.kvm("KVM_GET_SREGS", fd.get_sregs())?;
        let xsave = self.kvm("KVM_GET_XSAVE", fd.get_xsave())?;
        let xcrs = self.kvm("KVM_GET_XCRS", fd.get_xcrs())?;
        let debug_regs = self.kvm("KVM_GET_DEBUGREGS", fd.get_debug_regs())?;
        let lapic = match fd.get_lapic() {
            Ok(lapic) => Some(lapic),
            // No in-kernel local APIC in this VM.
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENXIO => None,
            Err(source) => {
                return Err(Error::Kvm {
                    op: "KVM_GET_LAPIC",
                    vcpu: self.id,
                    source,
                })
            }
        };
        let msrs = self.read_msrs(msr_indices)?;
        let events = self.kvm("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?;
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Reads every MSR in `indices` this vCPU has, skipping those KVM
    /// refuses (it stops at the first it cannot read).
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
        let mut saved = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let batch = rest.get(..kvm_bindings::KVM_MAX_MSR_ENTRIES).unwrap_or(rest);
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Snapshot {
                vcpu: self.id,
                reason: format!("{} MSRs: {e:?}", entries.len()),
            })?;
            let read = self.kvm("KVM_GET_MSRS", self.fd().get_msrs(&mut msrs))?;
            saved.extend(msrs.as_slice().iter().take(read.min(batch.len())));
            // `read` were read; the next one (if any) is unreadable: skip it.
            let consumed = read.saturating_add(1).min(batch.len());
            rest = rest.get(consumed..).unwrap_or_default();
        }
        Ok(saved)
    }

    /// Writes saved MSRs. KVM stops at the first it refuses; one it
    /// refuses that already holds the saved value (some hosts refuse a
    /// write of a paravirtual MSR's reset value) is skipped, any other
    /// refusal is an error naming the MSR.
    fn write_msrs(&self, entries: &[kvm_msr_entry]) -> Result<()> {
        let mut rest = entries;
        while !rest.is_empty() {
            let batch = rest.get(..kvm_bindings::KVM_MAX_MSR_ENTRIES).unwrap_or(rest);
            let msrs = Msrs::from_entries(batch).map_err(|e| Error::Snapshot {
                vcpu: self.id,
                reason: format!("{} MSRs: {e:?}", batch.len()),
            })?;
            let set = self.kvm("KVM_SET_MSRS", self.fd().set_msrs(&msrs))?;
            let Some(refused) = batch.get(set) else {
                rest = rest.get(batch.len()..).unwrap_or_default();
                continue;
            };
            let current = self.read_msrs(&[refused.index])?;
            if current.first().map(|m| m.data) != Some(refused.data) {
                return Err(Error::MsrRejected {
                    vcpu: self.id,
                    index: refused.index,
                });
            }
            // `set` is an index into the batch, so the rest starts at most
            // at its end.
            rest = rest.get(set.saturating_add(1)..).unwrap_or_default();
        }
        Ok(())
    }

    /// Puts a saved state into this vCPU, which must be new (never run)
    /// and belong to a VM whose memory and interrupt controller already
    /// hold the snapshot's. `supported` is the host's
    /// `KVM_GET_SUPPORTED_CPUID`: a state using a CPU feature the host
    /// lacks is refused before anything is changed.
    pub fn restore_state(&self, vm: &VmFd, supported: &CpuId, state: &VcpuState) -> Result<()> {
        let snapshot_error = |reason: String| Error::Snapshot {
            vcpu: self.id,
            reason,
        };
        if state.id != self.id {
            return Err(snapshot_error(format!("the saved state is vCPU {}'s", state.id)));
        }
        check_cpu_features(&state.cpuid, supported).map_err(|missing| {
            snapshot_error(format!(
                "this host lacks a CPU feature the snapshot uses: {missing}"
            ))
        })?;
        if !xsave_fits_legacy_area(vm) {
            return Err(snapshot_error(
                "the process enabled XSAVE features larger than 4 KiB (AMX) for guests; Keel restores the 4 KiB XSAVE area only".into(),
            ));
        }
        let fd = self.fd();
        if let Some(khz) = state.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                self.kvm("KVM_SET_TSC_KHZ", fd.set_tsc_khz(khz)).map_err(|e| {
                    snapshot_error(format!(
                        "the snapshot's TSC runs at {khz} kHz and this host cannot scale to it: {e}"
                    ))
                })?;
            }
        }
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|e| snapshot_error(format!("{} CPUID entries: {e:?}", state.cpuid.len())))?;
        self.kvm("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
        *self.cpuid.lock().unwrap_or_else(|e| e.into_inner()) = Some(cpuid);
        self.kvm("KVM_SET_MP_STATE", fd.set_mp_state(state.mp_state))?;
        self.kvm("KVM_SET_REGS", fd.set_regs(&state.regs))?;
        self.kvm("KVM_SET_SREGS", fd.set_sregs(&state.sregs))?;
        // SAFETY: `xsave_fits_legacy_area` showed that KVM reads at most
        // `size_of::<kvm_xsave>()` bytes for this VM, which `state.xsave`
        // is (a `kvm_xsave` by value, no trailing flexible array in use).
        self.kvm("KVM_SET_XSAVE", unsafe { fd.set_xsave(&state.xsave) })?;
        self.kvm("KVM_SET_XCRS", fd.set_xcrs(&state.xcrs))?;
        self.kvm("KVM_SET_DEBUGREGS", fd.set_debug_regs(&state.debug_regs))?;
        if let Some(lapic) = &state.lapic {
            self.kvm("KVM_SET_LAPIC", fd.set_lapic(lapic))?;
        }
        self.write_msrs(&state.msrs)?;
        self.kvm("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&state.events))?;
        // Tell a kvmclock guest it was paused, so its soft-lockup watchdog
        // does not fire; EINVAL when the guest has no kvmclock is fine.
        let _ = fd.kvmclock_ctrl();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::tests::entry;

    #[test]
    fn a_feature_the_host_lacks_is_named_by_leaf_register_and_bits() {
        let host =
            CpuId::from_entries(&[entry(1, 0, 0, 0, 0x0000_0001, 0), entry(7, 0, 0, 0x10, 0, 0)]).unwrap();
        let saved = [
            entry(1, 0, 0, 0, 0x8000_0001, 1 << 28),
            entry(7, 0, 0, 0x30, 0, 0),
        ];
        let missing = check_cpu_features(&saved, &host).unwrap_err();
        assert_eq!(
            missing,
            MissingCpuFeatures {
                leaf: 7,
                subleaf: 0,
                register: "ebx",
                bits: 0x20
            }
        );
        assert_eq!(
            missing.to_string(),
            "CPUID leaf 0x7 subleaf 0 ebx bits 0x00000020"
        );
    }

    #[test]
    fn the_bits_the_vmm_sets_itself_need_no_host_support() {
        let host = CpuId::from_entries(&[entry(1, 0, 0, 0, 1, 0)]).unwrap();
        // Hypervisor (ECX 31) and HTT (EDX 28) are Keel's own.
        let saved = [entry(1, 0, 0, 0, 0x8000_0001, 1 << 28)];
        assert_eq!(check_cpu_features(&saved, &host), Ok(()));
    }

    #[test]
    fn a_state_round_trips_through_serde() {
        let state = VcpuState {
            id: 3,
            cpuid: vec![entry(1, 0, 1, 2, 3, 4)],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rip: 0x1234,
                rax: 42,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: None,
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            events: Default::default(),
            tsc_khz: Some(2_000_000),
        };
        let bytes = postcard::to_allocvec(&state).unwrap();
        let back: VcpuState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.regs.rax, 42);
        assert_eq!(back.msrs[0].data, 99);
        assert_eq!(back.cpuid[0].edx, 4);
        assert_eq!(back.tsc_khz, Some(2_000_000));
    }
}
