//! Requests from ring 3 to ring 0.
//!
//! Neither `syscall` nor `int n` works from ring 3 on hosts whose KVM
//! emulates ring 0, but exceptions are delivered, so a request is a `ud2`
//! with its number in RAX. The `#UD` handler checks that the faulting
//! instruction is a `ud2` at CPL 3, carries out the request, skips the two
//! bytes and returns the result in RAX.

use core::arch::asm;

/// What ring 0 is asked to do.
#[derive(Clone, Copy)]
#[repr(u64)]
pub enum Request {
    /// Execute one `int3` at CPL 0 (emulating hosts: the VMM must inject #BP).
    Int3 = 1,
    /// Load an empty IDT and execute `ud2` at CPL 0: a triple fault.
    TripleFault = 2,
    /// Execute `popcnt` at CPL 0, which KVM's instruction emulator lacks.
    BadInstruction = 3,
    /// Set RFLAGS.IF for ring 3 (`sti` there needs IOPL 3, which hosts that
    /// run ring 3 natively under a software hypervisor do not honour).
    EnableInterrupts = 4,
}

/// Makes the request; returns ring 0's answer (0 = done, `u64::MAX` = unknown).
pub fn call(request: Request) -> u64 {
    let mut rax = request as u64;
    // SAFETY: the #UD handler preserves every register but RAX and only
    // writes its own counters; the trap switches to the ring-0 stack, so the
    // red zone below our RSP is untouched.
    unsafe { asm!("ud2", inout("rax") rax, options(nostack)) }
    rax
}
