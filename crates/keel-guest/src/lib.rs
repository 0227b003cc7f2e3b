//! Keel's built-in test guest: a tiny operating system, built from source
//! with the workspace, that a VMM boots like a Linux `vmlinux` to test
//! itself.
//!
//! # Why it exists
//!
//! A VMM's devices, interrupt wiring and exit handling are best tested with a
//! guest that does exactly one thing and says whether it worked, in well
//! under a second. Linux cannot be that guest on every machine: where KVM
//! emulates guest ring 0 in software (about a million instructions per
//! second, some instructions not at all) a kernel takes minutes to boot. This
//! guest keeps ring 0 to about 140 hand-written instructions at boot plus a
//! handful per interrupt or exception, and runs everything else — drivers
//! and test programs, in Rust — in ring 3, which such hosts run natively.
//! On a real VT-x/AMD-V host it behaves the same, only faster.
//!
//! The image needs no download: `build.rs` compiles `guest/` with the host
//! toolchain (`no_std`, freestanding, statically linked at [`LOAD_ADDR`]),
//! and [`elf`] returns the result.
//!
//! # Boot contract
//!
//! The guest expects Linux's 64-bit boot protocol as Firecracker implements
//! it for an ELF `vmlinux`:
//!
//! * The image is loaded with `linux_loader::loader::Elf::load(mem, None,
//!   image, Some(GuestAddress(0x10_0000)))`: each `PT_LOAD` at its `p_paddr`
//!   (equal to `p_vaddr`). RIP is the ELF entry point.
//! * 64-bit long mode at CPL 0 with paging on and the image identity-mapped
//!   (the guest loads its own page tables with its third instruction),
//!   interrupts off, and **RSI = the address of the zero page**
//!   (`struct boot_params`). The guest sets up its own stack, GDT, TSS and
//!   IDT, so the VMM's (conventionally RSP = 0x8ff0, CS = 0x10, DS = 0x18, a
//!   GDT at 0x500 and an empty IDT) only have to last until then.
//! * In the zero page the guest reads the command line pointer (`u32` at
//!   0x228, a NUL-terminated string of at most 2048 bytes), the e820 entry
//!   count (`u8` at 0x1e8) and the e820 table (20-byte entries at 0x2d0).
//! * At least 16 MiB of RAM from address 0. The guest identity-maps the first
//!   GiB (RAM) and 0xC000_0000–0xFFFF_FFFF (the 32-bit MMIO gap, where MMIO
//!   devices under test must live), all user-accessible.
//! * Platform: an 8259 PIC pair that reaches the CPU (in-kernel irqchip with
//!   LAPIC LINT0 in ExtINT mode), a 16550 UART at port 0x3f8 raising IRQ 4,
//!   an i8042 whose command 0xfe on port 0x64 resets the machine, and the
//!   exit port [`EXIT_PORT`], where a one-byte write of `V` ends the VM with
//!   status `V`.
//! * When the host's KVM cannot emulate a ring-0 `int3` (it stops with
//!   `KVM_EXIT_INTERNAL_ERROR`), the VMM injects `#BP` itself: RIP += 1, then
//!   `KVM_SET_VCPU_EVENTS` with exception 3 injected. Only the `int3`
//!   program needs this.
//!
//! # Programs
//!
//! The command line is `[key=value ...] PROGRAM [key=value ...]`: the program
//! is the first word without `=` (`hello` when there is none); numbers are
//! decimal or `0x` hexadecimal; keys a program does not know are reported
//! with a `note:` line and ignored, so a VMM may add its own parameters. The
//! names are in [`PROGRAMS`].
//!
//! | program | arguments | does | passes with |
//! |---|---|---|---|
//! | `hello` | `[mmio=ADDR] [expect=V]` | prints `Keel test guest: hello`, the RAM size from e820, the command line; reads the `u32` at ADDR and prints `mmio[ADDR] = V`; last `serial: N bytes sent, I interrupts, P polled` | [`STATUS_PASS`] if serial interrupts arrived and the MMIO value matches `expect` |
//! | `mmio-rw` | `mmio=ADDR` | drives the scratch device at ADDR: magic at +8 must be [`SCRATCH_MAGIC`]; patterns written to +0 read back; the read-only access counter at +4 grows by one per access to +0 and ignores writes | [`STATUS_PASS`] |
//! | `exit` | `code=N` | exits at once with status N (0–255) | status N |
//! | `reset` | | writes 0xfe to port 0x64 | a VM reset |
//! | `int3` | | ring 0 executes `int3`; the `#BP` handler must run once | [`STATUS_PASS`] |
//! | `triple-fault` | | ring 0 executes `ud2` with an empty IDT | a VM shutdown (`KVM_EXIT_SHUTDOWN`) |
//! | `bad-insn` | | ring 0 executes `popcnt`, which KVM's instruction emulator lacks | an emulation-failure stop on emulating hosts; [`STATUS_PASS`] elsewhere |
//! | `pio-loop` | `[count=N] [port=P]` | N one-byte writes to port P (default 1000 to 0x80), then prints TSC ticks per write | [`STATUS_PASS`] |
//! | `mmio-loop` | `mmio=ADDR [count=N]` | N 32-bit writes to ADDR (default 1000) | [`STATUS_PASS`] |
//! | `fault` | `[addr=ADDR]` | reads ADDR (default 0x7000_0000_0000, canonical and unmapped) from ring 3 | status `0x80 \| 14` (`#PF`) |
//!
//! An `mmio=` address must be 4-byte aligned, inside the identity map and
//! outside e820 RAM, otherwise the program fails with [`STATUS_BAD_ARGS`].
//!
//! # Output and exit statuses
//!
//! Everything goes to the serial port, one byte per THR-empty interrupt
//! (falling back to polling, and saying so in the `serial:` counts, when an
//! interrupt does not come). Lines end in `\r\n`. Every failure prints a line
//! starting with `FAIL:`, and every program that returns prints
//! `keel-guest: PROGRAM: PASS (status 0)` or `... FAIL (status N)` before
//! writing its status to [`EXIT_PORT`]:
//!
//! * [`STATUS_PASS`] (0), [`STATUS_FAIL`] (1), [`STATUS_BAD_ARGS`] (2),
//!   [`STATUS_PANIC`] (3);
//! * [`STATUS_EXCEPTION`]` | vector` for an exception the guest did not
//!   expect, after a line `keel-guest: unexpected exception V (#NAME)
//!   error=.. rip=.. cs=.. cr2=..` when it happened in ring 3 (an exception in
//!   ring 0 writes the status without printing).
//!
//! # Inside the guest
//!
//! Ring 0 is assembly only: `_start` switches to the guest's page tables
//! (assembled at link time), GDT (Linux's selectors: kernel 0x10/0x18, user
//! data 0x2b, user code 0x33), a TSS whose I/O permission bitmap gives ring 3
//! every port, and an IDT for vectors 0–47, enables SSE and `iretq`s to ring
//! 3 — 140 instructions, measured. Interrupt handlers count per IRQ line and
//! EOI the PIC; `#BP` counts and returns; any other exception is reported.
//!
//! Ring 3 (`guest/*.rs` besides `ring0.rs`) holds the drivers (`port`,
//! `serial`, `pic`, `mmio`, `boot_params`, `cmdline`, `console`, `exit`) and
//! the programs. It reaches ring 0 through `ud2` with a request in RAX,
//! since neither `syscall` nor `int n` from ring 3 works where KVM emulates
//! ring 0: 1 = execute `int3`, 2 = triple fault, 3 = execute `popcnt`, 4 =
//! set RFLAGS.IF (`sti` needs IOPL 3, which such hosts do not give ring 3).
//!
//! # Example
//!
//! ```
//! let image = keel_guest::elf();
//! assert_eq!(&image[..4], b"\x7fELF");
//! assert!(keel_guest::PROGRAMS.contains(&"hello"));
//! // A VMM test boots `image` with the command line "hello", runs the vCPU
//! // until the guest writes to keel_guest::EXIT_PORT, and expects status
//! // keel_guest::STATUS_PASS and "Keel test guest: hello" on the serial port.
//! ```
//!
//! `tests/raw_kvm.rs` is a complete, self-contained example: a minimal VMM on
//! raw `kvm-ioctls` that boots every program.

#![deny(missing_docs)]

include!("../guest/abi.rs");

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keel-guest.elf"));

/// The guest ELF image (x86_64, statically linked, loaded at its physical
/// addresses starting at [`LOAD_ADDR`]).
pub fn elf() -> &'static [u8] {
    IMAGE
}

/// The exit status the guest reports for an unexpected exception `vector`.
pub const fn exception_status(vector: u8) -> u8 {
    STATUS_EXCEPTION | (vector & 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PT_NOTE: u32 = 4;

    fn u16_at(offset: usize) -> u16 {
        u16::from_le_bytes(elf()[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(offset: usize) -> u32 {
        u32::from_le_bytes(elf()[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(offset: usize) -> u64 {
        u64::from_le_bytes(elf()[offset..offset + 8].try_into().unwrap())
    }

    /// (p_type, p_filesz, p_vaddr, p_paddr, p_memsz) of every program header.
    fn program_headers() -> Vec<(u32, u64, u64, u64, u64)> {
        let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
        (0..usize::from(phnum))
            .map(|i| {
                let ph = phoff + i * phentsize;
                (
                    u32_at(ph),
                    u64_at(ph + 0x20),
                    u64_at(ph + 0x10),
                    u64_at(ph + 0x18),
                    u64_at(ph + 0x28),
                )
            })
            .collect()
    }

    #[test]
    fn image_is_a_static_x86_64_executable() {
        let image = elf();
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(image[4], 2, "ELFCLASS64");
        assert_eq!(image[5], 1, "little endian");
        assert_eq!(u16_at(0x10), 2, "ET_EXEC, not a PIE");
        assert_eq!(u16_at(0x12), 62, "EM_X86_64");
        for (kind, ..) in program_headers() {
            assert!(
                ![PT_DYNAMIC, PT_INTERP].contains(&kind),
                "unexpected program header type {kind}"
            );
        }
    }

    #[test]
    fn entry_point_is_the_load_address() {
        assert_eq!(u64_at(0x18), LOAD_ADDR);
    }

    #[test]
    fn segments_are_identity_mapped_from_the_load_address_below_16_mib() {
        let loads: Vec<_> = program_headers().into_iter().filter(|h| h.0 == PT_LOAD).collect();
        assert!(!loads.is_empty());
        assert_eq!(loads[0].2, LOAD_ADDR);
        for (_, filesz, vaddr, paddr, memsz) in loads {
            assert_eq!(vaddr, paddr, "p_vaddr == p_paddr");
            assert!(filesz <= memsz);
            assert!(
                vaddr >= LOAD_ADDR && vaddr + memsz <= 16 << 20,
                "segment {vaddr:#x}+{memsz:#x}"
            );
        }
    }

    #[test]
    fn image_has_no_note_that_would_select_pvh_boot() {
        assert!(program_headers().iter().all(|h| h.0 != PT_NOTE));
    }

    #[test]
    fn image_stays_small() {
        assert!(elf().len() < 96 * 1024, "image is {} bytes", elf().len());
    }

    #[test]
    fn statuses_are_distinct_and_exceptions_set_the_top_bit() {
        let plain = [STATUS_PASS, STATUS_FAIL, STATUS_BAD_ARGS, STATUS_PANIC];
        for (i, a) in plain.iter().enumerate() {
            assert!(a & STATUS_EXCEPTION == 0);
            assert!(plain[i + 1..].iter().all(|b| a != b));
        }
        assert_eq!(exception_status(14), 0x8e);
    }
}
