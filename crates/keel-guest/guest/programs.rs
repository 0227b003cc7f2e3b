//! The test programs, one function each, selected by name on the command line.

use core::arch::asm;

use crate::abi::{
    EXIT_PORT, PROGRAMS, SCRATCH_MAGIC, STATUS_BAD_ARGS, STATUS_EXCEPTION, STATUS_FAIL, STATUS_PASS,
};
use crate::boot_params::{BootParams, E820_RAM};
use crate::cmdline::{ArgError, CommandLine};
use crate::interrupts::{breakpoint_count, irq_count};
use crate::mmio::{checked_window, MmioRegion};
use crate::service::{self, Request};
use crate::{exit, port, println, serial, tsc, virtio};

/// Why a program did not pass (it has printed a `FAIL:` line already).
pub enum Failure {
    Test,
    BadArgs,
}

type Outcome = Result<(), Failure>;

/// What a program gets to look at.
pub struct Context<'a> {
    pub params: &'a BootParams,
    pub cmdline: &'a CommandLine<'a>,
}

/// Prints a `FAIL:` line and returns a test failure from the program.
macro_rules! fail {
    ($($arg:tt)*) => {{
        $crate::println!("FAIL: {}", format_args!($($arg)*));
        return Err($crate::programs::Failure::Test);
    }};
}

/// Prints a `FAIL:` line and returns a bad-arguments failure from the program.
macro_rules! bad_args {
    ($($arg:tt)*) => {{
        $crate::println!("FAIL: {}", format_args!($($arg)*));
        return Err($crate::programs::Failure::BadArgs);
    }};
}

/// Turns an argument error into a bad-arguments failure.
fn arg<T>(result: Result<T, ArgError<'_>>) -> Result<T, Failure> {
    result.map_err(|e| {
        println!("FAIL: {e}");
        Failure::BadArgs
    })
}

/// The on/off argument `key=0|1`, `default` when absent.
fn flag(ctx: &Context<'_>, key: &'static str, default: bool) -> Result<bool, Failure> {
    match arg(ctx.cmdline.number(key))? {
        None => Ok(default),
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(other) => arg(Err(ArgError::OutOfRange(key, other))),
    }
}

/// The devices the command line's `virtio_mmio.device=` entries name,
/// each listed with a `virtio:` line.
fn virtio_devices(ctx: &Context<'_>) -> Result<virtio::Devices, Failure> {
    let devices = virtio::discover(ctx.cmdline, ctx.params).map_err(|e| {
        println!("FAIL: {e}");
        Failure::Test
    })?;
    for found in devices.iter() {
        println!(
            "virtio: {}: {} (device ID {}, vendor {:#x})",
            found.location,
            virtio::type_name(found.device_id),
            found.device_id,
            found.vendor_id
        );
    }
    Ok(devices)
}

/// How long a program waits at its end for a device's first interrupt.
const FIRST_INTERRUPT_WAIT_MS: u64 = 2000;

/// Prints `PREFIX: interrupts: ...` for a device whose requests are done,
/// failing if its IOAPIC pin saw no interrupt at all.
fn check_interrupts(
    prefix: core::fmt::Arguments<'_>,
    transport: &mut virtio::Transport,
) -> Outcome {
    let Some(count) = transport.settle_interrupts(FIRST_INTERRUPT_WAIT_MS) else {
        println!(
            "{prefix}: completion polled only (the device at {} has no interrupt line in use)",
            transport.location
        );
        return Ok(());
    };
    let irq = transport.irq().unwrap_or(0);
    let stats = transport.irq_stats;
    println!(
        "{prefix}: interrupts: {count} on IRQ {irq} for {} completions, used-buffer bit in InterruptStatus {} times",
        stats.completions, stats.isr_used
    );
    if count == 0 && stats.completions > 0 {
        // Did the device raise it? Its InterruptStatus stays set until acked.
        let raised = transport.interrupt_status() & virtio::isr::USED_BUFFER != 0;
        if raised {
            // The device did its part; delivery through the host's IOAPIC is
            // what failed (seen rarely on hosts whose KVM emulates ring 0).
            println!(
                "{prefix}: note: InterruptStatus has the used-buffer bit but IRQ {irq} was not delivered within {FIRST_INTERRUPT_WAIT_MS} ms"
            );
            return Ok(());
        }
        if transport.event_idx() {
            // With EVENT_IDX the device interrupts only when the driver's
            // used_event asks; this driver polls, often consumes a
            // completion before the device looks, and then rightly gets
            // none.
            println!(
                "{prefix}: note: no interrupt needed: EVENT_IDX, and the driver had consumed every completion"
            );
            return Ok(());
        }
        fail!(
            "{prefix}: no interrupt arrived on IRQ {irq} (device at {}) within {FIRST_INTERRUPT_WAIT_MS} ms: check the device's irqfd, the IOAPIC or MSI-X routes and the local APIC",
            transport.location
        );
    }
    Ok(())
}

mod acpi;
mod flood;
mod pci_hostile;
mod snapshot_seq;
mod virtio_balloon;
mod virtio_blk;
mod virtio_console;
mod virtio_hostile;
mod virtio_net;
mod virtio_request;
mod virtio_rng;
mod virtio_vsock;

/// Runs the program the command line names and returns the exit status.
pub fn run(ctx: &Context<'_>) -> u8 {
    let name = ctx.cmdline.program().unwrap_or("hello");
    let (program, keys): (fn(&Context<'_>) -> Outcome, &[&str]) = match name {
        "hello" => (hello, &["mmio", "expect"]),
        "mmio-rw" => (mmio_rw, &["mmio"]),
        "exit" => (exit_with_code, &["code"]),
        "reset" => (reset, &[]),
        "int3" => (int3, &[]),
        "triple-fault" => (triple_fault, &[]),
        "bad-insn" => (bad_instruction, &[]),
        "serial-echo" => (serial_echo, &["timeout-ms"]),
        "pio-loop" => (pio_loop, &["count", "port"]),
        "mmio-loop" => (mmio_loop, &["mmio", "count"]),
        "fault" => (fault, &["addr"]),
        "virtio-blk" => (
            virtio_blk::run,
            &["pattern", "irq", "event-idx", "indirect"],
        ),
        "virtio-blk-bench" => (virtio_blk::bench, &["size", "count", "disk", "irq"]),
        "virtio-blk-flush-wait" => (virtio_blk::flush_wait, &["pattern"]),
        "virtio-rng" => (virtio_rng::run, &["irq"]),
        "virtio-balloon" => (virtio_balloon::run, virtio_balloon::KEYS),
        "virtio-request" => (virtio_request::run, virtio_request::KEYS),
        "virtio-console" => (virtio_console::run, &["lines", "timeout-ms", "irq"]),
        "virtio-vsock" => (virtio_vsock::run, virtio_vsock::KEYS),
        "virtio-hostile" => (virtio_hostile::run, &[]),
        "pci-hostile" => (pci_hostile::run, &[]),
        "flood" => (flood::run, &["ms"]),
        "snapshot-seq" => (snapshot_seq::run, snapshot_seq::KEYS),
        "acpi-poweroff" => (acpi::poweroff, &[]),
        "acpi-power-button" => (acpi::power_button, &["timeout-ms"]),
        "virtio-net" => (
            virtio_net::run,
            &["mac", "host", "me", "udp-port", "burst", "flood"],
        ),
        _ => {
            println!("FAIL: unknown program \"{name}\"; programs: {}", Programs);
            return STATUS_BAD_ARGS;
        }
    };
    // The VMM's device list is every program's business.
    for key in ctx
        .cmdline
        .unknown_keys(keys)
        .filter(|&k| k != virtio::CMDLINE_KEY && k != crate::pci::CMDLINE_KEY && k != acpi::GED_KEY)
    {
        println!("keel-guest: note: {name} ignores {key}=");
    }
    for word in ctx.cmdline.stray_words() {
        println!("keel-guest: note: {name} ignores \"{word}\"");
    }
    let status = match program(ctx) {
        Ok(()) => STATUS_PASS,
        Err(Failure::Test) => STATUS_FAIL,
        Err(Failure::BadArgs) => STATUS_BAD_ARGS,
    };
    println!(
        "keel-guest: {name}: {} (status {status})",
        if status == 0 { "PASS" } else { "FAIL" }
    );
    status
}

struct Programs;

impl core::fmt::Display for Programs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, name) in PROGRAMS.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

/// The device window `mmio=ADDR` (covering `len` bytes), checked to be
/// aligned, identity-mapped and not guest RAM.
fn mmio_arg(ctx: &Context<'_>, len: u64) -> Result<Option<MmioRegion>, Failure> {
    let Some(addr) = arg(ctx.cmdline.number("mmio"))? else {
        return Ok(None);
    };
    match checked_window(ctx.params, addr, len) {
        Ok(region) => Ok(Some(region)),
        Err(why) => bad_args!("mmio={addr:#x} {why}"),
    }
}

/// `hello [mmio=ADDR] [expect=VALUE]`: banner, RAM size, interrupt-driven
/// serial output (which must see interrupts), optionally one MMIO read.
/// `serial-echo [timeout-ms=N]`: prints `KEEL-SERIAL: ready`, reads one line
/// from COM1 (polling; up to N ms between bytes, default 5000) and prints it
/// back as `KEEL-SERIAL: got <line>`: the host's input path end to end.
fn serial_echo(ctx: &Context<'_>) -> Outcome {
    let timeout_ms = arg(ctx.cmdline.number("timeout-ms"))?.unwrap_or(5000);
    let ticks = crate::tsc::ticks_per_ms(timeout_ms);
    println!("KEEL-SERIAL: ready");
    let mut line = [0u8; 128];
    let mut len = 0;
    loop {
        let Some(byte) = serial::read_byte_timeout(ticks) else {
            fail!("serial-echo: no input within {timeout_ms} ms after {len} bytes");
        };
        if byte == b'\n' || byte == b'\r' {
            break;
        }
        if len < line.len() {
            line[len] = byte;
            len += 1;
        }
    }
    match core::str::from_utf8(&line[..len]) {
        Ok(text) => println!("KEEL-SERIAL: got {text}"),
        Err(_) => fail!("serial-echo: input is not UTF-8"),
    }
    Ok(())
}

fn hello(ctx: &Context<'_>) -> Outcome {
    println!("Keel test guest: hello");
    let (mut ram, mut entries) = (0u64, 0usize);
    for entry in ctx.params.e820() {
        entries += 1;
        if entry.kind == E820_RAM {
            ram += entry.size;
        }
    }
    println!("RAM: {} MiB in {entries} e820 entries", ram >> 20);
    println!("command line: \"{}\"", ctx.cmdline.text());
    let expect = arg(ctx.cmdline.number("expect"))?;
    match (mmio_arg(ctx, 4)?, expect) {
        (Some(region), expect) => {
            let value = region.read32(0);
            println!("mmio[{:#x}] = {value:#x}", region.base());
            if let Some(expect) = expect {
                if expect != u64::from(value) {
                    fail!(
                        "mmio[{:#x}] = {value:#x}, expected {expect:#x}",
                        region.base()
                    );
                }
            }
        }
        (None, Some(_)) => bad_args!("expect= needs mmio="),
        (None, None) => {}
    }
    let stats = serial::stats();
    println!(
        "serial: {} bytes sent, {} interrupts, {} polled",
        stats.bytes, stats.interrupts, stats.polled
    );
    if stats.interrupts == 0 {
        fail!(
            "no serial THRE interrupt arrived (IRQ {} count {}): check the irqfd on GSI 4, the IOAPIC and the local APIC",
            serial::IRQ,
            irq_count(serial::IRQ)
        );
    }
    Ok(())
}

/// `mmio-rw mmio=ADDR`: the scratch + counter device (offset 0 scratch,
/// 4 read-only count of accesses to offset 0, 8 magic).
fn mmio_rw(ctx: &Context<'_>) -> Outcome {
    const PATTERNS: [u32; 5] = [0, 0xffff_ffff, 0xa5a5_a5a5, 0x5a5a_5a5a, 0x1234_5678];
    let Some(device) = mmio_arg(ctx, 12)? else {
        bad_args!("mmio-rw needs mmio=ADDR");
    };
    let magic = device.read32(8);
    println!("mmio-rw: device at {:#x}, magic {magic:#x}", device.base());
    if magic != SCRATCH_MAGIC {
        fail!(
            "magic at {:#x} is {magic:#x}, expected {SCRATCH_MAGIC:#x}",
            device.base() + 8
        );
    }
    let start = device.read32(4);
    for pattern in PATTERNS {
        device.write32(0, pattern);
        let read = device.read32(0);
        if read != pattern {
            fail!("scratch register: wrote {pattern:#x}, read back {read:#x}");
        }
    }
    let count = device.read32(4);
    let expected = start.wrapping_add(2 * PATTERNS.len() as u32);
    if count != expected {
        fail!(
            "access counter is {count}, expected {expected} ({start} + {} accesses)",
            2 * PATTERNS.len()
        );
    }
    device.write32(4, !count);
    let after = device.read32(4);
    if after != count {
        fail!("access counter changed from {count} to {after} on a write: it must be read-only");
    }
    println!(
        "mmio-rw: {} patterns read back, access counter {start} -> {count}",
        PATTERNS.len()
    );
    Ok(())
}

/// `exit code=N`: exits at once with status N.
fn exit_with_code(ctx: &Context<'_>) -> Outcome {
    let code = arg(ctx.cmdline.required_number("code"))?;
    let Ok(code) = u8::try_from(code) else {
        return arg(Err(ArgError::OutOfRange("code", code)));
    };
    exit::exit(code)
}

/// `reset`: resets the VM through the i8042.
fn reset(_: &Context<'_>) -> Outcome {
    println!("reset: writing 0xfe to i8042 port 0x64");
    exit::reset();
    fail!("still running after the i8042 reset request");
}

/// `int3`: ring 0 executes `int3`; the `#BP` handler must run exactly once.
fn int3(_: &Context<'_>) -> Outcome {
    let before = breakpoint_count();
    if before != 0 {
        fail!("#BP count is {before} before the test");
    }
    let answer = service::call(Request::Int3);
    let after = breakpoint_count();
    println!("int3: #BP handler ran {after} time(s)");
    if answer != 0 {
        fail!("service call returned {answer:#x}");
    }
    if after != 1 {
        fail!("#BP handler ran {after} times, expected once (does the VMM inject #BP for an int3 it cannot emulate?)");
    }
    Ok(())
}

/// `triple-fault`: ring 0 faults with an empty IDT; the VM must shut down.
fn triple_fault(_: &Context<'_>) -> Outcome {
    println!("triple-fault: ud2 at CPL 0 with an empty IDT");
    service::call(Request::TripleFault);
    fail!("still running after the triple fault");
}

/// `bad-insn`: ring 0 executes `popcnt`, which KVM's emulator cannot run.
fn bad_instruction(_: &Context<'_>) -> Outcome {
    println!("bad-insn: popcnt at CPL 0 (an emulating KVM stops the VM here)");
    service::call(Request::BadInstruction);
    println!("bad-insn: returned: ring 0 ran it natively");
    Ok(())
}

/// `pio-loop [count=N] [port=P]`: N one-byte writes to port P (0x80).
fn pio_loop(ctx: &Context<'_>) -> Outcome {
    const GUEST_PORTS: [(u64, u64); 4] = [(0x20, 0x21), (0xa0, 0xa1), (0x3f8, 0x3ff), (0x64, 0x64)];
    let count = arg(ctx.cmdline.number("count"))?.unwrap_or(1000);
    let port = arg(ctx.cmdline.number("port"))?.unwrap_or(0x80);
    let used = |p: u64| {
        p == u64::from(EXIT_PORT) || GUEST_PORTS.iter().any(|&(a, b)| (a..=b).contains(&p))
    };
    let Ok(port) = u16::try_from(port) else {
        return arg(Err(ArgError::OutOfRange("port", port)));
    };
    if used(u64::from(port)) {
        bad_args!("port={port:#x} is one the guest itself uses");
    }
    let start = tsc::now();
    for i in 0..count {
        port::outb(port, i as u8);
    }
    let ticks = tsc::now().wrapping_sub(start);
    println!(
        "pio-loop: {count} writes to port {port:#x}, {} TSC ticks each",
        ticks / count.max(1)
    );
    Ok(())
}

/// `mmio-loop mmio=ADDR [count=N]`: N 32-bit writes to ADDR.
fn mmio_loop(ctx: &Context<'_>) -> Outcome {
    let count = arg(ctx.cmdline.number("count"))?.unwrap_or(1000);
    let Some(region) = mmio_arg(ctx, 4)? else {
        bad_args!("mmio-loop needs mmio=ADDR");
    };
    let start = tsc::now();
    for i in 0..count {
        region.write32(0, i as u32);
    }
    let ticks = tsc::now().wrapping_sub(start);
    println!(
        "mmio-loop: {count} writes to {:#x}, {} TSC ticks each",
        region.base(),
        ticks / count.max(1)
    );
    Ok(())
}

/// `fault [addr=ADDR]`: reads an unmapped (canonical) address from ring 3;
/// the exception handler reports the page fault and exits `0x80 | 14`.
fn fault(ctx: &Context<'_>) -> Outcome {
    let addr = arg(ctx.cmdline.number("addr"))?.unwrap_or(0x7000_0000_0000);
    println!(
        "fault: reading {addr:#x} from ring 3 (a #PF should end the guest with status {:#x})",
        STATUS_EXCEPTION | 14
    );
    let value: u8;
    // SAFETY: a one-byte load from ring 3 at any address cannot corrupt
    // memory: it returns a byte or raises an exception, which ends the guest.
    unsafe {
        asm!("mov {0}, byte ptr [{1}]", out(reg_byte) value, in(reg) addr, options(nostack, readonly))
    }
    fail!("reading {addr:#x} did not fault (read {value:#x})");
}
