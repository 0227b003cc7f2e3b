//! The virtio-blk request path, end to end, with an in-memory disk.
//!
//! Each benchmark builds, once: 16 MiB of guest RAM, a [`Block`] device on a
//! [`MemoryBackend`] behind an [`MmioTransport`] brought to `DRIVER_OK`
//! through its registers (the driver accepts every feature the device
//! offers, `EVENT_IDX` and `FLUSH` among them), a [`RecordingLine`] as its
//! interrupt, and an [`EventManager`] with the device subscribed. Then only
//! the request path is timed, the way a request travels in a Keel VMM:
//!
//! 1. the driver writes the request header and puts a three-descriptor
//!    chain (header, data, status) on the available ring, reusing the same
//!    buffers and descriptor slots round after round;
//! 2. the queue's notification eventfd is signalled, as KVM's ioeventfd
//!    signals it when the guest writes `QueueNotify`;
//! 3. [`EventManager::run_with_timeout`] wakes the device's subscriber,
//!    which takes the chain, moves the data through its bounce buffer to or
//!    from the backend, fills the used ring and raises the interrupt line;
//! 4. the driver sees the used index advance, matches the used element to
//!    its request and reads the status byte.
//!
//! One criterion iteration is one request, so the reported time is per
//! request. The `*_batch32` benchmarks put 32 requests on the ring per
//! notification (one eventfd write, one event-loop wake-up, one interrupt
//! for all 32); their time is the batch's divided by 32.
//!
//! Every request's used element and status byte are checked; every
//! [`CHECK_EVERY`]th round also checks the data itself (what a read brought
//! in, what a write left on the disk), that the device asked for the next
//! notification (`avail_event`), and that exactly one interrupt was raised
//! per round.
//!
//! The `virtio_blk_rate_limiter` group times 4 KiB reads on a device with no
//! rate limit set and on one whose limits are never reached, side by side.
//!
//! Run: `cargo bench --bench virtio_blk` (`-- --quick` for a short run).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use event_manager::{EventManager, SubscriberOps};
use keel_irq::RecordingLine;
use keel_virtio::guest_driver::{self, memory, Buf, DriverQueue, DATA, MEM_SIZE};
use keel_virtio::GuestMemoryMmap;
use keel_virtio::{features, Block, BlockOptions, MemoryBackend, MmioSlot, MmioTransport};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

type Disk = Arc<Mutex<Block<MemoryBackend>>>;

/// Entries in the request queue: the device's default maximum, as Linux
/// would use it.
const QUEUE_SIZE: u16 = 256;
/// Requests per notification in the batched benchmarks.
const BATCH: usize = 32;
/// Every this many rounds, the data and the interrupt count are checked too.
const CHECK_EVERY: u64 = 64;
/// Largest request benchmarked.
const MAX_LEN: u32 = 64 * 1024;
/// Guest memory per request slot: header at +0, status at +0x100, data at
/// +0x1000.
const SLOT_STRIDE: u64 = 0x1000 + MAX_LEN as u64;
const STATUS_OFFSET: u64 = 0x100;
const DATA_OFFSET: u64 = 0x1000;
/// The disk: room for a batch of the largest requests, side by side.
const DISK_SIZE: usize = BATCH * MAX_LEN as usize * 2;
/// How long the event loop may wait for a notification before the benchmark
/// calls it lost (it never waits: the eventfd is signalled before).
const RUN_TIMEOUT_MS: i32 = 5_000;

const SLOT: MmioSlot = MmioSlot {
    base: 0xd000_0000,
    gsi: 5,
};

/// virtio-blk request types and status (virtio 1.2, 5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_S_OK: u8 = 0;
const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// What the disk holds at `offset` before any write: varies within a sector
/// and from sector to sector, so a read of the wrong place shows.
fn disk_byte(offset: usize) -> u8 {
    ((offset >> 9) as u8).wrapping_mul(31) ^ (offset as u8)
}

/// What a checked write round writes from `slot`: changes from one checked
/// round to the next, never matches the disk's initial pattern everywhere.
fn write_pattern(round: u64, slot: usize) -> u8 {
    ((round / CHECK_EVERY) as u8).wrapping_add(slot as u8) | 1
}

/// The guest side, the device and its event loop, set up once.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    driver: DriverQueue<'a>,
    disk: Disk,
    line: Arc<RecordingLine>,
    /// The queue's notification eventfd (a copy of the fd the transport
    /// would register as a KVM ioeventfd).
    notify: EventFd,
    event_loop: EventManager<Disk>,
    /// Kept alive: it owns the interrupt state the device signals through.
    _transport: MmioTransport,

    op: Op,
    len: u32,
    batch: usize,
    /// Head of each slot's chain in the current round.
    heads: Vec<u16>,
    /// The used index the driver has consumed up to.
    last_used: u16,
    /// Chains made available so far (the available index).
    avail_idx: u16,
    rounds: u64,
    scratch: Vec<u8>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, op: Op, len: u32, batch: usize) -> Self {
        assert!(u64::from(len).is_multiple_of(SECTOR_SIZE) && len <= MAX_LEN);
        assert!(batch * 3 <= usize::from(QUEUE_SIZE));
        assert!(DATA + batch as u64 * SLOT_STRIDE <= MEM_SIZE);

        let image: Vec<u8> = (0..DISK_SIZE).map(disk_byte).collect();
        let options = BlockOptions {
            queue_size: QUEUE_SIZE,
            ..BlockOptions::default()
        };
        let disk: Disk = Arc::new(Mutex::new(
            Block::new(MemoryBackend::from_bytes(image), options).expect("block device"),
        ));
        let line = Arc::new(RecordingLine::new());
        let mut transport =
            MmioTransport::new(disk.clone(), mem.clone(), line.clone(), SLOT).expect("transport");
        let notify = transport.queue_notifiers()[0]
            .event
            .try_clone()
            .expect("queue eventfd");
        let mut event_loop = EventManager::new().expect("event manager");
        event_loop.add_subscriber(disk.clone());

        let driver = DriverQueue::new(mem, QUEUE_SIZE).unwrap();
        bring_up(&mut transport, &driver);
        // The device takes its queue on the event loop.
        event_loop.run_with_timeout(RUN_TIMEOUT_MS).expect("event loop");
        assert!(disk.lock().unwrap().is_active(), "device activated");

        Self {
            mem,
            driver,
            disk,
            line,
            notify,
            event_loop,
            _transport: transport,
            op,
            len,
            batch,
            heads: vec![0; batch],
            last_used: 0,
            avail_idx: 0,
            rounds: 0,
            scratch: vec![0; MAX_LEN as usize],
        }
    }

    fn slot_base(slot: usize) -> u64 {
        DATA + slot as u64 * SLOT_STRIDE
    }

    /// Where on the disk `slot`'s request goes: each slot has its own range.
    fn disk_offset(&self, slot: usize) -> u64 {
        slot as u64 * u64::from(self.len)
    }

    /// One round: `batch` requests made available, one notification, one
    /// event-loop pass, all completions read back.
    fn round(&mut self) {
        let check = self.rounds.is_multiple_of(CHECK_EVERY);
        if check {
            self.prepare_check();
        }

        // Submit. An interrupt is wanted once the device has used past what
        // the driver has seen (EVENT_IDX's used_event, as Linux re-arms it).
        self.driver.set_used_event(self.last_used);
        let (request_type, data_writable) = match self.op {
            Op::Read => (VIRTIO_BLK_T_IN, true),
            Op::Write => (VIRTIO_BLK_T_OUT, false),
        };
        for slot in 0..self.batch {
            let base = Self::slot_base(slot);
            let sector = self.disk_offset(slot) / SECTOR_SIZE;
            self.mem.write_obj(request_type, GuestAddress(base)).unwrap();
            self.mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(base + STATUS_OFFSET))
                .unwrap();
            let data = Buf {
                addr: base + DATA_OFFSET,
                len: self.len,
                writable: data_writable,
            };
            self.heads[slot] = self
                .driver
                .add(&[
                    Buf::readable(base, 16),
                    data,
                    Buf::writable(base + STATUS_OFFSET, 1),
                ])
                .unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(self.batch as u16);

        // Notify, as the ioeventfd on QueueNotify would; the device runs.
        self.notify.write(1).expect("notify");
        self.event_loop
            .run_with_timeout(RUN_TIMEOUT_MS)
            .expect("event loop");

        // Complete.
        let used = self.driver.used_idx();
        assert_eq!(
            used,
            self.last_used.wrapping_add(self.batch as u16),
            "every request of the round completed"
        );
        let written = match self.op {
            Op::Read => self.len + 1,
            Op::Write => 1,
        };
        for slot in 0..self.batch {
            let (id, len) = self.driver.used_entry(self.last_used.wrapping_add(slot as u16));
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(Self::slot_base(slot) + STATUS_OFFSET))
                .unwrap();
            assert!(
                id == u32::from(self.heads[slot]) && len == written && status == VIRTIO_BLK_S_OK,
                "slot {slot}: used ({id}, {len}) status {status}"
            );
        }
        self.last_used = used;
        self.rounds += 1;

        if check {
            self.verify();
        }
    }

    /// Before a checked round: reads land on zeroed buffers, writes carry a
    /// pattern not on the disk yet.
    fn prepare_check(&mut self) {
        let len = self.len as usize;
        for slot in 0..self.batch {
            let fill = match self.op {
                Op::Read => 0,
                Op::Write => write_pattern(self.rounds, slot),
            };
            self.scratch[..len].fill(fill);
            self.mem
                .write_slice(
                    &self.scratch[..len],
                    GuestAddress(Self::slot_base(slot) + DATA_OFFSET),
                )
                .unwrap();
        }
        // The device re-armed notifications when it drained the ring: a
        // driver following EVENT_IDX must notify for the next chain.
        assert_eq!(
            self.driver.avail_event(),
            self.avail_idx,
            "device wants a notification"
        );
    }

    /// After a checked round: the data went where it should, and the device
    /// raised one interrupt per round.
    fn verify(&mut self) {
        let len = self.len as usize;
        for slot in 0..self.batch {
            let offset = self.disk_offset(slot) as usize;
            match self.op {
                Op::Read => {
                    self.mem
                        .read_slice(
                            &mut self.scratch[..len],
                            GuestAddress(Self::slot_base(slot) + DATA_OFFSET),
                        )
                        .unwrap();
                    let ok = self.scratch[..len]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == disk_byte(offset + i));
                    assert!(ok, "slot {slot}: read brought the wrong data");
                }
                Op::Write => {
                    // The round counter has moved on past the checked round.
                    let pattern = write_pattern(self.rounds - 1, slot);
                    let disk = self.disk.lock().unwrap();
                    let ok = disk.backend().data()[offset..offset + len]
                        .iter()
                        .all(|&b| b == pattern);
                    assert!(ok, "slot {slot}: write did not reach the disk");
                }
            }
        }
        assert_eq!(self.line.count(), self.rounds, "one interrupt per round");
    }

    /// Runs at least `requests` requests; returns the time for `requests`.
    fn time(&mut self, requests: u64) -> Duration {
        let rounds = requests.div_ceil(self.batch as u64).max(1);
        let start = Instant::now();
        for _ in 0..rounds {
            self.round();
        }
        let elapsed = start.elapsed();
        elapsed.mul_f64(requests as f64 / (rounds * self.batch as u64) as f64)
    }
}

/// Drives the transport to `DRIVER_OK` as a guest driver does, accepting
/// every feature the device offers, with `driver`'s rings as queue 0.
fn bring_up(t: &mut MmioTransport, driver: &DriverQueue<'_>) {
    let accepted = guest_driver::bring_up(t, keel_virtio::device_type::BLOCK, &[driver]).unwrap();
    assert_ne!(accepted & features::VERSION_1, 0);
    assert_ne!(accepted & features::RING_EVENT_IDX, 0);
}

fn bench_request_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("virtio_blk");
    for batch in [1, BATCH] {
        for len in [4 * 1024, MAX_LEN] {
            for op in [Op::Read, Op::Write] {
                let name = match batch {
                    1 => op.name().to_string(),
                    n => format!("{}_batch{n}", op.name()),
                };
                let mem = memory().unwrap();
                let mut rig = Rig::new(&mem, op, len, batch);
                group.throughput(Throughput::Bytes(u64::from(len)));
                group.bench_function(BenchmarkId::new(name, format!("{}KiB", len / 1024)), |b| {
                    b.iter_custom(|requests| rig.time(requests))
                });
            }
        }
    }
    group.finish();
}

/// The rate limiter's cost on the request path, side by side: a device with
/// no limit set (its limiter holds no bucket: one branch per request) and
/// the same device with bandwidth and ops buckets so large they never
/// throttle (every request pays the token arithmetic and a clock read).
fn bench_rate_limiter(c: &mut Criterion) {
    use keel_ratelimit::{BucketConfig, BucketUpdate};
    let mut group = c.benchmark_group("virtio_blk_rate_limiter");
    for batch in [1, BATCH] {
        for limited in [false, true] {
            let mem = memory().unwrap();
            let mut rig = Rig::new(&mem, Op::Read, 4096, batch);
            if limited {
                rig.disk.lock().unwrap().update_rate_limiter(
                    BucketUpdate::Set(BucketConfig::new(1 << 50, 1)),
                    BucketUpdate::Set(BucketConfig::new(1 << 40, 1)),
                );
            }
            let name = if limited {
                "limit_never_reached"
            } else {
                "no_limit"
            };
            group.throughput(Throughput::Bytes(4096));
            group.bench_function(BenchmarkId::new(name, format!("read_4KiB_batch{batch}")), |b| {
                b.iter_custom(|requests| rig.time(requests))
            });
            assert_eq!(rig.disk.lock().unwrap().throttled_count(), 0);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_request_path, bench_rate_limiter
}
criterion_main!(benches);
