//! A virtio-mmio version 2 driver (virtio 1.2, sections 2–4.2) for ring 3:
//! device discovery from the kernel command line, the status and feature
//! negotiation handshake, split virtqueues (`queue`) and the block,
//! entropy and console protocols (`blk`, and the programs).
//!
//! Devices are found the way Linux finds them with
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`: one `virtio_mmio.device=` entry per
//! device, `<size>@<base>:<gsi>[:<id>]` (size and base with an optional
//! K/M/G suffix and `0x` prefix), in the order the VMM appended them.
//! Completion is found by polling the used ring. A device whose GSI is an
//! IOAPIC pin (below 24, not the serial port's 4) also gets that pin
//! unmasked: the ring-0 stub counts each interrupt, the driver reads and
//! acknowledges `InterruptStatus` when the count moved, and a program checks
//! at its end that interrupts arrived (waiting a bounded time for the first,
//! since injection may lag on a busy host).

pub mod blk;
pub mod queue;

use core::fmt;

use crate::boot_params::BootParams;
use crate::cmdline::{parse_number, CommandLine};
use crate::interrupts::irq_count;
use crate::mmio::{checked_window, MmioRegion};
use crate::{irq, serial, tsc};

use queue::{Chain, Virtqueue, Wait};

/// The command-line key a VMM gives each virtio-mmio device under.
pub const CMDLINE_KEY: &str = "virtio_mmio.device";
/// "virt", little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Most devices the driver looks at.
pub const MAX_DEVICES: usize = 16;

/// Register offsets (virtio 1.2, table 4.1).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Device-independent feature bits.
pub mod feature {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// `InterruptStatus` bits.
pub mod isr {
    pub const USED_BUFFER: u32 = 1;
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Device type IDs.
pub mod device_id {
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
}

/// Name of a device type, for messages.
pub fn type_name(id: u32) -> &'static str {
    match id {
        0 => "placeholder",
        1 => "net",
        device_id::BLOCK => "block",
        device_id::CONSOLE => "console",
        device_id::RNG => "rng",
        5 => "balloon",
        19 => "vsock",
        _ => "unknown",
    }
}

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy)]
pub struct Slot {
    pub size: u64,
    pub base: u64,
    pub gsi: u32,
}

/// Parses `<size>@<base>:<gsi>[:<id>]`.
pub fn parse_slot(text: &str) -> Option<Slot> {
    let (size, rest) = text.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let gsi = rest.split(':').next()?;
    Some(Slot {
        size: parse_size(size)?,
        base: parse_size(base)?,
        gsi: gsi.parse().ok()?,
    })
}

/// A number with an optional K, M or G suffix (Linux's `memparse`).
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

/// What is at one slot.
#[derive(Clone, Copy)]
pub struct Found {
    pub slot: Slot,
    pub device_id: u32,
    pub vendor_id: u32,
}

/// Why the devices on the command line cannot be used.
pub enum DiscoverError<'a> {
    Malformed(&'a str),
    TooMany,
    NotMmio(Slot, &'static str),
    BadMagic(Slot, u32),
    BadVersion(Slot, u32),
}

impl fmt::Display for DiscoverError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(text) => write!(
                f,
                "{CMDLINE_KEY}={text} is not <size>@<base>:<gsi>"
            ),
            Self::TooMany => write!(f, "more than {MAX_DEVICES} virtio-mmio devices"),
            Self::NotMmio(slot, why) => write!(f, "virtio-mmio window at {:#x} {why}", slot.base),
            Self::BadMagic(slot, magic) => write!(
                f,
                "virtio-mmio device at {:#x}: magic {magic:#x}, expected {MAGIC:#x} (\"virt\")",
                slot.base
            ),
            Self::BadVersion(slot, version) => write!(
                f,
                "virtio-mmio device at {:#x}: version {version}, expected 2 (legacy devices are not supported)",
                slot.base
            ),
        }
    }
}

/// The devices the command line names, in its order.
pub struct Devices {
    found: [Option<Found>; MAX_DEVICES],
}

impl Devices {
    /// Every present device (device ID 0 is an empty slot and skipped).
    pub fn iter(&self) -> impl Iterator<Item = Found> + '_ {
        self.found
            .iter()
            .flatten()
            .copied()
            .filter(|f| f.device_id != 0)
    }

    /// The devices of type `id`, in command-line order.
    pub fn of_type(&self, id: u32) -> impl Iterator<Item = Found> + '_ {
        self.iter().filter(move |f| f.device_id == id)
    }
}

/// Reads the command line's `virtio_mmio.device=` entries and checks each
/// window: identity-mapped, not RAM, magic "virt", version 2.
pub fn discover<'a>(
    cmdline: &CommandLine<'a>,
    params: &BootParams,
) -> Result<Devices, DiscoverError<'a>> {
    let mut devices = Devices {
        found: [None; MAX_DEVICES],
    };
    for (i, text) in cmdline.values(CMDLINE_KEY).enumerate() {
        let slot = parse_slot(text).ok_or(DiscoverError::Malformed(text))?;
        if i == MAX_DEVICES {
            return Err(DiscoverError::TooMany);
        }
        let regs = checked_window(params, slot.base, slot.size.max(0x200))
            .map_err(|why| DiscoverError::NotMmio(slot, why))?;
        let magic = regs.read32(reg::MAGIC_VALUE);
        if magic != MAGIC {
            return Err(DiscoverError::BadMagic(slot, magic));
        }
        let version = regs.read32(reg::VERSION);
        if version != 2 {
            return Err(DiscoverError::BadVersion(slot, version));
        }
        devices.found[i] = Some(Found {
            slot,
            device_id: regs.read32(reg::DEVICE_ID),
            vendor_id: regs.read32(reg::VENDOR_ID),
        });
    }
    Ok(devices)
}

/// Why a device could not be brought up.
pub enum InitError {
    /// FEATURES_OK did not stick: the device refused the feature set.
    FeaturesRefused { offered: u64, accepted: u64 },
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1 { offered: u64 },
    /// A queue the device needs is unavailable (QueueNumMax 0) or busy.
    Queue { index: u16, why: &'static str },
    /// The device set DEVICE_NEEDS_RESET (or did not take DRIVER_OK).
    Status { status: u32 },
    /// The status register did not read 0 after a reset.
    ResetStuck { status: u32 },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FeaturesRefused { offered, accepted } => write!(
                f,
                "FEATURES_OK refused (offered {offered:#x}, accepted {accepted:#x})"
            ),
            Self::NoVersion1 { offered } => {
                write!(f, "VIRTIO_F_VERSION_1 not offered (features {offered:#x})")
            }
            Self::Queue { index, why } => write!(f, "queue {index}: {why}"),
            Self::Status { status } => write!(f, "status {status:#x} after DRIVER_OK"),
            Self::ResetStuck { status } => {
                write!(f, "status reads {status:#x} after a reset, not 0")
            }
        }
    }
}

/// Interrupt bookkeeping of one device.
#[derive(Clone, Copy, Default)]
pub struct IrqStats {
    /// Requests whose completion the driver saw.
    pub completions: u64,
    /// `InterruptStatus` reads that had the used-buffer bit.
    pub isr_used: u64,
    /// The line's count when the transport was made.
    base: u64,
    /// The line's count at the last look.
    seen: u64,
}

/// One virtio-mmio device's registers.
pub struct Transport {
    regs: MmioRegion,
    pub slot: Slot,
    /// The IOAPIC pin the device's GSI arrives on, if it is one (and enabled).
    irq: Option<u8>,
    pub irq_stats: IrqStats,
    /// Whether the last negotiation accepted `VIRTIO_RING_F_EVENT_IDX`.
    event_idx: core::cell::Cell<bool>,
}

impl Transport {
    /// The device at `found`, with its interrupt unmasked on the IOAPIC
    /// when `use_irq` and its GSI is an IOAPIC pin other than the serial
    /// port's.
    pub fn new(found: Found, params: &BootParams, use_irq: bool) -> Self {
        let regs = match checked_window(params, found.slot.base, 0x200) {
            Ok(regs) => regs,
            Err(why) => panic!(
                "window {:#x} was checked at discovery: {why}",
                found.slot.base
            ),
        };
        let irq = u8::try_from(found.slot.gsi)
            .ok()
            .filter(|&gsi| use_irq && usize::from(gsi) < irq::IRQ_LINES && gsi != serial::IRQ);
        if let Some(irq) = irq {
            irq::unmask(irq);
        }
        let count = irq.map_or(0, irq_count);
        Self {
            regs,
            slot: found.slot,
            irq,
            irq_stats: IrqStats {
                base: count,
                seen: count,
                ..IrqStats::default()
            },
            event_idx: core::cell::Cell::new(false),
        }
    }

    /// Whether the device and driver use `VIRTIO_RING_F_EVENT_IDX`.
    pub fn event_idx(&self) -> bool {
        self.event_idx.get()
    }

    /// The IOAPIC pin used, if any.
    pub fn irq(&self) -> Option<u8> {
        self.irq
    }

    pub fn read(&self, offset: u64) -> u32 {
        self.regs.read32(offset)
    }

    pub fn write(&self, offset: u64, value: u32) {
        self.regs.write32(offset, value)
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.read(reg::STATUS)
    }

    pub fn set_status(&self, value: u32) {
        self.write(reg::STATUS, value)
    }

    /// Writes 0 to the status register and waits until it reads 0.
    pub fn reset(&self) -> Result<(), InitError> {
        self.set_status(0);
        for _ in 0..1000 {
            let status = self.status();
            if status == 0 {
                return Ok(());
            }
        }
        Err(InitError::ResetStuck {
            status: self.status(),
        })
    }

    /// All 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Writes the driver's feature pages 0 and 1.
    pub fn write_driver_features(&self, features: u64) {
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accept `wanted & offered` (which
    /// must include VERSION_1) and set FEATURES_OK, checking it stuck.
    /// Returns the accepted features; queues come next, then
    /// [`driver_ok`](Self::driver_ok).
    pub fn begin_init(&self, wanted: u64) -> Result<u64, InitError> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if offered & feature::VERSION_1 == 0 {
            return Err(InitError::NoVersion1 { offered });
        }
        let accepted = (wanted | feature::VERSION_1) & offered;
        self.event_idx.set(accepted & feature::RING_EVENT_IDX != 0);
        self.write_driver_features(accepted);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            // Giving up on the device, as the spec asks.
            self.set_status(self.status() | status::FAILED);
            return Err(InitError::FeaturesRefused { offered, accepted });
        }
        Ok(accepted)
    }

    /// The largest size of queue `index` (0: the queue does not exist).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.read(reg::QUEUE_NUM_MAX).min(u32::from(u16::MAX)) as u16
    }

    /// Programs queue `index` with `size` entries at the given ring
    /// addresses and sets QueueReady. No checks: hostile tests use it too.
    pub fn setup_queue_raw(&self, index: u16, size: u32, desc: u64, driver: u64, device: u64) {
        self.write(reg::QUEUE_SEL, u32::from(index));
        self.write(reg::QUEUE_NUM, size);
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER_LOW, driver as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(reg::QUEUE_DEVICE_LOW, device as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.write(reg::QUEUE_READY, 1);
    }

    /// Hands `queue` (freshly reset) to the device.
    pub fn setup_queue(&self, queue: &Virtqueue) -> Result<(), InitError> {
        let index = queue.index();
        self.write(reg::QUEUE_SEL, u32::from(index));
        if self.read(reg::QUEUE_READY) != 0 {
            return Err(InitError::Queue {
                index,
                why: "QueueReady is already set",
            });
        }
        let max = self.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err(InitError::Queue {
                index,
                why: "not available (QueueNumMax 0)",
            });
        }
        if u32::from(queue.size()) > max {
            return Err(InitError::Queue {
                index,
                why: "larger than QueueNumMax",
            });
        }
        let (desc, driver, device) = queue.addresses();
        self.setup_queue_raw(index, u32::from(queue.size()), desc, driver, device);
        if self.read(reg::QUEUE_READY) != 1 {
            return Err(InitError::Queue {
                index,
                why: "QueueReady does not read back 1",
            });
        }
        Ok(())
    }

    /// Sets DRIVER_OK and checks the device took it without needing a reset.
    pub fn driver_ok(&self) -> Result<(), InitError> {
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.set_status(all);
        let status = self.status();
        if status & status::DEVICE_NEEDS_RESET != 0 || status & all != all {
            return Err(InitError::Status { status });
        }
        Ok(())
    }

    /// Writes QueueNotify.
    pub fn notify(&self, queue: u16) {
        self.write(reg::QUEUE_NOTIFY, u32::from(queue));
    }

    /// Reads InterruptStatus and acknowledges every bit set.
    pub fn ack_interrupt(&self) -> u32 {
        let isr = self.read(reg::INTERRUPT_STATUS);
        if isr != 0 {
            self.write(reg::INTERRUPT_ACK, isr);
        }
        isr
    }

    /// Called for each completion the driver sees: if interrupts arrived
    /// on the device's line since the last look, reads and acknowledges
    /// InterruptStatus. Completion itself is polled, so nothing waits here.
    pub fn note_completion(&mut self) {
        self.irq_stats.completions += 1;
        self.look_for_interrupts();
    }

    fn look_for_interrupts(&mut self) {
        let Some(irq) = self.irq else {
            return;
        };
        let now = irq_count(irq);
        if now != self.irq_stats.seen {
            self.irq_stats.seen = now;
            if self.ack_interrupt() & isr::USED_BUFFER != 0 {
                self.irq_stats.isr_used += 1;
            }
        }
    }

    /// Interrupts taken on the device's line since the transport was made,
    /// after waiting up to `timeout_ms` for the first one if none came yet
    /// (injection may lag on a busy host); acknowledges InterruptStatus.
    /// `None` without an IOAPIC pin.
    pub fn settle_interrupts(&mut self, timeout_ms: u64) -> Option<u64> {
        let irq = self.irq?;
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(timeout_ms);
        while irq_count(irq) == self.irq_stats.base && tsc::now().wrapping_sub(start) < limit {
            core::hint::spin_loop();
        }
        self.look_for_interrupts();
        Some(irq_count(irq) - self.irq_stats.base)
    }

    /// Reads `len` bytes (at most 8) of configuration space at `offset`
    /// with aligned 32-bit accesses, retried until ConfigGeneration is
    /// stable around them.
    pub fn config(&self, offset: u64, len: usize) -> u64 {
        loop {
            let generation = self.read(reg::CONFIG_GENERATION);
            let mut bytes = [0u8; 12];
            let first = offset & !3;
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = self.read(reg::CONFIG + first + 4 * i as u64);
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            if self.read(reg::CONFIG_GENERATION) == generation {
                let skip = (offset - first) as usize;
                let mut value = [0u8; 8];
                value[..len].copy_from_slice(&bytes[skip..skip + len]);
                return u64::from_le_bytes(value);
            }
        }
    }
}

/// Why a request got no answer.
#[derive(Clone, Copy)]
pub enum RequestError {
    /// The device set DEVICE_NEEDS_RESET instead of answering.
    NeedsReset { status: u32 },
    /// No answer in time.
    Timeout(queue::RingState),
    /// The used ring returned a head that was not in flight.
    WrongHead { expected: u16, got: u16 },
    /// The chain does not fit in the queue.
    QueueFull,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeedsReset { status } => write!(f, "device needs reset (status {status:#x})"),
            Self::Timeout(state) => write!(f, "no answer from the device ({state})"),
            Self::WrongHead { expected, got } => {
                write!(f, "used ring returned head {got}, expected {expected}")
            }
            Self::QueueFull => write!(f, "chain does not fit in the queue"),
        }
    }
}

/// Makes `chain` available on `queue`, notifies (if the device wants it),
/// waits for its used element and notes interrupts that arrived. Returns
/// the used length.
pub fn submit_and_wait(
    transport: &mut Transport,
    queue: &mut Virtqueue,
    chain: &Chain,
    timeout_ms: u64,
) -> Result<u32, RequestError> {
    let head = queue.add(chain).ok_or(RequestError::QueueFull)?;
    queue.kick(transport);
    match queue.wait(transport, timeout_ms) {
        Wait::Used { id, len } => {
            transport.note_completion();
            if id != head {
                return Err(RequestError::WrongHead {
                    expected: head,
                    got: id,
                });
            }
            Ok(len)
        }
        Wait::NeedsReset { status } => Err(RequestError::NeedsReset { status }),
        Wait::Timeout(state) => Err(RequestError::Timeout(state)),
    }
}

/// Brings up a device with `queues` (each reset to `size` entries, or the
/// device's maximum if smaller), accepting `wanted` features where
/// offered. Returns the accepted features.
pub fn init_device(
    transport: &Transport,
    wanted: u64,
    queues: &mut [&mut Virtqueue],
    size: u16,
) -> Result<u64, InitError> {
    let accepted = transport.begin_init(wanted)?;
    for queue in queues.iter_mut() {
        let index = queue.index();
        let max = transport.queue_max(index);
        if max == 0 {
            return Err(InitError::Queue {
                index,
                why: "not available (QueueNumMax 0)",
            });
        }
        let size = if max >= size {
            size
        } else {
            1 << (15 - max.leading_zeros())
        };
        queue.reset_for(size, accepted);
        transport.setup_queue(queue)?;
    }
    transport.driver_ok()?;
    Ok(accepted)
}
