//! `flood`: makes the VMM complain as fast as a guest can, to show that
//! its log stays bounded.

use super::{virtio_devices, Context, Outcome};
use crate::dma;
use crate::mmio::MmioRegion;
use crate::println;
use crate::virtio::blk::Blk;
use crate::virtio::device_id;

const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
/// The low dword of redirection entry 20: a pin no Keel device uses.
const REDTBL_20_LOW: u32 = 0x10 + 2 * 20;
/// Delivery mode 3 (reserved), unmasked; the vector alternates so every
/// write changes the entry.
const RESERVED_MODE: u32 = 3 << 8;

/// `flood [ms=N]`: for N milliseconds (default 500), round after round:
/// notifies a queue the first virtio-blk device does not have, reads the
/// sector just past its end, and programs IOAPIC entry 20 with a reserved
/// delivery mode. Passes when every past-the-end read got IOERR.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let ms = super::arg(ctx.cmdline.number("ms"))?.unwrap_or(500);
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(device_id::BLOCK).next() else {
        fail!("flood: no virtio-blk device");
    };
    let mut blk = match Blk::init(found, ctx.params, 0, false, 16) {
        Ok(blk) => blk,
        Err(e) => fail!("flood: virtio-blk initialisation: {e}"),
    };
    let data = dma::alloc_or_panic(512, 4096);
    // SAFETY: the IOAPIC window is identity-mapped (the guest maps the
    // 32-bit MMIO gap) and is not RAM.
    let ioapic = unsafe { MmioRegion::new(IOAPIC_BASE) };
    let end = crate::tsc::now().saturating_add(crate::tsc::ticks_per_ms(ms));
    let (mut rounds, mut refused) = (0u64, 0u64);
    while crate::tsc::now() < end {
        blk.transport.notify(7);
        match blk.read(blk.config.capacity, &[data]) {
            Ok(done) if done.status == crate::virtio::blk::S_IOERR => refused += 1,
            Ok(done) => fail!("flood: a read past the end got status {}", done.status),
            Err(e) => fail!("flood: a read past the end: {e}"),
        }
        ioapic.write32(IOREGSEL, REDTBL_20_LOW);
        ioapic.write32(IOWIN, RESERVED_MODE | 0x40 | (rounds & 1) as u32);
        rounds += 1;
    }
    // Leave the entry masked, as it was.
    ioapic.write32(IOREGSEL, REDTBL_20_LOW);
    ioapic.write32(IOWIN, 1 << 16);
    println!("flood: {rounds} rounds in {ms} ms: {rounds} bad notifications, {refused} reads past the end, {rounds} reserved IOAPIC entries");
    Ok(())
}
