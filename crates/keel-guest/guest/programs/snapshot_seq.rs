//! `snapshot-seq`: a checked sequence to snapshot in the middle of: a
//! counter printed step by step, a table in memory that every step
//! extends, and (with a virtio-blk disk) one sector written per step. At
//! the end it checks the whole table against a running hash and reads
//! every sector back, so a restore that lost or repeated a step, a memory
//! page or a block write fails here.
//!
//! Each step's value mixes in the TSC, so clones of one snapshot write
//! different data from their first step after the restore: a clone that
//! read another's disk writes would fail its read-back.

use super::{arg, virtio_devices, Context, Outcome};
use crate::abi::fnv1a64;
use crate::dma;
use crate::println;
use crate::virtio::blk::{Blk, S_OK};
use crate::virtio::device_id;

pub const KEYS: &[&str] = &[
    "steps",
    "delay-ms",
    "seed",
    "net",
    "host",
    "me",
    "udp-port",
    "vsock",
    "vsock-port",
];

/// Most steps: the table's size.
const MAX_STEPS: usize = 4096;

/// What step `i` of a run with `seed` stores at TSC `now`: in the table,
/// and in every 8 bytes of its sector.
fn value(seed: u64, i: u64, now: u64) -> u64 {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&i.to_le_bytes());
    bytes[16..].copy_from_slice(&now.to_le_bytes());
    fnv1a64(&bytes)
}

/// The running hash after `v`.
fn chain(hash: u64, v: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hash.to_le_bytes());
    bytes[8..].copy_from_slice(&v.to_le_bytes());
    fnv1a64(&bytes)
}

/// `snapshot-seq [steps=N] [delay-ms=M] [seed=S] [net=1 host= me= udp-port=]`:
/// N steps (default 200, at most 4096), M ms apart (default 5). Each step
/// stores its value in a table in guest memory, writes it to sector `i` of
/// the first virtio-blk disk if there is one, with `net=1` echoes a
/// datagram with the host's UDP echo server over the first virtio-net
/// card, and prints `seq: step i`. Then it checks the table and reads
/// every sector back.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let steps = arg(ctx.cmdline.number("steps"))?.unwrap_or(200);
    let delay_ms = arg(ctx.cmdline.number("delay-ms"))?.unwrap_or(5);
    let seed = arg(ctx.cmdline.number("seed"))?.unwrap_or(0x5eed);
    if steps == 0 || steps > MAX_STEPS as u64 {
        bad_args!("steps={steps}: must be 1 to {MAX_STEPS}");
    }
    let devices = virtio_devices(ctx)?;
    let mut disk = match devices.of_type(device_id::BLOCK).next() {
        Some(found) => match Blk::init(found, ctx.params, 0, false, 16) {
            Ok(blk) if blk.read_only() => fail!("snapshot-seq: the disk is read-only"),
            Ok(blk) if blk.config.capacity < steps => {
                fail!("snapshot-seq: the disk has {} sectors, fewer than {steps} steps", blk.config.capacity)
            }
            Ok(blk) => Some(blk),
            Err(e) => fail!("snapshot-seq: virtio-blk initialisation: {e}"),
        },
        None => None,
    };
    let mut net = if super::flag(ctx, "net", false)? {
        Some(super::virtio_net::echoer(ctx)?)
    } else {
        None
    };
    let mut vsock = if super::flag(ctx, "vsock", false)? {
        Some(super::virtio_vsock::exchanger(ctx)?)
    } else {
        None
    };
    let table = dma::alloc_or_panic(MAX_STEPS * 8, 4096);
    let sector = dma::alloc_or_panic(512, 4096);
    let ticks = crate::tsc::ticks_per_ms(delay_ms);
    println!(
        "seq: {steps} steps, {delay_ms} ms apart, {}",
        if disk.is_some() { "one disk write each" } else { "no disk" }
    );
    let mut running = 0u64;
    for i in 0..steps {
        let v = value(seed, i, crate::tsc::now());
        running = chain(running, v);
        table.put_u64(i as usize * 8, v);
        if let Some(blk) = disk.as_mut() {
            for word in 0..64 {
                sector.put_u64(word * 8, v);
            }
            match blk.write(i, &[sector]) {
                Ok(done) if done.status == S_OK => {}
                Ok(done) => fail!("seq: step {i}: disk write status {}", done.status),
                Err(e) => fail!("seq: step {i}: disk write: {e}"),
            }
        }
        if let Some(net) = net.as_mut() {
            if let Err(e) = net.round(i as u32) {
                fail!("seq: step {i}: network echo: {e}");
            }
        }
        if let Some(vsock) = vsock.as_mut() {
            if vsock.round(64).is_err() {
                fail!("seq: step {i}: vsock echo exchange failed (see above)");
            }
        }
        println!("seq: step {i}");
        let until = crate::tsc::now().saturating_add(ticks);
        while crate::tsc::now() < until {
            core::hint::spin_loop();
        }
    }
    let mut bytes = [0u8; 8];
    let entry = |i: u64, bytes: &mut [u8; 8]| {
        table.read(i as usize * 8, bytes);
        u64::from_le_bytes(*bytes)
    };
    let mut check = 0u64;
    for i in 0..steps {
        check = chain(check, entry(i, &mut bytes));
    }
    if check != running {
        fail!("seq: the table in memory hashes to {check:#x}, the steps to {running:#x}: memory was lost");
    }
    if let Some(blk) = disk.as_mut() {
        for i in 0..steps {
            sector.fill(0);
            match blk.read(i, &[sector]) {
                Ok(done) if done.status == S_OK => {}
                Ok(done) => fail!("seq: reading sector {i}: status {}", done.status),
                Err(e) => fail!("seq: reading sector {i}: {e}"),
            }
            let expected = entry(i, &mut bytes);
            for word in 0..64 {
                sector.read(word * 8, &mut bytes);
                let found = u64::from_le_bytes(bytes);
                if found != expected {
                    fail!(
                        "seq: sector {i} word {word} is {found:#x}, expected {expected:#x}: a block write was lost or is another's"
                    );
                }
            }
        }
    }
    println!(
        "seq: done: {steps} steps, table checked, {} sectors read back, {} datagrams echoed, {} vsock exchanges",
        if disk.is_some() { steps } else { 0 },
        if net.is_some() { steps } else { 0 },
        if vsock.is_some() { steps } else { 0 }
    );
    if let Some(vsock) = &vsock {
        println!(
            "seq: vsock: {} transport reset(s) seen, {} exchange(s) retried on a new connection",
            vsock.resets, vsock.retries
        );
    }
    Ok(())
}
