//! The 16550 UART at COM1, transmitting one byte per THR-empty interrupt.
//!
//! Interrupt-driven output exercises the whole interrupt path of a VMM
//! (serial device → irqfd → IOAPIC pin 4 → local APIC → IDT → EOI) with
//! every byte printed. Each byte: note the IRQ 4 count, write THR, wait for
//! the count to move, read IIR to acknowledge (an emulated 16550 raises
//! THRE again only once the previous one was identified). If no interrupt
//! comes within a bounded wait, the byte is finished by polling LSR instead
//! and counted as polled; after a few of those in a row the driver stops
//! waiting for interrupts altogether, so a broken interrupt path costs a
//! bounded delay.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::interrupts::irq_count;
use crate::port::{inb, outb};
use crate::tsc;

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const IIR: u16 = COM1 + 2;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;

const IER_THR_EMPTY: u8 = 0x02;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

/// ISA IRQ line of COM1 (IOAPIC pin 4).
pub const IRQ: u8 = 4;

/// Longest wait for one THRE interrupt, in TSC ticks (tens of ms on any
/// plausible TSC): irqfd injection for IOAPIC pins goes through a kernel
/// workqueue, which a busy host may run late.
const IRQ_WAIT_TICKS: u64 = 100_000_000;
/// Consecutive missed interrupts after which the driver only polls.
const MAX_MISSES_IN_A_ROW: u64 = 3;

static INTERRUPT_DRIVEN: AtomicBool = AtomicBool::new(false);
static BYTES: AtomicU64 = AtomicU64::new(0);
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
static POLLED: AtomicU64 = AtomicU64::new(0);
static MISSES_IN_A_ROW: AtomicU64 = AtomicU64::new(0);

/// Transmit statistics since boot.
#[derive(Clone, Copy)]
pub struct Stats {
    /// Bytes written to THR.
    pub bytes: u64,
    /// Bytes whose THRE interrupt arrived.
    pub interrupts: u64,
    /// Bytes finished by polling LSR because no interrupt came in time.
    pub polled: u64,
}

/// Programs 115200 8N1 with FIFOs and OUT2 (which gates the IRQ line on a PC),
/// interrupts off. Output is polled until [`enable_tx_interrupt`].
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x80); // DLAB: divisor follows
    outb(THR, 1); // divisor low: 115200 baud
    outb(IER, 0); // divisor high
    outb(LCR, 0x03); // 8 data bits, no parity, 1 stop bit
    outb(FCR, 0xc7); // enable and clear FIFOs
    outb(MCR, 0x0b); // DTR | RTS | OUT2
}

/// Enables the THR-empty interrupt (the IOAPIC must already pass IRQ 4 and
/// RFLAGS.IF be set). A 16550 raises THRE as soon as it is enabled with the
/// THR empty; that interrupt is consumed here and not counted.
pub fn enable_tx_interrupt() {
    let before = irq_count(IRQ);
    outb(IER, IER_THR_EMPTY);
    wait_for_irq(before);
    inb(IIR);
    INTERRUPT_DRIVEN.store(true, Ordering::Relaxed);
}

/// Sends one byte.
pub fn write_byte(byte: u8) {
    BYTES.fetch_add(1, Ordering::Relaxed);
    if !INTERRUPT_DRIVEN.load(Ordering::Relaxed) {
        wait_thr_empty();
        outb(THR, byte);
        return;
    }
    let before = irq_count(IRQ);
    outb(THR, byte);
    if wait_for_irq(before) {
        INTERRUPTS.fetch_add(1, Ordering::Relaxed);
        MISSES_IN_A_ROW.store(0, Ordering::Relaxed);
    } else {
        POLLED.fetch_add(1, Ordering::Relaxed);
        wait_thr_empty();
        if MISSES_IN_A_ROW.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_MISSES_IN_A_ROW {
            INTERRUPT_DRIVEN.store(false, Ordering::Relaxed);
        }
    }
    // Identify the interrupt: the UART raises the next THRE only after this.
    inb(IIR);
}

/// Receives one byte, polling LSR for up to `ticks` TSC ticks.
pub fn read_byte_timeout(ticks: u64) -> Option<u8> {
    let start = tsc::now();
    loop {
        if inb(LSR) & LSR_DATA_READY != 0 {
            return Some(inb(THR));
        }
        if tsc::now().wrapping_sub(start) > ticks {
            return None;
        }
        spin_loop();
    }
}

/// Transmit statistics so far.
pub fn stats() -> Stats {
    Stats {
        bytes: BYTES.load(Ordering::Relaxed),
        interrupts: INTERRUPTS.load(Ordering::Relaxed),
        polled: POLLED.load(Ordering::Relaxed),
    }
}

/// Waits (bounded) for the IRQ 4 count to move past `before`.
fn wait_for_irq(before: u64) -> bool {
    let start = tsc::now();
    loop {
        if irq_count(IRQ) != before {
            return true;
        }
        if tsc::now().wrapping_sub(start) > IRQ_WAIT_TICKS {
            return false;
        }
        spin_loop();
    }
}

fn wait_thr_empty() {
    for _ in 0..100_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            return;
        }
    }
}
