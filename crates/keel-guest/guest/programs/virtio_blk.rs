//! `virtio-blk` (every disk: configuration, GET_ID, pattern writes read
//! back, FLUSH, DISCARD, WRITE_ZEROES, requests past the end, read-only
//! refusals) and `virtio-blk-bench` (sequential throughput of one disk).

use core::fmt;

use super::{arg, check_interrupts, flag, virtio_devices, Context, Failure, Outcome};
use crate::abi::{
    blk_pattern_sector, fnv1a64, BLK_DEFAULT_PATTERN, BLK_DISCARD_RANGE, BLK_HEAD_RANGE,
    BLK_MIN_SECTORS, BLK_MULTI_RANGE, BLK_ZEROED_RANGE,
};
use crate::dma::{self, Buffer};
use crate::virtio::blk::{
    self, status_name, Blk, Done, F_DISCARD, F_FLUSH, F_WRITE_ZEROES, ID_BYTES, SECTOR, S_IOERR,
    S_OK, S_UNSUPP, T_DISCARD, T_WRITE_ZEROES,
};
use crate::virtio::queue::AVAIL_F_NO_INTERRUPT;
use crate::virtio::{device_id, feature, Found, RequestError};
use crate::{print, println, tsc};

/// Largest request the programs make: 64 KiB.
const MAX_REQUEST: usize = 64 * 1024;
/// Most segments a request is split into.
const MAX_SEGMENTS: usize = 16;

/// `vda`, `vdb`, … for disk index 0, 1, …
#[derive(Clone, Copy)]
pub struct DiskName(pub usize);

impl fmt::Display for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match u8::try_from(self.0).ok().filter(|&i| i < 26) {
            Some(i) => write!(f, "vd{}", (b'a' + i) as char),
            None => write!(f, "vd#{}", self.0),
        }
    }
}

/// A request's result, or a `FAIL:` line when it got none.
fn answered(
    name: DiskName,
    what: &str,
    result: Result<Done, RequestError>,
) -> Result<Done, Failure> {
    result.map_err(|e| {
        println!("FAIL: virtio-blk: {name}: {what}: {e}");
        Failure::Test
    })
}

/// A request whose status byte must be one of `allowed`.
fn expect(
    name: DiskName,
    what: &str,
    result: Result<Done, RequestError>,
    allowed: &[u8],
) -> Result<Done, Failure> {
    let done = answered(name, what, result)?;
    if !allowed.contains(&done.status) {
        println!(
            "FAIL: virtio-blk: {name}: {what}: status {} ({}), expected {}",
            done.status,
            status_name(done.status),
            status_name(allowed[0])
        );
        return Err(Failure::Test);
    }
    Ok(done)
}

/// Fills `buffer` with the pattern of `sectors` sectors from `first`.
fn fill_pattern(buffer: Buffer, pattern: u64, disk: u64, first: u64, sectors: u64) {
    let bytes = buffer.bytes_mut();
    for i in 0..sectors as usize {
        blk_pattern_sector(
            pattern,
            disk,
            first + i as u64,
            &mut bytes[i * SECTOR..(i + 1) * SECTOR],
        );
    }
}

/// `len` bytes of `buffer` split into `count` equal segments.
fn segments(buffer: Buffer, len: usize, count: usize) -> ([Buffer; MAX_SEGMENTS], usize) {
    let mut segs = [buffer.slice(0, 0); MAX_SEGMENTS];
    let each = len / count;
    for (i, seg) in segs.iter_mut().take(count).enumerate() {
        *seg = buffer.slice(i * each, each);
    }
    (segs, count)
}

/// How many segments a `len`-byte request needs at most, given the
/// device's `size_max` and `seg_max`: the most (up to 16, a power of two)
/// that `seg_max` allows, fewer only if `size_max` forces bigger ones.
fn segment_count(blk: &Blk, len: usize, wanted: usize) -> Option<usize> {
    let seg_max = if blk.has(blk::F_SEG_MAX) {
        blk.config.seg_max as usize
    } else {
        MAX_SEGMENTS
    };
    let size_max = if blk.has(blk::F_SIZE_MAX) {
        blk.config.size_max as usize
    } else {
        usize::MAX
    };
    let mut count = wanted.min(seg_max).clamp(1, MAX_SEGMENTS);
    count = 1 << (usize::BITS - 1 - count.leading_zeros());
    (len / count <= size_max && len.is_multiple_of(count * SECTOR)).then_some(count)
}

struct Buffers {
    write: Buffer,
    read: Buffer,
    id: Buffer,
}

/// `virtio-blk [pattern=N] [irq=0|1] [event-idx=0|1] [indirect=0|1]`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let pattern = arg(ctx.cmdline.number("pattern"))?.unwrap_or(BLK_DEFAULT_PATTERN);
    let use_irq = flag(ctx, "irq", true)?;
    let mut ring = 0;
    if flag(ctx, "event-idx", true)? {
        ring |= feature::RING_EVENT_IDX;
    }
    if flag(ctx, "indirect", true)? {
        ring |= feature::RING_INDIRECT_DESC;
    }
    let devices = virtio_devices(ctx)?;
    let count = devices.of_type(device_id::BLOCK).count();
    println!("virtio-blk: {count} device(s)");
    if count == 0 {
        fail!("no virtio-blk device on the command line (virtio_mmio.device=...)");
    }
    let buffers = Buffers {
        write: dma::alloc_or_panic(MAX_REQUEST, 4096),
        read: dma::alloc_or_panic(MAX_REQUEST, 4096),
        id: dma::alloc_or_panic(64, 64),
    };
    let mut result = Ok(());
    for (disk, found) in devices.of_type(device_id::BLOCK).enumerate() {
        if let Err(e) = check_disk(ctx, disk, found, pattern, ring, use_irq, &buffers) {
            result = Err(e);
        }
    }
    result
}

fn init(
    ctx: &Context<'_>,
    name: DiskName,
    found: Found,
    ring: u64,
    use_irq: bool,
) -> Result<Blk, Failure> {
    Blk::init(found, ctx.params, ring, use_irq, 64).map_err(|e| {
        println!(
            "FAIL: virtio-blk: {name} at {}: initialisation: {e}",
            found.location
        );
        Failure::Test
    })
}

fn check_disk(
    ctx: &Context<'_>,
    disk: usize,
    found: Found,
    pattern: u64,
    ring: u64,
    use_irq: bool,
    bufs: &Buffers,
) -> Outcome {
    let name = DiskName(disk);
    let mut blk = init(ctx, name, found, ring, use_irq)?;
    let c = blk.config;
    println!(
        "virtio-blk: {name} at {}: features offered {:#x}, accepted {:#x}",
        found.location, blk.offered, blk.features
    );
    println!(
        "virtio-blk: {name}: capacity {} sectors ({} KiB), size_max {}, seg_max {}, blk_size {}, num_queues {}, queue size {}",
        c.capacity,
        c.capacity / 2,
        c.size_max,
        c.seg_max,
        c.blk_size,
        c.num_queues,
        blk.queue.size()
    );
    if blk.has(F_DISCARD) {
        println!(
            "virtio-blk: {name}: discard: at most {} sectors in {} segments, alignment {} sectors",
            c.max_discard_sectors, c.max_discard_seg, c.discard_sector_alignment
        );
    }
    if blk.has(F_WRITE_ZEROES) {
        println!(
            "virtio-blk: {name}: write-zeroes: at most {} sectors in {} segments, may unmap {}",
            c.max_write_zeroes_sectors, c.max_write_zeroes_seg, c.write_zeroes_may_unmap
        );
    }
    println!(
        "virtio-blk: {name}: {}",
        if blk.read_only() {
            "read-only"
        } else {
            "read-write"
        }
    );

    // GET_ID: up to 20 bytes, NUL-padded.
    bufs.id.fill(0);
    let done = expect(
        name,
        "GET_ID",
        blk.get_id(bufs.id.slice(0, ID_BYTES)),
        &[S_OK],
    )?;
    let id = bufs.id.bytes();
    let len = id[..ID_BYTES]
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ID_BYTES);
    print!("virtio-blk: {name}: id \"");
    for &byte in &id[..len] {
        print!(
            "{}",
            if byte.is_ascii_graphic() || byte == b' ' {
                byte as char
            } else {
                '?'
            }
        );
    }
    println!("\" (used length {})", done.len);

    if blk.read_only() {
        read_only_checks(&mut blk, name, bufs)?;
    } else {
        read_write_checks(&mut blk, name, disk as u64, pattern, bufs)?;
    }

    // Past the end: one sector at the capacity, two straddling the end.
    let cap = c.capacity;
    expect(
        name,
        "read at the capacity",
        blk.read(cap, &[bufs.read.slice(0, SECTOR)]),
        &[S_IOERR],
    )?;
    expect(
        name,
        "read across the end",
        blk.read(cap.saturating_sub(1), &[bufs.read.slice(0, 2 * SECTOR)]),
        &[S_IOERR],
    )?;
    println!("virtio-blk: {name}: reads past the end: IOERR ok");

    // What the first 4 KiB hold now, for the host to compare.
    let head = bufs.read.slice(0, 8 * SECTOR);
    expect(name, "read of sectors 0+8", blk.read(0, &[head]), &[S_OK])?;
    println!(
        "virtio-blk: {name}: sectors 0+8 fnv1a64={:#018x}",
        fnv1a64(head.bytes())
    );

    check_interrupts(format_args!("virtio-blk: {name}"), &mut blk.transport)?;
    // Leave the device quiet.
    let _ = blk.transport.reset();
    Ok(())
}

/// Writes `sectors` of the pattern at `first` in `count` segments.
fn write_range(
    blk: &mut Blk,
    name: DiskName,
    disk: u64,
    pattern: u64,
    bufs: &Buffers,
    (first, sectors): (u64, u64),
    count: usize,
) -> Outcome {
    let len = sectors as usize * SECTOR;
    fill_pattern(bufs.write, pattern, disk, first, sectors);
    let (segs, n) = segments(bufs.write, len, count);
    expect(name, "write", blk.write(first, &segs[..n]), &[S_OK])?;
    println!("virtio-blk: {name}: wrote {sectors} sectors at {first} in {n} segment(s): OK");
    Ok(())
}

/// Reads `sectors` at `first` in `count` segments and compares them with
/// the pattern.
fn verify_range(
    blk: &mut Blk,
    name: DiskName,
    disk: u64,
    pattern: u64,
    bufs: &Buffers,
    (first, sectors): (u64, u64),
    count: usize,
) -> Outcome {
    let len = sectors as usize * SECTOR;
    bufs.read.fill(0xa5);
    let (segs, n) = segments(bufs.read, len, count);
    let done = expect(name, "read back", blk.read(first, &segs[..n]), &[S_OK])?;
    fill_pattern(bufs.write, pattern, disk, first, sectors);
    if let Some(at) = bufs
        .read
        .slice(0, len)
        .first_difference(&bufs.write.bytes()[..len])
    {
        fail!(
            "virtio-blk: {name}: sector {} byte {} reads back {:#04x}, wrote {:#04x}",
            first + (at / SECTOR) as u64,
            at % SECTOR,
            bufs.read.byte(at),
            bufs.write.byte(at)
        );
    }
    if done.len as usize != len + 1 {
        fail!(
            "virtio-blk: {name}: read of {len} bytes used {} bytes, expected {} (data + status)",
            done.len,
            len + 1
        );
    }
    println!("virtio-blk: {name}: read back {sectors} sectors at {first} in {n} segment(s): match");
    Ok(())
}

fn read_write_checks(
    blk: &mut Blk,
    name: DiskName,
    disk: u64,
    pattern: u64,
    bufs: &Buffers,
) -> Outcome {
    let cap = blk.config.capacity;
    if cap < BLK_MIN_SECTORS {
        fail!("virtio-blk: {name}: {cap} sectors; the test needs at least {BLK_MIN_SECTORS}");
    }
    let multi_len = BLK_MULTI_RANGE.1 as usize * SECTOR;
    let Some(multi) = segment_count(blk, multi_len, MAX_SEGMENTS) else {
        fail!(
            "virtio-blk: {name}: no segment count fits a 64 KiB request (size_max {}, seg_max {})",
            blk.config.size_max,
            blk.config.seg_max
        );
    };
    let head_len = BLK_HEAD_RANGE.1 as usize * SECTOR;
    let head = segment_count(blk, head_len, 1).unwrap_or(1);
    let last = (cap - 1, 1);
    write_range(blk, name, disk, pattern, bufs, BLK_HEAD_RANGE, head)?;
    write_range(blk, name, disk, pattern, bufs, BLK_MULTI_RANGE, multi)?;
    write_range(blk, name, disk, pattern, bufs, last, 1)?;
    verify_range(blk, name, disk, pattern, bufs, BLK_HEAD_RANGE, head)?;
    // Read the 64 KiB back in a different split than it was written.
    let back = segment_count(blk, multi_len, 1).unwrap_or(multi);
    verify_range(blk, name, disk, pattern, bufs, BLK_MULTI_RANGE, back)?;
    verify_range(blk, name, disk, pattern, bufs, last, 1)?;

    let flush_ok: &[u8] = if blk.has(F_FLUSH) {
        &[S_OK]
    } else {
        &[S_OK, S_UNSUPP]
    };
    let done = expect(name, "FLUSH", blk.flush(), flush_ok)?;
    println!("virtio-blk: {name}: flush: {}", status_name(done.status));

    // DISCARD: afterwards each sector holds the pattern or zeros.
    write_range(blk, name, disk, pattern, bufs, BLK_DISCARD_RANGE, 1)?;
    let discarded = blk.has(F_DISCARD)
        && BLK_DISCARD_RANGE
            .0
            .is_multiple_of(u64::from(blk.config.discard_sector_alignment.max(1)));
    if discarded {
        let (first, sectors) = BLK_DISCARD_RANGE;
        expect(
            name,
            "DISCARD",
            blk.discard_or_zero(T_DISCARD, first, sectors as u32, false),
            &[S_OK],
        )?;
        let len = sectors as usize * SECTOR;
        expect(
            name,
            "read after DISCARD",
            blk.read(first, &[bufs.read.slice(0, len)]),
            &[S_OK],
        )?;
        fill_pattern(bufs.write, pattern, disk, first, sectors);
        let (mut zeros, mut kept) = (0, 0);
        for s in 0..sectors as usize {
            let got = &bufs.read.bytes()[s * SECTOR..(s + 1) * SECTOR];
            if got.iter().all(|&b| b == 0) {
                zeros += 1;
            } else if got == &bufs.write.bytes()[s * SECTOR..(s + 1) * SECTOR] {
                kept += 1;
            } else {
                fail!(
                    "virtio-blk: {name}: sector {} after DISCARD is neither zeros nor what was there",
                    first + s as u64
                );
            }
        }
        println!(
            "virtio-blk: {name}: discard {sectors} sectors at {first}: OK ({zeros} read back as zeros, {kept} unchanged)"
        );
    } else {
        println!("virtio-blk: {name}: discard not negotiated (or misaligned): skipped");
    }

    // WRITE_ZEROES: afterwards the range reads as zeros.
    write_range(blk, name, disk, pattern, bufs, BLK_ZEROED_RANGE, 1)?;
    let zeroed = blk.has(F_WRITE_ZEROES);
    if zeroed {
        let (first, sectors) = BLK_ZEROED_RANGE;
        expect(
            name,
            "WRITE_ZEROES",
            blk.discard_or_zero(T_WRITE_ZEROES, first, sectors as u32, false),
            &[S_OK],
        )?;
        let len = sectors as usize * SECTOR;
        bufs.read.fill(0xa5);
        expect(
            name,
            "read after WRITE_ZEROES",
            blk.read(first, &[bufs.read.slice(0, len)]),
            &[S_OK],
        )?;
        if let Some(at) = bufs.read.bytes()[..len].iter().position(|&b| b != 0) {
            fail!(
                "virtio-blk: {name}: sector {} byte {} is {:#04x} after WRITE_ZEROES",
                first + (at / SECTOR) as u64,
                at % SECTOR,
                bufs.read.byte(at)
            );
        }
        println!("virtio-blk: {name}: write-zeroes {sectors} sectors at {first}: OK, reads back as zeros");
    } else {
        println!("virtio-blk: {name}: write-zeroes not negotiated: skipped");
    }

    let range = |r: (u64, u64), done: bool| Range(r, done);
    println!(
        "virtio-blk: {name}: written pattern={pattern} disk={disk} ranges={}+{},{}+{},{}+1 discarded={} zeroed={}",
        BLK_HEAD_RANGE.0,
        BLK_HEAD_RANGE.1,
        BLK_MULTI_RANGE.0,
        BLK_MULTI_RANGE.1,
        cap - 1,
        range(BLK_DISCARD_RANGE, discarded),
        range(BLK_ZEROED_RANGE, zeroed),
    );
    Ok(())
}

/// `first+count`, or `none` when the operation was skipped.
struct Range((u64, u64), bool);

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(f, "{}+{}", self.0 .0, self.0 .1)
        } else {
            f.write_str("none")
        }
    }
}

fn read_only_checks(blk: &mut Blk, name: DiskName, bufs: &Buffers) -> Outcome {
    let cap = blk.config.capacity;
    bufs.write.fill(0x5a);
    let done = expect(
        name,
        "write to a read-only disk",
        blk.write(0, &[bufs.write.slice(0, 8 * SECTOR)]),
        &[S_IOERR],
    )?;
    println!(
        "virtio-blk: {name}: write refused: {}",
        status_name(done.status)
    );
    let done = expect(
        name,
        "DISCARD on a read-only disk",
        blk.discard_or_zero(T_DISCARD, 0, 8, false),
        &[S_IOERR, S_UNSUPP],
    )?;
    println!(
        "virtio-blk: {name}: discard refused: {}",
        status_name(done.status)
    );
    let done = expect(
        name,
        "WRITE_ZEROES on a read-only disk",
        blk.discard_or_zero(T_WRITE_ZEROES, 0, 8, false),
        &[S_IOERR, S_UNSUPP],
    )?;
    println!(
        "virtio-blk: {name}: write-zeroes refused: {}",
        status_name(done.status)
    );
    expect(
        name,
        "read of a read-only disk",
        blk.read(0, &[bufs.read.slice(0, 8 * SECTOR)]),
        &[S_OK],
    )?;
    expect(
        name,
        "read of the last sector",
        blk.read(cap.saturating_sub(1), &[bufs.read.slice(0, SECTOR)]),
        &[S_OK],
    )?;
    let flush_ok: &[u8] = if blk.has(F_FLUSH) {
        &[S_OK]
    } else {
        &[S_OK, S_UNSUPP]
    };
    expect(name, "FLUSH", blk.flush(), flush_ok)?;
    println!("virtio-blk: {name}: reads and flush still work");
    Ok(())
}

/// `virtio-blk-bench [size=N] [count=N] [disk=N] [irq=0|1]`: sequential
/// writes, then sequential reads of `size` bytes, `count` of each, one
/// request at a time, completion polled; the driver asks for no interrupts
/// unless `irq=1`, which has every completion interrupt the guest (an
/// IOAPIC pin, or an MSI-X vector) as a driver waiting for it would.
pub fn bench(ctx: &Context<'_>) -> Outcome {
    let use_irq = flag(ctx, "irq", false)?;
    let size = arg(ctx.cmdline.number("size"))?.unwrap_or(4096);
    let count = arg(ctx.cmdline.number("count"))?.unwrap_or(256).max(1);
    let disk = arg(ctx.cmdline.number("disk"))?.unwrap_or(0);
    if size == 0 || size % SECTOR as u64 != 0 || size > MAX_REQUEST as u64 {
        bad_args!("size={size}: must be a multiple of 512 from 512 to {MAX_REQUEST}");
    }
    let size = size as usize;
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(device_id::BLOCK).nth(disk as usize) else {
        fail!("virtio-blk-bench: no virtio-blk device number {disk} on the command line");
    };
    let name = DiskName(disk as usize);
    let mut blk = init(ctx, name, found, 0, use_irq)?;
    if !use_irq {
        blk.queue.set_avail_flags(AVAIL_F_NO_INTERRUPT);
    }
    let per_request = (size / SECTOR) as u64;
    let slots = blk.config.capacity / per_request;
    if slots == 0 {
        fail!("virtio-blk-bench: {name} is smaller than one request");
    }
    let Some(n) = segment_count(&blk, size, 1) else {
        fail!(
            "virtio-blk-bench: {name}: size_max {} is too small",
            blk.config.size_max
        );
    };
    let buffer = dma::alloc_or_panic(MAX_REQUEST, 4096);
    buffer.fill(0x6b);
    let (segs, n) = segments(buffer, size, n);
    println!(
        "virtio-blk-bench: {name}: {count} sequential requests of {size} bytes each way, one at a time, polled, {}",
        if use_irq { "interrupts on" } else { "interrupts suppressed" }
    );
    match tsc::frequency() {
        Some((hz, source)) => println!(
            "virtio-blk-bench: TSC {} MHz ({})",
            hz / 1_000_000,
            source.describe()
        ),
        None => println!("virtio-blk-bench: TSC frequency unknown: reporting cycles per request"),
    }
    let phases: &[(&str, bool)] = if blk.read_only() {
        println!("virtio-blk-bench: {name} is read-only: writes skipped");
        &[("read", false)]
    } else {
        &[("write", true), ("read", false)]
    };
    for &(what, is_write) in phases {
        let start = tsc::now();
        for i in 0..count {
            let sector = (i % slots) * per_request;
            let result = if is_write {
                blk.write(sector, &segs[..n])
            } else {
                blk.read(sector, &segs[..n])
            };
            let done = answered(name, what, result)?;
            if done.status != S_OK {
                fail!(
                    "virtio-blk-bench: {name}: {what} at sector {sector}: status {}",
                    status_name(done.status)
                );
            }
        }
        report(
            name,
            what,
            count,
            size as u64,
            tsc::now().wrapping_sub(start),
        );
    }
    let _ = blk.transport.reset();
    Ok(())
}

/// `virtio-blk-flush-wait [pattern=N]`: writes sectors 0+8 of the first disk
/// with the byte `N` (default 0x5a), FLUSHes, prints `KEEL-FLUSHED pattern=N`
/// and then spins without exiting, so a host test can kill the VMM with
/// SIGKILL and check the flushed data is in the image.
pub fn flush_wait(ctx: &Context<'_>) -> Outcome {
    let pattern = arg(ctx.cmdline.number("pattern"))?.unwrap_or(0x5a);
    if pattern > 0xff {
        bad_args!("pattern={pattern}: must be a byte");
    }
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(device_id::BLOCK).next() else {
        fail!("virtio-blk-flush-wait: no virtio-blk device on the command line");
    };
    let name = DiskName(0);
    let mut blk = init(ctx, name, found, 0, false)?;
    let buffer = dma::alloc_or_panic(8 * SECTOR, 4096);
    buffer.fill(pattern as u8);
    let Some(n) = segment_count(&blk, 8 * SECTOR, 1) else {
        fail!("virtio-blk-flush-wait: {name}: size_max too small");
    };
    let (segs, n) = segments(buffer, 8 * SECTOR, n);
    let written = answered(name, "write", blk.write(0, &segs[..n]))?;
    let flushed = answered(name, "flush", blk.flush())?;
    if written.status != S_OK || flushed.status != S_OK {
        fail!(
            "virtio-blk-flush-wait: {name}: write {} flush {}",
            status_name(written.status),
            status_name(flushed.status)
        );
    }
    println!("KEEL-FLUSHED pattern={pattern:#x}");
    loop {
        core::hint::spin_loop();
    }
}

fn report(name: DiskName, what: &str, count: u64, size: u64, ticks: u64) {
    let ticks = ticks.max(1);
    let per_request = ticks / count;
    match tsc::frequency() {
        Some((hz, _)) => {
            let micros = u128::from(ticks) * 1_000_000 / u128::from(hz);
            let rate = u128::from(count) * u128::from(hz) / u128::from(ticks);
            let mib10 = u128::from(count * size) * u128::from(hz) * 10 / (u128::from(ticks) << 20);
            println!(
                "virtio-blk-bench: {name}: {what} {count} x {size} bytes in {}.{:03} ms: {rate} requests/s, {}.{} MiB/s, {per_request} cycles/request",
                micros / 1000,
                micros % 1000,
                mib10 / 10,
                mib10 % 10
            );
        }
        None => println!(
            "virtio-blk-bench: {name}: {what} {count} x {size} bytes: {per_request} TSC cycles per request"
        ),
    }
}
