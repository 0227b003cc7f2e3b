//! `acpi-poweroff` and `acpi-power-button`: the ACPI power controls a stock
//! kernel uses, driven the way its ACPI code does.

use super::{Context, Outcome};
use crate::mmio::MmioRegion;
use crate::port::outb;
use crate::println;

/// The FADT's sleep control register in Keel's platform.
const SLEEP_CONTROL_PORT: u16 = 0x600;
/// `SLP_EN | SLP_TYP(S5) << 2`, what Linux writes to power off.
const SLEEP_S5: u8 = (1 << 5) | (5 << 2);
/// What the VMM adds to the command line: `keel.ged=ADDR:GSI`.
pub const GED_KEY: &str = "keel.ged";
const POWER_BUTTON: u32 = 1;

/// `acpi-poweroff`: writes S5 to the sleep control register. The VM must
/// end ("guest powered off"); if it is still running the program fails.
pub fn poweroff(_ctx: &Context<'_>) -> Outcome {
    println!("acpi: entering S5");
    outb(SLEEP_CONTROL_PORT, SLEEP_S5);
    fail!("acpi: still running after writing S5 to port {SLEEP_CONTROL_PORT:#x}");
}

/// `acpi-power-button [timeout-ms=N]`: waits for the generic event
/// device's interrupt (its window and GSI come from `keel.ged=`), reads the
/// event register as `_EVT` does, and on the power-button event powers off
/// through S5.
pub fn power_button(ctx: &Context<'_>) -> Outcome {
    let timeout_ms = super::arg(ctx.cmdline.number("timeout-ms"))?.unwrap_or(10_000);
    let Some((base, gsi)) = ctx.cmdline.value(GED_KEY).and_then(|v| {
        let (base, gsi) = v.split_once(':')?;
        Some((crate::cmdline::parse_number(base)?, crate::cmdline::parse_number(gsi)?))
    }) else {
        fail!("acpi: no {GED_KEY}=ADDR:GSI on the command line (is ACPI on?)");
    };
    let Ok(region) = crate::mmio::checked_window(ctx.params, base, 4) else {
        fail!("acpi: event device window {base:#x} is not usable");
    };
    let Ok(pin) = u8::try_from(gsi) else {
        fail!("acpi: GSI {gsi} is not an IOAPIC pin");
    };
    crate::irq::unmask(pin);
    let before = crate::interrupts::irq_count(pin);
    println!("acpi: waiting for the power button (GED at {base:#x}, GSI {gsi})");
    let deadline = crate::tsc::now().saturating_add(crate::tsc::ticks_per_ms(timeout_ms));
    while crate::interrupts::irq_count(pin) == before {
        if crate::tsc::now() > deadline {
            fail!("acpi: no event device interrupt within {timeout_ms} ms");
        }
        core::hint::spin_loop();
    }
    let events = read_events(&region);
    println!("acpi: event device interrupt, events {events:#x}");
    if events & POWER_BUTTON == 0 {
        fail!("acpi: the event register does not say power button");
    }
    if read_events(&region) != 0 {
        fail!("acpi: reading the event register did not clear it");
    }
    println!("acpi: power button pressed; entering S5");
    outb(SLEEP_CONTROL_PORT, SLEEP_S5);
    fail!("acpi: still running after writing S5");
}

fn read_events(region: &MmioRegion) -> u32 {
    region.read32(0)
}
