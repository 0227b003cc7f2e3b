//! A virtio driver for ring 3 over both transports — virtio-mmio version 2
//! (virtio 1.2, section 4.2) and modern virtio-pci (section 4.1) — with
//! device discovery, the status and feature negotiation handshake, split
//! virtqueues (`queue`) and the block, entropy and console protocols
//! (`blk`, and the programs). Everything above [`Transport`] is the same
//! for both.
//!
//! virtio-mmio devices are found the way Linux finds them with
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`: one `virtio_mmio.device=` entry
//! per device, `<size>@<base>:<gsi>[:<id>]` (size and base with an optional
//! K/M/G suffix and `0x` prefix), in the order the VMM appended them.
//! virtio-pci devices are found by walking PCI bus 0 (see [`crate::pci`];
//! `pci=conf1|ecam|off`), after the MMIO ones, in bus order.
//!
//! Completion is found by polling the used ring. Interrupts are counted
//! per line by the ring-0 stubs (vector 0x20 + line): a virtio-mmio device
//! whose GSI is an IOAPIC pin (below 24, not the serial port's 4) gets that
//! pin unmasked; a virtio-pci device gets a line no MMIO device uses, and
//! its MSI-X table entries (one for configuration changes, one per queue)
//! all send that line's vector to this CPU. The driver reads and
//! acknowledges the interrupt status when the count moved, and a program
//! checks at its end that interrupts arrived (waiting a bounded time for
//! the first, since injection may lag on a busy host).

pub mod blk;
pub mod pci;
pub mod queue;

use core::fmt;

use core::cell::Cell;
use core::sync::atomic::{AtomicU32, Ordering};

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
pub const MAX_DEVICES: usize = 64;

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
    pub const BALLOON: u32 = 5;
}

/// Name of a device type, for messages.
pub fn type_name(id: u32) -> &'static str {
    match id {
        0 => "placeholder",
        1 => "net",
        device_id::BLOCK => "block",
        device_id::CONSOLE => "console",
        device_id::RNG => "rng",
        device_id::BALLOON => "balloon",
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

/// Where a device is.
#[derive(Clone, Copy)]
pub enum Location {
    /// A virtio-mmio window from the command line.
    Mmio(Slot),
    /// A virtio-pci function.
    Pci(pci::Device),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Mmio(slot) => write!(f, "{:#x} GSI {}", slot.base, slot.gsi),
            Location::Pci(device) => write!(f, "PCI {} BAR {:#x}", device.function(), device.bar),
        }
    }
}

/// What is at one place.
#[derive(Clone, Copy)]
pub struct Found {
    pub location: Location,
    pub device_id: u32,
    pub vendor_id: u32,
}

/// Why the devices cannot be used.
pub enum DiscoverError<'a> {
    Malformed(&'a str),
    TooMany,
    NotMmio(Slot, &'static str),
    BadMagic(Slot, u32),
    BadVersion(Slot, u32),
    BadPciArg(&'a str),
    Pci(crate::pci::Function, &'static str),
}

impl fmt::Display for DiscoverError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(text) => write!(
                f,
                "{CMDLINE_KEY}={text} is not <size>@<base>:<gsi>"
            ),
            Self::TooMany => write!(f, "more than {MAX_DEVICES} virtio devices"),
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
            Self::BadPciArg(value) => write!(
                f,
                "pci={value}: expected conf1, ecam or off (and ecam needs the window at {:#x} mapped)",
                crate::pci::ECAM_BASE
            ),
            Self::Pci(function, why) => write!(f, "virtio-pci device at {function}: {why}"),
        }
    }
}

/// The devices found, virtio-mmio ones first.
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

    /// The devices of type `id`, in discovery order.
    pub fn of_type(&self, id: u32) -> impl Iterator<Item = Found> + '_ {
        self.iter().filter(move |f| f.device_id == id)
    }

    fn push(&mut self, found: Found) -> Result<(), ()> {
        let slot = self.found.iter_mut().find(|f| f.is_none()).ok_or(())?;
        *slot = Some(found);
        Ok(())
    }
}

/// Interrupt lines (0x20 + line is the vector) that virtio-mmio devices'
/// GSIs or virtio-pci devices' MSI-X messages already use, bit per line.
static LINES_IN_USE: AtomicU32 = AtomicU32::new(1 << serial::IRQ);

/// A line for a virtio-pci device's MSI-X messages: the lowest one no
/// device uses yet (above the legacy ISA lines 0–4), or line 5 again when
/// all are taken (then devices share it, and so their counts).
pub fn allocate_line() -> u8 {
    let used = LINES_IN_USE.load(Ordering::Relaxed);
    let line = (5..irq::IRQ_LINES as u8)
        .find(|&l| used & 1 << l == 0)
        .unwrap_or(5);
    LINES_IN_USE.fetch_or(1 << line, Ordering::Relaxed);
    line
}

/// Reads the command line's `virtio_mmio.device=` entries and checks each
/// window (identity-mapped, not RAM, magic "virt", version 2), then walks
/// PCI bus 0 for modern virtio-pci functions and maps their structures.
pub fn discover<'a>(
    cmdline: &CommandLine<'a>,
    params: &BootParams,
) -> Result<Devices, DiscoverError<'a>> {
    let mut devices = Devices {
        found: [None; MAX_DEVICES],
    };
    for text in cmdline.values(CMDLINE_KEY) {
        let slot = parse_slot(text).ok_or(DiscoverError::Malformed(text))?;
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
        if slot.gsi < irq::IRQ_LINES as u32 {
            LINES_IN_USE.fetch_or(1 << slot.gsi, Ordering::Relaxed);
        }
        devices
            .push(Found {
                location: Location::Mmio(slot),
                device_id: regs.read32(reg::DEVICE_ID),
                vendor_id: regs.read32(reg::VENDOR_ID),
            })
            .map_err(|()| DiscoverError::TooMany)?;
    }
    let mechanism = crate::pci::Mechanism::from_cmdline(cmdline, params).map_err(DiscoverError::BadPciArg)?;
    if let Some(mechanism) = mechanism {
        let mut result = Ok(());
        crate::pci::scan(mechanism, |present| {
            let Some(device_id) = pci::device_type(&present) else {
                return;
            };
            if result.is_err() {
                return;
            }
            result = match pci::probe(&present, params) {
                Ok(device) => devices
                    .push(Found {
                        location: Location::Pci(device),
                        device_id,
                        vendor_id: u32::from(present.vendor),
                    })
                    .map_err(|()| DiscoverError::TooMany),
                Err(why) => Err(DiscoverError::Pci(present.config.function, why)),
            };
        });
        result?;
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
    /// An MSI-X vector did not stick (reads back NO_VECTOR): the
    /// configuration vector (`None`) or a queue's.
    Vector { queue: Option<u16> },
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
            Self::Vector { queue: None } => write!(f, "the configuration MSI-X vector reads back NO_VECTOR"),
            Self::Vector { queue: Some(q) } => {
                write!(f, "queue {q}'s MSI-X vector reads back NO_VECTOR")
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

/// Where a transport's registers are.
#[derive(Clone, Copy)]
enum Regs {
    Mmio(MmioRegion),
    Pci(pci::Device),
}

/// How many queues' notification offsets a transport remembers (the rest
/// are read from the device at each notification).
const NOTIFY_CACHE: usize = 4;

/// One virtio device's registers, over either transport.
pub struct Transport {
    regs: Regs,
    pub location: Location,
    /// The interrupt line (IOAPIC pin, or MSI-X vector - 0x20) the
    /// device's interrupts arrive on, if it is used.
    irq: Option<u8>,
    pub irq_stats: IrqStats,
    /// Whether the last negotiation accepted `VIRTIO_RING_F_EVENT_IDX`.
    event_idx: Cell<bool>,
    /// virtio-pci: each queue's notification offset, read at setup.
    notify_offsets: [Cell<Option<u16>>; NOTIFY_CACHE],
}

impl Transport {
    /// The device at `found`. With `use_irq`: a virtio-mmio device whose
    /// GSI is an IOAPIC pin other than the serial port's gets it unmasked;
    /// a virtio-pci device with MSI-X gets a line of its own and every
    /// table entry pointed at it, MSI-X enabled.
    pub fn new(found: Found, params: &BootParams, use_irq: bool) -> Self {
        let (regs, irq) = match found.location {
            Location::Mmio(slot) => {
                let regs = match checked_window(params, slot.base, 0x200) {
                    Ok(regs) => regs,
                    Err(why) => panic!("window {:#x} was checked at discovery: {why}", slot.base),
                };
                let irq = u8::try_from(slot.gsi)
                    .ok()
                    .filter(|&gsi| use_irq && usize::from(gsi) < irq::IRQ_LINES && gsi != serial::IRQ);
                if let Some(irq) = irq {
                    irq::unmask(irq);
                }
                (Regs::Mmio(regs), irq)
            }
            Location::Pci(device) => {
                let irq = match device.msix {
                    Some(msix) if use_irq => {
                        let line = allocate_line();
                        let vector = crate::ring0::IRQ_VECTOR_BASE + line;
                        for entry in 0..msix.vectors {
                            msix.program(entry, irq::apic_id(), vector);
                        }
                        msix.enable(&device.config);
                        Some(line)
                    }
                    _ => None,
                };
                (Regs::Pci(device), irq)
            }
        };
        let count = irq.map_or(0, irq_count);
        Self {
            regs,
            location: found.location,
            irq,
            irq_stats: IrqStats {
                base: count,
                seen: count,
                ..IrqStats::default()
            },
            event_idx: Cell::new(false),
            notify_offsets: Default::default(),
        }
    }

    /// Whether the device and driver use `VIRTIO_RING_F_EVENT_IDX`.
    pub fn event_idx(&self) -> bool {
        self.event_idx.get()
    }

    /// The interrupt line used, if any.
    pub fn irq(&self) -> Option<u8> {
        self.irq
    }

    /// Whether this is a virtio-pci device using MSI-X vectors.
    fn msix(&self) -> bool {
        matches!(self.regs, Regs::Pci(_)) && self.irq.is_some()
    }

    /// Where the device's registers start (the MMIO window, or the BAR).
    pub fn regs_base(&self) -> u64 {
        match self.regs {
            Regs::Mmio(regs) => regs.base(),
            Regs::Pci(device) => device.bar,
        }
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        match self.regs {
            Regs::Mmio(regs) => regs.read32(reg::STATUS),
            Regs::Pci(d) => u32::from(d.common.read8(pci::common::DEVICE_STATUS)),
        }
    }

    pub fn set_status(&self, value: u32) {
        match self.regs {
            Regs::Mmio(regs) => regs.write32(reg::STATUS, value),
            Regs::Pci(d) => d.common.write8(pci::common::DEVICE_STATUS, value as u8),
        }
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
        let page = |n: u32| match self.regs {
            Regs::Mmio(regs) => {
                regs.write32(reg::DEVICE_FEATURES_SEL, n);
                regs.read32(reg::DEVICE_FEATURES)
            }
            Regs::Pci(d) => {
                d.common.write32(pci::common::DEVICE_FEATURE_SELECT, n);
                d.common.read32(pci::common::DEVICE_FEATURE)
            }
        };
        let low = page(0);
        let high = page(1);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Writes the driver's feature pages 0 and 1.
    pub fn write_driver_features(&self, features: u64) {
        for n in 0..2 {
            let bits = (features >> (32 * n)) as u32;
            match self.regs {
                Regs::Mmio(regs) => {
                    regs.write32(reg::DRIVER_FEATURES_SEL, n);
                    regs.write32(reg::DRIVER_FEATURES, bits);
                }
                Regs::Pci(d) => {
                    d.common.write32(pci::common::DRIVER_FEATURE_SELECT, n);
                    d.common.write32(pci::common::DRIVER_FEATURE, bits);
                }
            }
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accept `wanted & offered` (which
    /// must include VERSION_1) and set FEATURES_OK, checking it stuck.
    /// With MSI-X, configuration changes get vector (table entry) 0.
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
        if let (Regs::Pci(d), true) = (self.regs, self.msix()) {
            d.common.write16(pci::common::CONFIG_MSIX_VECTOR, 0);
            if d.common.read16(pci::common::CONFIG_MSIX_VECTOR) != 0 {
                return Err(InitError::Vector { queue: None });
            }
        }
        Ok(accepted)
    }

    /// Selects queue `index` (both transports have a queue select).
    fn select_queue(&self, index: u16) {
        match self.regs {
            Regs::Mmio(regs) => regs.write32(reg::QUEUE_SEL, u32::from(index)),
            Regs::Pci(d) => d.common.write16(pci::common::QUEUE_SELECT, index),
        }
    }

    /// The largest size of queue `index` (0: the queue does not exist).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.select_queue(index);
        match self.regs {
            Regs::Mmio(regs) => regs.read32(reg::QUEUE_NUM_MAX).min(u32::from(u16::MAX)) as u16,
            // queue_size reads the maximum until the driver writes it.
            Regs::Pci(d) => d.common.read16(pci::common::QUEUE_SIZE),
        }
    }

    /// Whether the selected queue reads as ready (enabled).
    fn queue_ready(&self) -> u32 {
        match self.regs {
            Regs::Mmio(regs) => regs.read32(reg::QUEUE_READY),
            Regs::Pci(d) => u32::from(d.common.read16(pci::common::QUEUE_ENABLE)),
        }
    }

    /// Programs queue `index` with `size` entries at the given ring
    /// addresses and sets QueueReady (queue_enable). With MSI-X the queue
    /// gets vector (table entry) `1 + index`, or 0 past the table's end. No
    /// checks: hostile tests use it too.
    pub fn setup_queue_raw(&self, index: u16, size: u32, desc: u64, driver: u64, device: u64) {
        self.select_queue(index);
        match self.regs {
            Regs::Mmio(regs) => {
                regs.write32(reg::QUEUE_NUM, size);
                regs.write32(reg::QUEUE_DESC_LOW, desc as u32);
                regs.write32(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
                regs.write32(reg::QUEUE_DRIVER_LOW, driver as u32);
                regs.write32(reg::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
                regs.write32(reg::QUEUE_DEVICE_LOW, device as u32);
                regs.write32(reg::QUEUE_DEVICE_HIGH, (device >> 32) as u32);
                regs.write32(reg::QUEUE_READY, 1);
            }
            Regs::Pci(d) => {
                let c = d.common;
                c.write16(pci::common::QUEUE_SIZE, size.min(u32::from(u16::MAX)) as u16);
                for (field, value) in [
                    (pci::common::QUEUE_DESC, desc),
                    (pci::common::QUEUE_DRIVER, driver),
                    (pci::common::QUEUE_DEVICE, device),
                ] {
                    c.write32(field, value as u32);
                    c.write32(field + 4, (value >> 32) as u32);
                }
                if let (Some(msix), true) = (d.msix, self.irq.is_some()) {
                    let vector = if index + 1 < msix.vectors { index + 1 } else { 0 };
                    c.write16(pci::common::QUEUE_MSIX_VECTOR, vector);
                }
                if let Some(cache) = self.notify_offsets.get(usize::from(index)) {
                    cache.set(Some(c.read16(pci::common::QUEUE_NOTIFY_OFF)));
                }
                c.write16(pci::common::QUEUE_ENABLE, 1);
            }
        }
    }

    /// Hands `queue` (freshly reset) to the device.
    pub fn setup_queue(&self, queue: &Virtqueue) -> Result<(), InitError> {
        let index = queue.index();
        self.select_queue(index);
        if self.queue_ready() != 0 {
            return Err(InitError::Queue {
                index,
                why: "QueueReady is already set",
            });
        }
        let max = self.queue_max(index);
        if max == 0 {
            return Err(InitError::Queue {
                index,
                why: "not available (QueueNumMax 0)",
            });
        }
        if queue.size() > max {
            return Err(InitError::Queue {
                index,
                why: "larger than QueueNumMax",
            });
        }
        let (desc, driver, device) = queue.addresses();
        self.setup_queue_raw(index, u32::from(queue.size()), desc, driver, device);
        if self.queue_ready() != 1 {
            return Err(InitError::Queue {
                index,
                why: "QueueReady does not read back 1",
            });
        }
        if let (Regs::Pci(d), true) = (self.regs, self.msix()) {
            if d.common.read16(pci::common::QUEUE_MSIX_VECTOR) == pci::NO_VECTOR {
                return Err(InitError::Vector { queue: Some(index) });
            }
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

    /// Notifies queue `queue`: QueueNotify, or the queue's notification
    /// address (its `queue_notify_off` times the multiplier) over PCI.
    pub fn notify(&self, queue: u16) {
        match self.regs {
            Regs::Mmio(regs) => regs.write32(reg::QUEUE_NOTIFY, u32::from(queue)),
            Regs::Pci(d) => {
                let offset = match self.notify_offsets.get(usize::from(queue)).and_then(Cell::get) {
                    Some(offset) => offset,
                    None => {
                        d.common.write16(pci::common::QUEUE_SELECT, queue);
                        d.common.read16(pci::common::QUEUE_NOTIFY_OFF)
                    }
                };
                let at = u64::from(offset) * u64::from(d.notify_multiplier);
                // An offset past the notification area goes nowhere useful;
                // only a hostile test asks for one, and the window check
                // keeps the write inside the mapped gap.
                if at < 0x1000 {
                    d.notify.write16(at, queue);
                }
            }
        }
    }

    /// The interrupt status: `InterruptStatus` over MMIO (left set), the
    /// ISR over PCI (which reading clears).
    pub fn interrupt_status(&self) -> u32 {
        match self.regs {
            Regs::Mmio(regs) => regs.read32(reg::INTERRUPT_STATUS),
            Regs::Pci(d) => u32::from(d.isr.read8(0)),
        }
    }

    /// Reads the interrupt status and acknowledges every bit set.
    pub fn ack_interrupt(&self) -> u32 {
        let isr = self.interrupt_status();
        if let (Regs::Mmio(regs), true) = (self.regs, isr != 0) {
            regs.write32(reg::INTERRUPT_ACK, isr);
        }
        isr
    }

    /// Called for each completion the driver sees: if interrupts arrived
    /// on the device's line since the last look, reads and acknowledges
    /// the interrupt status. Completion itself is polled, so nothing waits
    /// here.
    pub fn note_completion(&mut self) {
        self.irq_stats.completions += 1;
        self.look_for_interrupts();
    }

    /// Takes note of interrupts that arrived since the last look (reading
    /// and acknowledging the interrupt status if any did), so the next
    /// completion only sees newer ones.
    pub fn catch_up_interrupts(&mut self) {
        self.look_for_interrupts();
    }

    fn look_for_interrupts(&mut self) {
        let Some(irq) = self.irq else {
            return;
        };
        let now = irq_count(irq);
        if now != self.irq_stats.seen {
            self.irq_stats.seen = now;
            let isr = self.ack_interrupt();
            // With MSI-X the vector itself says "used buffer".
            if isr & isr::USED_BUFFER != 0 || self.msix() {
                self.irq_stats.isr_used += 1;
            }
        }
    }

    /// Interrupts taken on the device's line since the transport was made,
    /// after waiting up to `timeout_ms` for the first one if none came yet
    /// (injection may lag on a busy host); acknowledges the interrupt
    /// status. `None` without a line.
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

    /// The configuration generation.
    fn config_generation(&self) -> u32 {
        match self.regs {
            Regs::Mmio(regs) => regs.read32(reg::CONFIG_GENERATION),
            Regs::Pci(d) => u32::from(d.common.read8(pci::common::CONFIG_GENERATION)),
        }
    }

    /// Reads `len` bytes (at most 8) of configuration space at `offset`
    /// with aligned 32-bit accesses, retried until the configuration
    /// generation is stable around them.
    pub fn config(&self, offset: u64, len: usize) -> u64 {
        let region = match self.regs {
            Regs::Mmio(regs) => regs.offset(reg::CONFIG),
            Regs::Pci(d) => d.device,
        };
        loop {
            let generation = self.config_generation();
            let mut bytes = [0u8; 12];
            let first = offset & !3;
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = region.read32(first + 4 * i as u64);
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            if self.config_generation() == generation {
                let skip = (offset - first) as usize;
                let mut value = [0u8; 8];
                value[..len].copy_from_slice(&bytes[skip..skip + len]);
                return u64::from_le_bytes(value);
            }
        }
    }
}

impl Transport {
    /// Writes the 32-bit configuration field at `offset` (4-byte aligned):
    /// for the few fields a driver owns, such as the balloon's `actual`.
    pub fn write_config32(&self, offset: u64, value: u32) {
        let region = match self.regs {
            Regs::Mmio(regs) => regs.offset(reg::CONFIG),
            Regs::Pci(d) => d.device,
        };
        region.write32(offset, value);
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
