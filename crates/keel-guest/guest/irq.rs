//! Interrupt routing: every device interrupt comes through the IOAPIC and
//! the local APIC; the 8259 PICs are masked and never used.
//!
//! This works the same with an in-kernel irqchip (KVM's PIC, IOAPIC and
//! LAPIC; the PIC just stays masked) and with a split irqchip (LAPIC in
//! the kernel, IOAPIC emulated by the VMM, no PIC and no PIT at all: the
//! masking writes then go to ports nobody answers, which is harmless).
//!
//! IOAPIC pin N (the GSI N of a VMM's device) is programmed to vector
//! [`IRQ_VECTOR_BASE`]` + N`: fixed delivery, physical destination (this
//! CPU's APIC ID), edge-triggered, active high, masked until [`unmask`]ed.
//! The ring-0 stub for that vector counts the interrupt in
//! [`IRQ_COUNTS`](crate::ring0::IRQ_COUNTS) and writes the local APIC's EOI
//! register. Everything here runs in ring 3; the APIC pages are
//! identity-mapped user-accessible like the rest of the MMIO gap.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::port::outb;
pub use crate::ring0::IRQ_LINES;
use crate::ring0::{IRQ_VECTOR_BASE, SPURIOUS_VECTOR};

/// The local APIC (xAPIC mode), at its reset base address.
const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x020;
const LAPIC_TPR: u64 = 0x080;
const LAPIC_SVR: u64 = 0x0f0;
const LAPIC_LVT_LINT0: u64 = 0x350;
const SVR_APIC_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_EXTINT: u32 = 7 << 8;

/// The IOAPIC, at its conventional base address.
const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_REDTBL: u32 = 0x10;
/// Redirection entry, low word: masked (bit 16). Delivery mode fixed (0),
/// physical destination (bit 11 clear), active high (bit 13 clear) and
/// edge-triggered (bit 15 clear) are all zero bits.
const REDIR_MASKED: u32 = 1 << 16;

/// The master and slave 8259 data ports (OCW1: the interrupt mask).
const PIC_MASTER_DATA: u16 = 0x21;
const PIC_SLAVE_DATA: u16 = 0xa1;

/// This CPU's local APIC ID, the IOAPIC entries' destination.
static APIC_ID: AtomicU32 = AtomicU32::new(0);

fn lapic_read(offset: u64) -> u32 {
    // SAFETY: the local APIC page is identity-mapped (the MMIO gap) and
    // user-accessible; it is device memory, not Rust-owned RAM.
    unsafe { read_volatile((LAPIC_BASE + offset) as *const u32) }
}

fn lapic_write(offset: u64, value: u32) {
    // SAFETY: as in `lapic_read`.
    unsafe { write_volatile((LAPIC_BASE + offset) as *mut u32, value) }
}

fn ioapic_write(register: u32, value: u32) {
    // SAFETY: the IOAPIC page is identity-mapped (the MMIO gap) and
    // user-accessible; it is device memory, not Rust-owned RAM. Ring 3 is
    // the only user of IOREGSEL (ring 0 never touches the IOAPIC), so the
    // select-then-write pair is not interleaved with another.
    unsafe {
        write_volatile((IOAPIC_BASE + IOREGSEL) as *mut u32, register);
        write_volatile((IOAPIC_BASE + IOWIN) as *mut u32, value);
    }
}

/// Writes pin `pin`'s redirection entry: its vector, this CPU as the
/// destination, masked or not.
fn set_pin(pin: u8, masked: bool) {
    let register = IOAPIC_REDTBL + 2 * u32::from(pin);
    let low = u32::from(IRQ_VECTOR_BASE + pin) | if masked { REDIR_MASKED } else { 0 };
    // High word first, so an unmasked entry never has a stale destination.
    ioapic_write(register + 1, APIC_ID.load(Ordering::Relaxed) << 24);
    ioapic_write(register, low);
}

/// Masks both PICs and the local APIC's LINT0 (the PIC's way in), enables
/// the local APIC with the spurious vector, then programs and unmasks the
/// IOAPIC pins whose bits are set in `enabled` (bit N = pin N, N <
/// [`IRQ_LINES`]). The other pins are left as the IOAPIC comes out of reset,
/// masked: each IOAPIC register access is two exits to the VMM (IOREGSEL,
/// then IOWIN), and masking all 24 pins again would cost ~100 of them.
/// RFLAGS.IF stays as it is.
pub fn init(enabled: u32) {
    outb(PIC_MASTER_DATA, 0xff);
    outb(PIC_SLAVE_DATA, 0xff);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED | LVT_EXTINT);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    APIC_ID.store(lapic_read(LAPIC_ID) >> 24, Ordering::Relaxed);
    for pin in 0..IRQ_LINES as u8 {
        if enabled & 1 << pin != 0 {
            set_pin(pin, false);
        }
    }
}

/// This CPU's local APIC ID (valid after [`init`]): the destination of the
/// MSI messages the guest programs.
pub fn apic_id() -> u32 {
    APIC_ID.load(Ordering::Relaxed)
}

/// Unmasks IOAPIC pin `pin` (below [`IRQ_LINES`]; others are ignored) on
/// top of what is already unmasked.
pub fn unmask(pin: u8) {
    if usize::from(pin) < IRQ_LINES {
        set_pin(pin, false);
    }
}
