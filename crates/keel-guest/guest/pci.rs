//! PCI configuration access and enumeration of bus 0, in ring 3.
//!
//! Configuration space is reached one of two ways, as Linux does: the PC's
//! configuration mechanism #1 (a 32-bit write of `CONFIG_ADDRESS` to port
//! `0xCF8`, then the data at `0xCFC..0xCFF`; Linux's `pci=conf1`, what it
//! uses without ACPI) or the PCI Express ECAM window ([`ECAM_BASE`], what an
//! ACPI MCFG table points at). The command line picks it: `pci=conf1` (the
//! default), `pci=ecam`, or `pci=off` to look for no PCI devices at all.

use crate::boot_params::BootParams;
use crate::cmdline::CommandLine;
use crate::mmio::{checked_window, MmioRegion};
use crate::port::{inb, inl, inw, outl, outw};

/// The command-line key choosing the configuration mechanism.
pub const CMDLINE_KEY: &str = "pci";
/// Where the ECAM window is (Keel's `PCI_ECAM_START`): bus 0 is its first
/// MiB.
pub const ECAM_BASE: u64 = 0xc000_0000;
const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Register offsets.
pub mod reg {
    pub const VENDOR_ID: u16 = 0x00;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const CLASS: u16 = 0x08;
    pub const HEADER_TYPE: u16 = 0x0e;
    pub const BAR0: u16 = 0x10;
    pub const CAPABILITIES: u16 = 0x34;
}

/// Command register bits.
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Status register: the function has a capability list.
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// How configuration space is reached.
#[derive(Clone, Copy)]
pub enum Mechanism {
    /// Ports 0xCF8/0xCFC.
    Ports,
    /// The ECAM window (bus 0's part of it).
    Ecam(MmioRegion),
}

impl Mechanism {
    /// The mechanism `pci=` names (`None` for `pci=off`); `Err` with the
    /// value for anything else, or an ECAM window the guest cannot map.
    pub fn from_cmdline<'a>(cmdline: &CommandLine<'a>, params: &BootParams) -> Result<Option<Self>, &'a str> {
        match cmdline.value(CMDLINE_KEY) {
            None | Some("conf1") => Ok(Some(Mechanism::Ports)),
            Some("off") => Ok(None),
            Some("ecam") => checked_window(params, ECAM_BASE, 1 << 20)
                .map(|window| Some(Mechanism::Ecam(window)))
                .map_err(|_| "ecam"),
            Some(other) => Err(other),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::Ports => "conf1 (ports 0xcf8/0xcfc)",
            Mechanism::Ecam(_) => "ECAM at 0xc0000000",
        }
    }
}

/// A function on bus 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Function {
    pub device: u8,
    pub function: u8,
}

impl core::fmt::Display for Function {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "00:{:02x}.{}", self.device, self.function)
    }
}

/// Configuration space of one function, through one mechanism.
#[derive(Clone, Copy)]
pub struct Config {
    pub mechanism: Mechanism,
    pub function: Function,
}

impl Config {
    fn address(&self, register: u16) -> u32 {
        0x8000_0000
            | u32::from(self.function.device) << 11
            | u32::from(self.function.function) << 8
            | u32::from(register & 0xfc)
    }

    fn ecam_offset(&self, register: u16) -> u64 {
        u64::from(self.function.device) << 15 | u64::from(self.function.function) << 12 | u64::from(register)
    }

    pub fn read32(&self, register: u16) -> u32 {
        match self.mechanism {
            Mechanism::Ports => {
                outl(CONFIG_ADDRESS, self.address(register));
                inl(CONFIG_DATA)
            }
            Mechanism::Ecam(window) => window.read32(self.ecam_offset(register)),
        }
    }

    pub fn read16(&self, register: u16) -> u16 {
        match self.mechanism {
            Mechanism::Ports => {
                outl(CONFIG_ADDRESS, self.address(register));
                inw(CONFIG_DATA + (register & 2))
            }
            Mechanism::Ecam(window) => window.read16(self.ecam_offset(register)),
        }
    }

    pub fn read8(&self, register: u16) -> u8 {
        match self.mechanism {
            Mechanism::Ports => {
                outl(CONFIG_ADDRESS, self.address(register));
                inb(CONFIG_DATA + (register & 3))
            }
            Mechanism::Ecam(window) => window.read8(self.ecam_offset(register)),
        }
    }

    pub fn write32(&self, register: u16, value: u32) {
        match self.mechanism {
            Mechanism::Ports => {
                outl(CONFIG_ADDRESS, self.address(register));
                outl(CONFIG_DATA, value)
            }
            Mechanism::Ecam(window) => window.write32(self.ecam_offset(register), value),
        }
    }

    pub fn write16(&self, register: u16, value: u16) {
        match self.mechanism {
            Mechanism::Ports => {
                outl(CONFIG_ADDRESS, self.address(register));
                outw(CONFIG_DATA + (register & 2), value)
            }
            Mechanism::Ecam(window) => window.write16(self.ecam_offset(register), value),
        }
    }

    /// The memory address BAR `index` holds (64-bit BARs read whole), or
    /// `None` for an I/O BAR or an index past the header's six.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        if index > 5 {
            return None;
        }
        let register = reg::BAR0 + 4 * u16::from(index);
        let low = self.read32(register);
        if low & 1 != 0 {
            return None;
        }
        let high = if low & 0x6 == 0x4 && index < 5 {
            self.read32(register + 4)
        } else {
            0
        };
        Some(u64::from(high) << 32 | u64::from(low & !0xf))
    }

    /// The capabilities, as (ID, offset), at most `MAX_CAPABILITIES` of
    /// them (a looping list ends there).
    pub fn capabilities(&self) -> Capabilities {
        let first = if self.read16(reg::STATUS) & STATUS_CAPABILITIES != 0 {
            self.read8(reg::CAPABILITIES) & 0xfc
        } else {
            0
        };
        Capabilities {
            config: *self,
            next: first,
            left: MAX_CAPABILITIES,
        }
    }
}

/// Most capabilities followed in one list.
const MAX_CAPABILITIES: u8 = 48;

pub struct Capabilities {
    config: Config,
    next: u8,
    left: u8,
}

impl Iterator for Capabilities {
    type Item = (u8, u16);
    fn next(&mut self) -> Option<(u8, u16)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = u16::from(self.next);
        let header = self.config.read16(at);
        self.next = (header >> 8) as u8 & 0xfc;
        Some((header as u8, at))
    }
}

/// What is at one address.
#[derive(Clone, Copy)]
pub struct Present {
    pub config: Config,
    pub vendor: u16,
    pub device: u16,
}

/// Walks bus 0: function 0 of every device, and functions 1–7 of devices
/// whose function 0 says it has more. Calls `found` for each function.
pub fn scan(mechanism: Mechanism, mut found: impl FnMut(Present)) {
    for device in 0..32 {
        for function in 0..8 {
            let config = Config {
                mechanism,
                function: Function { device, function },
            };
            let ids = config.read32(reg::VENDOR_ID);
            if ids as u16 == 0xffff {
                if function == 0 {
                    break;
                }
                continue;
            }
            found(Present {
                config,
                vendor: ids as u16,
                device: (ids >> 16) as u16,
            });
            if function == 0 && config.read8(reg::HEADER_TYPE) & 0x80 == 0 {
                break;
            }
        }
    }
}
