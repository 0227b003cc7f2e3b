//! The Keel test guest: a tiny ring-0 core (`ring0`) and drivers and test
//! programs that run in ring 3. Built by `../build.rs` as a freestanding
//! static ELF linked by `link.ld`; see the `keel-guest` crate documentation
//! for the boot contract, the programs and the exit statuses.

#![no_std]
#![no_main]

// Shared with the host-side library, which uses other items than the guest.
#[allow(dead_code)]
mod abi;
mod boot_params;
mod cmdline;
mod console;
mod dma;
mod exit;
mod interrupts;
mod irq;
mod mem_intrinsics;
mod mmio;
mod pci;
mod port;
mod programs;
mod ring0;
mod serial;
mod service;
mod tsc;
mod virtio;

use core::panic::PanicInfo;

use abi::{STATUS_BAD_ARGS, STATUS_PANIC};
use boot_params::BootParams;
use cmdline::CommandLine;
use programs::Context;

/// Ring 3 entry, reached from `_start` by `iretq` with interrupts off.
extern "C" fn ring3_main(boot_params: *const u8) -> ! {
    serial::init();
    irq::init(1 << serial::IRQ);
    interrupts::enable();
    serial::enable_tx_interrupt();

    // SAFETY: the boot protocol passes the zero page's (64-bit entry) or
    // hvm_start_info's (PVH entry) address in RSI, which `_start` forwards
    // here; `BootParams::new` ignores it unless it lies in mapped RAM.
    let params = unsafe { BootParams::new(boot_params) };
    let Ok(text) = core::str::from_utf8(params.command_line()) else {
        println!("FAIL: the command line is not UTF-8");
        exit::exit(STATUS_BAD_ARGS);
    };
    let cmdline = CommandLine::new(text);
    let status = programs::run(&Context {
        params: &params,
        cmdline: &cmdline,
    });
    exit::exit(status)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("keel-guest: panic: {info}");
    exit::exit(STATUS_PANIC)
}
