//! `pci-hostile`: a driver that abuses PCI configuration space and MSI-X
//! against the first virtio-blk device on PCI, and checks after each case
//! that the VMM is still there and the device still serves a read of
//! sector 0 (with its interrupt, where the case allows one).

use super::{virtio_devices, Context, Failure, Outcome};
use crate::dma::{self, Buffer};
use crate::interrupts::irq_count;
use crate::pci::{self, Config, Function, Mechanism, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::virtio::blk::{Blk, S_OK};
use crate::virtio::{device_id, isr, pci as vpci, Found, Location};
use crate::{irq, println, tsc};

/// How long a case waits for an interrupt.
const IRQ_WAIT_MS: u64 = 1000;

struct Bench<'a> {
    ctx: &'a Context<'a>,
    found: Found,
    device: vpci::Device,
    blk: Blk,
    /// Sector 0 as first read.
    reference: Buffer,
    scratch: Buffer,
    cases: u32,
    failed: u32,
}

/// The 32-bit memory window Keel's BARs come from (`PCI_MMIO32_START` ..
/// `PCI_MMIO32_END`): where a moved BAR still decodes.
const WINDOW: (u64, u64) = (0xe000_0000, 0xfec0_0000);

fn wait_for_irq(line: u8, before: u64) -> bool {
    let start = tsc::now();
    let limit = tsc::ticks_per_ms(IRQ_WAIT_MS);
    while irq_count(line) == before {
        if tsc::now().wrapping_sub(start) > limit {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

impl Bench<'_> {
    fn config(&self) -> Config {
        self.device.config
    }

    /// Re-reads the device's structures (after its BAR moved) and brings
    /// the driver up again on a fresh interrupt line.
    fn reprobe(&mut self) -> Result<(), &'static str> {
        let present = pci::Present {
            config: self.config(),
            vendor: vpci::VENDOR_ID,
            device: vpci::DEVICE_ID_BASE + device_id::BLOCK as u16,
        };
        self.device = vpci::probe(&present, self.ctx.params)?;
        self.found.location = Location::Pci(self.device);
        self.blk = Blk::init(self.found, self.ctx.params, 0, true, 16).map_err(|_| "initialisation failed")?;
        Ok(())
    }

    /// A read of sector 0 must return the reference data, and (when
    /// `irq`) the device's line must see an interrupt for it.
    fn read_ok(&mut self, irq: bool) -> Result<(), &'static str> {
        let line = self.blk.transport.irq();
        let before = line.map_or(0, irq_count);
        self.scratch.fill(0);
        match self.blk.read(0, &[self.scratch]) {
            Ok(done) if done.status == S_OK => {}
            Ok(_) => return Err("a read of sector 0 answered an error"),
            Err(_) => return Err("a read of sector 0 got no answer"),
        }
        if self.scratch.first_difference(self.reference.bytes()).is_some() {
            return Err("sector 0 read back different data");
        }
        if irq {
            let Some(line) = line else {
                return Err("the device has no interrupt line");
            };
            if !wait_for_irq(line, before) {
                return Err("no MSI-X interrupt for the read");
            }
        }
        Ok(())
    }

    /// Runs a case: `body` says how it went (`Ok(what)`), then the device
    /// must still work.
    fn case(&mut self, name: &str, body: impl FnOnce(&mut Self) -> Result<&'static str, &'static str>) {
        self.cases += 1;
        let verdict = body(self);
        let after = self.read_ok(false);
        match (verdict, after) {
            (Ok(what), Ok(())) => println!("pci-hostile: {name} ... ok ({what})"),
            (Err(why), _) | (Ok(_), Err(why)) => {
                self.failed += 1;
                println!("FAIL: pci-hostile: {name}: {why}");
                println!("pci-hostile: {name} ... FAILED");
            }
        }
    }

    fn bar0(&self) -> u32 {
        self.config().read32(pci::reg::BAR0)
    }

    fn set_command(&self, bits: u16) {
        self.config().write16(pci::reg::COMMAND, bits);
    }
}

/// Both configuration mechanisms see the same functions with the same IDs,
/// and the host bridge first.
fn mechanisms_agree(ctx: &Context<'_>) -> Result<&'static str, &'static str> {
    let ecam = pci::Mechanism::from_cmdline(&crate::cmdline::CommandLine::new("pci=ecam"), ctx.params)
        .map_err(|_| "the ECAM window at 0xc0000000 cannot be mapped")?
        .ok_or("no ECAM")?;
    let mut seen = [(0u8, 0u8, 0u32); 64];
    let mut count = 0;
    pci::scan(Mechanism::Ports, |p| {
        if count < seen.len() {
            seen[count] = (p.config.function.device, p.config.function.function, u32::from(p.device) << 16 | u32::from(p.vendor));
            count += 1;
        }
    });
    let mut matched = 0;
    let mut mismatch = false;
    pci::scan(ecam, |p| {
        let entry = (p.config.function.device, p.config.function.function, u32::from(p.device) << 16 | u32::from(p.vendor));
        if seen.get(matched) == Some(&entry) {
            matched += 1;
        } else {
            mismatch = true;
        }
    });
    if mismatch || matched != count {
        return Err("conf1 and ECAM enumerate different functions");
    }
    if count == 0 || seen[0].0 != 0 || seen[0].1 != 0 {
        return Err("no host bridge at 00:00.0");
    }
    let bridge = Config {
        mechanism: Mechanism::Ports,
        function: Function { device: 0, function: 0 },
    };
    if bridge.read32(pci::reg::CLASS) >> 16 != 0x0600 {
        return Err("00:00.0 is not a host bridge (class 06:00)");
    }
    println!(
        "pci-hostile: {count} functions, identical through {} and {}",
        Mechanism::Ports.name(),
        ecam.name()
    );
    Ok("same functions")
}

/// Writes all ones and all zeros to every read-only register and checks
/// nothing moved; the status register's error bits are write-1-to-clear.
fn read_only_registers(b: &mut Bench<'_>) -> Result<&'static str, &'static str> {
    let c = b.config();
    for register in [0x00u16, 0x08, 0x0c, 0x28, 0x2c, 0x34] {
        let before = c.read32(register);
        for value in [u32::MAX, 0] {
            c.write32(register, value);
        }
        // Byte 0x0c (cache line size) is writable scratch; the rest is not.
        let mask = if register == 0x0c { 0xffff_ff00 } else { u32::MAX };
        if (c.read32(register) ^ before) & mask != 0 {
            return Err("a read-only register changed");
        }
    }
    c.write16(pci::reg::STATUS, 0xffff);
    if c.read16(pci::reg::STATUS) & 0x10 == 0 {
        return Err("writing ones to status cleared the capability-list bit");
    }
    // The expansion ROM BAR does not exist: sizing reads 0.
    c.write32(0x30, u32::MAX);
    if c.read32(0x30) != 0 {
        return Err("the expansion ROM BAR took a value");
    }
    Ok("unchanged")
}

/// Accesses the configuration space through ECAM at odd widths and
/// offsets, past the 256 legacy bytes, and of functions that do not exist.
fn malformed_config_accesses(b: &mut Bench<'_>) -> Result<&'static str, &'static str> {
    let ecam = match Mechanism::from_cmdline(&crate::cmdline::CommandLine::new("pci=ecam"), b.ctx.params) {
        Ok(Some(Mechanism::Ecam(window))) => window,
        _ => return Err("the ECAM window cannot be mapped"),
    };
    let f = b.config().function;
    let base = u64::from(f.device) << 15 | u64::from(f.function) << 12;
    // A 2-byte read across a dword, a 4-byte one at an odd offset: all ones.
    if ecam.read16(base + 3) != 0xffff || ecam.read32(base + 2) != u32::MAX {
        return Err("a misaligned configuration read returned data");
    }
    // Misaligned writes change nothing (the vendor ID is read-only anyway;
    // the command register must keep memory decoding on).
    ecam.write32(base + 2, 0);
    ecam.write16(base + 5, 0);
    if b.config().read16(pci::reg::COMMAND) & COMMAND_MEMORY == 0 {
        return Err("a misaligned write reached the command register");
    }
    if ecam.read32(base + 0x100) != 0 || ecam.read32(base + 0xffc) != 0 {
        return Err("extended configuration space is not empty");
    }
    // Device 31 function 7 and a function behind a non-multifunction
    // device: absent, all ones, writes dropped.
    for absent in [31u64 << 15 | 7 << 12, base | 6 << 12] {
        ecam.write32(absent + 4, u32::MAX);
        if ecam.read32(absent) != u32::MAX {
            return Err("an absent function answered");
        }
    }
    // conf1 with the enable bit clear, and a reserved-bit pattern.
    crate::port::outl(0xcf8, 0x0000_0000);
    if crate::port::inl(0xcfc) != u32::MAX {
        return Err("conf1 data answered with the enable bit clear");
    }
    crate::port::outl(0xcf8, 0xffff_ffff);
    let latched = crate::port::inl(0xcf8);
    if latched != 0x80ff_fffc {
        return Err("CONFIG_ADDRESS kept reserved bits");
    }
    crate::port::outl(0xcfc, u32::MAX); // bus 255: nobody there
    Ok("all ones, nothing written")
}

/// Sizes BAR 0 as an OS does (decoding off, all ones, read, restore).
fn bar_sizing(b: &mut Bench<'_>) -> Result<&'static str, &'static str> {
    let c = b.config();
    let command = c.read16(pci::reg::COMMAND);
    let (low, high) = (c.read32(0x10), c.read32(0x14));
    b.set_command(command & !COMMAND_MEMORY);
    c.write32(0x10, u32::MAX);
    c.write32(0x14, u32::MAX);
    let (size_low, size_high) = (c.read32(0x10), c.read32(0x14));
    c.write32(0x10, low);
    c.write32(0x14, high);
    b.set_command(command);
    if size_low & 0xf != 0x4 {
        return Err("BAR 0 lost its 64-bit memory flags while sized");
    }
    let size = !(u64::from(size_high) << 32 | u64::from(size_low & !0xf)) + 1;
    if !size.is_power_of_two() || size < 0x1000 {
        return Err("BAR 0's size is not a power of two of at least 4 KiB");
    }
    if c.read32(0x10) != low || c.read32(0x14) != high {
        return Err("BAR 0 did not take its address back");
    }
    println!("pci-hostile: BAR 0 is {size:#x} bytes at {:#x}", u64::from(high) << 32 | u64::from(low & !0xf));
    Ok("size and flags right, address restored")
}

/// Moves BAR 0 elsewhere in the window; the device must work there
/// (notifications follow through the VMM's ioeventfds), then moves it back.
fn bar_relocation(b: &mut Bench<'_>) -> Result<&'static str, &'static str> {
    let c = b.config();
    let old = u64::from(b.bar0() & !0xf);
    let new = if old + 0x0100_0000 < WINDOW.1 { old + 0x0100_0000 } else { WINDOW.0 + 0x0080_0000 };
    let command = c.read16(pci::reg::COMMAND);
    b.set_command(command & !COMMAND_MEMORY);
    c.write32(0x10, new as u32);
    b.set_command(command | COMMAND_MEMORY);
    b.reprobe()?;
    if b.device.bar != new {
        return Err("the BAR does not read back where it was moved");
    }
    b.read_ok(true).map_err(|_| "the device does not work at its new address")?;
    b.set_command(command & !COMMAND_MEMORY);
    c.write32(0x10, old as u32);
    b.set_command(command | COMMAND_MEMORY);
    b.reprobe()?;
    Ok("works at the new address and back")
}

/// Points BAR 0 where no window forwards (guest RAM, the IOAPIC, the
/// ECAM window): nothing decodes there, the VMM survives; then back.
fn bar_outside_the_windows(b: &mut Bench<'_>) -> Result<&'static str, &'static str> {
    let c = b.config();
    let old = b.bar0();
    for target in [0x0010_0000u32, 0xfec0_0000, 0xc000_0000] {
        c.write32(0x10, target);
        // A read there goes to RAM, the IOAPIC or config space, not to the
        // device; the VMM must simply not crash.
        let _ = c.read32(0x10);
    }
    c.write32(0x10, old);
    b.reprobe()?;
    Ok("VMM survived, device back")
}

/// Points BAR 0 of a second virtio-pci function at the first one's: the
/// first keeps its accesses.
fn overlapping_bars(b: &mut Bench<'_>, other: Option<Config>) -> Result<&'static str, &'static str> {
    let Some(other) = other else {
        return Ok("skipped: only one virtio-pci function");
    };
    let (low, high) = (other.read32(0x10), other.read32(0x14));
    other.write32(0x14, b.config().read32(0x14));
    other.write32(0x10, b.bar0());
    let worked = b.read_ok(false);
    other.write32(0x10, low);
    other.write32(0x14, high);
    worked.map(|()| "the first device kept its BAR")
}

/// MSI-X table and PBA abuse: entries past the table, odd widths, PBA
/// writes; an entry aimed outside the interrupt range; function masking
/// with a pending interrupt; a vector moved while the device runs; MSI-X
/// switched off while running.
fn msix_cases(b: &mut Bench<'_>) {
    let Some(msix) = b.device.msix else {
        b.case("msix-present", |_| Err("the device has no MSI-X capability"));
        return;
    };
    b.case("msix-out-of-range-entries", |b| {
        let table = msix.table;
        let end = 16 * u64::from(msix.vectors);
        // Past the last entry (still inside the BAR's MSI-X area), odd
        // widths inside it.
        for offset in [end, end + 12, end + 0x100, 0x1ff0] {
            table.write32(offset, 0xdead_beef);
        }
        table.write8(0, 0xff);
        table.write16(8, 0xffff);
        if table.read32(end) != 0 || table.read8(0) != 0 {
            return Err("an access outside the table or of a bad width was taken");
        }
        // The PBA is read-only.
        let pba = msix.table.offset(0x2000);
        pba.write32(0, u32::MAX);
        if pba.read32(0) != 0 {
            return Err("the PBA took a write");
        }
        b.read_ok(true).map(|()| "ignored")
    });
    b.case("msix-vector-changed-while-running", |b| {
        let Some(old_line) = b.blk.transport.irq() else {
            return Err("no interrupt line");
        };
        let new_line = crate::virtio::allocate_line();
        let vector = crate::ring0::IRQ_VECTOR_BASE + new_line;
        // Rewrite every entry's data while unmasked (what the spec calls
        // undefined, and a VMM must survive), then mask/unmask properly.
        for entry in 0..msix.vectors {
            msix.table.write32(16 * u64::from(entry) + 8, u32::from(vector));
        }
        let before_new = irq_count(new_line);
        let before_old = irq_count(old_line);
        b.read_ok(false)?;
        if !wait_for_irq(new_line, before_new) {
            return Err("no interrupt on the new vector");
        }
        if irq_count(old_line) != before_old {
            return Err("the old vector still fired");
        }
        for entry in 0..msix.vectors {
            msix.program(entry, irq::apic_id(), crate::ring0::IRQ_VECTOR_BASE + old_line);
        }
        b.read_ok(true).map(|()| "the interrupt moved with it")
    });
    b.case("msix-function-mask-holds-and-releases", |b| {
        let c = b.config();
        let line = b.blk.transport.irq().ok_or("no interrupt line")?;
        let control = c.read16(msix.capability + 2);
        c.write16(msix.capability + 2, control | 0x4000);
        let before = irq_count(line);
        b.read_ok(false)?;
        let pending = msix.table.offset(0x2000).read32(0);
        let leaked = irq_count(line) != before;
        c.write16(msix.capability + 2, control & !0x4000);
        if leaked {
            return Err("an interrupt arrived while the function was masked");
        }
        if pending == 0 {
            return Err("no pending bit while masked");
        }
        if !wait_for_irq(line, before) {
            return Err("unmasking did not deliver the pending interrupt");
        }
        Ok("held pending, delivered on unmask")
    });
    b.case("msix-address-outside-interrupt-range", |b| {
        // Entry 1 (queue 0's) aimed at guest RAM: no interrupt, no write.
        let canary = b.scratch.slice(0, 16);
        canary.fill(0x5a);
        let line = b.blk.transport.irq().ok_or("no interrupt line")?;
        let table = msix.table;
        table.write32(16 + 12, 1);
        table.write32(16, canary.addr() as u32);
        table.write32(16 + 12, 0);
        let before = irq_count(line);
        let result = b.read_ok(false);
        let fired = wait_for_irq(line, before);
        msix.program(1, irq::apic_id(), crate::ring0::IRQ_VECTOR_BASE + line);
        result?;
        if fired {
            return Err("a message to RAM became an interrupt");
        }
        Ok("no interrupt, nothing written")
    });
    b.case("msix-queue-vector-out-of-range", |b| {
        let common = b.device.common;
        common.write16(vpci::common::QUEUE_SELECT, 0);
        let before = common.read16(vpci::common::QUEUE_MSIX_VECTOR);
        common.write16(vpci::common::QUEUE_MSIX_VECTOR, msix.vectors);
        let read = common.read16(vpci::common::QUEUE_MSIX_VECTOR);
        common.write16(vpci::common::QUEUE_MSIX_VECTOR, before);
        if read != vpci::NO_VECTOR {
            return Err("a vector past the table did not read back NO_VECTOR");
        }
        Ok("NO_VECTOR")
    });
    b.case("msix-disabled-while-running", |b| {
        let c = b.config();
        let line = b.blk.transport.irq().ok_or("no interrupt line")?;
        let control = c.read16(msix.capability + 2);
        // Interrupts of earlier cases must not make the read below
        // acknowledge (and so clear) the ISR.
        b.blk.transport.catch_up_interrupts();
        c.write16(msix.capability + 2, control & !0x8000);
        let before = irq_count(line);
        b.read_ok(false)?;
        // Without MSI-X the completion shows in the ISR only.
        let isr_bits = b.device.isr.read8(0);
        let fired = irq_count(line) != before;
        c.write16(msix.capability + 2, control);
        if fired {
            return Err("an interrupt arrived with MSI-X disabled");
        }
        if u32::from(isr_bits) & isr::USED_BUFFER == 0 {
            return Err("the ISR has no queue bit with MSI-X disabled");
        }
        b.read_ok(true).map(|()| "polled via the ISR, MSI-X back")
    });
}

/// `pci-hostile`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let devices = virtio_devices(ctx)?;
    let mut pci_blocks = devices
        .of_type(device_id::BLOCK)
        .filter(|f| matches!(f.location, Location::Pci(_)));
    let Some(found) = pci_blocks.next() else {
        fail!("pci-hostile needs a virtio-blk device on PCI");
    };
    let Location::Pci(device) = found.location else {
        fail!("pci-hostile: not a PCI device");
    };
    let other = devices
        .iter()
        .filter_map(|f| match f.location {
            Location::Pci(d) if d.function() != device.function() => Some(d.config),
            _ => None,
        })
        .next();
    let blk = match Blk::init(found, ctx.params, 0, true, 16) {
        Ok(blk) => blk,
        Err(e) => fail!("pci-hostile: virtio-blk at {}: initialisation: {e}", found.location),
    };
    let mut b = Bench {
        ctx,
        found,
        device,
        blk,
        reference: dma::alloc_or_panic(512, 512),
        scratch: dma::alloc_or_panic(512, 512),
        cases: 0,
        failed: 0,
    };
    match b.blk.read(0, &[b.reference]) {
        Ok(done) if done.status == S_OK => {}
        _ => fail!("pci-hostile: the reference read of sector 0 failed"),
    }
    println!(
        "pci-hostile: virtio-blk at {}, command {:#x}",
        found.location,
        b.config().read16(pci::reg::COMMAND) & (COMMAND_MEMORY | COMMAND_BUS_MASTER)
    );
    b.case("conf1-and-ecam-agree", |b| mechanisms_agree(b.ctx));
    b.case("read-only-registers", read_only_registers);
    b.case("malformed-config-accesses", malformed_config_accesses);
    b.case("bar-sizing", bar_sizing);
    b.case("bar-relocation", bar_relocation);
    b.case("bar-outside-the-windows", bar_outside_the_windows);
    b.case("overlapping-bars", |b| overlapping_bars(b, other));
    msix_cases(&mut b);
    println!("pci-hostile: {} cases, {} failed", b.cases, b.failed);
    if b.failed > 0 {
        return Err(Failure::Test);
    }
    Ok(())
}
