//! The modern virtio-pci transport (virtio 1.2, section 4.1): a virtio
//! device as a PCI function.
//!
//! [`PciTransport`] is a [`keel_pci::PciDevice`]: its configuration space
//! has virtio's vendor-specific capabilities and an MSI-X capability, and
//! one 64-bit memory BAR ([`BAR_SIZE`] bytes) holds every structure:
//!
//! | offset | structure | capability `cfg_type` |
//! |---|---|---|
//! | [`COMMON_CFG_OFFSET`] | common configuration (features, status, queue setup, MSI-X vectors) | 1 |
//! | [`NOTIFY_OFFSET`] | notifications: queue `q` at `+ q ×` [`NOTIFY_OFF_MULTIPLIER`] | 2 |
//! | [`ISR_OFFSET`] | ISR status (read to clear) | 3 |
//! | [`DEVICE_CFG_OFFSET`] | the device's configuration space | 4 |
//! | [`MSIX_TABLE_OFFSET`], [`MSIX_PBA_OFFSET`] | MSI-X table and pending bits | — |
//!
//! plus the PCI configuration access capability (`cfg_type` 5), through
//! which a driver reaches the BAR with configuration cycles only.
//!
//! As with [`crate::MmioTransport`], queue notifications should never exit
//! to the VMM: each queue's eventfd is registered as a KVM ioeventfd on its
//! notification address. Because the guest may move the BAR, the transport
//! does that itself, through a [`NotifyRegistrar`] the VMM gives it, every
//! time the bus reports the BAR moved (and unregisters them when it stops
//! decoding). Interrupts leave through MSI-X: one vector for configuration
//! changes and one per queue, as the driver assigns them
//! (`config_msix_vector`, `queue_msix_vector`), delivered by
//! [`keel_pci::Msix`] through KVM MSI routes and irqfds
//! ([`keel_irq::IrqfdMsiVectors`]). The function has no INTx pin: with
//! MSI-X disabled, the driver sees interrupts only by polling the ISR.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::GuestMemoryMmap;
use keel_irq::MsiVectors;
use keel_pci::{capability_id, BarSpec, ConfigSpace, HeaderType, Msix, MsixLayout, PciDevice, PciIds};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{VirtioDevice, VirtioInterrupt};
use crate::driver_state::{lock, set_high, set_low, DriverState, SignalState};
use crate::{device_type, Error, Result};

/// Red Hat's vendor ID, which virtio devices use.
pub const VENDOR_ID: u16 = 0x1af4;
/// Device ID of a modern (non-transitional) virtio device: this plus the
/// virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// The subsystem ID (0x40 or more for non-transitional devices).
pub const SUBSYSTEM_ID: u16 = 0x40;
/// The BAR all structures live in.
pub const BAR_INDEX: usize = 0;
/// Its size.
pub const BAR_SIZE: u64 = 0x8000;
/// Common configuration structure.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Size of the common configuration structure (without the optional
/// `queue_notify_data` and `queue_reset` fields).
pub const COMMON_CFG_SIZE: u64 = 0x38;
/// ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// The device's configuration space.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Size of the window onto the device's configuration space.
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Most queues a device may have here (the MSI-X table's room, less the
/// configuration vector).
pub const MAX_QUEUES: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize - 1;
/// "No vector": what the driver writes to give a queue or the configuration
/// no interrupt, and what the device reads back for a vector it cannot use.
pub const NO_VECTOR: u16 = 0xffff;

/// `cfg_type` of the virtio capabilities.
mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// Field offsets in the common configuration structure (virtio 1.2,
/// 4.1.4.3), each with its width in the comment.
pub mod common_cfg {
    /// `le32`: which 32 feature bits `DEVICE_FEATURE` shows.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `le32`, read-only: the device's feature bits.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `le32`: which 32 bits `DRIVER_FEATURE` writes.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `le32`: the driver's accepted feature bits.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `le16`: the MSI-X vector for configuration changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `le16`, read-only: how many queues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// `u8`: the device status.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `u8`, read-only: changes with every configuration change.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `le16`: which queue the queue fields below show.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `le16`: the queue's size (its maximum at reset; 0: no such queue).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `le16`: the queue's MSI-X vector.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `le16`: 1 once the queue is set up.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `le16`, read-only: the queue's notification offset (in units of
    /// the notify capability's multiplier).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `le64`: the descriptor table's address.
    pub const QUEUE_DESC: u64 = 0x20;
    /// `le64`: the available ring's address.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `le64`: the used ring's address.
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// ISR status bits.
pub mod isr {
    /// A queue has used buffers (only set with MSI-X disabled).
    pub const QUEUE: u32 = 1;
    /// The device configuration changed (or the device needs a reset).
    pub const CONFIG: u32 = 2;
}

/// Registers and unregisters the queue notification eventfds as KVM
/// ioeventfds, so the transport can follow its BAR wherever the guest moves
/// it. A driver notifies queue `q` by writing `q` as 16 bits at the queue's
/// address (without `VIRTIO_F_NOTIFICATION_DATA`, which Keel does not
/// offer), so the ioeventfd matches that write exactly; any other write
/// there still reaches the transport as an MMIO exit and is forwarded to
/// the same eventfd.
///
/// It is implemented for `Arc<VmFd>` (`KVM_IOEVENTFD`); without one
/// ([`NoIoeventfds`]) every notification reaches the transport as an MMIO
/// exit and is forwarded to the same eventfd.
pub trait NotifyRegistrar: Send {
    /// Starts signalling `event` on 16-bit writes of `queue` to `address`.
    fn register(&mut self, event: &EventFd, address: u64, queue: u16) -> std::io::Result<()>;
    /// Stops it.
    fn unregister(&mut self, event: &EventFd, address: u64, queue: u16) -> std::io::Result<()>;
}

/// KVM ioeventfds: `KVM_IOEVENTFD` for a 2-byte write of the queue index
/// at the address (datamatch), as the virtio-mmio transport's
/// `QueueNotify` ioeventfds match a 4-byte one.
impl NotifyRegistrar for Arc<kvm_ioctls::VmFd> {
    fn register(&mut self, event: &EventFd, address: u64, queue: u16) -> std::io::Result<()> {
        self.register_ioevent(event, &kvm_ioctls::IoEventAddress::Mmio(address), queue)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&mut self, event: &EventFd, address: u64, queue: u16) -> std::io::Result<()> {
        self.unregister_ioevent(event, &kvm_ioctls::IoEventAddress::Mmio(address), queue)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// A [`NotifyRegistrar`] that registers nothing: notifications come as MMIO
/// exits.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIoeventfds;

impl NotifyRegistrar for NoIoeventfds {
    fn register(&mut self, _event: &EventFd, _address: u64, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn unregister(&mut self, _event: &EventFd, _address: u64, _queue: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// A test double for [`NotifyRegistrar`]: keeps the addresses registered
/// now. Clones share them.
#[derive(Debug, Default, Clone)]
pub struct RecordingRegistrar {
    registered: Arc<Mutex<Vec<u64>>>,
}

impl RecordingRegistrar {
    /// Nothing registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// The addresses with an ioeventfd now, in registration order.
    pub fn addresses(&self) -> Vec<u64> {
        self.registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl NotifyRegistrar for RecordingRegistrar {
    fn register(&mut self, _event: &EventFd, address: u64, _queue: u16) -> std::io::Result<()> {
        let mut registered = self.registered.lock().unwrap_or_else(PoisonError::into_inner);
        if registered.contains(&address) {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        registered.push(address);
        Ok(())
    }
    fn unregister(&mut self, _event: &EventFd, address: u64, _queue: u16) -> std::io::Result<()> {
        let mut registered = self.registered.lock().unwrap_or_else(PoisonError::into_inner);
        let before = registered.len();
        registered.retain(|&a| a != address);
        if registered.len() == before {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(())
    }
}

/// MSI-X, and which vector each interrupt cause uses.
#[derive(Debug)]
struct Vectors {
    msix: Msix,
    config: u16,
    queues: Vec<u16>,
}

impl Vectors {
    /// `vector` if the table has it, else [`NO_VECTOR`] (what the driver
    /// reads back to learn the mapping failed).
    fn checked(&self, vector: u16) -> u16 {
        if vector < self.msix.vector_count() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn send(&mut self, vector: u16) -> Result<()> {
        if vector == NO_VECTOR {
            return Ok(());
        }
        Ok(self.msix.signal(vector)?)
    }
}

fn lock_vectors(vectors: &Mutex<Vectors>) -> MutexGuard<'_, Vectors> {
    vectors.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The transport's side of [`VirtioInterrupt`]: MSI-X vectors, with the
/// ISR bits as virtio-pci asks for them.
#[derive(Debug)]
struct PciInterrupt {
    signals: Arc<SignalState>,
    vectors: Arc<Mutex<Vectors>>,
}

impl PciInterrupt {
    fn config_interrupt(&self) -> Result<()> {
        self.signals.isr.fetch_or(isr::CONFIG, Ordering::SeqCst);
        let mut vectors = lock_vectors(&self.vectors);
        let vector = vectors.config;
        vectors.send(vector)
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_used_queue(&self, queue: u16) -> Result<()> {
        let mut vectors = lock_vectors(&self.vectors);
        if !vectors.msix.enabled() {
            self.signals.isr.fetch_or(isr::QUEUE, Ordering::SeqCst);
            return Ok(());
        }
        let vector = vectors
            .queues
            .get(usize::from(queue))
            .copied()
            .unwrap_or(NO_VECTOR);
        vectors.send(vector)
    }

    fn signal_config_change(&self) -> Result<()> {
        self.signals.config_generation.fetch_add(1, Ordering::SeqCst);
        self.config_interrupt()
    }

    fn signal_needs_reset(&self) -> Result<()> {
        self.signals.needs_reset.store(true, Ordering::SeqCst);
        self.config_interrupt()
    }
}

/// A [`PciTransport`]'s part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct PciTransportState {
    /// The configuration space's registers.
    pub config: Vec<u8>,
    /// The MSI-X table and control.
    pub msix: keel_pci::MsixState,
    /// The configuration-change vector.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
    /// The virtio registers and the device's state.
    pub transport: crate::TransportState,
}

/// A virtio device as a PCI function, modern virtio-pci layout (see the
/// [module documentation](self)).
///
/// Everything the guest does is checked: common configuration accesses
/// must have the field's width (64-bit fields also as two 32-bit halves);
/// other widths and offsets read as zero and write nothing. Queue setup
/// follows the same rules as [`crate::MmioTransport`] (changes only before
/// `DRIVER_OK` and while the queue is disabled; rings checked at
/// `DRIVER_OK`, `DEVICE_NEEDS_RESET` if unusable). A vector number the
/// MSI-X table does not have reads back as [`NO_VECTOR`].
///
/// # Example
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use keel_irq::RecordingMsiVectors;
/// use keel_pci::{BarAllocator, PciBus};
/// use keel_virtio::{PciTransport, RecordingRegistrar, Rng};
/// use vm_memory::GuestAddress;
/// use keel_virtio::GuestMemoryMmap;
///
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
/// let vectors = Arc::new(RecordingMsiVectors::new(PciTransport::vectors_needed(&*rng.lock().unwrap())));
/// let ioeventfds = RecordingRegistrar::new();
/// let transport = PciTransport::new(rng, mem, vectors, Box::new(ioeventfds.clone())).unwrap();
///
/// let window = (0xe000_0000, 0x1000_0000);
/// let mut bus = PciBus::new(0xc000_0000, &[window]);
/// let mut bars = BarAllocator::new(window, (1 << 32, 1 << 32)).unwrap();
/// let at = bus.add_device(Arc::new(Mutex::new(transport)), &mut bars).unwrap();
///
/// // virtio's vendor and modern device ID for an entropy device (type 4).
/// let mut id = [0u8; 4];
/// bus.read_ecam(at.ecam_offset(), &mut id);
/// assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
/// // The bus placed the BAR; the queue's ioeventfd followed it.
/// assert_eq!(ioeventfds.addresses(), [0xe000_3000]);
/// ```
pub struct PciTransport {
    config: ConfigSpace,
    state: DriverState,
    vectors: Arc<Mutex<Vectors>>,
    interrupt: Arc<dyn VirtioInterrupt>,
    registrar: Box<dyn NotifyRegistrar>,
    /// Where the notification ioeventfds are registered now.
    notify_base: Option<u64>,
    msix_capability: u16,
    pci_cfg_capability: u16,
}

impl std::fmt::Debug for PciTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("device_type", &self.state.device_type)
            .field("status", &self.state.status())
            .field("notify_base", &self.notify_base)
            .finish_non_exhaustive()
    }
}

/// The PCI class code a virtio device type presents (what `lspci` shows).
fn class_code(device_type: u32) -> u32 {
    match device_type {
        device_type::NET => 0x02_00_00,
        device_type::BLOCK => 0x01_00_00,
        device_type::CONSOLE => 0x07_80_00,
        _ => 0xff_00_00,
    }
}

/// Builds a virtio vendor capability (`struct virtio_pci_cap` after the ID
/// and next pointer), with `extra` appended.
fn virtio_cap(cfg: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // `extra` is at most 4 bytes: the length fits in a u8.
    let cap_len = extra.len().saturating_add(16) as u8;
    let mut body = vec![cap_len, cfg, BAR_INDEX as u8, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

/// Byte `at` of `range` lies inside `[start, start + len)`.
fn overlaps(range: &Range<u16>, start: u16, len: u16) -> bool {
    // Configuration space offsets are below 4096: nothing saturates.
    range.start < start.saturating_add(len) && start < range.end
}

/// Where `offset` is in the `len` bytes of a BAR region at `start`, if it
/// is in it.
fn offset_in(offset: u64, start: u64, len: u64) -> Option<u64> {
    offset.checked_sub(start).filter(|&o| o < len)
}

/// The MSI-X table's size in the BAR: up to the PBA.
const MSIX_TABLE_SIZE: u64 = MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET;
/// The notification region's size in the BAR: up to the MSI-X table.
const NOTIFY_SIZE: u64 = MSIX_TABLE_OFFSET - NOTIFY_OFFSET;
/// [`NOTIFY_OFF_MULTIPLIER`], for BAR offsets.
const NOTIFY_STRIDE: u64 = NOTIFY_OFF_MULTIPLIER as u64;

impl PciTransport {
    /// How many MSI-X vectors a transport for `device` has: one per queue
    /// and one for configuration changes. Create the [`MsiVectors`] with
    /// this many.
    pub fn vectors_needed(device: &dyn VirtioDevice) -> u16 {
        // At most MAX_QUEUES + 1, which fits in a u16.
        device.queue_max_sizes().len().min(MAX_QUEUES).saturating_add(1) as u16
    }

    /// Exposes `device` as a PCI function, with `mem` as guest RAM, its
    /// MSI-X vectors delivered through `vectors` (see
    /// [`vectors_needed`](Self::vectors_needed)) and its queue
    /// notifications registered through `registrar` wherever the BAR
    /// decodes. The BAR gets its address when a bus adds the function.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        vectors: Arc<dyn MsiVectors>,
        registrar: Box<dyn NotifyRegistrar>,
    ) -> Result<Self> {
        let state = DriverState::new("virtio-pci".into(), device, mem)?;
        let queue_count = state.queues.len();
        if queue_count > MAX_QUEUES {
            return Err(Error::TooManyQueues { count: queue_count });
        }
        // Modern virtio-pci device IDs are 0x1040..=0x107f (virtio 1.2,
        // 4.1.2.1): types 0 to 63.
        let device_id = u16::try_from(state.device_type)
            .ok()
            .filter(|&t| t < 0x40)
            .and_then(|t| DEVICE_ID_BASE.checked_add(t))
            .ok_or(Error::NoPciDeviceId {
                device_type: state.device_type,
            })?;
        let mut config = ConfigSpace::new(
            HeaderType::Device,
            PciIds {
                vendor: VENDOR_ID,
                device: device_id,
                revision: 1,
                class: class_code(state.device_type),
                subsystem_vendor: VENDOR_ID,
                subsystem: SUBSYSTEM_ID,
            },
        );
        config.set_bar(BAR_INDEX, BarSpec::memory64(BAR_SIZE))?;
        // At most MAX_QUEUES (checked above) registers.
        let notify_len = (queue_count.max(1) as u64).saturating_mul(u64::from(NOTIFY_OFF_MULTIPLIER));
        for (cfg, offset, length, extra) in [
            (cfg_type::COMMON, COMMON_CFG_OFFSET, COMMON_CFG_SIZE, &[][..]),
            (
                cfg_type::NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes()[..],
            ),
            (cfg_type::ISR, ISR_OFFSET, 1, &[][..]),
            (cfg_type::DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, &[][..]),
        ] {
            config.add_capability(
                capability_id::VENDOR_SPECIFIC,
                &virtio_cap(cfg, offset, length, extra),
                &[],
            )?;
        }
        // The PCI configuration access capability: bar, offset, length
        // and data are the driver's to write.
        // (18 bytes: `add_capability` refuses a mask of another length.)
        let body = virtio_cap(cfg_type::PCI, 0, 0, &[0; 4]);
        let mut writable = [0u8; 18];
        writable[2] = 0xff; // bar
        writable[6..18].fill(0xff); // offset, length, data
        let pci_cfg_capability = config.add_capability(capability_id::VENDOR_SPECIFIC, &body, &writable)?;

        // At most MAX_QUEUES + 1 (checked above), which fits in a u16.
        let vector_count = queue_count.saturating_add(1) as u16;
        let mut msix = Msix::new(
            vector_count.min(vectors.count().max(1)),
            MsixLayout {
                table_bar: BAR_INDEX as u8,
                table_offset: MSIX_TABLE_OFFSET as u32,
                pba_bar: BAR_INDEX as u8,
                pba_offset: MSIX_PBA_OFFSET as u32,
            },
            vectors,
        );
        let msix_capability = msix.add_capability(&mut config)?;
        let vectors = Arc::new(Mutex::new(Vectors {
            msix,
            config: NO_VECTOR,
            queues: vec![NO_VECTOR; queue_count],
        }));
        let interrupt = Arc::new(PciInterrupt {
            signals: state.signals.clone(),
            vectors: vectors.clone(),
        });
        Ok(Self {
            config,
            state,
            vectors,
            interrupt,
            registrar,
            notify_base: None,
            msix_capability,
            pci_cfg_capability,
        })
    }

    /// For a snapshot, while the VM is paused: the configuration space
    /// (BARs, command, capabilities), the MSI-X table, which vector each
    /// cause uses, and the virtio registers with the device's state.
    /// Fails, naming the device, for a device that cannot be saved.
    pub fn save_state(&self) -> Result<PciTransportState> {
        let transport = self.state.save_state()?;
        let vectors = lock_vectors(&self.vectors);
        Ok(PciTransportState {
            config: self.config.save_registers(),
            msix: vectors.msix.save_state(),
            config_vector: vectors.config,
            queue_vectors: vectors.queues.clone(),
            transport,
        })
    }

    /// Puts a saved state into this new transport (same device type, built
    /// the same way) and re-activates the device where its queues left
    /// off. The bus must then route the BAR where the state has it
    /// (`PciBus::refresh_routes`), which also moves the notification
    /// ioeventfds there. Nothing changes if the state does not fit.
    pub fn restore_state(&mut self, state: &PciTransportState) -> Result<()> {
        let mismatch = |reason: String| Error::StateMismatch {
            transport: "virtio-pci".into(),
            reason,
        };
        {
            let vectors = lock_vectors(&self.vectors);
            if state.queue_vectors.len() != vectors.queues.len() {
                return Err(mismatch(format!(
                    "{} queue vectors saved, the device has {} queues",
                    state.queue_vectors.len(),
                    vectors.queues.len()
                )));
            }
        }
        let mut config = self.config.clone();
        config
            .restore_registers(&state.config)
            .map_err(|e| mismatch(e.to_string()))?;
        self.state.restore_state(&state.transport, &self.interrupt)?;
        self.config = config;
        let mut vectors = lock_vectors(&self.vectors);
        vectors.config = vectors.checked(state.config_vector);
        for (slot, &saved) in state.queue_vectors.iter().enumerate() {
            let checked = vectors.checked(saved);
            if let Some(v) = vectors.queues.get_mut(slot) {
                *v = checked;
            }
        }
        vectors
            .msix
            .restore_state(&state.msix)
            .map_err(|e| mismatch(e.to_string()))?;
        Ok(())
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    /// Whether the device was activated (and not reset since).
    pub fn is_activated(&self) -> bool {
        self.state.is_activated()
    }

    /// Where the notification ioeventfds are registered now (the BAR's
    /// address plus [`NOTIFY_OFFSET`]), if the BAR decodes.
    pub fn notify_base(&self) -> Option<u64> {
        self.notify_base
    }

    fn read_common(&self, offset: u64, len: usize) -> Option<u64> {
        use common_cfg::*;
        let state = &self.state;
        let queue = state.selected_queue();
        let vectors = lock_vectors(&self.vectors);
        let value = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(state.device_features_select),
            (DEVICE_FEATURE, 4) => u64::from(state.device_features_page()),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(state.driver_features_select),
            (DRIVER_FEATURE, 4) => u64::from(state.driver_features_page()),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(vectors.config),
            (NUM_QUEUES, 2) => state.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(state.status() as u8),
            (CONFIG_GENERATION, 1) => u64::from(state.signals.config_generation.load(Ordering::SeqCst) as u8),
            (QUEUE_SELECT, 2) => u64::from(state.queue_select as u16),
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size as u16)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(
                vectors
                    .queues
                    .get(state.queue_select as usize)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            ),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready)),
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| u64::from(state.queue_select as u16)),
            (QUEUE_DESC..COMMON_CFG_SIZE, 4 | 8) if offset.is_multiple_of(len as u64) => {
                let q = queue.map_or(0, |q| match offset & !7 {
                    QUEUE_DESC => q.desc,
                    QUEUE_DRIVER => q.driver,
                    _ => q.device,
                });
                if offset.is_multiple_of(8) {
                    if len == 4 {
                        q & 0xffff_ffff
                    } else {
                        q
                    }
                } else {
                    q >> 32
                }
            }
            _ => return None,
        };
        Some(value)
    }

    fn write_common(&mut self, offset: u64, len: usize, value: u64) {
        use common_cfg::*;
        let v32 = value as u32;
        let v16 = value as u16;
        match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => self.state.device_features_select = v32,
            (DRIVER_FEATURE_SELECT, 4) => self.state.driver_features_select = v32,
            (DRIVER_FEATURE, 4) => self.state.write_driver_features(v32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let mut vectors = lock_vectors(&self.vectors);
                vectors.config = vectors.checked(v16);
            }
            (DEVICE_STATUS, 1) => {
                let interrupt = self.interrupt.clone();
                if self.state.write_status(u32::from(value as u8), &interrupt) {
                    let mut vectors = lock_vectors(&self.vectors);
                    vectors.config = NO_VECTOR;
                    vectors.queues.fill(NO_VECTOR);
                }
            }
            (QUEUE_SELECT, 2) => self.state.queue_select = u32::from(v16),
            (QUEUE_SIZE, 2) => self.state.with_queue_setup(|q| q.size = u32::from(v16)),
            (QUEUE_MSIX_VECTOR, 2) => {
                let select = self.state.queue_select as usize;
                let mut vectors = lock_vectors(&self.vectors);
                let checked = vectors.checked(v16);
                match vectors.queues.get_mut(select) {
                    Some(vector) => *vector = checked,
                    None => keel_ratelimit::warn_limited!(
                        "virtio-pci: MSI-X vector set for missing queue {select}"
                    ),
                }
            }
            (QUEUE_ENABLE, 2) => {
                if v16 == 1 {
                    self.state.set_queue_ready(true);
                } else {
                    keel_ratelimit::warn_limited!(
                        "virtio-pci: queue_enable {v16} written; only 1 is allowed"
                    );
                }
            }
            (QUEUE_DESC..COMMON_CFG_SIZE, 4 | 8) if offset.is_multiple_of(len as u64) => {
                let field = offset & !7;
                let high = !offset.is_multiple_of(8);
                self.state.with_queue_setup(|q| {
                    let target = match field {
                        QUEUE_DESC => &mut q.desc,
                        QUEUE_DRIVER => &mut q.driver,
                        _ => &mut q.device,
                    };
                    match (len, high) {
                        (8, _) => *target = value,
                        (_, false) => set_low(target, v32),
                        (_, true) => set_high(target, v32),
                    }
                });
            }
            _ => {
                log::debug!("virtio-pci: {len}-byte write of {value:#x} at common config {offset:#x} ignored")
            }
        }
    }

    /// Re-registers the notification ioeventfds at `base` (or nowhere).
    fn move_notifications(&mut self, base: Option<u64>) {
        if let Some(old) = self.notify_base.take() {
            for (queue, event) in self.state.queue_events.iter().enumerate() {
                let Some(address) = notify_address(old, queue) else {
                    continue;
                };
                // new() checked that queue indices fit in u16.
                if let Err(e) = self.registrar.unregister(event, address, queue as u16) {
                    keel_ratelimit::warn_limited!(
                        "virtio-pci: cannot unregister the ioeventfd of queue {queue} at {address:#x}: {e}"
                    );
                }
            }
        }
        let Some(base) = base else {
            return;
        };
        for (queue, event) in self.state.queue_events.iter().enumerate() {
            let Some(address) = notify_address(base, queue) else {
                keel_ratelimit::warn_limited!(
                    "virtio-pci: queue {queue}'s notification address overflows past {base:#x}"
                );
                continue;
            };
            if let Err(e) = self.registrar.register(event, address, queue as u16) {
                // Notifications still arrive, as MMIO exits.
                keel_ratelimit::warn_limited!(
                    "virtio-pci: cannot register an ioeventfd for queue {queue} at {address:#x}: {e}"
                );
            }
        }
        self.notify_base = Some(base);
    }

    /// The `(offset, length)` the PCI configuration access capability
    /// selects, if the driver made it a valid 1-, 2- or 4-byte access to
    /// this BAR.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_capability;
        let bar = self.config.read_u32(cap.checked_add(4)?) & 0xff;
        let offset = u64::from(self.config.read_u32(cap.checked_add(8)?));
        let len = self.config.read_u32(cap.checked_add(12)?) as usize;
        let valid = bar as usize == BAR_INDEX
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset.checked_add(len as u64).is_some_and(|end| end <= BAR_SIZE);
        valid.then_some((offset, len))
    }

    /// Where the PCI configuration access capability's data field is in
    /// the configuration space (the capability is in its first 256 bytes).
    fn pci_cfg_data(&self) -> u16 {
        self.pci_cfg_capability.saturating_add(16)
    }
}

/// The address of queue `queue`'s notification register, for the
/// notification region at `base`.
fn notify_address(base: u64, queue: usize) -> Option<u64> {
    (queue as u64)
        .checked_mul(NOTIFY_STRIDE)
        .and_then(|offset| base.checked_add(offset))
}

impl PciDevice for PciTransport {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let data_field = self.pci_cfg_data();
        if overlaps(&(offset..offset.saturating_add(data.len() as u16)), data_field, 4) {
            let mut value = [0u8; 4];
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                // `len` is 1, 2 or 4.
                if let Some(value) = value.get_mut(..len) {
                    self.read_bar(BAR_INDEX, bar_offset, value);
                }
            }
            self.config.set_bytes(data_field, &value);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        if !self.config.write(offset, data) {
            return;
        }
        let written = offset..offset.saturating_add(data.len() as u16);
        if overlaps(&written, self.msix_capability, 12) {
            lock_vectors(&self.vectors).msix.update_control(&self.config);
        }
        let data_field = self.pci_cfg_data();
        if overlaps(&written, data_field, 4) {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut value = [0u8; 4];
                self.config.read(data_field, &mut value);
                // `len` is 1, 2 or 4.
                if let Some(value) = value.get(..len) {
                    self.write_bar(BAR_INDEX, bar_offset, value);
                }
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR_INDEX {
            return;
        }
        let len = data.len();
        if let Some(o) = offset_in(offset, COMMON_CFG_OFFSET, COMMON_CFG_SIZE) {
            if let Some(value) = self.read_common(o, len) {
                let bytes = value.to_le_bytes();
                if let Some(bytes) = bytes.get(..len) {
                    data.copy_from_slice(bytes);
                }
            }
        } else if offset == ISR_OFFSET {
            // Reading clears it.
            let value = self.state.signals.isr.swap(0, Ordering::SeqCst);
            if let Some(first) = data.first_mut() {
                *first = value as u8;
            }
        } else if let Some(o) = offset_in(offset, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE) {
            if matches!(len, 1 | 2 | 4 | 8) {
                self.state.read_config(o, data);
            }
        } else if let Some(o) = offset_in(offset, MSIX_TABLE_OFFSET, MSIX_TABLE_SIZE) {
            lock_vectors(&self.vectors).msix.read_table(o, data);
        } else if let Some(o) = offset.checked_sub(MSIX_PBA_OFFSET) {
            lock_vectors(&self.vectors).msix.read_pba(o, data);
        } else {
            log::debug!("virtio-pci: {len}-byte read at BAR offset {offset:#x} ignored");
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX || data.is_empty() || data.len() > 8 {
            return;
        }
        // Little endian, 1 to 8 bytes (checked above).
        let mut bytes = [0u8; 8];
        for (dst, &src) in bytes.iter_mut().zip(data) {
            *dst = src;
        }
        let value = u64::from_le_bytes(bytes);
        if let Some(o) = offset_in(offset, COMMON_CFG_OFFSET, COMMON_CFG_SIZE) {
            self.write_common(o, data.len(), value);
        } else if let Some(o) = offset_in(offset, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE) {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.state.device).write_config(o, data);
            }
        } else if let Some(o) = offset_in(offset, NOTIFY_OFFSET, NOTIFY_SIZE) {
            // A notification that did not go through an ioeventfd.
            let queue = o / NOTIFY_STRIDE;
            self.state.notify_queue(queue as u32);
        } else if let Some(o) = offset_in(offset, MSIX_TABLE_OFFSET, MSIX_TABLE_SIZE) {
            lock_vectors(&self.vectors).msix.write_table(o, data);
        } else if let Some(o) = offset.checked_sub(MSIX_PBA_OFFSET) {
            lock_vectors(&self.vectors).msix.write_pba(o, data);
        } else {
            log::debug!(
                "virtio-pci: {}-byte write at BAR offset {offset:#x} ignored",
                data.len()
            );
        }
    }

    fn bar_moved(&mut self, bar: usize, address: Option<u64>) {
        if bar == BAR_INDEX {
            self.move_notifications(address.and_then(|a| a.checked_add(NOTIFY_OFFSET)));
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod kvm_tests {
    use super::*;

    /// A write to a registered notification address signals the queue's
    /// eventfd inside KVM; after unregistering, registering the same
    /// address again works (nothing was left behind).
    #[test]
    fn vm_fd_registers_and_unregisters_notification_ioeventfds() {
        let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
        let mut registrar: Box<dyn NotifyRegistrar> = Box::new(vm.clone());
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        registrar.register(&event, 0xe000_3000, 1).unwrap();
        assert!(
            registrar.register(&event, 0xe000_3000, 1).is_err(),
            "registered twice"
        );
        registrar.unregister(&event, 0xe000_3000, 1).unwrap();
        registrar.register(&event, 0xe000_3000, 1).unwrap();
    }
}
