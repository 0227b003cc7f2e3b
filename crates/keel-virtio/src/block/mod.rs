//! virtio-blk (virtio 1.2, section 5.2): a disk for the guest, on any
//! [`BlockBackend`].

mod backend;
mod overlay;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use keel_ratelimit::{BucketUpdate, RateLimiter};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::Bytes;

pub use backend::{BlockBackend, FileBackend, MemoryBackend};

use crate::activation::{process_queue, ActivationState, EventSource, Handled};
use crate::chain::RequestBuffers;
use crate::device::{Activation, SharedConfig, VirtioDevice};
use crate::{check_queue_count, device_type, features, Error, Result};

/// Bytes per sector: the unit of every offset and length in the protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the `GET_ID` string.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most sectors one discard or write-zeroes segment may cover (128 MiB):
/// bounds the time one request holds the event loop when a file system
/// needs zeros written by hand.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 18;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Discard granularity advertised to the guest, in sectors (4 KiB).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Size of the bounce buffer data moves through between guest memory and
/// the backend.
const BOUNCE_BUFFER_SIZE: usize = 128 * 1024;
/// Size of the configuration space up to `unused1` (virtio 1.2, 5.2.4).
const CONFIG_SPACE_SIZE: usize = 60;
/// Size of a discard / write-zeroes segment: sector, num_sectors, flags.
const DISCARD_SEGMENT_SIZE: u64 = 16;
/// Size of the request header: type, reserved, sector.
const HEADER_SIZE: usize = 16;

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// How a [`Block`] device presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    /// Refuse writes (offers `VIRTIO_BLK_F_RO`, and no discard or
    /// write-zeroes).
    pub read_only: bool,
    /// The serial the guest reads with `GET_ID` (Linux:
    /// `/sys/block/vda/serial`), at most [`ID_BYTES`] bytes.
    pub id: String,
    /// Entries in the request queue: a power of two from 4 to 32768. Chains may
    /// have at most this many descriptors, so the advertised `seg_max` is
    /// this minus two (header and status).
    pub queue_size: u16,
    /// Largest single buffer (descriptor) a request may use, advertised as
    /// `size_max`; requests with a larger one fail with `IOERR`.
    pub max_segment_size: u32,
}

impl Default for BlockOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            id: String::new(),
            queue_size: 256,
            max_segment_size: 1 << 20,
        }
    }
}

/// A virtio block device.
///
/// Requests are served on the event-loop thread in the order the driver
/// makes them available, one at a time, so a `FLUSH` completes only after
/// every earlier write completed and the backend's flush returned. Each
/// request is checked before the backend sees it: its header must be
/// readable, its status byte (the last writable byte) present, its data a
/// whole number of sectors inside the disk and its buffers no longer than
/// `size_max`. A request that fails those checks gets `IOERR` (or `UNSUPP`
/// for an unknown type or flag) and nothing is read or written; a chain that
/// breaks the virtqueue rules puts the device in `DEVICE_NEEDS_RESET`.
///
/// Features offered: `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`,
/// `SIZE_MAX`, `SEG_MAX`, `FLUSH`, and either `RO` or `DISCARD` and
/// `WRITE_ZEROES`. If the driver does not accept `FLUSH`, every write is
/// flushed before it completes (the spec's write-through case).
///
/// The device is shared by the transport (vCPU threads) and the event loop:
/// put it in an `Arc<Mutex<_>>`, hand a clone to [`crate::MmioTransport`]
/// and add another to the `EventManager`. See the crate documentation for
/// the wiring.
///
/// # Rate limiting
///
/// A [`RateLimiter`] with Firecracker's semantics paces the requests
/// ([`update_rate_limiter`](Self::update_rate_limiter)): every request
/// costs one operation, reads and writes also their data length in bytes.
/// A request the limiter refuses stays on the available ring, untouched;
/// the device stops serving the queue and watches the limiter's timerfd on
/// its event loop, which wakes it exactly when the request can pass. The
/// limiter can be changed while the VM runs, from any thread holding the
/// device's mutex; a throttled queue then resumes under the new limits at
/// once. Without a limit set the check is one branch per request.
///
/// ```
/// use keel_ratelimit::{BucketConfig, BucketUpdate};
/// use keel_virtio::{Block, BlockOptions, MemoryBackend};
///
/// let mut disk = Block::new(MemoryBackend::new(1 << 20), BlockOptions::default()).unwrap();
/// // 4 MiB/s in 10 ms slices, and at most 1000 requests per second.
/// disk.update_rate_limiter(
///     BucketUpdate::Set(BucketConfig::new(41_943, 10)),
///     BucketUpdate::Set(BucketConfig::new(100, 100)),
/// );
/// assert_eq!(disk.rate_limiter().bandwidth(), Some(BucketConfig::new(41_943, 10)));
/// // Later, on a running VM: lift the bandwidth limit, keep the other.
/// disk.update_rate_limiter(BucketUpdate::Disable, BucketUpdate::Keep);
/// assert!(disk.rate_limiter().bandwidth().is_none());
/// ```
pub struct Block<B: BlockBackend> {
    disk: Disk<B>,
    activation: ActivationState,
    features: u64,
    queue_sizes: [u16; 1],
    /// Read by the transports without the device's lock, so a driver
    /// reading the capacity never waits for a request stuck in the backend.
    config: SharedConfig,
    limiter: RateLimiter,
    throttled: u64,
}

impl<B: BlockBackend> std::fmt::Debug for Block<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity_sectors", &self.disk.capacity_sectors)
            .field("read_only", &self.disk.read_only)
            .field("active", &self.activation.is_active())
            .finish_non_exhaustive()
    }
}

impl<B: BlockBackend> Block<B> {
    /// A block device on `backend`.
    pub fn new(backend: B, options: BlockOptions) -> Result<Self> {
        if options.id.len() > ID_BYTES {
            return Err(Error::BlockIdTooLong {
                len: options.id.len(),
                id: options.id,
            });
        }
        let size = options.queue_size;
        if size < 4 || !size.is_power_of_two() || size > crate::MAX_QUEUE_SIZE {
            return Err(Error::InvalidQueueSize { size });
        }
        if options.max_segment_size < SECTOR_SIZE as u32 {
            return Err(Error::InvalidSegmentSize {
                size: options.max_segment_size,
            });
        }
        let mut id = [0u8; ID_BYTES];
        // At most ID_BYTES (checked above).
        for (dst, &src) in id.iter_mut().zip(options.id.as_bytes()) {
            *dst = src;
        }
        let capacity_sectors = backend.capacity() / SECTOR_SIZE;

        let mut features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_FLUSH);
        if options.read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        } else {
            features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }

        // `size` is at least 4 (checked above).
        let seg_max = u32::from(size).saturating_sub(2);
        let config = SharedConfig::new(vec![0; CONFIG_SPACE_SIZE]);
        config.write(0, &capacity_sectors.to_le_bytes());
        config.write(8, &options.max_segment_size.to_le_bytes());
        config.write(12, &seg_max.to_le_bytes());
        config.write(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        config.write(34, &1u16.to_le_bytes()); // num_queues
        config.write(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        config.write(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        config.write(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
        config.write(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        config.write(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        config.write(56, &[1]); // write_zeroes_may_unmap

        Ok(Self {
            disk: Disk {
                backend,
                capacity_sectors,
                read_only: options.read_only,
                id,
                max_segment_size: options.max_segment_size,
                acked_features: 0,
                bounce: vec![0; BOUNCE_BUFFER_SIZE],
            },
            activation: ActivationState::new("virtio-blk")?,
            features,
            queue_sizes: [size],
            config,
            limiter: RateLimiter::unlimited().map_err(Error::CreateEventFd)?,
            throttled: 0,
        })
    }

    /// Changes the request rate limiter's bandwidth (bytes read or
    /// written) and operations (requests) buckets; see the type's
    /// documentation. May be called on a running device.
    pub fn update_rate_limiter(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        self.limiter.update(bandwidth, ops);
    }

    /// The request rate limiter (its buckets, whether it is holding the
    /// queue back).
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Times the rate limiter held the queue back.
    pub fn throttled_count(&self) -> u64 {
        self.throttled
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.disk.backend
    }

    /// Puts `backend` in place of the current one (which is returned), on a
    /// running device too: Firecracker's `PATCH /drives` with a new
    /// `path_on_host`. The capacity follows the new backend and an active
    /// driver gets a configuration-change interrupt so it rereads it.
    /// Requests are served under the same lock, so none is cut in half.
    pub fn replace_backend(&mut self, backend: B) -> B {
        let capacity_sectors = backend.capacity() / SECTOR_SIZE;
        let old = std::mem::replace(&mut self.disk.backend, backend);
        self.disk.capacity_sectors = capacity_sectors;
        self.config.write(0, &capacity_sectors.to_le_bytes());
        if let Some(active) = self.activation.active_mut() {
            if let Err(e) = active.interrupt.signal_config_change() {
                log::warn!("virtio-blk: cannot signal the capacity change: {e}");
            }
        }
        old
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.disk.backend
    }

    /// The disk size the guest sees, in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    fn process_requests(&mut self, ops: &mut EventOps) {
        if self.limiter.is_blocked() {
            // The limiter's timer brings us back.
            return;
        }
        let Some((active, budget)) = self.activation.start_pass(ops, 0) else {
            return;
        };
        let disk = &mut self.disk;
        let limiter = &mut self.limiter;
        let throttled = &mut self.throttled;
        let run = process_queue(active, 0, budget, |mem, buffers| {
            if limiter.is_limiting() && !limiter.consume(transfer_len(mem, buffers)) {
                *throttled = throttled.saturating_add(1);
                return Handled::Throttled;
            }
            disk.execute(mem, buffers)
        });
        self.activation.end_pass(ops, 0, run);
    }

    fn on_limiter_timer(&mut self, ops: &mut EventOps) {
        if self.limiter.on_timer() {
            self.process_requests(ops);
        }
    }
}

/// The bytes a request moves, as its rate limiter counts them (Firecracker's
/// rule): the data length of a read or a write, nothing for other types or a
/// request too short to say.
fn transfer_len(mem: &GuestMemoryMmap, buffers: &RequestBuffers) -> u64 {
    let mut reader = buffers.reader(mem);
    let mut request_type = [0u8; 4];
    if reader.read_exact(&mut request_type).is_err() {
        return 0;
    }
    match u32::from_le_bytes(request_type) {
        // Less the status byte.
        VIRTIO_BLK_T_IN => buffers.writable_len().saturating_sub(1),
        // Less the rest of the header.
        VIRTIO_BLK_T_OUT => reader.remaining().saturating_sub(HEADER_REST),
        _ => 0,
    }
}

/// The header after its 4-byte request type.
const HEADER_REST: u64 = (HEADER_SIZE - 4) as u64;

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, acked: u64) {
        self.disk.acked_features = acked & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn shared_config(&self) -> Option<SharedConfig> {
        Some(self.config.clone())
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Without VIRTIO_BLK_F_CONFIG_WCE nothing in the space is writable.
        log::debug!(
            "virtio-blk: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        check_queue_count(self, &activation)?;
        self.activation.activate(device_type::BLOCK, activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        self.disk.acked_features = 0;
        true
    }

    fn save_state(&self) -> Option<crate::DeviceState> {
        Some(crate::DeviceState::new(
            self.activation.queue_progress(),
            Vec::new(),
        ))
    }
}

impl<B: BlockBackend> MutEventSubscriber for Block<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
        if let Err(e) = ops.add(Events::new_raw(self.limiter.timer_fd(), EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the rate limiter's timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.activation.classify(fd) == EventSource::Other && fd == self.limiter.timer_fd() {
            self.on_limiter_timer(ops);
        } else if self.activation.queue_event(fd, ops) {
            self.process_requests(ops);
        }
    }
}

/// The part of the device that executes requests.
struct Disk<B> {
    backend: B,
    capacity_sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    max_segment_size: u32,
    acked_features: u64,
    bounce: Vec<u8>,
}

/// A request's result: its status byte.
type Status = u8;
const OK: Status = VIRTIO_BLK_S_OK as Status;
const IOERR: Status = VIRTIO_BLK_S_IOERR as Status;
const UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as Status;

impl<B: BlockBackend> Disk<B> {
    fn has(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }

    /// Without a negotiated FLUSH every write must be stable on completion.
    fn write_through(&mut self) -> Status {
        if self.has(VIRTIO_BLK_F_FLUSH) {
            return OK;
        }
        let result = self.backend.flush();
        self.backend_result("flush", result)
    }

    fn backend_result(&self, what: &str, result: std::io::Result<()>) -> Status {
        match result {
            Ok(()) => OK,
            Err(e) => {
                keel_ratelimit::warn_limited!("virtio-blk: backend {what} failed: {e}");
                IOERR
            }
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are all on the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        // No overflow: the capacity in sectors is the backend's in bytes
        // divided by the sector size.
        let capacity = self.capacity_sectors.checked_mul(SECTOR_SIZE)?;
        (end <= capacity).then_some(offset)
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, buffers: &RequestBuffers) -> Handled {
        let Some(status_addr) = buffers.last_writable_byte() else {
            return Handled::Unanswerable("no device-writable byte for the status");
        };
        // Less the status byte, which is there (above).
        let data_len = buffers.writable_len().saturating_sub(1);
        let (status, written) = self.run(mem, buffers, data_len);
        if mem.write_obj(status, status_addr).is_err() {
            // Cannot happen: parse checked the buffer is in guest memory.
            return Handled::Unanswerable("status byte not writable");
        }
        // The chain is at most 4 GiB in total, so this fits.
        Handled::Used(u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX))
    }

    /// Executes one request; returns its status and the data bytes written
    /// into the guest's buffers.
    fn run(&mut self, mem: &GuestMemoryMmap, buffers: &RequestBuffers, data_len: u64) -> (Status, u64) {
        let mut reader = buffers.reader(mem);
        let mut header = [0u8; HEADER_SIZE];
        if reader.read_exact(&mut header).is_err() {
            keel_ratelimit::warn_limited!("virtio-blk: request shorter than its 16-byte header");
            return (IOERR, 0);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        if buffers.longest_segment() > self.max_segment_size {
            keel_ratelimit::warn_limited!(
                "virtio-blk: a buffer of {} bytes exceeds size_max {}",
                buffers.longest_segment(),
                self.max_segment_size
            );
            return (IOERR, 0);
        }

        match request_type {
            VIRTIO_BLK_T_IN => {
                let mut writer = buffers.writer(mem, data_len);
                let status = self.read(sector, &mut writer);
                (status, writer.written())
            }
            VIRTIO_BLK_T_OUT => (self.write(sector, &mut reader), 0),
            VIRTIO_BLK_T_FLUSH => {
                let result = self.backend.flush();
                (self.backend_result("flush", result), 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut writer = buffers.writer(mem, data_len);
                // The writer stops at `data_len`.
                match writer.write(&self.id) {
                    Ok(_) => (OK, writer.written()),
                    Err(_) => (IOERR, writer.written()),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                (self.discard_or_zero(request_type, &mut reader), 0)
            }
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (UNSUPP, 0)
            }
        }
    }

    fn read(&mut self, sector: u64, writer: &mut crate::chain::GuestWriter<'_>) -> Status {
        let len = writer.remaining();
        if !len.is_multiple_of(SECTOR_SIZE) {
            keel_ratelimit::warn_limited!("virtio-blk: read of {len} bytes is not a whole number of sectors");
            return IOERR;
        }
        let Some(offset) = self.byte_range(sector, len) else {
            keel_ratelimit::warn_limited!(
                "virtio-blk: read of {len} bytes at sector {sector} is past the end ({} sectors)",
                self.capacity_sectors
            );
            return IOERR;
        };
        let mut at = offset;
        let mut left = len;
        while left > 0 {
            // At most the bounce buffer's length: the chunk is always there.
            let n = left.min(self.bounce.len() as u64) as usize;
            let Some(chunk) = self.bounce.get_mut(..n) else {
                return IOERR;
            };
            if let Err(e) = self.backend.read_at(at, chunk) {
                keel_ratelimit::warn_limited!("virtio-blk: backend read at {at} failed: {e}");
                return IOERR;
            }
            if writer.write(chunk).is_err() {
                return IOERR;
            }
            // `n` is at most `left`, and `offset + len` is on the disk.
            at = at.saturating_add(n as u64);
            left = left.saturating_sub(n as u64);
        }
        OK
    }

    fn write(&mut self, sector: u64, reader: &mut crate::chain::GuestReader<'_>) -> Status {
        if self.read_only {
            log::debug!("virtio-blk: write to a read-only disk refused");
            return IOERR;
        }
        let len = reader.remaining();
        if !len.is_multiple_of(SECTOR_SIZE) {
            keel_ratelimit::warn_limited!(
                "virtio-blk: write of {len} bytes is not a whole number of sectors"
            );
            return IOERR;
        }
        let Some(offset) = self.byte_range(sector, len) else {
            keel_ratelimit::warn_limited!(
                "virtio-blk: write of {len} bytes at sector {sector} is past the end ({} sectors)",
                self.capacity_sectors
            );
            return IOERR;
        };
        let mut at = offset;
        let mut left = len;
        while left > 0 {
            // At most the bounce buffer's length: the chunk is always there.
            let n = left.min(self.bounce.len() as u64) as usize;
            let Some(chunk) = self.bounce.get_mut(..n) else {
                return IOERR;
            };
            if reader.read_exact(chunk).is_err() {
                return IOERR;
            }
            if let Err(e) = self.backend.write_at(at, chunk) {
                keel_ratelimit::warn_limited!("virtio-blk: backend write at {at} failed: {e}");
                return IOERR;
            }
            // `n` is at most `left`, and `offset + len` is on the disk.
            at = at.saturating_add(n as u64);
            left = left.saturating_sub(n as u64);
        }
        self.write_through()
    }

    fn discard_or_zero(&mut self, request_type: u32, reader: &mut crate::chain::GuestReader<'_>) -> Status {
        let discard = request_type == VIRTIO_BLK_T_DISCARD;
        if self.read_only {
            return IOERR;
        }
        let feature = if discard {
            VIRTIO_BLK_F_DISCARD
        } else {
            VIRTIO_BLK_F_WRITE_ZEROES
        };
        if !self.has(feature) {
            return UNSUPP;
        }
        let payload = reader.remaining();
        let count = payload / DISCARD_SEGMENT_SIZE;
        if !payload.is_multiple_of(DISCARD_SEGMENT_SIZE)
            || count == 0
            || count > u64::from(MAX_DISCARD_SEGMENTS)
        {
            keel_ratelimit::warn_limited!(
                "virtio-blk: discard/write-zeroes payload of {payload} bytes is malformed"
            );
            return IOERR;
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let mut raw = [0u8; DISCARD_SEGMENT_SIZE as usize];
            if reader.read_exact(&mut raw).is_err() {
                return IOERR;
            }
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return IOERR;
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = self.byte_range(sector, len) else {
                return IOERR;
            };
            ranges.push((offset, len, unmap));
        }
        for (offset, len, unmap) in ranges {
            let result = if discard {
                self.backend.discard(offset, len)
            } else {
                self.backend.write_zeroes(offset, len, unmap)
            };
            let what = if discard { "discard" } else { "write-zeroes" };
            let status = self.backend_result(what, result);
            if status != OK {
                return status;
            }
        }
        self.write_through()
    }
}

#[cfg(test)]
mod tests;
