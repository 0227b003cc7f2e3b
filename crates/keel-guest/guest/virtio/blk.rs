//! virtio-blk (virtio 1.2, section 5.2): configuration and requests.

use super::queue::{Chain, Virtqueue};
use super::{feature, submit_and_wait, Found, InitError, RequestError, Transport};
use crate::boot_params::BootParams;
use crate::dma::{self, Buffer};

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What the driver puts in the status byte before a request, so a device
/// that never writes it is noticed.
pub const S_UNWRITTEN: u8 = 0xff;

/// Feature bits.
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Scratch page layout: header, status, discard segments, indirect table.
const HEADER: usize = 0;
const STATUS: usize = 16;
const SEGMENTS: usize = 64;
const TABLE: usize = 1024;
const SCRATCH_BYTES: usize = TABLE + 16 * super::queue::MAX_CHAIN;

/// Name of a status byte.
pub fn status_name(status: u8) -> &'static str {
    match status {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        S_UNWRITTEN => "unwritten",
        _ => "invalid",
    }
}

/// The configuration space fields the driver uses.
#[derive(Clone, Copy, Default)]
pub struct Config {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

/// A request's outcome: its status byte and the used length.
#[derive(Clone, Copy)]
pub struct Done {
    pub status: u8,
    pub len: u32,
}

/// A virtio-blk device, initialised.
pub struct Blk {
    pub transport: Transport,
    pub queue: Virtqueue,
    pub features: u64,
    pub offered: u64,
    pub config: Config,
    /// Header, status, segments and indirect table of the request in flight.
    pub scratch: Buffer,
    /// Put every chain behind one indirect descriptor (when negotiated).
    pub use_indirect: bool,
    pub timeout_ms: u64,
    wanted: u64,
    queue_size: u16,
}

/// The features the driver accepts besides the ring options.
pub const DRIVER_FEATURES: u64 =
    F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;

impl Blk {
    /// Brings up the device at `found` with a queue of `queue_size`
    /// entries (or the device's maximum, if smaller), accepting
    /// [`DRIVER_FEATURES`] plus `ring_features` (EVENT_IDX, INDIRECT_DESC)
    /// where offered.
    pub fn init(
        found: Found,
        params: &BootParams,
        ring_features: u64,
        use_irq: bool,
        queue_size: u16,
    ) -> Result<Self, InitError> {
        let transport = Transport::new(found, params, use_irq);
        let mut blk = Self {
            transport,
            queue: Virtqueue::new(0, queue_size),
            features: 0,
            offered: 0,
            config: Config::default(),
            scratch: dma::alloc_or_panic(SCRATCH_BYTES, 4096),
            use_indirect: false,
            timeout_ms: 2000,
            wanted: DRIVER_FEATURES | ring_features,
            queue_size,
        };
        blk.reinit()?;
        Ok(blk)
    }

    /// Resets and initialises the device again, with an empty queue.
    pub fn reinit(&mut self) -> Result<(), InitError> {
        self.reinit_with(|t, q| t.setup_queue(q))
    }

    /// Like [`reinit`](Self::reinit), with `setup` programming the queue
    /// (hostile tests pass bad ring addresses). Config is read after
    /// FEATURES_OK.
    pub fn reinit_with(
        &mut self,
        setup: impl FnOnce(&Transport, &Virtqueue) -> Result<(), InitError>,
    ) -> Result<(), InitError> {
        self.features = self.transport.begin_init(self.wanted)?;
        self.offered = self.transport.device_features();
        self.use_indirect = self.features & feature::RING_INDIRECT_DESC != 0;
        let max = self.transport.queue_max(0);
        if max == 0 {
            return Err(InitError::Queue {
                index: 0,
                why: "not available (QueueNumMax 0)",
            });
        }
        let wanted = self.queue_size;
        let size = if max >= wanted {
            wanted
        } else {
            1 << (15 - max.leading_zeros())
        };
        self.queue.reset_for(size, self.features);
        self.config = self.read_config();
        setup(&self.transport, &self.queue)?;
        self.transport.driver_ok()
    }

    fn read_config(&self) -> Config {
        let t = &self.transport;
        Config {
            capacity: t.config(0, 8),
            size_max: t.config(8, 4) as u32,
            seg_max: t.config(12, 4) as u32,
            blk_size: t.config(20, 4) as u32,
            num_queues: t.config(34, 2) as u16,
            max_discard_sectors: t.config(36, 4) as u32,
            max_discard_seg: t.config(40, 4) as u32,
            discard_sector_alignment: t.config(44, 4) as u32,
            max_write_zeroes_sectors: t.config(48, 4) as u32,
            max_write_zeroes_seg: t.config(52, 4) as u32,
            write_zeroes_may_unmap: t.config(56, 1) as u8,
        }
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.has(F_RO)
    }

    /// Fills in the header and presets the status byte.
    pub fn prepare(&self, kind: u32, sector: u64) {
        self.scratch.put_u32(HEADER, kind);
        self.scratch.put_u32(HEADER + 4, 0);
        self.scratch.put_u64(HEADER + 8, sector);
        self.scratch.write(STATUS, &[S_UNWRITTEN]);
    }

    /// The 16-byte request header.
    pub fn header(&self) -> Buffer {
        self.scratch.slice(HEADER, 16)
    }

    /// The status byte.
    pub fn status_byte(&self) -> Buffer {
        self.scratch.slice(STATUS, 1)
    }

    /// Where an indirect table for one chain goes.
    pub fn table(&self) -> Buffer {
        self.scratch.slice(TABLE, SCRATCH_BYTES - TABLE)
    }

    /// The chain of a request: header, `data` (device-writable if
    /// `device_writes`), status byte.
    pub fn chain(&self, data: &[Buffer], device_writes: bool) -> Chain {
        let mut chain = Chain::new().read_buf(self.header());
        for &buffer in data {
            chain = if device_writes {
                chain.write_buf(buffer)
            } else {
                chain.read_buf(buffer)
            };
        }
        chain.write_buf(self.status_byte())
    }

    /// Makes `chain` available (behind an indirect descriptor if
    /// [`use_indirect`](Self::use_indirect)), notifies, and waits for it.
    pub fn submit(&mut self, chain: &Chain) -> Result<u32, RequestError> {
        let chain = if self.use_indirect {
            let table = self.table();
            chain.write_table(table.addr(), 0);
            Chain::new().indirect(table.addr(), chain.len())
        } else {
            *chain
        };
        self.submit_direct(&chain)
    }

    /// Makes `chain` available as it is, notifies, and waits for the
    /// answer. Returns the used length.
    pub fn submit_direct(&mut self, chain: &Chain) -> Result<u32, RequestError> {
        submit_and_wait(&mut self.transport, &mut self.queue, chain, self.timeout_ms)
    }

    /// One request of type `kind` at `sector` moving `data`.
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[Buffer],
        device_writes: bool,
    ) -> Result<Done, RequestError> {
        self.prepare(kind, sector);
        let chain = self.chain(data, device_writes);
        let len = self.submit(&chain)?;
        Ok(Done {
            status: self.scratch.byte(STATUS),
            len,
        })
    }

    pub fn read(&mut self, sector: u64, data: &[Buffer]) -> Result<Done, RequestError> {
        self.request(T_IN, sector, data, true)
    }

    pub fn write(&mut self, sector: u64, data: &[Buffer]) -> Result<Done, RequestError> {
        self.request(T_OUT, sector, data, false)
    }

    pub fn flush(&mut self) -> Result<Done, RequestError> {
        self.request(T_FLUSH, 0, &[], false)
    }

    pub fn get_id(&mut self, id: Buffer) -> Result<Done, RequestError> {
        self.request(T_GET_ID, 0, &[id], true)
    }

    /// DISCARD or WRITE_ZEROES of one range.
    pub fn discard_or_zero(
        &mut self,
        kind: u32,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<Done, RequestError> {
        let segment = self.scratch.slice(SEGMENTS, 16);
        segment.put_u64(0, sector);
        segment.put_u32(8, sectors);
        segment.put_u32(12, u32::from(unmap));
        self.request(kind, 0, &[segment], false)
    }
}
