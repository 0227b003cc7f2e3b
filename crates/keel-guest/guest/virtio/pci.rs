//! Finding a virtio-pci device's structures (virtio 1.2, 4.1.4): the vendor
//! capabilities name a BAR, an offset and a length for the common
//! configuration, notifications, the ISR and the device configuration; the
//! MSI-X capability names the vector table.

use crate::boot_params::BootParams;
use crate::mmio::{checked_window, MmioRegion};
use crate::pci::{self, Config, Function, Present, COMMAND_BUS_MASTER, COMMAND_MEMORY};

/// Red Hat's vendor ID.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs: 0x1040 + the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// "No vector".
pub const NO_VECTOR: u16 = 0xffff;

/// Common configuration field offsets.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// The MSI-X capability: where the table is and how big.
#[derive(Clone, Copy)]
pub struct Msix {
    /// The capability's offset in configuration space.
    pub capability: u16,
    pub table: MmioRegion,
    pub vectors: u16,
}

impl Msix {
    /// Points table entry `entry` at `vector` on APIC `apic_id`, unmasked.
    pub fn program(&self, entry: u16, apic_id: u32, vector: u8) {
        let at = 16 * u64::from(entry);
        self.table.write32(at, 0xfee0_0000 | (apic_id & 0xff) << 12);
        self.table.write32(at + 4, 0);
        self.table.write32(at + 8, u32::from(vector));
        self.table.write32(at + 12, 0);
    }

    /// Sets MSI-X enable (and clears the function mask) in `config`.
    pub fn enable(&self, config: &Config) {
        let control = config.read16(self.capability + 2);
        config.write16(self.capability + 2, (control | 0x8000) & !0x4000);
    }
}

/// One virtio-pci function's structures, mapped.
#[derive(Clone, Copy)]
pub struct Device {
    pub config: Config,
    /// Where BAR 0 (or the common configuration's BAR) sits.
    pub bar: u64,
    pub common: MmioRegion,
    pub notify: MmioRegion,
    pub notify_multiplier: u32,
    pub isr: MmioRegion,
    pub device: MmioRegion,
    pub msix: Option<Msix>,
}

impl Device {
    pub fn function(&self) -> Function {
        self.config.function
    }
}

/// The virtio device type of a PCI function, if it is a modern virtio
/// device.
pub fn device_type(present: &Present) -> Option<u32> {
    if present.vendor != VENDOR_ID {
        return None;
    }
    present
        .device
        .checked_sub(DEVICE_ID_BASE)
        .filter(|&t| t < 0x40)
        .map(u32::from)
}

/// Maps the structures the capabilities of `present` describe, and turns
/// on memory decoding and bus mastering.
pub fn probe(present: &Present, params: &BootParams) -> Result<Device, &'static str> {
    let config = present.config;
    let (mut common, mut notify, mut isr, mut device, mut msix) = (None, None, None, None, None);
    let mut notify_multiplier = 0;
    let mut bar = 0;
    for (id, at) in config.capabilities() {
        match id {
            CAP_VENDOR => {
                let cfg_type = config.read8(at + 3);
                let bar_index = config.read8(at + 4);
                let offset = u64::from(config.read32(at + 8));
                let length = u64::from(config.read32(at + 12));
                let slot = match cfg_type {
                    CFG_COMMON => &mut common,
                    CFG_NOTIFY => {
                        notify_multiplier = config.read32(at + 16);
                        &mut notify
                    }
                    CFG_ISR => &mut isr,
                    CFG_DEVICE => &mut device,
                    _ => continue,
                };
                if slot.is_some() {
                    continue; // the first of each type is the one to use
                }
                let base = config.bar_address(bar_index).ok_or("a capability names an I/O or missing BAR")?;
                if cfg_type == CFG_COMMON {
                    bar = base;
                }
                *slot = Some(checked_window(params, base + offset, length.max(4))?);
            }
            CAP_MSIX => {
                let table = config.read32(at + 4);
                let base = config
                    .bar_address((table & 7) as u8)
                    .ok_or("the MSI-X table names an I/O or missing BAR")?;
                let vectors = (config.read16(at + 2) & 0x7ff) + 1;
                msix = Some(Msix {
                    capability: at,
                    table: checked_window(params, base + u64::from(table & !7), 16 * u64::from(vectors))?,
                    vectors,
                });
            }
            _ => {}
        }
    }
    let command = config.read16(pci::reg::COMMAND);
    config.write16(pci::reg::COMMAND, command | COMMAND_MEMORY | COMMAND_BUS_MASTER);
    Ok(Device {
        config,
        bar,
        common: common.ok_or("no common configuration capability")?,
        notify: notify.ok_or("no notification capability")?,
        notify_multiplier,
        isr: isr.ok_or("no ISR capability")?,
        device: device.ok_or("no device configuration capability")?,
        msix,
    })
}
