//! x86 port I/O from ring 3, which the TSS I/O permission bitmap allows
//! for every port (see `ring0`).

use core::arch::asm;

/// Writes one byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory; the I/O bitmap allows it at CPL 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` touches no memory; the I/O bitmap allows it at CPL 3.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes 16 bits to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: `out` touches no memory; the I/O bitmap allows it at CPL 3.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads 16 bits from an I/O port.
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: `in` touches no memory; the I/O bitmap allows it at CPL 3.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes 32 bits to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: `out` touches no memory; the I/O bitmap allows it at CPL 3.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads 32 bits from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` touches no memory; the I/O bitmap allows it at CPL 3.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}
