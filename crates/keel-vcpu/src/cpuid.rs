//! CPUID as an explicit transform of what KVM supports.
//!
//! [`CpuidConfig::apply`] is a pure function over a [`CpuId`]: the policy of
//! which bits a guest sees lives here and nowhere else, and it is unit-tested
//! without KVM.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// KVM's paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// KVM paravirtual features that need no hypercall: kvm-clock (bits 0 and
/// 3), `NOP_IO_DELAY` (1) and `CLOCKSOURCE_STABLE_BIT` (24). The others (PV
/// spinlock kick, PV send-IPI, PV TLB flush, async PF, …) make hypercalls.
pub const KVM_FEATURES_WITHOUT_HYPERCALLS: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

/// Leaf 1 ECX bits of instructions a software-emulated ring 0 cannot run:
/// CX16 (cmpxchg16b), MOVBE, POPCNT, XSAVE, OSXSAVE, AVX, RDRAND.
const LEAF1_ECX_UNEMULATED: u32 =
    (1 << 13) | (1 << 22) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30);
/// Leaf 7 EBX: FSGSBASE, BMI1, AVX2, SMEP, BMI2, ERMS, RDSEED, SMAP.
const LEAF7_EBX_UNEMULATED: u32 =
    (1 << 0) | (1 << 3) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 18) | (1 << 20);
/// Leaf 7 ECX: UMIP, PKU, RDPID.
const LEAF7_ECX_UNEMULATED: u32 = (1 << 2) | (1 << 3) | (1 << 22);
/// Leaf 7 EDX: FSRM.
const LEAF7_EDX_UNEMULATED: u32 = 1 << 4;
/// Leaf 0x8000_0001 ECX: ABM (lzcnt).
const LEAF_EXT1_ECX_UNEMULATED: u32 = 1 << 5;

pub(crate) const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
pub(crate) const LEAF1_EDX_HTT: u32 = 1 << 28;

/// What the guest's CPUID should say about one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidConfig {
    /// This vCPU's index, used as its APIC ID.
    pub vcpu_id: u8,
    /// How many vCPUs the VM has.
    pub vcpu_count: u8,
    /// Offer only the KVM paravirtual features that make no hypercalls
    /// ([`KVM_FEATURES_WITHOUT_HYPERCALLS`]). Needed where hypercalls hang.
    pub no_pv_hypercalls: bool,
    /// Hide features whose instructions a software-emulated ring 0 cannot
    /// execute (see `docs/host-kvm-notes.md`). Harmless but unnecessary on VT-x /
    /// AMD-V hosts.
    pub hide_unemulated_instructions: bool,
    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`), published in
    /// the hypervisor timing leaf 0x4000_0010 (EAX: TSC kHz, EBX: local
    /// APIC timer kHz), as QEMU and VMware do, so a guest without a PIT to
    /// calibrate against still knows it. `None`: no timing leaf.
    pub tsc_khz: Option<u32>,
}

/// The hypervisor timing leaf (VMware's convention, also used by QEMU).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer counts at 1 GHz (1 ns per bus cycle).
const KVM_APIC_TIMER_KHZ: u32 = 1_000_000;
/// The first hypervisor leaf: EAX is the highest hypervisor leaf.
const HYPERVISOR_BASE_LEAF: u32 = 0x4000_0000;

impl CpuidConfig {
    /// The configuration for vCPU `vcpu_id` of `vcpu_count`, with no host
    /// quirks.
    pub fn new(vcpu_id: u8, vcpu_count: u8) -> Self {
        CpuidConfig {
            vcpu_id,
            vcpu_count,
            no_pv_hypercalls: false,
            hide_unemulated_instructions: false,
            tsc_khz: None,
        }
    }

    /// Rewrites `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) into what
    /// this vCPU should see.
    pub fn apply(&self, cpuid: &mut CpuId) {
        for entry in cpuid.as_mut_slice() {
            self.apply_entry(entry);
        }
        if let Some(khz) = self.tsc_khz {
            Self::add_timing_leaf(cpuid, khz);
        }
    }

    /// Raises the hypervisor leaf range to [`TIMING_LEAF`] and fills it in;
    /// nothing when KVM offers no hypervisor leaves at all.
    fn add_timing_leaf(cpuid: &mut CpuId, khz: u32) {
        let slice = cpuid.as_mut_slice();
        let Some(base) = slice.iter_mut().find(|e| e.function == HYPERVISOR_BASE_LEAF) else {
            return;
        };
        base.eax = base.eax.max(TIMING_LEAF);
        let timing = kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: KVM_APIC_TIMER_KHZ,
            ..Default::default()
        };
        match slice.iter_mut().find(|e| e.function == TIMING_LEAF) {
            Some(existing) => *existing = timing,
            None => {
                if cpuid.push(timing).is_err() {
                    log::warn!("CPUID table full: no timing leaf {TIMING_LEAF:#x}");
                }
            }
        }
    }

    fn apply_entry(&self, e: &mut kvm_cpuid_entry2) {
        let apic_id = u32::from(self.vcpu_id);
        let count = u32::from(self.vcpu_count.max(1));
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors,
                // [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                if self.hide_unemulated_instructions {
                    e.ecx &= !LEAF1_ECX_UNEMULATED;
                }
            }
            4 => {
                // Deterministic cache parameters: EAX[31:26] is cores per
                // package minus one; one core per vCPU, no SMT.
                e.eax = (e.eax & 0x03ff_ffff) | (count.saturating_sub(1) << 26);
            }
            7 if e.index == 0 && self.hide_unemulated_instructions => {
                e.ebx &= !LEAF7_EBX_UNEMULATED;
                e.ecx &= !LEAF7_ECX_UNEMULATED;
                e.edx &= !LEAF7_EDX_UNEMULATED;
            }
            0xa => {
                // No virtual PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                // Extended topology: level 0 is SMT (one thread per core),
                // level 1 is cores (every vCPU a core); EDX is the x2APIC ID.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = u32::BITS.saturating_sub(count.saturating_sub(1).leading_zeros());
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            KVM_CPUID_FEATURES if self.no_pv_hypercalls => {
                e.eax &= KVM_FEATURES_WITHOUT_HYPERCALLS;
            }
            0x8000_0001 if self.hide_unemulated_instructions => {
                e.ecx &= !LEAF_EXT1_ECX_UNEMULATED;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CPUID entry (also for the state module's tests).
    pub(crate) fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn cpuid(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn timing_leaf_publishes_the_tsc_frequency_and_extends_the_hypervisor_range() {
        let mut c = cpuid(&[entry(
            HYPERVISOR_BASE_LEAF,
            0,
            KVM_CPUID_FEATURES,
            0x4b4d564b,
            0x564b4d56,
            0x4d,
        )]);
        let config = CpuidConfig {
            tsc_khz: Some(2_100_000),
            ..CpuidConfig::new(0, 1)
        };
        config.apply(&mut c);
        assert_eq!(find(&c, HYPERVISOR_BASE_LEAF, 0).eax, TIMING_LEAF);
        assert_eq!(
            find(&c, HYPERVISOR_BASE_LEAF, 0).ebx,
            0x4b4d564b,
            "signature kept"
        );
        let t = find(&c, TIMING_LEAF, 0);
        assert_eq!((t.eax, t.ebx), (2_100_000, 1_000_000));
        // Applying twice replaces the leaf rather than adding another.
        config.apply(&mut c);
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == TIMING_LEAF).count(),
            1
        );
    }

    #[test]
    fn no_timing_leaf_without_a_frequency_or_without_hypervisor_leaves() {
        let mut c = cpuid(&[entry(HYPERVISOR_BASE_LEAF, 0, KVM_CPUID_FEATURES, 0, 0, 0)]);
        CpuidConfig::new(0, 1).apply(&mut c);
        assert_eq!(find(&c, HYPERVISOR_BASE_LEAF, 0).eax, KVM_CPUID_FEATURES);
        assert!(c.as_slice().iter().all(|e| e.function != TIMING_LEAF));
        let mut bare = cpuid(&[entry(1, 0, 0, 0, 0, 0)]);
        CpuidConfig {
            tsc_khz: Some(1_000_000),
            ..CpuidConfig::new(0, 1)
        }
        .apply(&mut bare);
        assert!(bare.as_slice().iter().all(|e| e.function != TIMING_LEAF));
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = cpuid(&[entry(1, 0, 0x806f8, 0xff00_00ff, 0, 0)]);
        CpuidConfig::new(3, 4).apply(&mut c);
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 3, "APIC ID");
        assert_eq!((e.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!((e.ebx >> 8) & 0xff, 8, "clflush size");
        assert_eq!(e.ebx & 0xff, 0xff, "brand index kept");
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = cpuid(&[entry(1, 0, 0, 0, 0, LEAF1_EDX_HTT)]);
        CpuidConfig::new(0, 1).apply(&mut c);
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn quirk_hides_cx16_xsave_popcnt_and_smap() {
        let mut c = cpuid(&[
            entry(1, 0, 0, 0, !LEAF1_ECX_HYPERVISOR, 0),
            entry(7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
        ]);
        let mut cfg = CpuidConfig::new(0, 1);
        cfg.hide_unemulated_instructions = true;
        cfg.apply(&mut c);
        let l1 = find(&c, 1, 0);
        for bit in [13, 23, 26, 28] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        assert_eq!(l1.ecx & (1 << 0), 1, "SSE3 kept");
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx & (1 << 20), 0, "SMAP");
        assert_eq!(l7.ebx & (1 << 7), 0, "SMEP");
        assert_ne!(l7.ebx & (1 << 1), 0, "unrelated bit kept");
    }

    #[test]
    fn without_quirk_instruction_bits_are_untouched() {
        let mut c = cpuid(&[entry(1, 0, 0, 0, 1 << 13, 0), entry(7, 0, 0, 1 << 20, 0, 0)]);
        CpuidConfig::new(0, 1).apply(&mut c);
        assert_ne!(find(&c, 1, 0).ecx & (1 << 13), 0);
        assert_ne!(find(&c, 7, 0).ebx & (1 << 20), 0);
    }

    #[test]
    fn no_pv_hypercalls_keeps_only_clock_and_io_delay_features() {
        let mut c = cpuid(&[entry(KVM_CPUID_FEATURES, 0, u32::MAX, 0, 0, 0)]);
        let mut cfg = CpuidConfig::new(0, 2);
        cfg.no_pv_hypercalls = true;
        cfg.apply(&mut c);
        assert_eq!(find(&c, KVM_CPUID_FEATURES, 0).eax, 0x0100_000b);
    }

    #[test]
    fn pv_features_untouched_by_default() {
        let mut c = cpuid(&[entry(KVM_CPUID_FEATURES, 0, u32::MAX, 0, 0, 0)]);
        CpuidConfig::new(0, 2).apply(&mut c);
        assert_eq!(find(&c, KVM_CPUID_FEATURES, 0).eax, u32::MAX);
    }

    #[test]
    fn topology_leaf_reports_cores_and_x2apic_id() {
        let mut c = cpuid(&[
            entry(0xb, 0, 9, 9, 9, 9),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xb, 2, 9, 9, 9, 9),
        ]);
        CpuidConfig::new(1, 4).apply(&mut c);
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 1));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 1));
        let end = find(&c, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
    }

    #[test]
    fn pmu_leaf_is_cleared() {
        let mut c = cpuid(&[entry(0xa, 0, 1, 2, 3, 4)]);
        CpuidConfig::new(0, 1).apply(&mut c);
        let e = find(&c, 0xa, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
    }

    #[test]
    fn cache_leaf_reports_cores_per_package() {
        let mut c = cpuid(&[entry(4, 0, 0xffff_ffff, 0, 0, 0)]);
        CpuidConfig::new(0, 2).apply(&mut c);
        assert_eq!(find(&c, 4, 0).eax >> 26, 1);
    }
}
