//! Completing instructions a host's KVM cannot emulate.
//!
//! Where KVM runs guest ring 0 in its instruction emulator (see
//! `docs/host-kvm-notes.md`), a few instructions a stock kernel executes
//! stop the vCPU with `KVM_EXIT_INTERNAL_ERROR` (emulation failure): the
//! SSE control-register and x87 control instructions of the kernel's FPU
//! code. The VMM completes them as the CPU would: decode the instruction
//! (`iced-x86`), compute its memory operand's linear address from the
//! registers and segment bases, translate it with the guest's page tables
//! (`KVM_TRANSLATE`), update the FPU state through KVM, advance RIP. A
//! fault the CPU would raise (a page not present, reserved MXCSR bits) is
//! injected instead. On VT-x/AMD-V hosts none of this runs: the CPU
//! executes these instructions itself.
//!
//! The semantics are written against [`Machine`], so each instruction form
//! is unit-tested without KVM.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};
use kvm_bindings::kvm_fpu;

/// What the VMM must provide to complete an instruction.
pub(crate) trait Machine {
    /// A general-purpose register's full 64-bit value.
    fn gpr(&self, register: Register) -> u64;
    /// The base of segment `register` (FS and GS carry real bases in long
    /// mode; the others are 0 there).
    fn segment_base(&self, register: Register) -> u64;
    /// Reads guest-linear memory; `Err(addr)` names the first byte whose
    /// page is not mapped.
    fn read(&mut self, linear: u64, buf: &mut [u8]) -> Result<(), u64>;
    /// Writes guest-linear memory; `Err(addr)` as for [`Machine::read`].
    fn write(&mut self, linear: u64, data: &[u8]) -> Result<(), u64>;
    /// The x87/SSE state.
    fn fpu(&mut self) -> &mut kvm_fpu;
}

/// What completing the instruction came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Done: RIP moves past these many bytes.
    Done { len: u64 },
    /// The CPU would raise #GP(0) (reserved MXCSR bits set).
    GeneralProtection,
    /// The CPU would raise #PF at this linear address (`write`: on a store).
    PageFault { address: u64, write: bool },
    /// Not an instruction Keel completes.
    Unsupported,
}

/// MXCSR bits a guest may set (the usual MXCSR_MASK, `DAZ` included).
const MXCSR_MASK: u32 = 0xffff;

/// The instruction in `bytes` (at `rip`, 64-bit code), decoded.
pub(crate) fn decode(bytes: &[u8], rip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    (!instruction.is_invalid()).then_some(instruction)
}

/// The linear address of `instruction`'s memory operand.
fn memory_address(instruction: &Instruction, machine: &impl Machine) -> u64 {
    let base = match instruction.memory_base() {
        Register::None => 0,
        // RIP-relative: iced already folded the next RIP into the
        // displacement.
        Register::RIP => 0,
        r => machine.gpr(r),
    };
    let index = match instruction.memory_index() {
        Register::None => 0,
        r => machine
            .gpr(r)
            .wrapping_mul(u64::from(instruction.memory_index_scale())),
    };
    let offset = base
        .wrapping_add(index)
        .wrapping_add(instruction.memory_displacement64());
    machine
        .segment_base(instruction.memory_segment())
        .wrapping_add(offset)
}

/// Completes the instruction in `bytes` at `rip` on `machine`.
pub(crate) fn complete(bytes: &[u8], rip: u64, machine: &mut impl Machine) -> Completion {
    let Some(instruction) = decode(bytes, rip) else {
        return Completion::Unsupported;
    };
    let len = instruction.len() as u64;
    let has_memory = instruction.op_count() == 1 && instruction.op0_kind() == OpKind::Memory;
    let done = Completion::Done { len };
    let fault = |address: u64, write: bool| Completion::PageFault { address, write };
    match instruction.code() {
        Code::Ldmxcsr_m32 | Code::VEX_Vldmxcsr_m32 if has_memory => {
            let at = memory_address(&instruction, machine);
            let mut value = [0u8; 4];
            if let Err(address) = machine.read(at, &mut value) {
                return fault(address, false);
            }
            let value = u32::from_le_bytes(value);
            if value & !MXCSR_MASK != 0 {
                return Completion::GeneralProtection;
            }
            machine.fpu().mxcsr = value;
            done
        }
        Code::Stmxcsr_m32 | Code::VEX_Vstmxcsr_m32 if has_memory => {
            let at = memory_address(&instruction, machine);
            let value = machine.fpu().mxcsr.to_le_bytes();
            match machine.write(at, &value) {
                Ok(()) => done,
                Err(address) => fault(address, true),
            }
        }
        Code::Fldcw_m2byte if has_memory => {
            let at = memory_address(&instruction, machine);
            let mut value = [0u8; 2];
            if let Err(address) = machine.read(at, &mut value) {
                return fault(address, false);
            }
            machine.fpu().fcw = u16::from_le_bytes(value);
            done
        }
        Code::Fnstcw_m2byte if has_memory => {
            let at = memory_address(&instruction, machine);
            let value = machine.fpu().fcw.to_le_bytes();
            match machine.write(at, &value) {
                Ok(()) => done,
                Err(address) => fault(address, true),
            }
        }
        Code::Fnstsw_m2byte if has_memory => {
            let at = memory_address(&instruction, machine);
            let value = machine.fpu().fsw.to_le_bytes();
            match machine.write(at, &value) {
                Ok(()) => done,
                Err(address) => fault(address, true),
            }
        }
        Code::Fninit => {
            let fpu = machine.fpu();
            fpu.fcw = 0x037f;
            fpu.fsw = 0;
            // Abridged tag word: every register empty.
            fpu.ftwx = 0;
            fpu.last_opcode = 0;
            fpu.last_ip = 0;
            fpu.last_dp = 0;
            done
        }
        Code::Fnclex => {
            // Clears the exception flags, ES and B.
            machine.fpu().fsw &= !0x80ff;
            done
        }
        Code::Fxsave64_m512byte | Code::Fxsave_m512byte if has_memory => {
            let at = memory_address(&instruction, machine);
            let image = fxsave_image(machine.fpu());
            match machine.write(at, &image) {
                Ok(()) => done,
                Err(address) => fault(address, true),
            }
        }
        Code::Fxrstor64_m512byte | Code::Fxrstor_m512byte if has_memory => {
            let at = memory_address(&instruction, machine);
            let mut image = [0u8; 512];
            if let Err(address) = machine.read(at, &mut image) {
                return fault(address, false);
            }
            match fxrstor_image(&image, machine.fpu()) {
                Ok(()) => done,
                Err(()) => Completion::GeneralProtection,
            }
        }
        _ => Completion::Unsupported,
    }
}

/// The 512-byte FXSAVE image (64-bit layout) of `fpu`.
fn fxsave_image(fpu: &kvm_fpu) -> [u8; 512] {
    let mut image = [0u8; 512];
    image[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    image[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    image[4] = fpu.ftwx;
    image[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    image[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
    image[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    image[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    image[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    // ST0–ST7 at 32..160 and XMM0–XMM15 at 160..416, 16 bytes each.
    for (slot, st) in image[32..160].chunks_exact_mut(16).zip(&fpu.fpr) {
        slot.copy_from_slice(st);
    }
    for (slot, xmm) in image[160..416].chunks_exact_mut(16).zip(&fpu.xmm) {
        slot.copy_from_slice(xmm);
    }
    image
}

/// Loads `fpu` from a 512-byte FXSAVE image; `Err` where the CPU raises
/// #GP (reserved MXCSR bits).
fn fxrstor_image(image: &[u8; 512], fpu: &mut kvm_fpu) -> Result<(), ()> {
    let u16_at = |o: usize| u16::from_le_bytes(bytes_at(image, o));
    let u32_at = |o: usize| u32::from_le_bytes(bytes_at(image, o));
    let u64_at = |o: usize| u64::from_le_bytes(bytes_at(image, o));
    let mxcsr = u32_at(24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(());
    }
    fpu.fcw = u16_at(0);
    fpu.fsw = u16_at(2);
    fpu.ftwx = image[4];
    fpu.last_opcode = u16_at(6);
    fpu.last_ip = u64_at(8);
    fpu.last_dp = u64_at(16);
    fpu.mxcsr = mxcsr;
    for (st, slot) in fpu.fpr.iter_mut().zip(image[32..160].chunks_exact(16)) {
        st.copy_from_slice(slot);
    }
    for (xmm, slot) in fpu.xmm.iter_mut().zip(image[160..416].chunks_exact(16)) {
        xmm.copy_from_slice(slot);
    }
    Ok(())
}

/// The `N` bytes of `image` at `offset` (the FXSAVE fields are all inside
/// the image; zeros past its end).
fn bytes_at<const N: usize>(image: &[u8], offset: usize) -> [u8; N] {
    image
        .get(offset..)
        .and_then(|rest| rest.first_chunk::<N>())
        .copied()
        .unwrap_or([0; N])
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Registers, a GS base, a page of mapped memory at 0x1000 and the FPU.
    #[derive(Default)]
    struct Model {
        gprs: BTreeMap<Register, u64>,
        gs_base: u64,
        page: Vec<u8>,
        fpu: kvm_fpu,
    }

    const PAGE: u64 = 0x1000;

    impl Model {
        fn new() -> Self {
            let mut m = Model {
                page: vec![0; 4096],
                ..Default::default()
            };
            m.fpu.mxcsr = 0x1f80;
            m.fpu.fcw = 0x037f;
            m
        }

        fn at(&self, linear: u64, len: usize) -> Result<usize, u64> {
            match linear.checked_sub(PAGE) {
                Some(o) if o as usize + len <= 4096 => Ok(o as usize),
                Some(o) if (o as usize) < 4096 => Err(PAGE + 4096),
                _ => Err(linear),
            }
        }
    }

    impl Machine for Model {
        fn gpr(&self, register: Register) -> u64 {
            self.gprs.get(&register).copied().unwrap_or(0)
        }
        fn segment_base(&self, register: Register) -> u64 {
            if register == Register::GS {
                self.gs_base
            } else {
                0
            }
        }
        fn read(&mut self, linear: u64, buf: &mut [u8]) -> Result<(), u64> {
            let o = self.at(linear, buf.len())?;
            buf.copy_from_slice(&self.page[o..o + buf.len()]);
            Ok(())
        }
        fn write(&mut self, linear: u64, data: &[u8]) -> Result<(), u64> {
            let o = self.at(linear, data.len())?;
            self.page[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn fpu(&mut self) -> &mut kvm_fpu {
            &mut self.fpu
        }
    }

    #[test]
    fn ldmxcsr_from_the_stack_as_the_stock_kernel_runs_it() {
        // ldmxcsr [rsp+4], the instruction Debian's cloud kernel stopped on.
        let mut m = Model::new();
        m.gprs.insert(Register::RSP, 0x1100);
        m.page[0x104..0x108].copy_from_slice(&0x9fc0u32.to_le_bytes());
        let done = complete(&[0x0f, 0xae, 0x54, 0x24, 0x04], 0xffff_ffff_8103_dede, &mut m);
        assert_eq!(done, Completion::Done { len: 5 });
        assert_eq!(m.fpu.mxcsr, 0x9fc0);
    }

    #[test]
    fn ldmxcsr_with_reserved_bits_is_a_general_protection_fault() {
        let mut m = Model::new();
        m.gprs.insert(Register::RAX, 0x1000);
        m.page[0..4].copy_from_slice(&0x1_0000u32.to_le_bytes());
        // ldmxcsr [rax]
        assert_eq!(
            complete(&[0x0f, 0xae, 0x10], 0, &mut m),
            Completion::GeneralProtection
        );
        assert_eq!(m.fpu.mxcsr, 0x1f80, "MXCSR unchanged");
    }

    #[test]
    fn vldmxcsr_and_an_unmapped_operand_page_fault() {
        let mut m = Model::new();
        m.gprs.insert(Register::RDI, 0x9000);
        // vldmxcsr [rdi]: c5 f8 ae 17
        assert_eq!(
            complete(&[0xc5, 0xf8, 0xae, 0x17], 0, &mut m),
            Completion::PageFault {
                address: 0x9000,
                write: false
            }
        );
    }

    #[test]
    fn stmxcsr_with_base_index_scale_and_displacement() {
        let mut m = Model::new();
        m.gprs.insert(Register::RBX, 0x1000);
        m.gprs.insert(Register::RCX, 4);
        // stmxcsr [rbx+rcx*8+0x10]: 0f ae 5c cb 10
        assert_eq!(
            complete(&[0x0f, 0xae, 0x5c, 0xcb, 0x10], 0, &mut m),
            Completion::Done { len: 5 }
        );
        assert_eq!(&m.page[0x30..0x34], &0x1f80u32.to_le_bytes());
    }

    #[test]
    fn stmxcsr_through_gs_uses_the_segment_base() {
        let mut m = Model::new();
        m.gs_base = 0x1000;
        // stmxcsr gs:[0x20]: 65 0f ae 1c 25 20 00 00 00
        let done = complete(&[0x65, 0x0f, 0xae, 0x1c, 0x25, 0x20, 0, 0, 0], 0, &mut m);
        assert_eq!(done, Completion::Done { len: 9 });
        assert_eq!(&m.page[0x20..0x24], &0x1f80u32.to_le_bytes());
    }

    #[test]
    fn rip_relative_operands_count_from_the_next_instruction() {
        let mut m = Model::new();
        m.fpu.mxcsr = 0x1f80;
        // stmxcsr [rip+0x10] at rip 0x1000: 0f ae 1d 10 00 00 00 (7 bytes)
        let done = complete(&[0x0f, 0xae, 0x1d, 0x10, 0, 0, 0], 0x1000, &mut m);
        assert_eq!(done, Completion::Done { len: 7 });
        assert_eq!(&m.page[0x17..0x1b], &0x1f80u32.to_le_bytes());
    }

    #[test]
    fn x87_control_word_status_word_init_and_clear() {
        let mut m = Model::new();
        m.gprs.insert(Register::RAX, 0x1000);
        m.page[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
        // fldcw [rax]: d9 28
        assert_eq!(complete(&[0xd9, 0x28], 0, &mut m), Completion::Done { len: 2 });
        assert_eq!(m.fpu.fcw, 0x027f);
        // fnstcw [rax+2]: d9 78 02
        assert_eq!(
            complete(&[0xd9, 0x78, 0x02], 0, &mut m),
            Completion::Done { len: 3 }
        );
        assert_eq!(&m.page[2..4], &0x027fu16.to_le_bytes());
        m.fpu.fsw = 0x80a1;
        // fnstsw [rax+4]: dd 78 04
        assert_eq!(
            complete(&[0xdd, 0x78, 0x04], 0, &mut m),
            Completion::Done { len: 3 }
        );
        assert_eq!(&m.page[4..6], &0x80a1u16.to_le_bytes());
        // fnclex: db e2
        assert_eq!(complete(&[0xdb, 0xe2], 0, &mut m), Completion::Done { len: 2 });
        assert_eq!(m.fpu.fsw, 0);
        // fninit: db e3
        m.fpu.fcw = 0;
        assert_eq!(complete(&[0xdb, 0xe3], 0, &mut m), Completion::Done { len: 2 });
        assert_eq!(m.fpu.fcw, 0x037f);
    }

    #[test]
    fn fxsave_then_fxrstor_round_trips_the_state() {
        let mut m = Model::new();
        m.gprs.insert(Register::RDI, 0x1000);
        m.fpu.xmm[3] = [7; 16];
        m.fpu.fpr[1] = [9; 16];
        m.fpu.mxcsr = 0x1fa0;
        // fxsave64 [rdi]: 48 0f ae 07
        assert_eq!(
            complete(&[0x48, 0x0f, 0xae, 0x07], 0, &mut m),
            Completion::Done { len: 4 }
        );
        assert_eq!(&m.page[24..28], &0x1fa0u32.to_le_bytes());
        assert_eq!(&m.page[160 + 48..160 + 64], &[7; 16]);
        let saved = m.fpu;
        m.fpu = kvm_fpu::default();
        // fxrstor64 [rdi]: 48 0f ae 0f
        assert_eq!(
            complete(&[0x48, 0x0f, 0xae, 0x0f], 0, &mut m),
            Completion::Done { len: 4 }
        );
        assert_eq!(m.fpu.xmm, saved.xmm);
        assert_eq!(m.fpu.fpr, saved.fpr);
        assert_eq!(m.fpu.mxcsr, 0x1fa0);
        // A 512-byte image that runs off the mapped page faults on the
        // first unmapped byte.
        m.gprs.insert(Register::RDI, 0x1f00);
        assert_eq!(
            complete(&[0x48, 0x0f, 0xae, 0x07], 0, &mut m),
            Completion::PageFault {
                address: 0x2000,
                write: true
            }
        );
    }

    #[test]
    fn other_and_invalid_instructions_are_left_alone() {
        let mut m = Model::new();
        assert_eq!(complete(&[0x0f, 0x0b], 0, &mut m), Completion::Unsupported); // ud2
        assert_eq!(complete(&[], 0, &mut m), Completion::Unsupported);
        assert_eq!(complete(&[0x0f], 0, &mut m), Completion::Unsupported);
        // ldmxcsr with a register operand does not exist: invalid.
        assert_eq!(complete(&[0x0f, 0xae, 0xd0], 0, &mut m), Completion::Unsupported);
    }
}
