//! Everything that runs at CPL 0: boot, interrupt and exception handlers.
//!
//! On hosts whose KVM emulates ring 0 instruction by instruction (about 1 µs
//! each, and some instructions not at all), this part is hand-written
//! assembly kept to the minimum a protected-mode OS needs:
//!
//! * `_start` (entered in 64-bit mode on the VMM's page tables and GDT) loads
//!   the guest's own page tables, GDT, TSS and IDT, enables SSE and `iretq`s
//!   to ring 3 with interrupts off. The page tables, GDT and TSS are
//!   assembled at link time; only the TSS descriptor and the address bits
//!   of the IDT gates, which need bit-splitting a relocation cannot
//!   express, are written here (one `add` per gate). 108 instructions run
//!   at CPL 0 before ring 3 (measured by single-stepping).
//! * `pvh_start`, the PVH entry named by the `.note.Xen` ELF note (entered
//!   in 32-bit protected mode, paging off, EBX = `hvm_start_info`), loads
//!   the same page tables, sets CR4.PAE, EFER.LME and CR0.PG|PE, loads the
//!   GDT (its 32-bit `lgdt` base reaches it: the image is below 16 MiB)
//!   and far-jumps through the 64-bit KERNEL_CS into `_start` past its
//!   page-table switch, with the start info in RSI: 16 more instructions,
//!   121 before ring 3. Ring 3 tells the two structures apart by the PVH
//!   magic (see [`crate::boot_params`]).
//! * IRQ stubs (vectors 0x20–0x37, IOAPIC pins 0–23) count the interrupt in
//!   [`IRQ_COUNTS`] and send the local APIC an EOI: one store to its EOI
//!   register, through an alias of the LAPIC page at
//!   0xffff_ffff_fee0_0000 (supervisor-only) that a sign-extended 32-bit
//!   absolute address reaches (four instructions per interrupt in all:
//!   `lock inc`, `jmp`, the store, `iretq`). There is no PIC EOI: ring 3
//!   masks the 8259s and routes every interrupt through the IOAPIC (see
//!   [`crate::irq`]), so the guest works the same with an in-kernel irqchip
//!   and with a VMM's user-space IOAPIC (split irqchip, no PIC and no PIT).
//! * The local APIC's spurious vector (0x3f) returns without an EOI.
//!   Vectors 0x38–0x3e are unused and reported like an unexpected exception.
//! * `#BP` counts in [`BREAKPOINTS`] and returns.
//! * `#UD` from ring 3 on a `ud2` is the service call (see [`crate::service`]).
//! * Any other exception is recorded in [`FAULT`]. From ring 3 the handler
//!   then "returns" into [`report_fault`], which prints the record natively and
//!   exits with `STATUS_EXCEPTION | vector`; from ring 0 it writes that status
//!   to the exit port itself and halts.
//!
//! Everything ring 3 runs (including memory the handlers write) is mapped
//! user-accessible, so ring 3 reads the counters directly.
//!
//! Two choices are dictated by software hypervisors that run guest ring 3
//! directly on the host CPU (Linux's PVM, whose "native" mode emulates
//! ring 0): ring 3 runs on the *host's* GDT there, so the user selectors are
//! Linux's (data 0x2b, 64-bit code 0x33) or `iretq` to ring 3 faults; and the
//! host CPU runs the guest at IOPL 0, so ring 3 gets its port access from
//! the TSS I/O permission bitmap (all ports allowed) rather than from IOPL 3,
//! and asks ring 0 to set RFLAGS.IF instead of executing `sti`. Both work
//! the same on hardware virtualization.

use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::{EXIT_PORT, STATUS_EXCEPTION};

/// IOAPIC pins the ring-0 stubs serve: pin N arrives on vector
/// [`IRQ_VECTOR_BASE`]` + N`.
pub const IRQ_LINES: usize = 24;

/// Vector of IOAPIC pin 0.
pub const IRQ_VECTOR_BASE: u8 = 0x20;

/// The local APIC's spurious-interrupt vector (its low four bits are 1, as
/// older APICs require); its stub returns without an EOI.
pub const SPURIOUS_VECTOR: u8 = 0x3f;

/// Interrupts taken per IOAPIC pin (index = pin, vector = 0x20 + pin).
pub static IRQ_COUNTS: [AtomicU64; IRQ_LINES] = [const { AtomicU64::new(0) }; IRQ_LINES];

/// `#BP` exceptions taken (only ring 0 executes `int3`, through the service call).
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

/// What the ring-0 handler saw when an unexpected exception arrived.
#[repr(C)]
pub struct FaultRecord {
    /// Non-zero once a fault is being reported; a fault while reporting one
    /// goes straight to the exit port instead of recursing.
    pub reporting: AtomicU64,
    pub vector: AtomicU64,
    pub error_code: AtomicU64,
    pub rip: AtomicU64,
    pub cs: AtomicU64,
    pub cr2: AtomicU64,
}

/// The last unexpected exception (written by ring 0, read by [`report_fault`]).
pub static FAULT: FaultRecord = FaultRecord {
    reporting: AtomicU64::new(0),
    vector: AtomicU64::new(0),
    error_code: AtomicU64::new(0),
    rip: AtomicU64::new(0),
    cs: AtomicU64::new(0),
    cr2: AtomicU64::new(0),
};

/// Guest-physical ranges the guest's page tables identity-map (2 MiB pages,
/// user-accessible): RAM in the first GiB and the 32-bit MMIO gap.
pub const IDENTITY_MAPPED: [(u64, u64); 2] = [(0, 0x4000_0000), (0xc000_0000, 0x1_0000_0000)];

/// Ring 3's landing point for an exception it caused: print and exit.
extern "C" fn report_fault() -> ! {
    let vector = FAULT.vector.load(Ordering::Relaxed);
    crate::println!(
        "keel-guest: unexpected exception {} ({}) error=0x{:x} rip=0x{:x} cs=0x{:x} cr2=0x{:x}",
        vector,
        exception_name(vector),
        FAULT.error_code.load(Ordering::Relaxed),
        FAULT.rip.load(Ordering::Relaxed),
        FAULT.cs.load(Ordering::Relaxed),
        FAULT.cr2.load(Ordering::Relaxed),
    );
    crate::exit::exit(STATUS_EXCEPTION | (vector as u8 & 0x7f))
}

fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "coprocessor overrun",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "reserved",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
        "#VE",
        "#CP",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("?")
}

// Selectors of the guest GDT below: Linux's layout. Kernel code and data
// keep the numbers of the 64-bit boot protocol (0x10/0x18), so nothing the
// VMM left in the segment registers names a different kind of descriptor;
// the user selectors must equal the host's where ring 3 runs on the host GDT.
//
// Every ring-0 instruction below costs about a microsecond on an emulating
// host: prefer data assembled at link time over code that computes it.
core::arch::global_asm!(
    r#"
    .set KERNEL_CS, 0x10
    .set KERNEL_DS, 0x18
    .set USER_DS, 0x28 | 3
    .set USER_CS, 0x30 | 3
    .set TSS_SEL, 0x40
    // Exceptions 0-31, IOAPIC pins 0-23 (0x20-0x37), unused 0x38-0x3e, the
    // spurious vector 0x3f: 64 stubs of 16 bytes, exactly one 1 KiB block.
    .set IDT_VECTORS, 64
    // The local APIC's EOI register through the supervisor-only alias of
    // the MMIO gap at the top of the address space (pml4[511] below): a
    // 32-bit absolute address is sign-extended in 64-bit mode, and
    // 0xfee000b0 sign-extends to exactly this.
    .set LAPIC_EOI, 0xfee000b0 - 0x100000000
    // 104-byte TSS, an I/O bitmap for all 65536 ports, and the all-ones
    // byte the CPU may read past the bitmap's end.
    .set TSS_LIMIT, 104 + 8192 + 1 - 1

    .section .text.boot, "ax"
    .global _start
_start:
    // RSI = boot_params; kept untouched until it is handed to ring 3 in RDI.
    lea rsp, [rip + kernel_stack_top]
    lea rax, [rip + pml4]
    mov cr3, rax
start_common:

    // 64-bit TSS descriptor: limit TSS_LIMIT, type 0x89 (present,
    // available), base bits 0-23 at bit 16. The linker script keeps the
    // image below 16 MiB, so base bits 24-63 are zero.
    lea rax, [rip + tss]
    shl rax, 16
    or rax, TSS_LIMIT
    movabs rcx, 0x0000890000000000
    or rax, rcx
    mov [rip + gdt + TSS_SEL], rax

    lgdt [rip + gdtr]
    push KERNEL_CS
    lea rax, [rip + 2f]
    push rax
    retfq
2:
    mov eax, KERNEL_DS
    mov ss, eax
    mov ds, eax
    mov es, eax
    mov eax, TSS_SEL
    ltr ax

    // IDT gates for vectors 0..63, one 16-byte stub each. The link-time
    // table holds the selector, type 0x8e (present interrupt gate, DPL 0)
    // and each stub's offset within the 1 KiB-aligned block; adding the
    // block's address bits 0-15 (no carry: they are a multiple of 1024)
    // and 16-31 (into gate bits 48-63) completes a gate; bits 32-63 are
    // zero. Skipped when already done (a reset that kept the image).
    cmp word ptr [rip + idt + 6], 0
    jne 1f
    lea rax, [rip + vector_stubs]
    mov rcx, rax
    and ecx, 0xffff0000
    shl rcx, 32
    movzx eax, ax
    or rax, rcx
    .set gate, 0
    .rept IDT_VECTORS
    add [rip + idt + gate * 16], rax
    .set gate, gate + 1
    .endr
1:
    lidt [rip + idtr]

    // SSE for compiled Rust in ring 3: CR0 clear CD, NW, TS, EM; set NE, MP.
    // CR4 = PAE | OSFXSR | OSXMMEXCPT (and nothing else the VMM may have set).
    mov rax, cr0
    and rax, ~0x6000000c
    or rax, 0x22
    mov cr0, rax
    mov eax, 0x620
    mov cr4, rax

    // To ring 3 with interrupts off and IOPL 0: ports come from the TSS
    // I/O bitmap, IF from a service call, the same on every host.
    push USER_DS
    lea rax, [rip + user_stack_top]
    push rax
    push 0x2
    push USER_CS
    lea rax, [rip + ring3_entry]
    push rax
    mov rdi, rsi
    iretq

    // PVH entry (XEN_ELFNOTE_PHYS32_ENTRY, the note below): 32-bit
    // protected mode, paging off, EBX = hvm_start_info. Into long mode on
    // the guest's own page tables and GDT (both below 16 MiB, so 32-bit
    // absolute addresses reach them), then on with _start, with the start
    // info in RSI where the 64-bit protocol has the zero page: ring 3 tells
    // the two apart by the PVH magic. 16 instructions.
    .code32
pvh_start:
    mov eax, offset pml4
    mov cr3, eax
    mov eax, 0x20               // CR4.PAE
    mov cr4, eax
    mov ecx, 0xc0000080         // EFER
    rdmsr
    or eax, 0x100               // LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000001          // PG | PE: long mode (compatibility)
    mov cr0, eax
    lgdt [gdtr]                 // 32-bit base: the GDT is below 16 MiB
    // ljmp KERNEL_CS:pvh_start64 (64-bit code segment)
    .byte 0xea
    .long pvh_start64
    .word KERNEL_CS
    .code64
pvh_start64:
    mov esi, ebx
    lea rsp, [rip + kernel_stack_top]
    jmp start_common

    // The PVH entry note (name "Xen", type 18, the 32-bit entry address in
    // an 8-byte descriptor as Linux writes it; QEMU reads 8 bytes in a
    // 64-bit ELF). link.ld keeps it in a PT_NOTE segment of its own.
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .quad pvh_start
    .popsection

    // ---- ring 3 from here on (runs natively) ----
    .text
ring3_entry:
    // Zero .bss: a VMM reusing memory (a reboot) does not clear it for us.
    mov rbx, rdi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, rbx
    call {ring3_main}
    ud2

    // ---- ring 0 handlers ----
    // Exception stubs push a zero where the CPU pushes no error code, then
    // the vector, so every frame reads:
    // [rsp] vector, +8 error, +16 rip, +24 cs, +32 rflags, +40 rsp, +48 ss.
    .macro exception_stub vector, has_error
    .balign 16
    .if \has_error == 0
    push 0
    .endif
    push \vector
    jmp exception_common
    .endm

    .macro irq_stub irq
    .balign 16
    lock inc qword ptr [rip + {irq_counts} + 8 * \irq]
    jmp irq_eoi
    .endm

    .balign 1024
vector_stubs:
    exception_stub 0, 0
    exception_stub 1, 0
    exception_stub 2, 0
    exception_stub 3, 0
    exception_stub 4, 0
    exception_stub 5, 0
    exception_stub 6, 0
    exception_stub 7, 0
    exception_stub 8, 1
    exception_stub 9, 0
    exception_stub 10, 1
    exception_stub 11, 1
    exception_stub 12, 1
    exception_stub 13, 1
    exception_stub 14, 1
    exception_stub 15, 0
    exception_stub 16, 0
    exception_stub 17, 1
    exception_stub 18, 0
    exception_stub 19, 0
    exception_stub 20, 0
    exception_stub 21, 1
    exception_stub 22, 0
    exception_stub 23, 0
    exception_stub 24, 0
    exception_stub 25, 0
    exception_stub 26, 0
    exception_stub 27, 0
    exception_stub 28, 0
    exception_stub 29, 1
    exception_stub 30, 1
    exception_stub 31, 0
    irq_stub 0
    irq_stub 1
    irq_stub 2
    irq_stub 3
    irq_stub 4
    irq_stub 5
    irq_stub 6
    irq_stub 7
    irq_stub 8
    irq_stub 9
    irq_stub 10
    irq_stub 11
    irq_stub 12
    irq_stub 13
    irq_stub 14
    irq_stub 15
    irq_stub 16
    irq_stub 17
    irq_stub 18
    irq_stub 19
    irq_stub 20
    irq_stub 21
    irq_stub 22
    irq_stub 23
    exception_stub 56, 0
    exception_stub 57, 0
    exception_stub 58, 0
    exception_stub 59, 0
    exception_stub 60, 0
    exception_stub 61, 0
    exception_stub 62, 0
    .balign 16
    // 0x3f, the spurious vector: no EOI (the APIC set no ISR bit).
    iretq
    // Fails to assemble ("moving backwards") if a stub outgrew 16 bytes.
    .org vector_stubs + IDT_VECTORS * 16

irq_eoi:
    mov dword ptr [LAPIC_EOI], 0
    iretq

exception_common:
    cmp qword ptr [rsp], 3
    je breakpoint
    cmp qword ptr [rsp], 6
    je service_call
    jmp fatal

breakpoint:
    // A trap: the saved RIP already points past the int3.
    lock inc qword ptr [rip + {breakpoints}]
    add rsp, 16
    iretq

service_call:
    // Only a ud2 executed by ring 3 is a request; anything else is a bug.
    test byte ptr [rsp + 24], 3
    jz fatal
    push rcx
    mov rcx, [rsp + 24]
    cmp word ptr [rcx], 0x0b0f
    pop rcx
    jne fatal
    cmp rax, 1
    je service_int3
    cmp rax, 2
    je service_triple_fault
    cmp rax, 3
    je service_bad_instruction
    cmp rax, 4
    je service_enable_interrupts
    mov rax, -1
service_return:
    add qword ptr [rsp + 16], 2
    add rsp, 16
    iretq

service_int3:
    // Emulating hosts cannot run int3 at CPL 0: the VMM must inject #BP.
    int3
    xor eax, eax
    jmp service_return

service_triple_fault:
    // #UD with no IDT -> #GP -> #DF -> shutdown.
    lidt [rip + null_idtr]
    ud2

service_enable_interrupts:
    // Set IF in the RFLAGS the iretq below restores.
    or qword ptr [rsp + 32], 0x200
    xor eax, eax
    jmp service_return

service_bad_instruction:
    // popcnt is one of the instructions KVM's emulator lacks.
    popcnt rax, rax
    xor eax, eax
    jmp service_return

fatal:
    cmp qword ptr [rip + {fault} + {reporting}], 0
    jne fatal_halt
    push rax
    mov rax, [rsp + 8]
    mov [rip + {fault} + {vector}], rax
    mov rax, [rsp + 16]
    mov [rip + {fault} + {error_code}], rax
    mov rax, [rsp + 24]
    mov [rip + {fault} + {rip_off}], rax
    mov rax, [rsp + 32]
    mov [rip + {fault} + {cs}], rax
    mov rax, cr2
    mov [rip + {fault} + {cr2}], rax
    pop rax
    test byte ptr [rsp + 24], 3
    jz fatal_halt
    // From ring 3: report natively, on a fresh ring-3 stack (16-byte aligned
    // minus the return address a call would have pushed).
    mov qword ptr [rip + {fault} + {reporting}], 1
    push rax
    lea rax, [rip + {report_fault}]
    mov [rsp + 24], rax
    lea rax, [rip + fault_stack_top - 8]
    mov [rsp + 48], rax
    pop rax
    add rsp, 16
    iretq
fatal_halt:
    mov al, [rsp]
    or al, {exception}
    out {exit_port}, al
3:
    cli
    hlt
    jmp 3b

    // ---- tables (assembled at link time) ----
    .section .data.ring0, "aw"
    .balign 4096
    // Identity map with P|RW|US at every level: the first GiB (RAM) and
    // 3-4 GiB (MMIO gap, uncached: PWT|PCD), 2 MiB pages.
    // pml4[511] aliases the MMIO gap at 0xffff_ffff_c000_0000 for ring 0
    // only (no US bit): the IRQ stubs' EOI store reaches the local APIC
    // there with a sign-extended 32-bit absolute address.
pml4:
    .quad pdpt + 0x7
    .fill 510, 8, 0
    .quad pdpt_high + 0x3
pdpt:
    .quad pd_ram + 0x7
    .quad 0
    .quad 0
    .quad pd_mmio + 0x7
    .fill 508, 8, 0
pdpt_high:
    .fill 511, 8, 0
    .quad pd_mmio + 0x3
pd_ram:
    .set page, 0
    .rept 512
    .quad page + 0x87
    .set page, page + 0x200000
    .endr
pd_mmio:
    .set page, 0xc0000000
    .rept 512
    .quad page + 0x9f
    .set page, page + 0x200000
    .endr

    .balign 16
gdt:
    .quad 0                     // 0x00 null
    .quad 0                     // 0x08 (Linux: 32-bit kernel code) unused
    .quad 0x00af9b000000ffff    // 0x10 kernel code, 64-bit
    .quad 0x00cf93000000ffff    // 0x18 kernel data
    .quad 0                     // 0x20 (Linux: 32-bit user code) unused
    .quad 0x00cff3000000ffff    // 0x28 user data (DPL 3)
    .quad 0x00affb000000ffff    // 0x30 user code, 64-bit (DPL 3)
    .quad 0                     // 0x38 unused
    .quad 0, 0                  // 0x40 TSS, filled in by _start
gdt_end:

    .balign 16
tss:
    .long 0
    .quad kernel_stack_top      // RSP0: the stack ring 3 -> ring 0 switches to
    .fill 11, 8, 0              // RSP1, RSP2, reserved, IST1-7, reserved
    .word 0
    .word 104                   // I/O bitmap offset: right after this header
    .fill 8192, 1, 0            // every port allowed to ring 3
    .byte 0xff

    // Gates without their address bits (see _start).
    .balign 16
idt:
    .set gate, 0
    .rept IDT_VECTORS
    .quad (gate * 16) | (KERNEL_CS << 16) | 0x00008e0000000000
    .quad 0
    .set gate, gate + 1
    .endr

    .balign 8
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
idtr:
    .word IDT_VECTORS * 16 - 1
    .quad idt
null_idtr:
    .word 0
    .quad 0

    // Stacks take no space in the image (NOLOAD) and need no zeroing.
    .section .stack, "aw", @nobits
    .balign 16
    .skip 4096
kernel_stack_top:
    .skip 16384
fault_stack_top:
    .skip 65536
user_stack_top:

    .text
"#,
    ring3_main = sym crate::ring3_main,
    irq_counts = sym IRQ_COUNTS,
    breakpoints = sym BREAKPOINTS,
    fault = sym FAULT,
    report_fault = sym report_fault,
    reporting = const offset_of!(FaultRecord, reporting),
    vector = const offset_of!(FaultRecord, vector),
    error_code = const offset_of!(FaultRecord, error_code),
    rip_off = const offset_of!(FaultRecord, rip),
    cs = const offset_of!(FaultRecord, cs),
    cr2 = const offset_of!(FaultRecord, cr2),
    exception = const STATUS_EXCEPTION,
    exit_port = const EXIT_PORT,
);
