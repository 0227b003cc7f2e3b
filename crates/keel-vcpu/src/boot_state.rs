//! Architectural state for entering a kernel through Linux's 64-bit boot
//! protocol: GDT, identity page tables, segments, control registers,
//! general registers, FPU, MSRs and the local APIC's LINT pins.

use keel_memory::{
    GuestMemoryMmap, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// Linux's 64-bit boot protocol wants `__BOOT_CS` = 0x10 and `__BOOT_DS` =
/// 0x18, so the GDT has two null entries first.
pub const BOOT_GDT: [u64; 5] = [
    0,                             // null
    0,                             // null
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code, DPL 0
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data, DPL 0
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: busy 64-bit TSS
];
/// GDTR's limit for [`BOOT_GDT`]: its size in bytes, minus one.
const BOOT_GDT_LIMIT: u16 = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
/// Code selector at entry.
pub const BOOT_CS: u16 = 0x10;
/// Data selector at entry.
pub const BOOT_DS: u16 = 0x18;
/// Task register selector at entry.
pub const BOOT_TSS: u16 = 0x20;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT descriptor from access/flags (`0xF0FF` mask), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT descriptor into the segment KVM loads for `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Writes the boot GDT, an empty IDT and identity page tables covering the
/// first 1 GiB (2 MiB pages) into guest memory. Once per VM, before any vCPU
/// enters.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let write = |what: &'static str, addr: GuestAddress, bytes: &[u8]| {
        mem.write_slice(bytes, addr).map_err(|source| Error::BootTables {
            what,
            addr: addr.0,
            source,
        })
    };
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write("GDT", BOOT_GDT_START, &gdt)?;
    write("IDT", BOOT_IDT_START, &0u64.to_le_bytes())?;
    write("PML4", PML4_START, &(PDPTE_START.0 | 0x03).to_le_bytes())?;
    write("PDPT", PDPTE_START, &(PDE_START.0 | 0x03).to_le_bytes())?;
    // 512 2 MiB pages, present + writable + page size.
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write("page directory", PDE_START, &pd)
}

/// Points GDTR/IDTR at the boot tables and loads flat `code`, `data` (every
/// data segment register) and `tss`: what both entry protocols share.
fn load_boot_tables_and_segments(
    sregs: &mut kvm_sregs,
    code: kvm_segment,
    data: kvm_segment,
    tss: kvm_segment,
) {
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = BOOT_GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Special registers for a 64-bit entry, starting from `sregs` as KVM has
/// them (so fields this code does not own keep their reset values).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[2], BOOT_CS);
    let data = segment_from_gdt(BOOT_GDT[3], BOOT_DS);
    let tss = segment_from_gdt(BOOT_GDT[4], BOOT_TSS);
    load_boot_tables_and_segments(&mut sregs, code, data, tss);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START.0;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for a PVH entry: 32-bit protected mode, flat
/// segments, paging off (the PVH ABI).
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), BOOT_CS);
    let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
    let mut tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), BOOT_TSS);
    tss.g = 0;
    load_boot_tables_and_segments(&mut sregs, code, data, tss);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers for a PVH entry at `entry` with `EBX` pointing at
/// `hvm_start_info`.
pub fn pvh_regs(entry: GuestAddress, start_info: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rbx: start_info.0,
        ..Default::default()
    }
}

/// General registers for a 64-bit entry at `entry`: boot stack, `RSI` at
/// the zero page, interrupts off.
pub fn long_mode_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER.0,
        rbp: BOOT_STACK_POINTER.0,
        rsi: ZERO_PAGE_START.0,
        ..Default::default()
    }
}

/// FPU state at reset as Linux expects it (x87 control word, MXCSR).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices set at boot.
pub mod msr_index {
    /// `IA32_TSC`.
    pub const TSC: u32 = 0x10;
    /// `IA32_SYSENTER_CS`.
    pub const SYSENTER_CS: u32 = 0x174;
    /// `IA32_SYSENTER_ESP`.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// `IA32_SYSENTER_EIP`.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// `IA32_MISC_ENABLE`.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// `IA32_MTRR_DEF_TYPE`.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// `STAR`.
    pub const STAR: u32 = 0xc000_0081;
    /// `LSTAR`.
    pub const LSTAR: u32 = 0xc000_0082;
    /// `CSTAR`.
    pub const CSTAR: u32 = 0xc000_0083;
    /// `SFMASK`.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// `KERNEL_GS_BASE`.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// The MSRs a vCPU gets at boot: syscall/sysenter cleared, TSC at 0, fast
/// strings on, MTRRs enabled with write-back as the default type.
// Cannot panic: a fixed list of 11 entries, far below KVM_MAX_MSR_ENTRIES
// (256), the only limit Msrs::from_entries checks.
#[allow(clippy::expect_used)]
pub fn boot_msrs() -> Msrs {
    use msr_index::*;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(SYSENTER_CS, 0),
        entry(SYSENTER_ESP, 0),
        entry(SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(TSC, 0),
        entry(MISC_ENABLE, 1),
        entry(MTRR_DEF_TYPE, (1 << 11) | 6),
    ])
    .expect("fewer entries than KVM_MAX_MSR_ENTRIES")
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The 32-bit local APIC register at `offset` (0 past the register page).
fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    if let Some(reg) = state.regs.get(offset..).and_then(|rest| rest.get(..4)) {
        for (byte, &r) in bytes.iter_mut().zip(reg) {
            *byte = r as u8;
        }
    }
    u32::from_le_bytes(bytes)
}

/// Sets the 32-bit local APIC register at `offset` (nothing past the
/// register page).
fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    if let Some(reg) = state.regs.get_mut(offset..).and_then(|rest| rest.get_mut(..4)) {
        for (r, byte) in reg.iter_mut().zip(value.to_le_bytes()) {
            *r = byte as _;
        }
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Routes LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as
/// firmware does on a PC.
pub fn lint_pins_as_pc(mut state: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(&mut state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(&mut state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::{GuestLayout, MIB};

    #[test]
    fn gdt_entry_round_trips_through_segment_decoding() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 0x10);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 0x10));
        assert_eq!(
            (
                code.type_,
                code.present,
                code.dpl,
                code.s,
                code.l,
                code.db,
                code.g
            ),
            (0xb, 1, 0, 1, 1, 0, 1)
        );
        let data = segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 0x18);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!((data.type_, data.db, data.l), (0x3, 1, 0));
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 0x20);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn gdt_entry_matches_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn boot_tables_identity_map_the_first_gigabyte() {
        let mem = GuestLayout::new(16 * MIB).unwrap().create_memory().unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4, PDPTE_START.0 | 3);
        let pdpte: u64 = mem.read_obj(PDPTE_START).unwrap();
        assert_eq!(pdpte, PDE_START.0 | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START.0 + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START.0 + 0x10)).unwrap();
        assert_eq!(code, BOOT_GDT[2]);
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_64_bit_code() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START.0);
        assert_eq!((s.cs.selector, s.cs.l), (BOOT_CS, 1));
        assert_eq!(s.ss.selector, BOOT_DS);
    }

    #[test]
    fn pvh_sregs_are_flat_32_bit_protected_mode_without_paging() {
        let s = pvh_sregs(long_mode_sregs(kvm_sregs::default()));
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit, s.cs.base), (1, 0, 0xffff_ffff, 0));
        assert_eq!((s.tr.type_, s.tr.limit), (0xb, 0x67));
    }

    #[test]
    fn long_mode_regs_point_rsi_at_zero_page() {
        let r = long_mode_regs(GuestAddress(0x100_0000));
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, 0x7000, 0x8ff0, 2));
    }

    #[test]
    fn lint_pins_become_extint_and_nmi_keeping_other_bits() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0000); // masked
        let state = lint_pins_as_pc(state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&state, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn boot_msrs_enable_mtrrs_write_back() {
        let msrs = boot_msrs();
        let mtrr = msrs
            .as_slice()
            .iter()
            .find(|e| e.index == msr_index::MTRR_DEF_TYPE)
            .unwrap();
        assert_eq!(mtrr.data, 0x806);
    }
}
