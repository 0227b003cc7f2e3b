//! The virtio-net transmit path, per frame, with an in-memory backend.
//!
//! Each benchmark builds, once: 16 MiB of guest RAM, a [`Net`] device on a
//! [`MemoryNetBackend`] behind an [`MmioTransport`] brought to `DRIVER_OK`
//! through its registers (the driver accepts every feature the device
//! offers, `EVENT_IDX` among them), a [`RecordingLine`] as its interrupt,
//! and an [`EventManager`] with the device subscribed. Then only the
//! transmit path is timed, the way a frame leaves a Keel guest:
//!
//! 1. the driver puts a one-descriptor chain (the 12-byte
//!    `virtio_net_hdr_v1`, then the frame) on the transmit queue, reusing
//!    the same buffers and descriptor slots round after round;
//! 2. the transmit queue's notification eventfd is signalled, as KVM's
//!    ioeventfd signals it when the guest writes `QueueNotify`;
//! 3. [`EventManager::run_with_timeout`] wakes the device's subscriber,
//!    which takes the chain, copies header and frame into its buffer, checks
//!    the header, hands the frame to the backend, fills the used ring and
//!    raises the interrupt line;
//! 4. the driver sees the used index advance and matches the used element
//!    to its chain.
//!
//! One criterion iteration is one frame, so the reported time is per frame.
//! The `tx_batch32` benchmarks put 32 frames on the ring per notification;
//! their time is the batch's divided by 32.
//!
//! `MemoryNetBackend` keeps every frame it is given and has no way to drop
//! them, so every [`RECYCLE_FRAMES`] frames the device, its transport and
//! its event loop are rebuilt (with a fresh backend) outside the timed
//! stretch. Before that, every frame the old backend received is checked
//! byte for byte (header and frame), as are the device's counters and the
//! interrupt count (one per round). Every used element is checked in the
//! timed path; every [`CHECK_EVERY`]th round also changes the frames'
//! contents (so a stale or misplaced frame shows) and checks that the device
//! asked for the next notification (`avail_event`).
//!
//! Run: `cargo bench --bench virtio_net` (`-- --quick` for a short run).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use event_manager::{EventManager, SubscriberOps};
use keel_irq::RecordingLine;
use keel_virtio::guest_driver::{self, memory, Buf, DriverQueue, DATA, MEM_SIZE};
use keel_virtio::GuestMemoryMmap;
use keel_virtio::{features, MemoryNetBackend, MmioSlot, MmioTransport, Net, NetOptions, VNET_HDR_LEN};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

type Card = Arc<Mutex<Net<MemoryNetBackend>>>;

/// Entries in each queue: the device's default, as Linux would use it.
const QUEUE_SIZE: u16 = 256;
/// Frames per notification in the batched benchmarks.
const BATCH: usize = 32;
/// Every this many rounds the frames' contents change and `avail_event`
/// is checked.
const CHECK_EVERY: u64 = 64;
/// Frames sent to one backend before the device is rebuilt (untimed) and
/// everything the backend received is checked: bounds what it holds to
/// about 12 MiB. A multiple of [`BATCH`], so rebuilds fall between rounds.
const RECYCLE_FRAMES: u64 = 8192;
/// Frame sizes benchmarked: the shortest Ethernet frame without its FCS,
/// and the longest at the standard MTU.
const FRAME_LENS: [u32; 2] = [64, 1514];
/// Guest memory per frame slot: header at +0, the frame right after it.
const SLOT_STRIDE: u64 = 0x1000;
/// Where the queues' rings live (descriptor table, available and used
/// rings of 256 entries take under 0x1a10 bytes each).
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x4000;
/// How long the event loop may wait for a notification before the benchmark
/// calls it lost (it never waits: the eventfd is signalled before).
const RUN_TIMEOUT_MS: i32 = 5_000;

/// The transmit queue's index (rx is 0: the order `bring_up` passes them).
const TXQ: u32 = 1;

const SLOT: MmioSlot = MmioSlot {
    base: 0xd000_0000,
    gsi: 5,
};

/// Byte `i` of the frame in `slot` during the check period `period` (the
/// round number divided by [`CHECK_EVERY`]): differs from slot to slot and
/// from one period to the next.
fn frame_byte(period: u64, slot: usize, i: usize) -> u8 {
    (i as u8)
        .wrapping_mul(7)
        .wrapping_add((slot as u8).wrapping_mul(13))
        .wrapping_add((period as u8).wrapping_mul(29))
        ^ (i >> 8) as u8
}

/// A live device and the driver's view of its transmit queue; rebuilt every
/// [`RECYCLE_FRAMES`] frames.
struct Device<'a> {
    tx: DriverQueue<'a>,
    card: Card,
    backend: MemoryNetBackend,
    line: Arc<RecordingLine>,
    /// The transmit queue's notification eventfd (a copy of the fd the
    /// transport would register as a KVM ioeventfd).
    notify: EventFd,
    event_loop: EventManager<Card>,
    /// Kept alive: it owns the interrupt state the device signals through.
    _transport: MmioTransport,
}

impl<'a> Device<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        // Fresh rings: a previous device's indices must not show through.
        let zeros = vec![0u8; (DATA - RX_RING) as usize];
        mem.write_slice(&zeros, GuestAddress(RX_RING)).unwrap();

        let backend = MemoryNetBackend::new().expect("backend");
        let options = NetOptions {
            queue_size: QUEUE_SIZE,
            ..NetOptions::default()
        };
        let card: Card = Arc::new(Mutex::new(
            Net::new(backend.clone(), options).expect("net device"),
        ));
        let line = Arc::new(RecordingLine::new());
        let mut transport =
            MmioTransport::new(card.clone(), mem.clone(), line.clone(), SLOT).expect("transport");
        let notify = transport.queue_notifiers()[TXQ as usize]
            .event
            .try_clone()
            .expect("queue eventfd");
        let mut event_loop = EventManager::new().expect("event manager");
        event_loop.add_subscriber(card.clone());

        let rx = DriverQueue::at(mem, GuestAddress(RX_RING), QUEUE_SIZE).unwrap();
        let tx = DriverQueue::at(mem, GuestAddress(TX_RING), QUEUE_SIZE).unwrap();
        bring_up(&mut transport, &rx, &tx);
        // The device takes its queues on the event loop.
        event_loop.run_with_timeout(RUN_TIMEOUT_MS).expect("event loop");
        assert!(card.lock().unwrap().is_active(), "device activated");

        Self {
            tx,
            card,
            backend,
            line,
            notify,
            event_loop,
            _transport: transport,
        }
    }
}

/// The guest side, the device and its event loop.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Device<'a>,
    len: u32,
    batch: usize,
    /// Head of each slot's chain in the current round.
    heads: Vec<u16>,
    /// The used index the driver has consumed up to.
    last_used: u16,
    /// Chains made available so far (the available index).
    avail_idx: u16,
    /// Rounds run, over all devices.
    rounds: u64,
    /// `rounds` when the current device was built.
    first_round: u64,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap, len: u32, batch: usize) -> Self {
        assert!(batch <= usize::from(QUEUE_SIZE));
        assert!(VNET_HDR_LEN as u64 + u64::from(len) <= SLOT_STRIDE);
        assert!(DATA + batch as u64 * SLOT_STRIDE <= MEM_SIZE);
        assert!(RECYCLE_FRAMES.is_multiple_of(batch as u64));
        let rig = Self {
            mem,
            dev: Device::new(mem),
            len,
            batch,
            heads: vec![0; batch],
            last_used: 0,
            avail_idx: 0,
            rounds: 0,
            first_round: 0,
        };
        rig.write_frames();
        rig
    }

    fn slot_base(slot: usize) -> u64 {
        DATA + slot as u64 * SLOT_STRIDE
    }

    /// Writes every slot's header (all zero: no offloads, `num_buffers` 0)
    /// and frame for the current check period.
    fn write_frames(&self) {
        let period = self.rounds / CHECK_EVERY;
        let mut bytes = vec![0u8; VNET_HDR_LEN + self.len as usize];
        for slot in 0..self.batch {
            for (i, b) in bytes[VNET_HDR_LEN..].iter_mut().enumerate() {
                *b = frame_byte(period, slot, i);
            }
            self.mem
                .write_slice(&bytes, GuestAddress(Self::slot_base(slot)))
                .unwrap();
        }
    }

    /// One round: `batch` frames made available, one notification, one
    /// event-loop pass, all used elements read back.
    fn round(&mut self) {
        let dev = &mut self.dev;
        if self.rounds.is_multiple_of(CHECK_EVERY) && self.rounds > 0 {
            // The device re-armed notifications when it drained the ring: a
            // driver following EVENT_IDX must notify for the next chain.
            assert_eq!(
                dev.tx.avail_event(),
                self.avail_idx,
                "device wants a notification"
            );
            self.write_frames();
        }
        let dev = &mut self.dev;

        // Submit. An interrupt is wanted once the device has used past what
        // the driver has seen (EVENT_IDX's used_event, as Linux re-arms it).
        dev.tx.set_used_event(self.last_used);
        let chain_len = VNET_HDR_LEN as u32 + self.len;
        for slot in 0..self.batch {
            self.heads[slot] = dev
                .tx
                .add(&[Buf::readable(Self::slot_base(slot), chain_len)])
                .unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(self.batch as u16);

        // Notify, as the ioeventfd on QueueNotify would; the device runs.
        dev.notify.write(1).expect("notify");
        dev.event_loop
            .run_with_timeout(RUN_TIMEOUT_MS)
            .expect("event loop");

        // Complete: the device writes nothing into transmit buffers.
        let used = dev.tx.used_idx();
        assert_eq!(
            used,
            self.last_used.wrapping_add(self.batch as u16),
            "every frame of the round completed"
        );
        for slot in 0..self.batch {
            let (id, len) = dev.tx.used_entry(self.last_used.wrapping_add(slot as u16));
            assert!(
                id == u32::from(self.heads[slot]) && len == 0,
                "slot {slot}: used ({id}, {len})"
            );
        }
        self.last_used = used;
        self.rounds += 1;
    }

    /// Frames the current device has been given.
    fn frames_on_device(&self) -> u64 {
        (self.rounds - self.first_round) * self.batch as u64
    }

    /// Checks everything the current device's backend received, its
    /// counters and interrupts; then replaces it with a fresh one.
    fn recycle(&mut self) {
        self.verify();
        self.dev = Device::new(self.mem);
        self.first_round = self.rounds;
        self.last_used = 0;
        self.avail_idx = 0;
    }

    fn verify(&self) {
        let frames = self.frames_on_device();
        let sent = self.dev.backend.sent();
        assert_eq!(sent.len() as u64, frames, "the backend got every frame");
        let len = self.len as usize;
        for (k, frame) in sent.iter().enumerate() {
            let round = self.first_round + k as u64 / self.batch as u64;
            let slot = k % self.batch;
            let period = round / CHECK_EVERY;
            let ok = frame.len() == VNET_HDR_LEN + len
                && frame[..VNET_HDR_LEN].iter().all(|&b| b == 0)
                && frame[VNET_HDR_LEN..]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == frame_byte(period, slot, i));
            assert!(ok, "frame {k} (round {round}, slot {slot}) arrived damaged");
        }
        let counters = self.dev.card.lock().unwrap().counters();
        assert_eq!(counters.tx_frames, frames);
        assert_eq!(counters.tx_bytes, frames * u64::from(self.len));
        assert_eq!(
            counters.tx_dropped_malformed + counters.tx_dropped_oversized + counters.tx_backend_errors,
            0,
            "nothing dropped"
        );
        assert_eq!(
            self.dev.line.count(),
            self.rounds - self.first_round,
            "one interrupt per round"
        );
    }

    /// Runs at least `frames` frames; returns the time for `frames`, not
    /// counting the rebuilds of the device.
    fn time(&mut self, frames: u64) -> Duration {
        let rounds = frames.div_ceil(self.batch as u64).max(1);
        let mut elapsed = Duration::ZERO;
        let mut done = 0;
        while done < rounds {
            if self.frames_on_device() >= RECYCLE_FRAMES {
                self.recycle();
            }
            let room = (RECYCLE_FRAMES - self.frames_on_device()) / self.batch as u64;
            let stretch = room.min(rounds - done);
            let start = Instant::now();
            for _ in 0..stretch {
                self.round();
            }
            elapsed += start.elapsed();
            done += stretch;
        }
        elapsed.mul_f64(frames as f64 / (rounds * self.batch as u64) as f64)
    }
}

/// Drives the transport to `DRIVER_OK` as a guest driver does, accepting
/// every feature the device offers, with `rx`'s and `tx`'s rings as queues
/// 0 and 1.
fn bring_up(t: &mut MmioTransport, rx: &DriverQueue<'_>, tx: &DriverQueue<'_>) {
    let accepted = guest_driver::bring_up(t, keel_virtio::device_type::NET, &[rx, tx]).unwrap();
    assert_ne!(accepted & features::VERSION_1, 0);
    assert_ne!(accepted & features::RING_EVENT_IDX, 0);
}

fn bench_tx_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("virtio_net");
    for batch in [1, BATCH] {
        for len in FRAME_LENS {
            let name = match batch {
                1 => "tx".to_string(),
                n => format!("tx_batch{n}"),
            };
            let mem = memory().unwrap();
            let mut rig = Rig::new(&mem, len, batch);
            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::new(name, format!("{len}B")), |b| {
                b.iter_custom(|frames| rig.time(frames))
            });
            // Whatever the last stretch sent is checked too.
            rig.verify();
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_tx_path
}
criterion_main!(benches);
