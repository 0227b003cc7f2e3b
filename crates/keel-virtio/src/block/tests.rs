//! virtio-blk against a pretend guest driver, honest and hostile.

use std::io;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_T_SECURE_ERASE};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
use crate::guest_driver::{memory, raw_desc, Buf, DriverQueue, DATA, MEM_SIZE};

const HEADER: u64 = DATA;
const BUFFER: u64 = DATA + 0x1000;
/// VIRTIO_BLK_T_GET_LIFETIME (virtio 1.2), not in the bindings.
const VIRTIO_BLK_T_GET_LIFETIME: u32 = 10;
/// Far from the data, so a stray write shows.
const STATUS: u64 = DATA + 0x80_0000;
const DISK_SIZE: usize = 1 << 20;
const SECTORS: u64 = DISK_SIZE as u64 / SECTOR_SIZE;
const POISON: u8 = 0x5a;

/// What a [`RecordingDisk`] was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Read(u64, usize),
    Write(u64, usize),
    /// With the used ring index and the status byte as the guest saw them
    /// at the moment of the flush.
    Flush {
        used_idx: u16,
        status: u8,
    },
    Discard(u64, u64),
    WriteZeroes(u64, u64, bool),
}

/// A disk double: a [`MemoryBackend`] that records its calls and can fail.
struct RecordingDisk {
    disk: MemoryBackend,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Guest memory and the used ring's address, to look at the guest's
    /// view during a flush.
    guest: Option<(GuestMemoryMmap, u64)>,
    fail_flush: bool,
    fail_io: bool,
}

impl RecordingDisk {
    fn new(size: usize) -> (Self, Arc<Mutex<Vec<Call>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut image = vec![0u8; size];
        for (i, byte) in image.iter_mut().enumerate() {
            *byte = (i / SECTOR_SIZE as usize) as u8; // each sector holds its number
        }
        let disk = Self {
            disk: MemoryBackend::from_bytes(image),
            calls: calls.clone(),
            guest: None,
            fail_flush: false,
            fail_io: false,
        };
        (disk, calls)
    }

    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn injected(&self) -> io::Result<()> {
        if self.fail_io {
            Err(io::Error::other("injected I/O error"))
        } else {
            Ok(())
        }
    }
}

impl BlockBackend for RecordingDisk {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.record(Call::Read(offset, buf.len()));
        self.injected()?;
        self.disk.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.record(Call::Write(offset, buf.len()));
        self.injected()?;
        self.disk.write_at(offset, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        let (used_idx, status) = match &self.guest {
            Some((mem, used)) => (
                mem.read_obj(GuestAddress(used + 2)).unwrap(),
                mem.read_obj(GuestAddress(STATUS)).unwrap(),
            ),
            None => (0, 0),
        };
        self.record(Call::Flush { used_idx, status });
        if self.fail_flush {
            return Err(io::Error::other("injected flush error"));
        }
        self.disk.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Call::Discard(offset, len));
        self.injected()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.record(Call::WriteZeroes(offset, len, unmap));
        self.injected()?;
        self.disk.write_zeroes(offset, len, unmap)
    }
}

struct Harness<'a, B: BlockBackend + 'static> {
    mem: &'a GuestMemoryMmap,
    driver: DriverQueue<'a>,
    block: Arc<Mutex<Block<B>>>,
    interrupt: Arc<RecordingInterrupt>,
    notify: EventFd,
    event_loop: EventManager<Arc<Mutex<Block<B>>>>,
}

/// Every feature the device offers.
fn all_features<B: BlockBackend>(block: &Block<B>) -> u64 {
    block.features()
}

impl<'a, B: BlockBackend + 'static> Harness<'a, B> {
    fn new(mem: &'a GuestMemoryMmap, backend: B, options: BlockOptions) -> Self {
        Self::with_features(mem, backend, options, None)
    }

    /// Acks `acked` (all offered features if `None`) and activates.
    fn with_features(
        mem: &'a GuestMemoryMmap,
        backend: B,
        options: BlockOptions,
        acked: Option<u64>,
    ) -> Self {
        let block = Arc::new(Mutex::new(Block::new(backend, options).unwrap()));
        let driver = DriverQueue::new(mem, 16).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::new());
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut event_loop = EventManager::new().unwrap();
        event_loop.add_subscriber(block.clone());
        {
            let mut b = block.lock().unwrap();
            let features = acked.unwrap_or_else(|| all_features(&b));
            b.ack_features(features);
            b.activate(Activation {
                mem: mem.clone(),
                queues: vec![driver.queue().unwrap()],
                queue_events: vec![notify.try_clone().unwrap()],
                interrupt: interrupt.clone(),
                stop: StopSignal::new(),
            })
            .unwrap();
        }
        event_loop.run_with_timeout(100).unwrap();
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
        Self {
            mem,
            driver,
            block,
            interrupt,
            notify,
            event_loop,
        }
    }

    fn run(&mut self) {
        self.notify.write(1).unwrap();
        self.event_loop.run_with_timeout(100).unwrap();
    }

    /// Adds `bufs` as one chain, notifies, runs; returns (head, used len).
    fn submit(&mut self, bufs: &[Buf]) -> (u16, Option<u32>) {
        let before = self.driver.used().len();
        let head = self.driver.add(bufs).unwrap();
        self.run();
        let used = self.driver.used();
        let len = (used.len() > before).then(|| {
            assert_eq!(used[before].0, u32::from(head));
            used[before].1
        });
        (head, len)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn needs_reset(&self) -> bool {
        self.interrupt.signals().contains(&VirtioSignal::NeedsReset)
    }
}

fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    mem.write_obj(request_type, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
}

/// header, `len` bytes of data (direction by type), status.
fn request(mem: &GuestMemoryMmap, request_type: u32, sector: u64, len: u32) -> Vec<Buf> {
    header(mem, request_type, sector);
    let data = if request_type == VIRTIO_BLK_T_OUT || request_type == VIRTIO_BLK_T_DISCARD {
        Buf::readable(BUFFER, len)
    } else {
        Buf::writable(BUFFER, len)
    };
    let mut bufs = vec![Buf::readable(HEADER, 16)];
    if len > 0 {
        bufs.push(data);
    }
    bufs.push(Buf::writable(STATUS, 1));
    bufs
}

fn segments(mem: &GuestMemoryMmap, segments: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, count, flags)) in segments.iter().enumerate() {
        let at = BUFFER + 16 * i as u64;
        mem.write_obj(sector, GuestAddress(at)).unwrap();
        mem.write_obj(count, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    }
    16 * segments.len() as u32
}

fn poison(mem: &GuestMemoryMmap, addr: u64, len: usize) {
    mem.write_slice(&vec![POISON; len], GuestAddress(addr)).unwrap();
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

fn recording_disk() -> (RecordingDisk, Arc<Mutex<Vec<Call>>>) {
    RecordingDisk::new(DISK_SIZE)
}

// --- configuration and features -------------------------------------------

#[test]
fn offers_version_1_indirect_descriptors_event_idx_and_honest_limits() {
    let block = Block::new(MemoryBackend::new(DISK_SIZE), BlockOptions::default()).unwrap();
    let f = block.features();
    for wanted in [
        features::VERSION_1,
        features::RING_INDIRECT_DESC,
        features::RING_EVENT_IDX,
        bit(VIRTIO_BLK_F_SIZE_MAX),
        bit(VIRTIO_BLK_F_SEG_MAX),
        bit(VIRTIO_BLK_F_FLUSH),
        bit(VIRTIO_BLK_F_DISCARD),
        bit(VIRTIO_BLK_F_WRITE_ZEROES),
    ] {
        assert_ne!(f & wanted, 0, "feature {wanted:#x}");
    }
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & bit(VIRTIO_BLK_F_BLK_SIZE), 0);

    let mut config = [0u8; 60];
    block.read_config(0, &mut config);
    let le32 = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), SECTORS);
    assert_eq!(le32(8), 1 << 20, "size_max");
    assert_eq!(le32(12), 254, "seg_max = queue size - header - status");
    assert_eq!(le32(36), MAX_DISCARD_SECTORS);
    assert_eq!(le32(40), MAX_DISCARD_SEGMENTS);
    assert_eq!(le32(44), DISCARD_SECTOR_ALIGNMENT);
    assert_eq!(le32(48), MAX_DISCARD_SECTORS);
    assert_eq!(le32(52), MAX_DISCARD_SEGMENTS);
    assert_eq!(config[56], 1, "write_zeroes_may_unmap");
}

#[test]
fn capacity_counts_whole_sectors_only() {
    let block = Block::new(MemoryBackend::new(1000), BlockOptions::default()).unwrap();
    assert_eq!(block.capacity_sectors(), 1);
}

#[test]
fn read_only_disk_advertises_ro_and_no_discard() {
    let options = BlockOptions {
        read_only: true,
        ..BlockOptions::default()
    };
    let block = Block::new(MemoryBackend::new(DISK_SIZE), options).unwrap();
    assert_ne!(block.features() & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(block.features() & bit(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(block.features() & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn config_space_is_read_only() {
    let mut block = Block::new(MemoryBackend::new(DISK_SIZE), BlockOptions::default()).unwrap();
    block.write_config(0, &[0xff; 8]);
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
}

#[test]
fn rejects_an_id_longer_than_20_bytes_naming_it() {
    let options = BlockOptions {
        id: "a-serial-number-that-is-too-long".into(),
        ..BlockOptions::default()
    };
    let err = Block::new(MemoryBackend::new(512), options).unwrap_err();
    assert!(
        err.to_string().contains("a-serial-number-that-is-too-long"),
        "{err}"
    );
    assert!(err.to_string().contains("32 bytes"), "{err}");
}

#[test]
fn rejects_unusable_queue_and_segment_sizes() {
    for queue_size in [0, 2, 100, 65535] {
        let options = BlockOptions {
            queue_size,
            ..BlockOptions::default()
        };
        let err = Block::new(MemoryBackend::new(512), options).unwrap_err();
        assert!(matches!(err, Error::InvalidQueueSize { size } if size == queue_size));
    }
    let options = BlockOptions {
        max_segment_size: 100,
        ..BlockOptions::default()
    };
    assert!(matches!(
        Block::new(MemoryBackend::new(512), options),
        Err(Error::InvalidSegmentSize { size: 100 })
    ));
}

// --- reads and writes -------------------------------------------------------

#[test]
fn reads_sectors_into_the_guest_buffers() {
    let mem = memory().unwrap();
    let (disk, _) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    let bufs = request(&mem, VIRTIO_BLK_T_IN, 3, 1024);
    let (_, used) = h.submit(&bufs);
    assert_eq!(used, Some(1025), "used length = data written + status");
    assert_eq!(h.status(), OK);
    let data = guest_bytes(&mem, BUFFER, 1024);
    assert!(data[..512].iter().all(|&b| b == 3));
    assert!(data[512..].iter().all(|&b| b == 4));
    assert_eq!(h.interrupt.signals(), [VirtioSignal::UsedQueue(0)]);
}

#[test]
fn writes_guest_data_to_the_disk() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MemoryBackend::new(DISK_SIZE), BlockOptions::default());
    mem.write_slice(&[0xc3; 512], GuestAddress(BUFFER)).unwrap();
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_OUT, 7, 512));
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), OK);
    let block = h.block.lock().unwrap();
    let data = block.backend().data();
    assert!(data[7 * 512..8 * 512].iter().all(|&b| b == 0xc3));
    assert!(data[6 * 512..7 * 512].iter().all(|&b| b == 0));
}

#[test]
fn data_may_share_descriptors_with_the_header_and_the_status() {
    let mem = memory().unwrap();
    let (disk, _) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    // Read: header alone, then one writable buffer holding data and status.
    header(&mem, VIRTIO_BLK_T_IN, 2);
    let (_, used) = h.submit(&[Buf::readable(HEADER, 16), Buf::writable(BUFFER, 513)]);
    assert_eq!(used, Some(513));
    assert!(guest_bytes(&mem, BUFFER, 512).iter().all(|&b| b == 2));
    assert_eq!(guest_bytes(&mem, BUFFER + 512, 1), [OK]);

    // Write: header and data in one readable buffer, status split off.
    mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(BUFFER)).unwrap();
    mem.write_obj(0u32, GuestAddress(BUFFER + 4)).unwrap();
    mem.write_obj(9u64, GuestAddress(BUFFER + 8)).unwrap();
    mem.write_slice(&[0x77; 512], GuestAddress(BUFFER + 16)).unwrap();
    let (_, used) = h.submit(&[Buf::readable(BUFFER, 528), Buf::writable(STATUS, 1)]);
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), OK);
    let block = h.block.lock().unwrap();
    assert!(block.backend().disk.data()[9 * 512..10 * 512]
        .iter()
        .all(|&b| b == 0x77));
}

#[test]
fn large_read_across_many_descriptors_goes_through_the_bounce_buffer_in_chunks() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let mut bufs = vec![Buf::readable(HEADER, 16)];
    for i in 0..5u64 {
        bufs.push(Buf::writable(BUFFER + i * 0x1_0000, 0x1_0000)); // 5 x 64 KiB
    }
    bufs.push(Buf::writable(STATUS, 1));
    let (_, used) = h.submit(&bufs);
    assert_eq!(used, Some(5 * 0x1_0000 + 1));
    assert_eq!(h.status(), OK);
    let reads: Vec<_> = calls.lock().unwrap().clone();
    assert_eq!(
        reads,
        [
            Call::Read(0, BOUNCE_BUFFER_SIZE),
            Call::Read(BOUNCE_BUFFER_SIZE as u64, BOUNCE_BUFFER_SIZE),
            Call::Read(2 * BOUNCE_BUFFER_SIZE as u64, 0x1_0000),
        ]
    );
    let data = guest_bytes(&mem, BUFFER, 5 * 0x1_0000);
    for (i, chunk) in data.chunks(512).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8), "sector {i}");
    }
}

#[test]
fn request_in_an_indirect_table_is_served() {
    let mem = memory().unwrap();
    let (disk, _) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_IN, 5);
    let table = DATA + 0x40_0000;
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    mem.write_obj(raw_desc(HEADER, 16, next, 1), GuestAddress(table))
        .unwrap();
    mem.write_obj(raw_desc(BUFFER, 512, next | write, 2), GuestAddress(table + 16))
        .unwrap();
    mem.write_obj(raw_desc(STATUS, 1, write, 0), GuestAddress(table + 32))
        .unwrap();
    h.driver
        .store(0, raw_desc(table, 48, VRING_DESC_F_INDIRECT as u16, 0))
        .unwrap();
    h.driver.publish(0);
    h.run();
    assert_eq!(h.driver.used(), [(0, 513)]);
    assert_eq!(h.status(), OK);
    assert!(guest_bytes(&mem, BUFFER, 512).iter().all(|&b| b == 5));
}

#[test]
fn serves_every_available_request_in_order() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    for i in 0..8u64 {
        let base = DATA + i * 0x1000;
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(base)).unwrap();
        mem.write_obj(i, GuestAddress(base + 8)).unwrap();
        h.driver
            .add(&[Buf::readable(base, 16), Buf::writable(base + 0x200, 513)])
            .unwrap();
    }
    h.run();
    assert_eq!(h.driver.used().len(), 8);
    let offsets: Vec<u64> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| match c {
            Call::Read(offset, _) => *offset,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(offsets, (0..8).map(|i| i * 512).collect::<Vec<_>>());
    assert_eq!(
        h.interrupt.signals(),
        [VirtioSignal::UsedQueue(0)],
        "one interrupt"
    );
}

// --- flush --------------------------------------------------------------------

#[test]
fn flush_reaches_stable_storage_before_completion() {
    let mem = memory().unwrap();
    let (mut disk, calls) = recording_disk();
    let driver_used = DriverQueue::new(&mem, 16).unwrap().used_addr();
    disk.guest = Some((mem.clone(), driver_used));
    let mut h = Harness::new(&mem, disk, BlockOptions::default());

    mem.write_slice(&[1; 512], GuestAddress(BUFFER)).unwrap();
    h.submit(&request(&mem, VIRTIO_BLK_T_OUT, 0, 512));
    assert_eq!(h.status(), OK);
    poison(&mem, STATUS, 1);
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_FLUSH, 0, 0));

    assert_eq!(used, Some(1));
    assert_eq!(h.status(), OK);
    assert_eq!(
        *calls.lock().unwrap(),
        [
            Call::Write(0, 512),
            // When the backend flushed, the write was complete (used index
            // 1) and the flush was not (no status byte, used index not 2).
            Call::Flush {
                used_idx: 1,
                status: POISON
            },
        ]
    );
    assert_eq!(h.driver.used_idx(), 2);
}

#[test]
fn failed_flush_completes_with_ioerr() {
    let mem = memory().unwrap();
    let (mut disk, _) = recording_disk();
    disk.fail_flush = true;
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_FLUSH, 0, 0));
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), IOERR);
}

#[test]
fn writes_are_stable_before_completion_when_the_driver_declined_flush() {
    let mem = memory().unwrap();
    let (mut disk, calls) = recording_disk();
    disk.guest = Some((mem.clone(), DriverQueue::new(&mem, 16).unwrap().used_addr()));
    let acked = features::VERSION_1;
    let mut h = Harness::with_features(&mem, disk, BlockOptions::default(), Some(acked));
    h.submit(&request(&mem, VIRTIO_BLK_T_OUT, 1, 512));
    assert_eq!(h.status(), OK);
    assert_eq!(
        *calls.lock().unwrap(),
        [
            Call::Write(512, 512),
            Call::Flush {
                used_idx: 0,
                status: POISON
            }
        ]
    );
}

// --- GET_ID -------------------------------------------------------------------

#[test]
fn get_id_returns_the_20_byte_id_padded_with_nul() {
    let mem = memory().unwrap();
    let options = BlockOptions {
        id: "keel-disk-0".into(),
        ..BlockOptions::default()
    };
    let mut h = Harness::new(&mem, MemoryBackend::new(DISK_SIZE), options);
    poison(&mem, BUFFER, 32);
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_GET_ID, 0, 32));
    assert_eq!(used, Some(21));
    assert_eq!(h.status(), OK);
    let id = guest_bytes(&mem, BUFFER, 32);
    assert_eq!(&id[..11], b"keel-disk-0");
    assert_eq!(id[11..20], [0; 9]);
    assert_eq!(id[20..], [POISON; 12], "nothing past 20 bytes");
}

#[test]
fn get_id_into_a_short_buffer_writes_only_what_fits() {
    let mem = memory().unwrap();
    let options = BlockOptions {
        id: "0123456789abcdefghij".into(),
        ..BlockOptions::default()
    };
    let mut h = Harness::new(&mem, MemoryBackend::new(DISK_SIZE), options);
    poison(&mem, BUFFER, 16);
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_GET_ID, 0, 8));
    assert_eq!(used, Some(9));
    assert_eq!(&guest_bytes(&mem, BUFFER, 9), b"01234567\x5a");
}

// --- bad requests: error status ---------------------------------------------

#[test]
fn unknown_request_types_are_unsupp() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    for request_type in [
        2,
        3,
        VIRTIO_BLK_T_GET_LIFETIME,
        VIRTIO_BLK_T_SECURE_ERASE,
        0x8000_0000,
        u32::MAX,
    ] {
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
        let (_, used) = h.submit(&request(&mem, request_type, 0, 512));
        assert_eq!(used, Some(1), "type {request_type}");
        assert_eq!(h.status(), UNSUPP, "type {request_type}");
    }
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn read_past_the_end_of_the_disk_fails_with_ioerr_and_writes_no_data() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    poison(&mem, BUFFER, 1024);
    // The last sector plus one more.
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_IN, SECTORS - 1, 1024));
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), IOERR);
    assert_eq!(guest_bytes(&mem, BUFFER, 1024), vec![POISON; 1024]);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn read_claiming_more_than_the_whole_disk_fails_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    // 15 MiB of writable buffers (inside guest RAM) for a 1 MiB disk.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (_, used) = h.submit(&[
        Buf::readable(HEADER, 16),
        Buf::writable(DATA, 0xe0_0000),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!(used, Some(1));
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn write_past_the_end_fails_with_ioerr_and_leaves_the_disk_alone() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_OUT, SECTORS, 512));
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), IOERR);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn sector_numbers_that_overflow_fail_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1] {
        h.submit(&request(&mem, VIRTIO_BLK_T_IN, sector, 512));
        assert_eq!(h.status(), IOERR, "sector {sector:#x}");
    }
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn data_that_is_not_a_whole_number_of_sectors_fails_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    h.submit(&request(&mem, VIRTIO_BLK_T_IN, 0, 511));
    assert_eq!(h.status(), IOERR);
    h.submit(&request(&mem, VIRTIO_BLK_T_OUT, 0, 513));
    assert_eq!(h.status(), IOERR);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn request_shorter_than_its_header_fails_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, used) = h.submit(&[Buf::readable(HEADER, 8), Buf::writable(STATUS, 1)]);
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), IOERR);
    // A header split over two descriptors is fine.
    let (_, used) = h.submit(&[
        Buf::readable(HEADER, 8),
        Buf::readable(HEADER + 8, 8),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), OK);
    assert!(calls.lock().unwrap().is_empty(), "an empty write touches nothing");
}

#[test]
fn buffer_longer_than_size_max_fails_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let options = BlockOptions {
        max_segment_size: 4096,
        ..BlockOptions::default()
    };
    let mut h = Harness::new(&mem, disk, options);
    poison(&mem, BUFFER, 8192);
    h.submit(&request(&mem, VIRTIO_BLK_T_IN, 0, 8192));
    assert_eq!(h.status(), IOERR);
    assert!(calls.lock().unwrap().is_empty());
    assert_eq!(guest_bytes(&mem, BUFFER, 8192), vec![POISON; 8192]);
}

#[test]
fn backend_read_error_completes_with_ioerr() {
    let mem = memory().unwrap();
    let (mut disk, _) = recording_disk();
    disk.fail_io = true;
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_IN, 0, 512));
    assert_eq!(used, Some(1), "no data reached the guest");
    assert_eq!(h.status(), IOERR);
}

#[test]
fn read_only_disk_refuses_writes_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let options = BlockOptions {
        read_only: true,
        ..BlockOptions::default()
    };
    let mut h = Harness::new(&mem, disk, options);
    let (_, used) = h.submit(&request(&mem, VIRTIO_BLK_T_OUT, 0, 512));
    assert_eq!(used, Some(1));
    assert_eq!(h.status(), IOERR);
    assert!(calls.lock().unwrap().is_empty(), "no data written");
    // Reads still work.
    h.submit(&request(&mem, VIRTIO_BLK_T_IN, 1, 512));
    assert_eq!(h.status(), OK);
}

#[test]
fn read_only_disk_refuses_discard_and_write_zeroes_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let options = BlockOptions {
        read_only: true,
        ..BlockOptions::default()
    };
    // A hostile driver acks features that were never offered.
    let acked = u64::MAX;
    let mut h = Harness::with_features(&mem, disk, options, Some(acked));
    for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
        let len = segments(&mem, &[(0, 8, 0)]);
        header(&mem, request_type, 0);
        h.submit(&[
            Buf::readable(HEADER, 16),
            Buf::readable(BUFFER, len),
            Buf::writable(STATUS, 1),
        ]);
        assert_eq!(h.status(), IOERR);
    }
    assert!(calls.lock().unwrap().is_empty());
}

// --- discard and write zeroes ----------------------------------------------

fn submit_segments(h: &mut Harness<'_, RecordingDisk>, request_type: u32, segs: &[(u64, u32, u32)]) {
    mem_status_poison(h);
    let len = segments(h.mem, segs);
    header(h.mem, request_type, 0);
    h.submit(&[
        Buf::readable(HEADER, 16),
        Buf::readable(BUFFER, len),
        Buf::writable(STATUS, 1),
    ]);
}

fn mem_status_poison(h: &Harness<'_, RecordingDisk>) {
    h.mem.write_obj(POISON, GuestAddress(STATUS)).unwrap();
}

#[test]
fn discard_reaches_the_backend_for_each_segment() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    submit_segments(&mut h, VIRTIO_BLK_T_DISCARD, &[(8, 8, 0), (100, 1, 0)]);
    assert_eq!(h.status(), OK);
    assert_eq!(
        *calls.lock().unwrap(),
        [Call::Discard(4096, 4096), Call::Discard(51200, 512)]
    );
}

#[test]
fn write_zeroes_zeroes_the_range_and_passes_the_unmap_flag() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    submit_segments(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[(2, 2, 0), (10, 1, unmap)]);
    assert_eq!(h.status(), OK);
    assert_eq!(
        *calls.lock().unwrap(),
        [
            Call::WriteZeroes(1024, 1024, false),
            Call::WriteZeroes(5120, 512, true)
        ]
    );
    let block = h.block.lock().unwrap();
    let data = block.backend().disk.data();
    assert!(data[1024..2048].iter().all(|&b| b == 0));
    assert!(data[2048..2560].iter().all(|&b| b == 4), "next sector untouched");
}

#[test]
fn discard_with_the_unmap_flag_is_unsupp() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    submit_segments(
        &mut h,
        VIRTIO_BLK_T_DISCARD,
        &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );
    assert_eq!(h.status(), UNSUPP);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn discard_or_write_zeroes_with_unknown_flags_is_unsupp() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    submit_segments(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0b10)]);
    assert_eq!(h.status(), UNSUPP);
    submit_segments(&mut h, VIRTIO_BLK_T_DISCARD, &[(0, 8, 1 << 31)]);
    assert_eq!(h.status(), UNSUPP);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn discard_the_driver_did_not_negotiate_is_unsupp() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let acked = features::VERSION_1 | bit(VIRTIO_BLK_F_FLUSH);
    let mut h = Harness::with_features(&mem, disk, BlockOptions::default(), Some(acked));
    submit_segments(&mut h, VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]);
    assert_eq!(h.status(), UNSUPP);
    submit_segments(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]);
    assert_eq!(h.status(), UNSUPP);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn discard_segments_beyond_the_advertised_limits_fail_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    // Too many sectors in one segment.
    submit_segments(&mut h, VIRTIO_BLK_T_DISCARD, &[(0, MAX_DISCARD_SECTORS + 1, 0)]);
    assert_eq!(h.status(), IOERR);
    // Too many segments.
    let many: Vec<_> = (0..=u64::from(MAX_DISCARD_SEGMENTS)).map(|i| (i, 1, 0)).collect();
    submit_segments(&mut h, VIRTIO_BLK_T_DISCARD, &many);
    assert_eq!(h.status(), IOERR);
    // Past the end of the disk, even after a valid segment: nothing runs.
    submit_segments(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0), (SECTORS, 1, 0)]);
    assert_eq!(h.status(), IOERR);
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn discard_payload_that_is_not_whole_segments_fails_with_ioerr() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    for len in [0, 8, 17] {
        mem_status_poison(&h);
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let mut bufs = vec![Buf::readable(HEADER, 16)];
        if len > 0 {
            bufs.push(Buf::readable(BUFFER, len));
        }
        bufs.push(Buf::writable(STATUS, 1));
        h.submit(&bufs);
        assert_eq!(h.status(), IOERR, "payload of {len} bytes");
    }
    assert!(calls.lock().unwrap().is_empty());
}

// --- broken chains: DEVICE_NEEDS_RESET -------------------------------------

#[test]
fn request_without_a_status_byte_puts_the_device_in_needs_reset() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, used) = h.submit(&[Buf::readable(HEADER, 16), Buf::readable(BUFFER, 512)]);
    assert_eq!(used, None);
    assert!(h.needs_reset());
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn zero_length_status_descriptor_leaves_no_status_byte_and_needs_reset() {
    let mem = memory().unwrap();
    let (disk, _) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let (_, used) = h.submit(&[Buf::readable(HEADER, 16), Buf::writable(STATUS, 0)]);
    assert_eq!(used, None);
    assert!(h.needs_reset());
    assert_eq!(h.status(), POISON);
}

#[test]
fn rejects_descriptor_chain_past_end_of_memory() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let (_, used) = h.submit(&[
        Buf::readable(HEADER, 16),
        Buf::writable(MEM_SIZE - 256, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!(used, None);
    assert!(h.needs_reset());
    assert!(calls.lock().unwrap().is_empty());
    assert_eq!(h.status(), POISON, "not even the status byte is written");
}

#[test]
fn readable_buffer_after_the_status_puts_the_device_in_needs_reset() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, used) = h.submit(&[
        Buf::readable(HEADER, 16),
        Buf::writable(STATUS, 1),
        Buf::readable(BUFFER, 512),
    ]);
    assert_eq!(used, None);
    assert!(h.needs_reset());
    assert!(calls.lock().unwrap().is_empty());
    assert_eq!(h.status(), POISON);
}

#[test]
fn looping_chain_puts_the_device_in_needs_reset() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    h.driver.store(0, raw_desc(HEADER, 16, next, 1)).unwrap();
    h.driver
        .store(1, raw_desc(BUFFER, 512, next | VRING_DESC_F_WRITE as u16, 0))
        .unwrap();
    h.driver.publish(0);
    h.run();
    assert!(h.driver.used().is_empty());
    assert!(h.needs_reset());
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn after_needs_reset_notifications_are_ignored_until_a_reset_and_reactivation() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    h.submit(&[Buf::readable(HEADER, 16)]); // no status byte
    assert!(h.needs_reset());

    h.submit(&request(&mem, VIRTIO_BLK_T_IN, 0, 512));
    assert_eq!(h.driver.used_idx(), 0);
    assert!(calls.lock().unwrap().is_empty());

    // The driver resets and starts over with a fresh queue.
    let driver = DriverQueue::at(&mem, GuestAddress(0x8000), 16).unwrap();
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    {
        let mut block = h.block.lock().unwrap();
        assert!(block.reset());
        let features = block.features();
        block.ack_features(features);
        block
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![driver.queue().unwrap()],
                queue_events: vec![notify.try_clone().unwrap()],
                interrupt: h.interrupt.clone(),
                stop: StopSignal::new(),
            })
            .unwrap();
    }
    h.event_loop.run_with_timeout(100).unwrap();
    let mut driver = driver;
    driver.add(&request(&mem, VIRTIO_BLK_T_IN, 0, 512)).unwrap();
    notify.write(1).unwrap();
    h.event_loop.run_with_timeout(100).unwrap();
    assert_eq!(driver.used().len(), 1);
    assert_eq!(h.status(), OK);
}

#[test]
fn activation_twice_without_reset_is_refused() {
    let mem = memory().unwrap();
    let (disk, _) = recording_disk();
    let h = Harness::new(&mem, disk, BlockOptions::default());
    let err = h
        .block
        .lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![h.driver.queue().unwrap()],
            queue_events: vec![EventFd::new(0).unwrap()],
            interrupt: h.interrupt.clone(),
            stop: StopSignal::new(),
        })
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyActive { device_type: 2 }));
}

// --- a real file ------------------------------------------------------------

#[test]
fn file_backed_disk_round_trips_a_write_through_the_device() {
    let image = super::backend::tests::TempImage::new(64 * 1024);
    let mem = memory().unwrap();
    let disk = FileBackend::open(&image.0, false).unwrap();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());

    mem.write_slice(&[0x42; 1024], GuestAddress(BUFFER)).unwrap();
    h.submit(&request(&mem, VIRTIO_BLK_T_OUT, 4, 1024));
    assert_eq!(h.status(), OK);
    h.submit(&request(&mem, VIRTIO_BLK_T_FLUSH, 0, 0));
    assert_eq!(h.status(), OK);

    poison(&mem, BUFFER, 1024);
    h.submit(&request(&mem, VIRTIO_BLK_T_IN, 4, 1024));
    assert_eq!(h.status(), OK);
    assert_eq!(guest_bytes(&mem, BUFFER, 1024), vec![0x42; 1024]);

    let on_disk = std::fs::read(&image.0).unwrap();
    assert!(on_disk[2048..3072].iter().all(|&b| b == 0x42));
}

// --- the ring itself ----------------------------------------------------------

#[test]
fn available_index_more_than_a_queue_ahead_puts_the_device_in_needs_reset() {
    let mem = memory().unwrap();
    let (disk, calls) = recording_disk();
    let mut h = Harness::new(&mem, disk, BlockOptions::default());
    h.driver.add(&request(&mem, VIRTIO_BLK_T_IN, 0, 512)).unwrap();
    h.driver.set_avail_idx(40);
    h.run();
    assert!(h.needs_reset());
    assert!(h.driver.used().is_empty());
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn random_descriptor_tables_never_panic_and_never_touch_memory_outside_the_buffers() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let mem = memory().unwrap();
        let (disk, _) = recording_disk();
        let mut h = Harness::new(&mem, disk, BlockOptions::default());
        // A canary page that no descriptor below may point at.
        let canary = DATA + 0x70_0000;
        poison(&mem, canary, 4096);
        for index in 0..16u16 {
            let r = next();
            let addr = match r % 4 {
                0 => r >> 8,                       // anywhere at all
                1 => MEM_SIZE - (r >> 60),         // around the end of RAM
                _ => DATA + (r >> 44) % 0x40_0000, // in the data area
            };
            let len = match (r >> 2) % 4 {
                0 => 0,
                1 => (r >> 32) as u32,
                _ => ((r >> 40) % 4096) as u32,
            };
            let flags = (r >> 16) as u16 & 0b111; // NEXT, WRITE, INDIRECT
            let next_index = ((r >> 24) % 20) as u16; // sometimes past the table
            h.driver
                .store(index, raw_desc(addr, len, flags, next_index))
                .unwrap();
        }
        for _ in 0..(next() % 16) {
            h.driver.publish((next() % 18) as u16);
        }
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(DATA)).unwrap();
        h.run();
        assert_eq!(
            guest_bytes(&mem, canary, 4096),
            vec![POISON; 4096],
            "round {round}"
        );
    }
}

// --- rate limiting ------------------------------------------------------------

mod rate_limiting {
    use std::time::{Duration, Instant};

    use keel_ratelimit::{BucketConfig, BucketUpdate};

    use super::*;

    fn limited(
        mem: &GuestMemoryMmap,
        bandwidth: BucketUpdate,
        ops: BucketUpdate,
    ) -> Harness<'_, MemoryBackend> {
        let h = Harness::new(mem, MemoryBackend::new(DISK_SIZE), BlockOptions::default());
        h.block.lock().unwrap().update_rate_limiter(bandwidth, ops);
        h
    }

    /// Makes `count` 4 KiB reads available (at most 5 in flight: three
    /// descriptors each in a 16-entry table) and notifies once.
    fn queue_reads(h: &mut Harness<'_, MemoryBackend>, count: usize) {
        for _ in 0..count {
            let bufs = request(h.mem, VIRTIO_BLK_T_IN, 0, 4096);
            h.driver.add(&bufs).unwrap();
        }
        h.notify.write(1).unwrap();
    }

    /// Runs the event loop until `used` requests are done or `limit` passes.
    fn run_until_used(h: &mut Harness<'_, MemoryBackend>, used: usize, limit: Duration) -> Duration {
        let start = Instant::now();
        while h.driver.used().len() < used && start.elapsed() < limit {
            h.event_loop.run_with_timeout(10).unwrap();
        }
        start.elapsed()
    }

    #[test]
    fn a_request_over_the_bandwidth_limit_stays_on_the_ring_until_the_timer_fires() {
        let mem = memory().unwrap();
        // One 4 KiB read per 100 ms.
        let mut h = limited(
            &mem,
            BucketUpdate::Set(BucketConfig::new(4096, 100)),
            BucketUpdate::Keep,
        );
        queue_reads(&mut h, 2);
        let start = Instant::now();
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 1, "the second read waits for tokens");
        assert_eq!(h.block.lock().unwrap().throttled_count(), 1);
        assert!(h.block.lock().unwrap().rate_limiter().is_blocked());

        run_until_used(&mut h, 2, Duration::from_secs(2));
        let waited = start.elapsed();
        assert_eq!(h.driver.used().len(), 2, "the timer resumed the queue");
        assert!(waited >= Duration::from_millis(90), "served after {waited:?}");
        assert_eq!(h.status(), OK);
    }

    #[test]
    fn while_throttled_notifications_do_not_serve_the_queue() {
        let mem = memory().unwrap();
        let mut h = limited(
            &mem,
            BucketUpdate::Set(BucketConfig::new(4096, 60_000)),
            BucketUpdate::Keep,
        );
        queue_reads(&mut h, 2);
        h.event_loop.run_with_timeout(10).unwrap();
        for _ in 0..5 {
            h.run();
        }
        assert_eq!(h.driver.used().len(), 1);
        assert_eq!(
            h.block.lock().unwrap().throttled_count(),
            1,
            "asked once, then waits"
        );
    }

    #[test]
    fn the_ops_bucket_limits_requests_of_any_type() {
        let mem = memory().unwrap();
        // One request per 100 ms, whatever its size.
        let mut h = limited(
            &mem,
            BucketUpdate::Keep,
            BucketUpdate::Set(BucketConfig::new(1, 100)),
        );
        for _ in 0..3 {
            let bufs = request(h.mem, VIRTIO_BLK_T_FLUSH, 0, 0);
            h.driver.add(&bufs).unwrap();
        }
        h.notify.write(1).unwrap();
        let start = Instant::now();
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 1);
        run_until_used(&mut h, 3, Duration::from_secs(2));
        assert_eq!(h.driver.used().len(), 3);
        assert!(
            start.elapsed() >= Duration::from_millis(180),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn reads_and_writes_pay_their_data_length_in_bytes() {
        let mem = memory().unwrap();
        // 8 KiB, refilled in a minute: two 4 KiB transfers, any number of flushes.
        let mut h = limited(
            &mem,
            BucketUpdate::Set(BucketConfig::new(8192, 60_000)),
            BucketUpdate::Keep,
        );
        let write = request(h.mem, VIRTIO_BLK_T_OUT, 0, 4096);
        h.driver.add(&write).unwrap();
        h.notify.write(1).unwrap();
        h.event_loop.run_with_timeout(10).unwrap();
        for _ in 0..4 {
            let flush = request(h.mem, VIRTIO_BLK_T_FLUSH, 0, 0);
            h.submit(&flush);
        }
        assert_eq!(h.driver.used().len(), 5, "flushes move no bytes");
        queue_reads(&mut h, 2);
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(
            h.driver.used().len(),
            6,
            "4 KiB written + 4 KiB read spent the bucket"
        );
    }

    #[test]
    fn an_update_on_a_running_device_applies_at_once_even_from_another_thread() {
        let mem = memory().unwrap();
        // Practically nothing: 4 KiB per minute.
        let mut h = limited(
            &mem,
            BucketUpdate::Set(BucketConfig::new(4096, 60_000)),
            BucketUpdate::Keep,
        );
        queue_reads(&mut h, 3);
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 1);

        let block = h.block.clone();
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                // 1 MiB per 100 ms: plenty for the two waiting reads.
                block.lock().unwrap().update_rate_limiter(
                    BucketUpdate::Set(BucketConfig::new(1 << 20, 100)),
                    BucketUpdate::Keep,
                );
            });
            run_until_used(&mut h, 3, Duration::from_secs(5));
        });
        assert_eq!(h.driver.used().len(), 3);
        assert!(start.elapsed() < Duration::from_secs(5), "woken by the update");
        assert_eq!(
            h.block.lock().unwrap().rate_limiter().bandwidth(),
            Some(BucketConfig::new(1 << 20, 100))
        );
    }

    #[test]
    fn disabling_the_limiter_removes_the_limit() {
        let mem = memory().unwrap();
        let mut h = limited(
            &mem,
            BucketUpdate::Set(BucketConfig::new(4096, 60_000)),
            BucketUpdate::Set(BucketConfig::new(1, 60_000)),
        );
        queue_reads(&mut h, 2);
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 1);
        h.block
            .lock()
            .unwrap()
            .update_rate_limiter(BucketUpdate::Disable, BucketUpdate::Disable);
        assert!(!h.block.lock().unwrap().rate_limiter().is_limiting());
        run_until_used(&mut h, 2, Duration::from_secs(2));
        assert_eq!(h.driver.used().len(), 2);
        // Nothing limits any more: what the ring holds goes through in one pass.
        queue_reads(&mut h, 5);
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 7);
    }

    #[test]
    fn an_unlimited_device_never_throttles() {
        let mem = memory().unwrap();
        let mut h = Harness::new(&mem, MemoryBackend::new(DISK_SIZE), BlockOptions::default());
        queue_reads(&mut h, 5);
        h.event_loop.run_with_timeout(10).unwrap();
        assert_eq!(h.driver.used().len(), 5);
        assert_eq!(h.block.lock().unwrap().throttled_count(), 0);
    }
}

#[test]
fn replacing_the_backend_of_a_running_device_changes_the_capacity_and_tells_the_driver() {
    let mem = memory().unwrap();
    let driver = DriverQueue::new(&mem, 16).unwrap();
    let mut block = Block::new(MemoryBackend::new(DISK_SIZE), BlockOptions::default()).unwrap();
    let interrupt = Arc::new(RecordingInterrupt::new());
    block
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![driver.queue().unwrap()],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            interrupt: interrupt.clone(),
            stop: StopSignal::new(),
        })
        .unwrap();
    let old = block.replace_backend(MemoryBackend::new(4 * DISK_SIZE));
    assert_eq!(old.data().len(), DISK_SIZE);
    assert_eq!(block.capacity_sectors(), 4 * SECTORS);
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 4 * SECTORS);
    assert_eq!(interrupt.signals(), [VirtioSignal::ConfigChange]);
}
