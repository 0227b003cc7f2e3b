//! The PCI bus: functions by address, configuration access through ECAM and
//! ports `0xCF8`/`0xCFC`, and BAR decoding for memory accesses.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use crate::config::{reg, BarKind, ConfigSpace, HeaderType, PciIds};
use crate::{Error, Result};

/// Devices per bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Functions per device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;
/// The first of the two configuration ports (`CONFIG_ADDRESS`); the data
/// port `CONFIG_DATA` is at `+4`, and the bus answers the 8 ports from here.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// How many ports the configuration mechanism takes.
pub const CONFIG_PORTS: u16 = 8;

/// A function's address: bus, device (0–31), function (0–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0–31.
    pub device: u8,
    /// Function number, 0–7.
    pub function: u8,
}

impl PciAddress {
    /// Bus 0, `device`, `function` (taken modulo 32 and 8).
    pub fn new(device: u8, function: u8) -> Self {
        Self {
            bus: 0,
            device: device % DEVICES_PER_BUS,
            function: function % FUNCTIONS_PER_DEVICE,
        }
    }

    /// The function and register an ECAM offset names: bits 20–27 bus,
    /// 15–19 device, 12–14 function, 0–11 register.
    pub fn from_ecam_offset(offset: u64) -> (Self, u16) {
        let address = Self {
            bus: (offset >> 20) as u8,
            device: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        (address, (offset & 0xfff) as u16)
    }

    /// The function's configuration space offset in an ECAM window.
    pub fn ecam_offset(&self) -> u64 {
        (u64::from(self.bus) << 20) | (u64::from(self.device) << 15) | (u64::from(self.function) << 12)
    }
}

impl fmt::Display for PciAddress {
    /// `BB:DD.F`, as Linux's `lspci` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// A PCI function as a bus drives it.
///
/// The bus takes the function's lock for every access, on the vCPU thread
/// that made it: configuration reads and writes, and accesses to the memory
/// its BARs decode. After each configuration write the bus looks at where
/// the BARs decode ([`ConfigSpace::decoded_memory_bars`]) and calls
/// [`bar_moved`](Self::bar_moved) for each BAR whose decoding changed, so a
/// device can move what it registered elsewhere (ioeventfds).
///
/// Everything reaching these methods comes from the guest: offsets and
/// lengths are unchecked, and nothing may panic.
pub trait PciDevice: Send {
    /// The configuration space, for reads and for the bus's look at BARs.
    fn config(&self) -> &ConfigSpace;

    /// The configuration space, mutable (the bus sets the multi-function
    /// bit and programs BARs through it).
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// The guest reads configuration space. Default: the registers as
    /// stored.
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// The guest writes configuration space. Default: the write masks of
    /// [`ConfigSpace::write`]. Devices override it to act on writes to
    /// their capabilities (MSI-X message control, for instance).
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// The guest reads `data.len()` bytes at `offset` in BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// The guest writes `data` at `offset` in BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` now decodes at `address` (`None`: it no longer decodes, or
    /// not inside the bus's windows). Default: nothing to do.
    fn bar_moved(&mut self, bar: usize, address: Option<u64>) {
        let _ = (bar, address);
    }
}

/// A function shared between the bus and whoever else drives it.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The PCI host bridge, function 00:00.0: a type-0 header with class
/// "host bridge" (0x06_00_00), no BARs; what an OS probing `0xCF8` looks
/// for first. Its IDs are Red Hat's QEMU PCIe host bridge (1b36:0008),
/// which operating systems know to need nothing special.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// Vendor ID (Red Hat, Inc.).
    pub const VENDOR_ID: u16 = 0x1b36;
    /// Device ID (QEMU PCIe host bridge).
    pub const DEVICE_ID: u16 = 0x0008;

    /// A host bridge.
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(
                HeaderType::Device,
                PciIds {
                    vendor: Self::VENDOR_ID,
                    device: Self::DEVICE_ID,
                    revision: 0,
                    class: 0x06_00_00,
                    subsystem_vendor: Self::VENDOR_ID,
                    subsystem: 0x1100,
                },
            ),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Allocates BAR addresses from the 32-bit and 64-bit PCI memory windows,
/// each BAR aligned to its size (as PCI requires).
///
/// 32-bit BARs come from the window below 4 GiB. 64-bit BARs come from it
/// too while it has room, then from the window above 4 GiB, so guests that
/// only map the low 4 GiB (early boot code, Keel's built-in guest) reach
/// every device they can, and a VM with many or large BARs still gets them
/// all.
///
/// # Example
///
/// ```
/// use keel_pci::{BarAllocator, BarSpec};
/// let mut bars = BarAllocator::new((0xe000_0000, 0x1000_0000), (1 << 32, 1 << 36)).unwrap();
/// assert_eq!(bars.allocate(&BarSpec::memory64(0x4000)).unwrap(), 0xe000_0000);
/// assert_eq!(bars.allocate(&BarSpec::memory32(0x1000)).unwrap(), 0xe000_4000);
/// // Too big for the low window: a 64-bit BAR goes high.
/// assert_eq!(bars.allocate(&BarSpec::memory64(1 << 30)).unwrap(), 1 << 32);
/// ```
#[derive(Debug)]
pub struct BarAllocator {
    low: AddressAllocator,
    high: AddressAllocator,
}

impl BarAllocator {
    /// The allocator for a 32-bit window and a 64-bit window, each `(start,
    /// size)`.
    pub fn new(low: (u64, u64), high: (u64, u64)) -> Result<Self> {
        let window = |(start, size): (u64, u64)| {
            AddressAllocator::new(start, size).map_err(|e| Error::InvalidWindow {
                start,
                size,
                reason: e.to_string(),
            })
        };
        Ok(Self {
            low: window(low)?,
            high: window(high)?,
        })
    }

    /// An address for a memory BAR of `spec`.
    pub fn allocate(&mut self, spec: &BarSpec) -> Result<u64> {
        let low = |a: &mut AddressAllocator| a.allocate(spec.size, spec.size, AllocPolicy::FirstMatch);
        let range = match spec.kind {
            BarKind::Memory32 => low(&mut self.low),
            BarKind::Memory64 => low(&mut self.low).or_else(|_| low(&mut self.high)),
            BarKind::Io => {
                return Err(Error::BarSpaceExhausted {
                    size: spec.size,
                    reason: "I/O BARs are not allocated: this bus forwards memory space only".into(),
                })
            }
        };
        range.map(|r| r.start()).map_err(|e| Error::BarSpaceExhausted {
            size: spec.size,
            reason: e.to_string(),
        })
    }
}

use crate::config::BarSpec;

struct Function {
    address: PciAddress,
    device: SharedPciDevice,
}

/// One BAR range the bus decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BarRoute {
    start: u64,
    size: u64,
    function: usize,
    bar: usize,
}

/// A PCI bus (bus 0) behind a host bridge: the functions on it, the
/// configuration mechanisms that reach them, and the memory windows whose
/// accesses it forwards to the BAR that decodes them.
///
/// Put it on a VMM's buses three times (it implements `vm-device`'s
/// [`DeviceMmio`] and [`DevicePio`], dispatching on the address):
///
/// - the ECAM window at its `ecam_base` ([`register`](Self::new) it with its
///   size, 256 MiB for buses 0–255): offset `bus << 20 | device << 15 |
///   function << 12 | register`;
/// - ports [`CONFIG_ADDRESS_PORT`]`..+`[`CONFIG_PORTS`]: the PC's
///   configuration mechanism #1 (a 32-bit `CONFIG_ADDRESS` with bit 31
///   enabling, then `CONFIG_DATA` at `0xCFC..0xCFF` for the dword's bytes);
/// - each memory window BARs are allocated from.
///
/// Functions that do not exist (and other buses) read as all ones, and
/// writes to them are dropped, as a host bridge answers a master abort.
/// Memory accesses that no BAR decodes read as all ones too. If the guest
/// makes two BARs overlap, the one found first (lowest device address,
/// lowest BAR) gets the access; nothing breaks.
///
/// # Example
///
/// See the crate documentation.
pub struct PciBus {
    ecam_base: u64,
    functions: Vec<Function>,
    windows: Vec<(u64, u64)>,
    routes: RwLock<Vec<BarRoute>>,
    config_address: AtomicU32,
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBus")
            .field("ecam_base", &format_args!("{:#x}", self.ecam_base))
            .field(
                "functions",
                &self
                    .functions
                    .iter()
                    .map(|f| f.address.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

fn lock(device: &Mutex<dyn PciDevice>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PciBus {
    /// A bus with a [`HostBridge`] at 00:00.0, its ECAM window at
    /// `ecam_base`, forwarding the memory `windows` (`(start, size)` each)
    /// to BARs.
    pub fn new(ecam_base: u64, windows: &[(u64, u64)]) -> Self {
        let mut bus = Self {
            ecam_base,
            functions: Vec::new(),
            windows: windows.to_vec(),
            routes: RwLock::new(Vec::new()),
            config_address: AtomicU32::new(0),
        };
        bus.functions.push(Function {
            address: PciAddress::new(0, 0),
            device: Arc::new(Mutex::new(HostBridge::new())),
        });
        bus
    }

    /// The ECAM window's base address.
    pub fn ecam_base(&self) -> u64 {
        self.ecam_base
    }

    /// Puts `device` on the bus at the next free address — function 0 of
    /// devices 1–31 first, then functions 1–7 of those devices (setting the
    /// multi-function bit of function 0) — gives each of its memory BARs an
    /// address from `bars` and enables memory decoding, as firmware does.
    /// Returns the address.
    pub fn add_device(&mut self, device: SharedPciDevice, bars: &mut BarAllocator) -> Result<PciAddress> {
        let address = self.next_free().ok_or(Error::BusFull)?;
        {
            let mut d = lock(&device);
            let config = d.config_mut();
            for index in 0..config.bar_count() {
                let Some(spec) = config.bar(index).filter(|s| s.kind != BarKind::Io) else {
                    continue;
                };
                let base = bars.allocate(&spec)?;
                config.set_bar_address(index, base)?;
            }
            let command = config.read_u16(reg::COMMAND) | crate::config::command::MEMORY_SPACE;
            config.set_u16(reg::COMMAND, command);
        }
        if address.function > 0 {
            if let Some(mut first) = self.device_at(PciAddress::new(address.device, 0)) {
                first.config_mut().set_multifunction(true);
            }
        }
        let index = self.functions.len();
        self.functions.push(Function {
            address,
            device: device.clone(),
        });
        self.update_routes(index);
        log::debug!("PCI {address}: added");
        Ok(address)
    }

    /// The functions on the bus, host bridge included, in the order added.
    pub fn addresses(&self) -> Vec<PciAddress> {
        self.functions.iter().map(|f| f.address).collect()
    }

    fn next_free(&self) -> Option<PciAddress> {
        (0..FUNCTIONS_PER_DEVICE)
            .flat_map(|function| (1..DEVICES_PER_BUS).map(move |device| PciAddress::new(device, function)))
            .find(|a| self.function_at(*a).is_none())
    }

    fn function_at(&self, address: PciAddress) -> Option<usize> {
        self.functions.iter().position(|f| f.address == address)
    }

    /// The device of function `index` (from `function_at` or a route),
    /// locked.
    fn device(&self, index: usize) -> Option<MutexGuard<'_, dyn PciDevice + 'static>> {
        self.functions.get(index).map(|f| lock(&f.device))
    }

    /// The device at `address`, locked.
    fn device_at(&self, address: PciAddress) -> Option<MutexGuard<'_, dyn PciDevice + 'static>> {
        self.functions
            .iter()
            .find(|f| f.address == address)
            .map(|f| lock(&f.device))
    }

    /// The guest reads configuration space of `address` at `register`.
    pub fn read_config(&self, address: PciAddress, register: u16, data: &mut [u8]) {
        match self.device_at(address) {
            Some(mut device) => device.read_config(register, data),
            None => data.fill(0xff),
        }
    }

    /// The guest writes configuration space of `address` at `register`;
    /// BARs whose decoding changed are re-routed (and their device told).
    pub fn write_config(&self, address: PciAddress, register: u16, data: &[u8]) {
        let Some(index) = self.function_at(address) else {
            log::debug!("PCI {address}: config write to an absent function dropped");
            return;
        };
        if let Some(mut device) = self.device(index) {
            device.write_config(register, data);
        }
        self.update_routes(index);
    }

    /// After the function at `address` had its configuration space put
    /// back from a snapshot: recomputes where its BARs decode and tells it
    /// (`bar_moved`), as a guest's write to them would.
    pub fn refresh_routes(&self, address: PciAddress) {
        if let Some(index) = self.function_at(address) {
            self.update_routes(index);
        }
    }

    /// Recomputes where function `index`'s BARs decode, updates the routes
    /// and calls `bar_moved` for each BAR whose decoding changed.
    fn update_routes(&self, index: usize) {
        let Some(function) = self.functions.get(index) else {
            return;
        };
        let mut device = lock(&function.device);
        let decoded: Vec<BarRoute> = device
            .config()
            .decoded_memory_bars()
            .into_iter()
            .filter(|&(_, start, size)| self.in_window(start, size))
            .map(|(bar, start, size)| BarRoute {
                start,
                size,
                function: index,
                bar,
            })
            .collect();
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let old: Vec<BarRoute> = routes.iter().filter(|r| r.function == index).copied().collect();
        if old == decoded {
            return;
        }
        routes.retain(|r| r.function != index);
        routes.extend(decoded.iter().copied());
        routes.sort_by_key(|r| (self.functions.get(r.function).map(|f| f.address), r.bar));
        drop(routes);
        let bars = old.iter().chain(&decoded).map(|r| r.bar);
        let mut seen = Vec::new();
        for bar in bars {
            if seen.contains(&bar) {
                continue;
            }
            seen.push(bar);
            let before = old.iter().find(|r| r.bar == bar).map(|r| r.start);
            let after = decoded.iter().find(|r| r.bar == bar).map(|r| r.start);
            if before != after {
                log::debug!(
                    "PCI {}: BAR {bar} decodes at {after:x?} (was {before:x?})",
                    function.address
                );
                device.bar_moved(bar, after);
            }
        }
    }

    fn in_window(&self, start: u64, size: u64) -> bool {
        let Some(end) = start.checked_add(size) else {
            return false;
        };
        self.windows
            .iter()
            .any(|&(w, len)| start >= w && w.checked_add(len).is_some_and(|w_end| end <= w_end))
    }

    /// The BAR that decodes all `len` bytes at `address`, as (function,
    /// bar, offset in it). An access that runs past a BAR's end decodes
    /// nowhere, so devices only ever see accesses inside their BARs.
    fn route(&self, address: u64, len: usize) -> Option<(usize, usize, u64)> {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        routes.iter().find_map(|r| {
            let offset = address.checked_sub(r.start)?;
            let end = offset.checked_add(len as u64)?;
            (end <= r.size).then_some((r.function, r.bar, offset))
        })
    }

    /// A guest read of memory at `address` (inside one of the windows).
    pub fn read_memory(&self, address: u64, data: &mut [u8]) {
        match self
            .route(address, data.len())
            .and_then(|(function, bar, offset)| Some((self.device(function)?, bar, offset)))
        {
            Some((mut device, bar, offset)) => device.read_bar(bar, offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write of memory at `address` (inside one of the windows).
    pub fn write_memory(&self, address: u64, data: &[u8]) {
        if let Some((function, bar, offset)) = self.route(address, data.len()) {
            if let Some(mut device) = self.device(function) {
                device.write_bar(bar, offset, data);
            }
        }
    }

    /// A guest read of the ECAM window at `offset` from its base.
    pub fn read_ecam(&self, offset: u64, data: &mut [u8]) {
        let (address, register) = PciAddress::from_ecam_offset(offset);
        if address.bus != 0 {
            data.fill(0xff);
            return;
        }
        self.read_config(address, register, data);
    }

    /// A guest write of the ECAM window at `offset` from its base.
    pub fn write_ecam(&self, offset: u64, data: &[u8]) {
        let (address, register) = PciAddress::from_ecam_offset(offset);
        if address.bus == 0 {
            self.write_config(address, register, data);
        }
    }

    /// The function and register `CONFIG_ADDRESS` selects for a data access
    /// at `CONFIG_DATA + byte` (`byte` 0–3), if enabled and on this bus.
    fn selected(&self, byte: u16) -> Option<(PciAddress, u16)> {
        let value = self.config_address.load(Ordering::SeqCst);
        if value & 0x8000_0000 == 0 || (value >> 16) & 0xff != 0 {
            return None;
        }
        let address = PciAddress::new(((value >> 11) & 0x1f) as u8, ((value >> 8) & 0x7) as u8);
        // The dword's register, then the byte in it (bits 0–1 of
        // CONFIG_ADDRESS are 0).
        Some((address, (value & 0xfc) as u16 | (byte & 0x3)))
    }

    /// A guest read of port `CONFIG_ADDRESS_PORT + offset`.
    pub fn read_port(&self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.config_address.load(Ordering::SeqCst).to_le_bytes()),
            // CONFIG_DATA: ports 4–7, the dword's bytes 0–3.
            (4..=7, 1 | 2 | 4) => match self.selected(offset & 0x3) {
                Some((address, register)) => self.read_config(address, register, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    /// A guest write of port `CONFIG_ADDRESS_PORT + offset`. Only 32-bit
    /// writes of `CONFIG_ADDRESS` latch an address (reserved bits 24–30 and
    /// 0–1 read back as 0); narrower writes there are other chipset
    /// registers on a PC and are ignored.
    pub fn write_port(&self, offset: u16, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.config_address
                    .store(u32::from_le_bytes(bytes) & 0x80ff_fffc, Ordering::SeqCst);
            }
            (4..=7, 1 | 2 | 4) => {
                if let Some((address, register)) = self.selected(offset & 0x3) {
                    self.write_config(address, register, data);
                }
            }
            _ => log::debug!("PCI config port {offset:#x}: {}-byte write ignored", data.len()),
        }
    }
}

/// The ECAM window on a VMM's MMIO bus: register it at
/// [`PciBus::ecam_base`].
#[derive(Debug, Clone)]
pub struct PciEcam(pub Arc<PciBus>);

impl DeviceMmio for PciEcam {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.read_ecam(offset, data);
    }
    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.write_ecam(offset, data);
    }
}

/// A memory window on a VMM's MMIO bus: register one per window, at the
/// window's start, with its size; accesses go to the BAR that decodes them.
#[derive(Debug, Clone)]
pub struct PciMemoryWindow(pub Arc<PciBus>);

impl DeviceMmio for PciMemoryWindow {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.read_memory(base.0.wrapping_add(offset), data);
    }
    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.write_memory(base.0.wrapping_add(offset), data);
    }
}

/// The configuration ports on a VMM's port bus: register at
/// [`CONFIG_ADDRESS_PORT`] with [`CONFIG_PORTS`] ports.
#[derive(Debug, Clone)]
pub struct PciConfigPorts(pub Arc<PciBus>);

impl DevicePio for PciConfigPorts {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.0.read_port(offset, data);
    }
    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.0.write_port(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{bar_offset, command};

    const LOW: (u64, u64) = (0xe000_0000, 0x1000_0000);
    const HIGH: (u64, u64) = (1 << 32, 1 << 34);

    /// A function with one 64-bit BAR of `size` bytes whose memory records
    /// accesses, and a log of where its BAR moved.
    struct Recorder {
        config: ConfigSpace,
        memory: Vec<u8>,
        moves: Vec<(usize, Option<u64>)>,
    }

    impl Recorder {
        fn shared(size: u64) -> Arc<Mutex<Recorder>> {
            let mut config = ConfigSpace::new(
                HeaderType::Device,
                PciIds {
                    vendor: 0x1af4,
                    device: 0x1042,
                    revision: 1,
                    class: 0x01_80_00,
                    subsystem_vendor: 0x1af4,
                    subsystem: 0x40,
                },
            );
            config.set_bar(0, BarSpec::memory64(size)).unwrap();
            Arc::new(Mutex::new(Recorder {
                config,
                memory: vec![0; size as usize],
                moves: Vec::new(),
            }))
        }
    }

    impl PciDevice for Recorder {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let start = offset as usize;
            data.copy_from_slice(&self.memory[start..start + data.len()]);
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let start = offset as usize;
            self.memory[start..start + data.len()].copy_from_slice(data);
        }
        fn bar_moved(&mut self, bar: usize, address: Option<u64>) {
            self.moves.push((bar, address));
        }
    }

    fn bus() -> (PciBus, BarAllocator) {
        (
            PciBus::new(0xc000_0000, &[LOW, HIGH]),
            BarAllocator::new(LOW, HIGH).unwrap(),
        )
    }

    fn port_config_read(bus: &PciBus, address: PciAddress, register: u8) -> u32 {
        let value = 0x8000_0000
            | (u32::from(address.device) << 11)
            | (u32::from(address.function) << 8)
            | u32::from(register);
        bus.write_port(0, &value.to_le_bytes());
        let mut data = [0u8; 4];
        bus.read_port(4, &mut data);
        u32::from_le_bytes(data)
    }

    fn ecam_read32(bus: &PciBus, address: PciAddress, register: u16) -> u32 {
        let mut data = [0u8; 4];
        bus.read_ecam(address.ecam_offset() + u64::from(register), &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn host_bridge_is_found_at_00_00_0_through_both_mechanisms() {
        let (bus, _) = bus();
        let bridge = PciAddress::new(0, 0);
        assert_eq!(port_config_read(&bus, bridge, 0), 0x0008_1b36);
        assert_eq!(port_config_read(&bus, bridge, 8) >> 8, 0x06_00_00);
        assert_eq!(ecam_read32(&bus, bridge, 0), 0x0008_1b36);
        assert_eq!(bridge.to_string(), "00:00.0");
    }

    #[test]
    fn linux_type1_probe_sees_config_address_read_back() {
        // arch/x86/pci/direct.c, pci_check_type1: outb(0x01, 0xCFB);
        // outl(0x80000000, 0xCF8); inl(0xCF8) == 0x80000000.
        let (bus, _) = bus();
        bus.write_port(3, &[0x01]);
        bus.write_port(0, &0x8000_0000u32.to_le_bytes());
        let mut data = [0u8; 4];
        bus.read_port(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
        // Reserved bits do not stick.
        bus.write_port(0, &0xffff_ffffu32.to_le_bytes());
        bus.read_port(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);
    }

    #[test]
    fn config_data_port_reaches_each_byte_of_the_selected_dword() {
        let (bus, _) = bus();
        bus.write_port(0, &0x8000_0000u32.to_le_bytes());
        let mut word = [0u8; 2];
        bus.read_port(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x0008);
        let mut byte = [0u8];
        bus.read_port(5, &mut byte);
        assert_eq!(byte, [0x1b]);
    }

    #[test]
    fn absent_functions_other_buses_and_disabled_access_read_all_ones() {
        let (bus, _) = bus();
        assert_eq!(port_config_read(&bus, PciAddress::new(5, 0), 0), u32::MAX);
        assert_eq!(ecam_read32(&bus, PciAddress::new(0, 3), 0), u32::MAX);
        let other_bus = PciAddress {
            bus: 1,
            device: 0,
            function: 0,
        };
        assert_eq!(ecam_read32(&bus, other_bus, 0), u32::MAX);
        bus.write_port(0, &0x0000_0000u32.to_le_bytes()); // enable bit clear
        let mut data = [0u8; 4];
        bus.read_port(4, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write_port(0, &0x8001_0000u32.to_le_bytes()); // bus 1
        bus.read_port(4, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn devices_fill_slots_then_functions_and_set_the_multifunction_bit() {
        let (mut bus, mut bars) = bus();
        let mut addresses = Vec::new();
        for _ in 0..33 {
            addresses.push(bus.add_device(Recorder::shared(0x1000), &mut bars).unwrap());
        }
        assert_eq!(addresses[0], PciAddress::new(1, 0));
        assert_eq!(addresses[30], PciAddress::new(31, 0));
        assert_eq!(addresses[31], PciAddress::new(1, 1));
        assert_eq!(addresses[32], PciAddress::new(2, 1));
        let header = |a: PciAddress| (ecam_read32(&bus, a, 0x0c) >> 16) & 0xff;
        assert_eq!(header(PciAddress::new(1, 0)), 0x80);
        assert_eq!(header(PciAddress::new(3, 0)), 0x00);
        assert_eq!(bus.addresses().len(), 34);
    }

    #[test]
    fn the_bus_is_full_at_248_functions() {
        let (mut bus, mut bars) = bus();
        for _ in 0..31 * 8 {
            bus.add_device(Recorder::shared(16), &mut bars).unwrap();
        }
        let err = bus.add_device(Recorder::shared(16), &mut bars).unwrap_err();
        assert!(matches!(err, Error::BusFull), "{err:?}");
    }

    #[test]
    fn bars_are_allocated_aligned_and_decode_memory_accesses() {
        let (mut bus, mut bars) = bus();
        let a = Recorder::shared(0x4000);
        let b = Recorder::shared(0x1000);
        let at_a = bus.add_device(a.clone(), &mut bars).unwrap();
        let at_b = bus.add_device(b.clone(), &mut bars).unwrap();
        let bar = |at: PciAddress| ecam_read32(&bus, at, 0x10) & !0xf;
        assert_eq!(bar(at_a), 0xe000_0000);
        assert_eq!(bar(at_b), 0xe000_4000);
        assert_eq!(
            ecam_read32(&bus, at_a, 0x04) & 0xffff,
            u32::from(command::MEMORY_SPACE)
        );
        bus.write_memory(0xe000_4010, &0xabcdu32.to_le_bytes());
        assert_eq!(&b.lock().unwrap().memory[0x10..0x14], &0xabcdu32.to_le_bytes());
        let mut data = [0u8; 4];
        bus.read_memory(0xe000_4010, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xabcd);
        // Nothing decodes between the BARs' end and the window's, nor an
        // access that runs past a BAR's end.
        bus.read_memory(0xe000_5000, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.read_memory(0xe000_4ffe, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn guest_sizing_and_moving_a_bar_reroutes_it_and_tells_the_device() {
        let (mut bus, mut bars) = bus();
        let device = Recorder::shared(0x1000);
        let at = bus.add_device(device.clone(), &mut bars).unwrap();
        let cfg = |register: u16, value: u32| {
            bus.write_ecam(at.ecam_offset() + u64::from(register), &value.to_le_bytes())
        };
        // Linux sizes with decoding off, then restores.
        cfg(0x04, 0);
        cfg(0x10, u32::MAX);
        cfg(0x14, u32::MAX);
        assert_eq!(ecam_read32(&bus, at, 0x10), 0xffff_f004);
        cfg(0x10, 0xe100_0000);
        cfg(0x14, 0);
        cfg(0x04, u32::from(command::MEMORY_SPACE));
        assert_eq!(
            device.lock().unwrap().moves,
            [(0, Some(0xe000_0000)), (0, None), (0, Some(0xe100_0000))],
            "placed by the bus, sizing, moved by the guest"
        );
        bus.write_memory(0xe100_0000, &[7]);
        assert_eq!(device.lock().unwrap().memory[0], 7);
        // The old place decodes nothing any more.
        let mut data = [0u8; 1];
        bus.read_memory(0xe000_0000, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn a_bar_moved_outside_the_windows_stops_decoding() {
        let (mut bus, mut bars) = bus();
        let device = Recorder::shared(0x1000);
        let at = bus.add_device(device.clone(), &mut bars).unwrap();
        bus.write_ecam(
            at.ecam_offset() + u64::from(bar_offset(0)),
            &0x0010_0000u32.to_le_bytes(),
        );
        assert_eq!(device.lock().unwrap().moves, [(0, Some(0xe000_0000)), (0, None)]);
        let mut data = [0u8; 4];
        bus.read_memory(0x0010_0000, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn overlapping_bars_give_the_access_to_the_first_device_only() {
        let (mut bus, mut bars) = bus();
        let first = Recorder::shared(0x1000);
        let second = Recorder::shared(0x1000);
        bus.add_device(first.clone(), &mut bars).unwrap();
        let at = bus.add_device(second.clone(), &mut bars).unwrap();
        bus.write_ecam(at.ecam_offset() + 0x10, &0xe000_0000u32.to_le_bytes());
        bus.write_memory(0xe000_0000, &[1]);
        assert_eq!(first.lock().unwrap().memory[0], 1);
        assert_eq!(second.lock().unwrap().memory[0], 0);
    }

    #[test]
    fn bar_allocation_falls_back_to_the_high_window_and_reports_exhaustion() {
        let mut bars = BarAllocator::new((0xe000_0000, 0x2000), (1 << 32, 0x4000)).unwrap();
        assert_eq!(bars.allocate(&BarSpec::memory64(0x2000)).unwrap(), 0xe000_0000);
        assert_eq!(bars.allocate(&BarSpec::memory64(0x2000)).unwrap(), 1 << 32);
        let err = bars.allocate(&BarSpec::memory32(0x1000)).unwrap_err();
        assert!(err.to_string().contains("0x1000"), "{err}");
        assert!(bars.allocate(&BarSpec::memory64(0x4000)).is_err());
    }

    #[test]
    fn random_config_and_memory_traffic_never_panics() {
        let (mut bus, mut bars) = bus();
        for _ in 0..4 {
            bus.add_device(Recorder::shared(0x1000), &mut bars).unwrap();
        }
        let mut state = 0x0123_4567_89ab_cdefu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let r = next();
            let len = [1usize, 2, 4, 8, 3][(r % 5) as usize];
            let value = next().to_le_bytes();
            let mut data = vec![0u8; len];
            match (r >> 8) % 6 {
                0 => bus.write_ecam(next() % (1 << 21), &value[..len]),
                1 => bus.read_ecam(next() % (1 << 28), &mut data),
                2 => bus.write_port((next() % 8) as u16, &value[..len]),
                3 => bus.read_port((next() % 8) as u16, &mut data),
                // Only addresses inside a BAR reach a device through a
                // VMM's window; the recorder trusts its offsets.
                4 => bus.read_memory(LOW.0 + next() % 0x4000, &mut data),
                _ => bus.write_memory(LOW.0 + next() % 0x4000, &value[..len]),
            }
        }
        assert_eq!(port_config_read(&bus, PciAddress::new(0, 0), 0), 0x0008_1b36);
    }
}
