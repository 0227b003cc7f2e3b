//! The 8259A pair: remapped past the exception vectors, everything masked
//! but the lines the guest uses.

use crate::port::{inb, outb};

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;

/// Vector of IRQ 0; IRQ n arrives on `VECTOR_BASE + n` (the IDT covers 16).
pub const VECTOR_BASE: u8 = 0x20;

/// Initialises both PICs (edge-triggered, cascade on IRQ 2, normal EOI) and
/// unmasks the IRQ lines whose bits are set in `enabled`.
pub fn init(enabled: u16) {
    outb(MASTER_CMD, 0x11); // ICW1: init, ICW4 follows
    outb(SLAVE_CMD, 0x11);
    outb(MASTER_DATA, VECTOR_BASE); // ICW2: vector base
    outb(SLAVE_DATA, VECTOR_BASE + 8);
    outb(MASTER_DATA, 1 << 2); // ICW3: slave on IRQ 2
    outb(SLAVE_DATA, 2); //         slave identity
    outb(MASTER_DATA, 0x01); // ICW4: 8086 mode
    outb(SLAVE_DATA, 0x01);
    // The cascade line must be open for any slave IRQ to get through.
    let enabled = if enabled & 0xff00 != 0 {
        enabled | 1 << 2
    } else {
        enabled
    };
    outb(MASTER_DATA, !(enabled as u8));
    outb(SLAVE_DATA, !((enabled >> 8) as u8));
}

/// Unmasks IRQ line `irq` (0–15) on top of what is already unmasked,
/// opening the cascade line for a slave IRQ.
pub fn unmask(irq: u8) {
    let irq = irq & 15;
    if irq < 8 {
        outb(MASTER_DATA, inb(MASTER_DATA) & !(1 << irq));
    } else {
        outb(SLAVE_DATA, inb(SLAVE_DATA) & !(1 << (irq - 8)));
        outb(MASTER_DATA, inb(MASTER_DATA) & !(1 << 2));
    }
}
