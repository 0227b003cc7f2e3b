//! `virtio-hostile`: broken chains, bad addresses, bad queues and resets in
//! the middle of I/O, against the first virtio-blk device (and the first
//! virtio-rng device where a case fits it).
//!
//! Every case runs on a freshly initialised device. Its buffers live in a
//! 64 KiB arena filled with a canary byte; afterwards every byte outside
//! the buffers the chain declared device-writable must be unchanged. The
//! device must answer with an error status (IOERR or UNSUPP) or set
//! DEVICE_NEEDS_RESET; then it is reset, initialised again and must serve
//! a normal read of sector 0 that matches a reference read taken at the
//! start.

use super::virtio_rng::{looks_random, Rng};
use super::{virtio_devices, Context, Failure, Outcome};
use crate::dma::{self, Buffer};
use crate::println;
use crate::tsc;
use crate::virtio::blk::{
    status_name, Blk, SECTOR, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_IN, T_OUT,
};
use crate::virtio::queue::{Chain, Entry, Next, Virtqueue, Wait, DESC_F_INDIRECT, DESC_F_WRITE};
use crate::virtio::{device_id, feature, status, InitError, Transport};

const ARENA: usize = 64 * 1024;
/// Arena layout: request header, indirect table, data, status byte.
const HDR: usize = 0;
const TABLE: usize = 0x100;
const DATA: usize = 0x1000;
const STATUS: usize = 0xff00;
/// Headers of the reads `reset-mid-io` puts in flight (after their tables).
const RESET_HEADERS: usize = 0x400;
const CANARY: u8 = 0xa5;
/// Queue size used for every case (a chain longer than this is "too long").
const QUEUE: u16 = 16;
const MAX_WRITABLE: usize = 24;
const TIMEOUT_MS: u64 = 1000;
/// An address whose buffers wrap around 2^64.
const WRAPPING: u64 = 0xffff_ffff_ffff_fe00;
/// A length of gigabytes.
const HUGE: u32 = 0xc000_0000;

/// A chain under construction, with the arena ranges it lets the device
/// write.
struct Case {
    arena: Buffer,
    chain: Chain,
    writable: [(u64, u64); MAX_WRITABLE],
    count: usize,
    /// Where the status byte is: the last byte of the last non-empty
    /// writable buffer, if that is inside the arena.
    status_at: Option<usize>,
}

impl Case {
    fn new(arena: Buffer) -> Self {
        arena.fill(CANARY);
        Self {
            arena,
            chain: Chain::new(),
            writable: [(0, 0); MAX_WRITABLE],
            count: 0,
            status_at: None,
        }
    }

    fn at(&self, offset: usize) -> u64 {
        self.arena.addr() + offset as u64
    }

    fn entry(mut self, entry: Entry) -> Self {
        if entry.flags & DESC_F_WRITE != 0 && entry.len > 0 {
            let end = entry.addr.saturating_add(u64::from(entry.len));
            assert!(self.count < MAX_WRITABLE, "too many writable buffers");
            self.writable[self.count] = (entry.addr, end);
            self.count += 1;
            let last = end - 1;
            let arena = self.arena.addr()..self.arena.addr() + ARENA as u64;
            self.status_at = arena
                .contains(&last)
                .then(|| (last - self.arena.addr()) as usize);
        }
        self.chain = self.chain.push(entry);
        self
    }

    fn raw(self, addr: u64, len: u32, flags: u16) -> Self {
        self.entry(Entry {
            addr,
            len,
            flags,
            next: Next::Following,
        })
    }

    /// Writes a request header into the arena and appends it (`len` bytes
    /// of it) as readable.
    fn header(self, kind: u32, sector: u64, len: u32) -> Self {
        self.arena.put_u32(HDR, kind);
        self.arena.put_u32(HDR + 4, 0);
        self.arena.put_u64(HDR + 8, sector);
        let addr = self.at(HDR);
        self.raw(addr, len, 0)
    }

    /// `len` device-writable bytes at arena offset `offset`.
    fn data(self, offset: usize, len: u32) -> Self {
        let addr = self.at(offset);
        self.raw(addr, len, DESC_F_WRITE)
    }

    /// The status byte.
    fn status(self) -> Self {
        let addr = self.at(STATUS);
        self.raw(addr, 1, DESC_F_WRITE)
    }

    /// A normal read of `len` bytes at `sector`.
    fn read(self, sector: u64, len: u32) -> Self {
        self.header(T_IN, sector, 16).data(DATA, len).status()
    }

    fn link_last(mut self, next: Next) -> Self {
        self.chain = self.chain.link_last(next);
        self
    }

    /// Moves the chain into an indirect table in the arena, behind one
    /// indirect descriptor.
    fn indirect(mut self) -> Self {
        let table = self.at(TABLE);
        self.chain.write_table(table, 0);
        self.chain = Chain::new().indirect(table, self.chain.len());
        self
    }

    fn may_write(&self, addr: u64) -> bool {
        self.writable[..self.count]
            .iter()
            .any(|&(start, end)| (start..end).contains(&addr))
    }
}

/// What the device did with a case.
#[derive(Clone, Copy)]
enum Seen {
    /// Used the chain with this status byte (or none: no status in the
    /// arena) and used length.
    Answered(Option<u8>, u32),
    /// Set DEVICE_NEEDS_RESET; InterruptStatus at that point.
    NeedsReset(u32),
    Timeout,
    WrongHead(u16),
    QueueFull,
}

/// Which answers pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Allow {
    /// IOERR, UNSUPP or DEVICE_NEEDS_RESET.
    Error,
    /// Those, or OK with the data of sector 0 (the chain was odd but legal).
    ErrorOrRead,
    /// The entropy device: DEVICE_NEEDS_RESET, or nothing filled.
    NothingFilled,
}

struct Hostile {
    blk: Blk,
    rng: Option<Rng>,
    arena: Buffer,
    snapshot: Buffer,
    /// Sector 0 as read before any case.
    reference: Buffer,
    scratch: Buffer,
    ram_end: u64,
    cases: u32,
    failed: u32,
}

/// Waits for the answer to what was just made available on `queue`.
fn await_answer(t: &Transport, q: &mut Virtqueue, head: Option<u16>, case: &Case) -> Seen {
    match q.wait(t, TIMEOUT_MS) {
        Wait::Used { id, len } => {
            t.ack_interrupt();
            if head.is_some_and(|h| h != id) {
                return Seen::WrongHead(id);
            }
            Seen::Answered(case.status_at.map(|at| case.arena.byte(at)), len)
        }
        Wait::NeedsReset { .. } => {
            Seen::NeedsReset(t.ack_interrupt())
        }
        Wait::Timeout(_) => Seen::Timeout,
    }
}

/// Makes `case` available on `queue`, notifies and waits.
fn submit(t: &Transport, q: &mut Virtqueue, case: &Case) -> Seen {
    let Some(head) = q.add(&case.chain) else {
        return Seen::QueueFull;
    };
    t.notify(q.index());
    await_answer(t, q, Some(head), case)
}

impl Hostile {
    /// Takes the snapshot the canary check compares with.
    fn snap(&self) {
        self.snapshot.write(0, self.arena.bytes());
    }

    /// The first arena offset the device changed outside `case`'s writable
    /// buffers.
    fn stray_write(&self, case: &Case) -> Option<usize> {
        let (now, before) = (self.arena.bytes(), self.snapshot.bytes());
        (0..ARENA).find(|&i| now[i] != before[i] && !case.may_write(self.arena.addr() + i as u64))
    }

    /// Judges what the device did with a case.
    fn judge(
        &self,
        name: &str,
        case: &Case,
        seen: Seen,
        allow: Allow,
    ) -> Result<&'static str, Failure> {
        if let Some(at) = self.stray_write(case) {
            fail!(
                "hostile: {name}: the device wrote {:#04x} at arena offset {at:#x}, outside the request's writable buffers",
                self.arena.byte(at)
            );
        }
        match (seen, allow) {
            (Seen::NeedsReset(isr), _) => {
                if isr & crate::virtio::isr::CONFIG_CHANGE == 0 {
                    println!("hostile: {name}: note: DEVICE_NEEDS_RESET without the configuration-change interrupt bit");
                }
                Ok("DEVICE_NEEDS_RESET")
            }
            (Seen::Answered(Some(S_IOERR), _), Allow::Error | Allow::ErrorOrRead) => Ok("IOERR"),
            (Seen::Answered(Some(S_UNSUPP), _), Allow::Error | Allow::ErrorOrRead) => Ok("UNSUPP"),
            (Seen::Answered(Some(S_OK), _), Allow::ErrorOrRead) => {
                let data = self.arena.slice(DATA, SECTOR);
                if data.first_difference(self.reference.bytes()).is_some() {
                    fail!("hostile: {name}: answered OK but the data is not sector 0");
                }
                Ok("OK, data correct")
            }
            (Seen::Answered(_, 0), Allow::NothingFilled) => Ok("used length 0"),
            (Seen::Answered(_, len), Allow::NothingFilled) => {
                fail!("hostile: {name}: the device filled {len} bytes")
            }
            (Seen::Answered(Some(status), len), _) => fail!(
                "hostile: {name}: the device answered {} ({status:#x}), used length {len}",
                status_name(status)
            ),
            (Seen::Answered(None, len), _) => {
                fail!("hostile: {name}: the device used the chain, length {len}")
            }
            (Seen::Timeout, _) => {
                fail!("hostile: {name}: no answer and no DEVICE_NEEDS_RESET within {TIMEOUT_MS} ms")
            }
            (Seen::WrongHead(id), _) => fail!("hostile: {name}: the used ring returned head {id}"),
            (Seen::QueueFull, _) => fail!("hostile: {name}: the chain does not fit the queue"),
        }
    }

    /// Resets and re-initialises the block device, which must then read
    /// sector 0 correctly.
    fn recover(&mut self, name: &str) -> Outcome {
        if let Err(e) = self.blk.reinit() {
            fail!("hostile: {name}: initialising the device again: {e}");
        }
        self.blk.use_indirect = false;
        self.blk.queue.force_notify = true;
        self.scratch.fill(0);
        match self.blk.read(0, &[self.scratch]) {
            Ok(done) if done.status == S_OK => {}
            Ok(done) => fail!(
                "hostile: {name}: afterwards a normal read answered {}",
                status_name(done.status)
            ),
            Err(e) => fail!("hostile: {name}: afterwards a normal read: {e}"),
        }
        if self
            .scratch
            .first_difference(self.reference.bytes())
            .is_some()
        {
            fail!("hostile: {name}: afterwards sector 0 reads back different data");
        }
        Ok(())
    }

    /// Runs one chain case on the block device.
    fn blk_case(&mut self, name: &str, case: Case, allow: Allow) -> Outcome {
        self.snap();
        let seen = submit(&self.blk.transport, &mut self.blk.queue, &case);
        let verdict = self.judge(name, &case, seen, allow);
        self.finish(name, verdict, Self::recover)
    }

    /// Prints the case's line, then recovers the device either way.
    fn finish(
        &mut self,
        name: &str,
        verdict: Result<&'static str, Failure>,
        recover: fn(&mut Self, &str) -> Outcome,
    ) -> Outcome {
        self.cases += 1;
        let recovered = recover(self, name);
        match (verdict, recovered) {
            (Ok(what), Ok(())) => {
                println!("hostile: {name} ... ok ({what})");
                Ok(())
            }
            _ => {
                self.failed += 1;
                println!("hostile: {name} ... FAILED");
                Err(Failure::Test)
            }
        }
    }

    /// A queue set up with `program` (instead of the driver's good one):
    /// DRIVER_OK must leave the device in DEVICE_NEEDS_RESET.
    fn setup_case(
        &mut self,
        name: &str,
        program: impl FnOnce(&Transport, &Virtqueue, u64),
    ) -> Outcome {
        let case = Case::new(self.arena);
        self.snap();
        let ram_end = self.ram_end;
        let result = self.blk.reinit_with(|t, q| {
            program(t, q, ram_end);
            Ok(())
        });
        let verdict = match result {
            Err(InitError::Status { status }) if status & status::DEVICE_NEEDS_RESET != 0 => self
                .judge(
                    name,
                    &case,
                    Seen::NeedsReset(self.blk.transport.ack_interrupt()),
                    Allow::Error,
                )
                .map(|_| "DEVICE_NEEDS_RESET at DRIVER_OK"),
            Err(e) => {
                println!("FAIL: hostile: {name}: expected DEVICE_NEEDS_RESET after DRIVER_OK: {e}");
                Err(Failure::Test)
            }
            Ok(()) => {
                println!(
                    "FAIL: hostile: {name}: the device took the queue (status {:#x})",
                    self.blk.transport.status()
                );
                Err(Failure::Test)
            }
        };
        self.finish(name, verdict, Self::recover)
    }
}

/// `virtio-hostile`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(device_id::BLOCK).next() else {
        fail!("virtio-hostile needs a virtio-blk device on the command line");
    };
    let wanted = feature::RING_INDIRECT_DESC;
    let mut blk = match Blk::init(found, ctx.params, wanted, false, QUEUE) {
        Ok(blk) => blk,
        Err(e) => fail!(
            "hostile: virtio-blk at {}: initialisation: {e}",
            found.location
        ),
    };
    blk.use_indirect = false;
    blk.queue.force_notify = true;
    blk.timeout_ms = TIMEOUT_MS;
    if blk.queue.size() != QUEUE {
        fail!(
            "hostile: the block device's queue holds {} entries, the cases need {QUEUE}",
            blk.queue.size()
        );
    }
    let rng = devices.of_type(device_id::RNG).next().and_then(|found| {
        let transport = Transport::new(found, ctx.params, false);
        Rng::init(transport, QUEUE).ok()
    });
    let mut h = Hostile {
        blk,
        rng,
        arena: dma::alloc_or_panic(ARENA, 4096),
        snapshot: dma::alloc_or_panic(ARENA, 4096),
        reference: dma::alloc_or_panic(SECTOR, 512),
        scratch: dma::alloc_or_panic(SECTOR, 512),
        ram_end: ctx.params.ram_end(),
        cases: 0,
        failed: 0,
    };
    match h.blk.read(0, &[h.reference]) {
        Ok(done) if done.status == S_OK => {}
        _ => fail!("hostile: the reference read of sector 0 failed"),
    }
    let capacity = h.blk.config.capacity;
    println!(
        "hostile: virtio-blk at {}, {capacity} sectors, queue size {QUEUE}, RAM ends at {:#x}; virtio-rng: {}",
        found.location,
        h.ram_end,
        if h.rng.is_some() { "yes" } else { "no" }
    );
    blk_cases(&mut h, capacity);
    setup_cases(&mut h);
    let _ = reset_mid_io(&mut h);
    let _ = notify_missing_queue(&mut h);
    rng_cases(&mut h);
    println!("hostile: {} cases, {} failed", h.cases, h.failed);
    let _ = h.blk.transport.reset();
    if let Some(rng) = &h.rng {
        let _ = rng.transport.reset();
    }
    if h.failed > 0 {
        return Err(Failure::Test);
    }
    Ok(())
}

/// What the case builders need to know.
struct Env {
    a: Buffer,
    ram_end: u64,
    mmio: u64,
    capacity: u64,
}

type Build = fn(&Env) -> Case;

const S: u32 = SECTOR as u32;
const W: u16 = DESC_F_WRITE;

/// The chain cases on the block device: name, chain, what passes.
const BLK_CASES: [(&str, Build, Allow); 27] = [
    (
        "outside-ram",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .raw(e.ram_end, S, W)
                .status()
        },
        Allow::Error,
    ),
    (
        "mmio-address",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .raw(e.mmio, S, W)
                .status()
        },
        Allow::Error,
    ),
    (
        "wrap-2^64",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .raw(WRAPPING, 2 * S, W)
                .status()
        },
        Allow::Error,
    ),
    (
        "huge-length",
        |e| Case::new(e.a).header(T_IN, 0, 16).data(DATA, HUGE).status(),
        Allow::Error,
    ),
    (
        "huge-length-write",
        |e| {
            Case::new(e.a)
                .header(T_OUT, 0, 16)
                .raw(e.a.addr() + DATA as u64, HUGE, 0)
                .status()
        },
        Allow::Error,
    ),
    (
        "loop",
        |e| Case::new(e.a).read(0, S).link_last(Next::Element(1)),
        Allow::Error,
    ),
    (
        "loop-to-head",
        |e| Case::new(e.a).read(0, S).link_last(Next::Element(0)),
        Allow::Error,
    ),
    (
        "self-loop",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .link_last(Next::Element(0))
        },
        Allow::Error,
    ),
    (
        "next-out-of-range",
        |e| Case::new(e.a).read(0, S).link_last(Next::Index(QUEUE + 5)),
        Allow::Error,
    ),
    ("too-long", |e| too_long(e.a), Allow::Error),
    (
        "indirect-in-indirect",
        |e| {
            Case::new(e.a)
                .raw(e.a.addr() + DATA as u64, 48, DESC_F_INDIRECT)
                .header(T_IN, 0, 16)
                .status()
                .indirect()
        },
        Allow::Error,
    ),
    (
        "indirect-outside-ram",
        |e| Case::new(e.a).raw(e.ram_end, 3 * 16, DESC_F_INDIRECT),
        Allow::Error,
    ),
    (
        "indirect-bad-length",
        |e| Case::new(e.a).read(0, S).indirect().bad_indirect_len(),
        Allow::Error,
    ),
    (
        "zero-length-header",
        |e| Case::new(e.a).header(T_IN, 0, 0).data(DATA, S).status(),
        Allow::Error,
    ),
    (
        "zero-length-status",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .data(DATA, S)
                .raw(e.a.addr() + STATUS as u64, 0, W)
        },
        Allow::Error,
    ),
    (
        "zero-length-only-status",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .raw(e.a.addr() + STATUS as u64, 0, W)
        },
        Allow::Error,
    ),
    (
        "zero-length-mixed",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .raw(e.a.addr() + 0x8000, 0, 0)
                .data(DATA, S)
                .raw(e.a.addr() + 0x9000, 0, W)
                .status()
        },
        Allow::ErrorOrRead,
    ),
    (
        "unlinked-status",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .data(DATA, S)
                .link_last(Next::End)
                .status_unlinked()
        },
        Allow::Error,
    ),
    (
        "writable-first",
        |e| Case::new(e.a).data(DATA, S).header(T_IN, 0, 16).status(),
        Allow::Error,
    ),
    (
        "all-readable",
        |e| {
            Case::new(e.a)
                .header(T_IN, 0, 16)
                .raw(e.a.addr() + DATA as u64, S, 0)
                .raw(e.a.addr() + STATUS as u64, 1, 0)
        },
        Allow::Error,
    ),
    (
        "past-end",
        |e| Case::new(e.a).read(e.capacity, S),
        Allow::Error,
    ),
    (
        "straddle-end",
        |e| Case::new(e.a).read(e.capacity - 1, 2 * S),
        Allow::Error,
    ),
    (
        "sector-overflow",
        |e| Case::new(e.a).read(u64::MAX / SECTOR as u64 + 1, S),
        Allow::Error,
    ),
    (
        "unknown-type",
        |e| {
            Case::new(e.a)
                .header(0x7fff_0000, 0, 16)
                .data(DATA, S)
                .status()
        },
        Allow::Error,
    ),
    ("odd-length", |e| Case::new(e.a).read(0, 100), Allow::Error),
    (
        "short-header",
        |e| Case::new(e.a).header(T_IN, 0, 8).data(DATA, S).status(),
        Allow::Error,
    ),
    (
        "discard-bad-payload",
        |e| {
            Case::new(e.a)
                .header(T_DISCARD, 0, 16)
                .raw(e.a.addr() + DATA as u64, 10, 0)
                .status()
        },
        Allow::Error,
    ),
];

fn blk_cases(h: &mut Hostile, capacity: u64) {
    let env = Env {
        a: h.arena,
        ram_end: h.ram_end,
        mmio: h.blk.transport.regs_base(),
        capacity,
    };
    for (name, build, allow) in BLK_CASES {
        let _ = h.blk_case(name, build(&env), allow);
    }
    // Heads and indexes that are no chain at all.
    let _ = raw_ring_case(h, "head-out-of-range", |q| q.publish(QUEUE + 3));
    let _ = raw_ring_case(h, "avail-index-jump", |q| {
        q.set_avail_idx_raw(q.avail_idx().wrapping_add(QUEUE + 1))
    });
}

impl Case {
    /// Puts a status descriptor in the table that nothing links to: the
    /// chain ends at the data buffer.
    fn status_unlinked(self) -> Self {
        let addr = self.at(STATUS);
        // Not recorded as writable: the device must not find it.
        let mut case = self;
        case.chain = case.chain.push(Entry {
            addr,
            len: 1,
            flags: DESC_F_WRITE,
            next: Next::End,
        });
        case
    }

    /// Gives the single indirect descriptor a length that is no whole
    /// number of descriptors.
    fn bad_indirect_len(mut self) -> Self {
        let table = self.at(TABLE);
        self.chain = Chain::new().push(Entry {
            addr: table,
            len: 20,
            flags: DESC_F_INDIRECT,
            next: Next::Following,
        });
        self
    }
}

/// An indirect table of QUEUE + 1 descriptors: header, QUEUE - 1 sectors
/// of data, status. Legal in every other way.
fn too_long(arena: Buffer) -> Case {
    let mut case = Case::new(arena).header(T_IN, 0, 16);
    for i in 0..usize::from(QUEUE) - 1 {
        case = case.data(DATA + i * SECTOR, SECTOR as u32);
    }
    case.status().indirect()
}

/// Something written straight into the available ring.
fn raw_ring_case(h: &mut Hostile, name: &str, poke: impl FnOnce(&mut Virtqueue)) -> Outcome {
    let case = Case::new(h.arena);
    h.snap();
    poke(&mut h.blk.queue);
    h.blk.transport.notify(0);
    let seen = await_answer(&h.blk.transport, &mut h.blk.queue, None, &case);
    let verdict = h.judge(name, &case, seen, Allow::Error);
    h.finish(name, verdict, Hostile::recover)
}

/// Programs queue 0 badly: (transport, the queue as the driver made it, RAM end).
type SetupQueue = fn(&Transport, &Virtqueue, u64);

fn setup_cases(h: &mut Hostile) {
    let cases: [(&str, SetupQueue); 7] = [
        ("ring-outside-ram", |t, q, ram_end| {
            let (_, avail, used) = q.addresses();
            t.setup_queue_raw(0, q.size().into(), ram_end, avail, used);
        }),
        ("avail-ring-outside-ram", |t, q, ram_end| {
            let (desc, _, used) = q.addresses();
            t.setup_queue_raw(0, q.size().into(), desc, ram_end, used);
        }),
        ("used-ring-outside-ram", |t, q, ram_end| {
            let (desc, avail, _) = q.addresses();
            t.setup_queue_raw(0, q.size().into(), desc, avail, ram_end);
        }),
        ("ring-wraps-2^64", |t, q, _| {
            let (_, avail, used) = q.addresses();
            t.setup_queue_raw(0, q.size().into(), 0xffff_ffff_ffff_ff00, avail, used);
        }),
        ("misaligned-ring", |t, q, _| {
            let (desc, avail, used) = q.addresses();
            t.setup_queue_raw(0, q.size().into(), desc + 8, avail, used);
        }),
        ("bad-queue-size", |t, q, _| {
            let (desc, avail, used) = q.addresses();
            t.setup_queue_raw(0, 3, desc, avail, used);
        }),
        ("queue-larger-than-max", |t, q, _| {
            let (desc, avail, used) = q.addresses();
            let max = t.queue_max(0);
            t.setup_queue_raw(0, u32::from(max) * 2, desc, avail, used);
        }),
    ];
    for (name, program) in cases {
        let _ = h.setup_case(name, program);
    }
}

/// Several reads in flight, then status 0 right after the notification:
/// once the reset write returns the device must not touch memory, and it
/// must work again after initialisation.
fn reset_mid_io(h: &mut Hostile) -> Outcome {
    let name = "reset-mid-io";
    let arena = h.arena;
    arena.fill(CANARY);
    // As many 4 KiB reads as fit: one descriptor each behind indirect
    // tables when negotiated (14: the data fills the arena), else 5.
    let indirect = h.blk.has(feature::RING_INDIRECT_DESC);
    let requests = if indirect { 14 } else { usize::from(QUEUE / 3) };
    let base = h.blk.queue.used_idx();
    for i in 0..requests {
        let header = RESET_HEADERS + 32 * i;
        arena.put_u32(header, T_IN);
        arena.put_u64(header + 8, 8 * i as u64);
        let mut chain = Chain::new()
            .readable(arena.addr() + header as u64, 16)
            .writable(arena.addr() + (DATA + 4096 * i) as u64, 4096)
            .writable(arena.addr() + (STATUS + i) as u64, 1);
        if indirect {
            let table = arena.addr() + (TABLE + 48 * i) as u64;
            chain.write_table(table, 0);
            chain = Chain::new().indirect(table, 3);
        }
        if h.blk.queue.add(&chain).is_none() {
            break;
        }
    }
    let queued = usize::from(h.blk.queue.in_flight());
    h.blk.transport.notify(0);
    h.blk.transport.set_status(0);
    // Whatever happened before the reset took effect, nothing may change
    // after it.
    let used = h.blk.queue.used_idx();
    h.snap();
    let start = tsc::now();
    let wait = tsc::ticks_per_ms(5);
    while tsc::now().wrapping_sub(start) < wait {
        core::hint::spin_loop();
    }
    let after = h.blk.queue.used_idx();
    let verdict = if queued != requests {
        println!("FAIL: hostile: {name}: only {queued} of {requests} requests fit the queue");
        Err(Failure::Test)
    } else if after != used {
        println!(
            "FAIL: hostile: {name}: the used index moved from {used} to {after} after the reset"
        );
        Err(Failure::Test)
    } else if let Some(at) = h.stray_write(&Case::new_empty(arena)) {
        println!("FAIL: hostile: {name}: the device wrote arena offset {at:#x} after the reset");
        Err(Failure::Test)
    } else {
        let done = used.wrapping_sub(base);
        println!(
            "hostile: {name}: {done} of {requests} reads completed before the reset took effect"
        );
        Ok("quiet after the reset")
    };
    h.finish(name, verdict, Hostile::recover)
}

impl Case {
    /// A case allowing no writes at all (for checks after a reset).
    fn new_empty(arena: Buffer) -> Self {
        Self {
            arena,
            chain: Chain::new(),
            writable: [(0, 0); MAX_WRITABLE],
            count: 0,
            status_at: None,
        }
    }
}

/// A notification for a queue the device does not have: ignored, and the
/// device keeps working without a reset.
fn notify_missing_queue(h: &mut Hostile) -> Outcome {
    let name = "notify-missing-queue";
    h.blk.transport.notify(7);
    h.blk.transport.notify(0xffff);
    let status = h.blk.transport.status();
    let verdict = if status & status::DEVICE_NEEDS_RESET != 0 {
        println!("FAIL: hostile: {name}: the device needs a reset (status {status:#x})");
        Err(Failure::Test)
    } else {
        match h.blk.read(0, &[h.scratch]) {
            Ok(done) if done.status == S_OK => Ok("ignored"),
            _ => {
                println!("FAIL: hostile: {name}: the next normal read failed");
                Err(Failure::Test)
            }
        }
    };
    h.finish(name, verdict, Hostile::recover)
}

fn rng_recover(h: &mut Hostile, name: &str) -> Outcome {
    let Some(rng) = h.rng.as_mut() else {
        return Ok(());
    };
    if let Err(e) = rng.reinit() {
        fail!("hostile: {name}: initialising virtio-rng again: {e}");
    }
    rng.queue.force_notify = true;
    let buffer = h.scratch.slice(0, 64);
    buffer.fill(0);
    match rng.fill(buffer) {
        Ok(len) if len > 0 && looks_random(&buffer.bytes()[..len as usize]) => Ok(()),
        Ok(len) => fail!(
            "hostile: {name}: afterwards virtio-rng filled {len} bytes that do not look random"
        ),
        Err(e) => fail!("hostile: {name}: afterwards virtio-rng: {e}"),
    }
}

fn rng_cases(h: &mut Hostile) {
    if h.rng.is_none() {
        println!("hostile: no virtio-rng device: its cases are skipped");
        return;
    }
    let _ = rng_recover(h, "rng setup");
    let env = Env {
        a: h.arena,
        ram_end: h.ram_end,
        mmio: 0,
        capacity: 0,
    };
    let cases: [(&str, Build); 5] = [
        ("rng-outside-ram", |e| Case::new(e.a).raw(e.ram_end, 64, W)),
        ("rng-wrap-2^64", |e| Case::new(e.a).raw(WRAPPING, 1024, W)),
        ("rng-huge-length", |e| Case::new(e.a).data(DATA, HUGE)),
        ("rng-loop", |e| {
            Case::new(e.a)
                .data(DATA, 64)
                .data(DATA + 64, 64)
                .link_last(Next::Element(0))
        }),
        ("rng-readable-only", |e| {
            Case::new(e.a).raw(e.a.addr() + DATA as u64, 64, 0)
        }),
    ];
    for (name, build) in cases {
        let case = build(&env);
        h.snap();
        let Some(rng) = h.rng.as_mut() else {
            return;
        };
        let seen = submit(&rng.transport, &mut rng.queue, &case);
        let verdict = h.judge(name, &case, seen, Allow::NothingFilled);
        let _ = h.finish(name, verdict, rng_recover);
    }
}
