//! ACPI tables: how a stock kernel learns its CPUs, interrupt controllers,
//! devices and power controls without being told on its command line.
//!
//! [`write_acpi_tables`] builds, from a description of the machine
//! ([`AcpiPlatform`]), a hardware-reduced ACPI platform (ACPI 6.5, built
//! with rust-vmm's `acpi_tables` crate):
//!
//! - **RSDP** at [`ACPI_RSDP_START`] (inside the BIOS area Linux scans, and
//!   also handed over in the zero page / `hvm_start_info`), pointing at the
//!   **XSDT**, which lists the other tables;
//! - **FADT**: `HW_REDUCED_ACPI`; the reset register (a byte write of 0xfe
//!   to the i8042's port 0x64, which resets the VM) and the sleep
//!   control/status registers ([`AcpiSleepRegisters`]) through which the
//!   guest powers off (`SLP_TYP` 5, see `\_S5`);
//! - **MADT**: one local APIC per vCPU, the IOAPIC, and (with a legacy PIC)
//!   the ISA IRQ 0 → GSI 2 override;
//! - **DSDT**: the vCPUs (`ACPI0007`), COM1 (`PNP0501`), the CMOS clock
//!   (`PNP0B00`), every virtio-mmio device as `LNRO0005` with its window
//!   and interrupt, the PCI host bridge (`PNP0A08`) with its bus range and
//!   windows, the ECAM window as motherboard resources (`PNP0C02`), a
//!   generic event device (`ACPI0013`) whose event 0 notifies the power
//!   button (`PNP0C0C`), and `\_S5`;
//! - **MCFG** for the PCI configuration window, when there is PCI.
//!
//! Every table carries a correct checksum; `iasl -d` disassembles the DSDT
//! without errors (tested where `iasl` is installed).
//!
//! ```
//! use keel_boot::{write_acpi_tables, AcpiPlatform};
//! use keel_memory::{GuestLayout, MIB};
//! use vm_memory::Bytes;
//!
//! let layout = GuestLayout::new(64 * MIB).unwrap();
//! let mem = layout.create_memory().unwrap();
//! let rsdp = write_acpi_tables(&mem, &AcpiPlatform::new(2)).unwrap();
//! let mut signature = [0u8; 8];
//! mem.read_slice(&mut signature, rsdp).unwrap();
//! assert_eq!(&signature, b"RSD PTR ");
//! ```

use acpi_tables::aml::{
    self, Device, EISAName, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt,
    Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Package, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use keel_memory::{GuestMemoryMmap, IOAPIC_START, LAPIC_START};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// Where the RSDP goes: the start of the BIOS read-only area that Linux
/// scans for it (`0xE0000..0x100000`), which Keel's e820 map reserves.
pub const ACPI_RSDP_START: GuestAddress = GuestAddress(0x000e_0000);
/// The end of the area the tables may use.
pub const ACPI_TABLES_END: GuestAddress = GuestAddress(0x0010_0000);

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_TABLE_ID: [u8; 8] = *b"KEELVMM ";
const OEM_REVISION: u32 = 1;
/// `SLP_TYP` of S5 (soft off), as `\_S5` tells the guest.
pub const SLEEP_TYPE_S5: u8 = 5;
/// The bit of the GED's event register that means "power button".
pub const GED_EVENT_POWER_BUTTON: u32 = 1;
/// Size of the generic event device's MMIO window.
pub const GED_WINDOW_SIZE: u64 = 0x1000;

/// A legacy port device: its first port, how many, and its ISA interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegacyDevice {
    /// First I/O port.
    pub port: u16,
    /// Number of ports.
    pub ports: u8,
    /// ISA IRQ (and IOAPIC pin), if it interrupts.
    pub irq: Option<u32>,
}

/// One virtio-mmio device: its register window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceWindow {
    /// Guest physical base of the window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// The GSI (IOAPIC pin) it raises.
    pub gsi: u32,
}

/// The PCI host bridge: its configuration window (ECAM) and the windows
/// its devices' BARs live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostBridge {
    /// Guest physical base of the ECAM window (bus 0 at offset 0).
    pub ecam_base: u64,
    /// Last bus number (the window holds `last_bus + 1` MiB).
    pub last_bus: u8,
    /// The 32-bit BAR window, `[start, end)`.
    pub mmio32: (u64, u64),
    /// The 64-bit BAR window above RAM, `[start, end)`, if any.
    pub mmio64: Option<(u64, u64)>,
}

/// The generic event device through which the VMM tells the guest about
/// events (the power button): an MMIO event register the guest reads in
/// `_EVT`, and an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GedWindow {
    /// Guest physical base of its [`GED_WINDOW_SIZE`] window; the event
    /// register is the `u32` at offset 0.
    pub base: u64,
    /// The GSI it raises.
    pub gsi: u32,
}

/// The FADT's sleep control and status registers (I/O ports, one byte
/// each). The guest powers off by writing `SLP_EN | SLP_TYP(5) << 2` to
/// the control register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiSleepRegisters {
    /// Sleep control register port.
    pub control_port: u16,
    /// Sleep status register port.
    pub status_port: u16,
}

/// The default sleep registers: ports 0x600 and 0x601.
pub const DEFAULT_SLEEP_REGISTERS: AcpiSleepRegisters = AcpiSleepRegisters {
    control_port: 0x600,
    status_port: 0x601,
};

/// What the guest should be told about the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcpiPlatform {
    /// Number of vCPUs (APIC IDs 0..vcpus).
    pub vcpus: u8,
    /// Whether a dual 8259 PIC is present (KVM's in-kernel irqchip): sets
    /// `PCAT_COMPAT` and the IRQ 0 → GSI 2 override.
    pub legacy_pic: bool,
    /// 16550 UARTs.
    pub serial_ports: Vec<LegacyDevice>,
    /// The CMOS real-time clock.
    pub rtc: Option<LegacyDevice>,
    /// virtio-mmio devices (`LNRO0005`).
    pub virtio_mmio: Vec<MmioDeviceWindow>,
    /// The PCI host bridge, if any.
    pub pci: Option<PciHostBridge>,
    /// The generic event device (power button), if any.
    pub ged: Option<GedWindow>,
    /// Sleep control and status registers.
    pub sleep: AcpiSleepRegisters,
    /// The reset register: a byte `value` written to I/O `port`.
    pub reset: (u16, u8),
}

impl AcpiPlatform {
    /// `vcpus` CPUs and an IOAPIC, COM1 at 0x3f8 (IRQ 4), the CMOS clock
    /// at 0x70, the default sleep registers and the i8042 reset; no PIC,
    /// no devices, no PCI, no event device.
    pub fn new(vcpus: u8) -> Self {
        Self {
            vcpus,
            legacy_pic: false,
            serial_ports: vec![LegacyDevice {
                port: 0x3f8,
                ports: 8,
                irq: Some(4),
            }],
            rtc: Some(LegacyDevice {
                port: 0x70,
                ports: 2,
                irq: None,
            }),
            virtio_mmio: Vec::new(),
            pci: None,
            ged: None,
            sleep: DEFAULT_SLEEP_REGISTERS,
            reset: (0x64, 0xfe),
        }
    }
}

fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// A four-character ACPI name: `prefix` plus two hex digits.
fn numbered_name(prefix: &str, n: usize) -> String {
    format!("{prefix}{:02X}", n & 0xff)
}

fn resources(children: Vec<&dyn Aml>) -> Vec<u8> {
    bytes_of(&Name::new("_CRS".into(), &ResourceTemplate::new(children)))
}

fn cpu_device(id: u8) -> Vec<u8> {
    let uid = u32::from(id);
    let name = numbered_name("C", usize::from(id));
    // Names must be exactly four characters: "C" + 2 digits + "_".
    let name = format!("{name}_");
    bytes_of(&Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0007"),
            &Name::new("_UID".into(), &uid),
        ],
    ))
}

fn legacy_device(name: &str, hid: &str, uid: u32, device: &LegacyDevice) -> Vec<u8> {
    let io = aml::IO::new(device.port, device.port, 1, device.ports);
    let irq = device
        .irq
        .map(|irq| Interrupt::new(true, true, false, false, irq));
    let mut crs: Vec<&dyn Aml> = vec![&io];
    if let Some(irq) = &irq {
        crs.push(irq);
    }
    let crs = resources(crs);
    let mut body = bytes_of(&Name::new("_HID".into(), &EISAName::new(hid)));
    body.extend(bytes_of(&Name::new("_UID".into(), &uid)));
    body.extend(crs);
    device_raw(name, body)
}

/// `Device(name) { body }` from raw AML.
fn device_raw(name: &str, body: Vec<u8>) -> Vec<u8> {
    struct Raw(Vec<u8>);
    impl Aml for Raw {
        fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
            sink.vec(&self.0);
        }
    }
    bytes_of(&Device::new(name.into(), vec![&Raw(body)]))
}

fn virtio_mmio_device(index: usize, window: &MmioDeviceWindow) -> Vec<u8> {
    // Windows sit below 4 GiB (the device window in the MMIO gap).
    let base = u32::try_from(window.base).unwrap_or(u32::MAX);
    let size = u32::try_from(window.size).unwrap_or(u32::MAX);
    let uid = u32::try_from(index).unwrap_or(u32::MAX);
    let memory = Memory32Fixed::new(true, base, size);
    let irq = Interrupt::new(true, true, false, false, window.gsi);
    let mut body = bytes_of(&Name::new("_HID".into(), &"LNRO0005"));
    body.extend(bytes_of(&Name::new("_UID".into(), &uid)));
    body.extend(resources(vec![&memory, &irq]));
    device_raw(&numbered_name("VR", index), body)
}

fn pci_host_bridge(pci: &PciHostBridge) -> Vec<u8> {
    let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(pci.last_bus));
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let (start32, end32) = pci.mmio32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(start32).unwrap_or(u32::MAX),
        u32::try_from(end32.saturating_sub(1)).unwrap_or(u32::MAX),
        None,
    );
    let mmio64 = pci.mmio64.map(|(start, end)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            end.saturating_sub(1),
            None,
        )
    });
    let mut crs: Vec<&dyn Aml> = vec![&buses, &config_ports, &mmio32];
    if let Some(mmio64) = &mmio64 {
        crs.push(mmio64);
    }
    let mut body = bytes_of(&Name::new("_HID".into(), &EISAName::new("PNP0A08")));
    body.extend(bytes_of(&Name::new("_CID".into(), &EISAName::new("PNP0A03"))));
    body.extend(bytes_of(&Name::new("_ADR".into(), &0u32)));
    body.extend(bytes_of(&Name::new("_SEG".into(), &0u32)));
    body.extend(bytes_of(&Name::new("_UID".into(), &0u32)));
    body.extend(bytes_of(&Name::new("_BBN".into(), &0u32)));
    body.extend(resources(crs));
    let mut out = device_raw("PCI0", body);

    // The ECAM window is the motherboard's: reserved, so Linux trusts MCFG.
    let ecam_size = (u64::from(pci.last_bus) + 1) << 20;
    let ecam = Memory32Fixed::new(
        false,
        u32::try_from(pci.ecam_base).unwrap_or(u32::MAX),
        u32::try_from(ecam_size).unwrap_or(u32::MAX),
    );
    let mut body = bytes_of(&Name::new("_HID".into(), &EISAName::new("PNP0C02")));
    body.extend(bytes_of(&Name::new("_UID".into(), &1u32)));
    body.extend(resources(vec![&ecam]));
    out.extend(device_raw("MRES", body));
    out
}

fn generic_event_device(ged: &GedWindow) -> Vec<u8> {
    let irq = Interrupt::new(true, true, false, false, ged.gsi);
    let base = u32::try_from(ged.base).unwrap_or(u32::MAX);
    let size = 4u32;
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemMemory, &base, &size);
    let field = aml::Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let local0 = aml::Local(0);
    let gdat = aml::Path::new("GDAT");
    let store = aml::Store::new(&local0, &gdat);
    let mask = GED_EVENT_POWER_BUTTON;
    let masked = aml::And::new(&aml::Zero {}, &local0, &mask);
    let is_power = aml::Equal::new(&masked, &mask);
    let power_button = aml::Path::new("\\_SB_.PWRB");
    let notify_value = 0x80u8;
    let notify = Notify::new(&power_button, &notify_value);
    let on_power = If::new(&is_power, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&store, &on_power]);
    let mut body = bytes_of(&Name::new("_HID".into(), &"ACPI0013"));
    body.extend(bytes_of(&Name::new("_UID".into(), &0u32)));
    body.extend(resources(vec![&irq]));
    body.extend(bytes_of(&region));
    body.extend(bytes_of(&field));
    body.extend(bytes_of(&evt));
    let mut out = device_raw("GED_", body);

    let mut body = bytes_of(&Name::new("_HID".into(), &EISAName::new("PNP0C0C")));
    body.extend(bytes_of(&Name::new("_UID".into(), &0u32)));
    out.extend(device_raw("PWRB", body));
    out
}

/// The DSDT's AML body (everything after the table header).
fn dsdt_body(platform: &AcpiPlatform) -> Vec<u8> {
    let mut sb = Vec::new();
    for id in 0..platform.vcpus {
        sb.extend(cpu_device(id));
    }
    for (i, serial) in platform.serial_ports.iter().enumerate() {
        let uid = u32::try_from(i).unwrap_or(u32::MAX).saturating_add(1);
        sb.extend(legacy_device(&numbered_name("CO", i + 1), "PNP0501", uid, serial));
    }
    if let Some(rtc) = &platform.rtc {
        sb.extend(legacy_device("RTC_", "PNP0B00", 0, rtc));
    }
    for (i, window) in platform.virtio_mmio.iter().enumerate() {
        sb.extend(virtio_mmio_device(i, window));
    }
    if let Some(pci) = &platform.pci {
        sb.extend(pci_host_bridge(pci));
    }
    if let Some(ged) = &platform.ged {
        sb.extend(generic_event_device(ged));
    }
    let mut body = Scope::raw("\\_SB_".into(), sb);
    let s5_type = SLEEP_TYPE_S5;
    let s5 = Package::new(vec![&s5_type, &s5_type, &0u8, &0u8]);
    body.extend(bytes_of(&Name::new("_S5_".into(), &s5)));
    body
}

/// The DSDT of `platform`, as bytes (header, AML, checksum).
pub fn dsdt_bytes(platform: &AcpiPlatform) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(platform));
    dsdt.as_slice().to_vec()
}

fn madt_bytes(platform: &AcpiPlatform) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, if platform.legacy_pic { PCAT_COMPAT } else { 0 });
    for id in 0..platform.vcpus {
        madt.append_slice(&bytes_of(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    // The IOAPIC's ID follows the CPUs', as in the MP table.
    madt.append_slice(&bytes_of(&IoApic::new(platform.vcpus, IOAPIC_START as u32, 0)));
    if platform.legacy_pic {
        // Interrupt source override: bus 0 (ISA), IRQ 0 → GSI 2, flags 0
        // (conforming polarity and trigger).
        madt.append_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    }
    madt.as_slice().to_vec()
}

fn fadt_bytes(platform: &AcpiPlatform, dsdt: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Control-method power button and no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_byte(platform.reset.0);
    fadt.reset_value = platform.reset.1;
    fadt.sleep_control_reg = io_byte(platform.sleep.control_port);
    fadt.sleep_status_reg = io_byte(platform.sleep.status_port);
    // IA-PC boot architecture: no VGA (bit 2), no MSI restriction, a CMOS
    // clock present (bit 5 clear).
    fadt.iapc_boot_arch = (1u16 << 2).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"KEELVMM\0").into();
    bytes_of(&fadt.finalize())
}

fn mcfg_bytes(pci: &PciHostBridge) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, 0, 0, pci.last_bus);
    bytes_of(&mcfg)
}

/// Writes the tables for `platform` at [`ACPI_RSDP_START`] and returns the
/// RSDP's address (for the zero page's `acpi_rsdp_addr` or PVH's
/// `rsdp_paddr`).
pub fn write_acpi_tables(mem: &GuestMemoryMmap, platform: &AcpiPlatform) -> Result<GuestAddress> {
    let align = |addr: u64| addr.div_ceil(16) * 16;
    let rsdp_at = ACPI_RSDP_START.0;
    let mut next = align(rsdp_at + Rsdp::len() as u64);
    let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut place = |bytes: Vec<u8>, tables: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = align(at + bytes.len() as u64);
        tables.push((at, bytes));
        at
    };
    let dsdt = place(dsdt_bytes(platform), &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(place(fadt_bytes(platform, dsdt), &mut tables));
    xsdt.add_entry(place(madt_bytes(platform), &mut tables));
    if let Some(pci) = &platform.pci {
        xsdt.add_entry(place(mcfg_bytes(pci), &mut tables));
    }
    let xsdt_at = place(bytes_of(&xsdt), &mut tables);
    tables.push((rsdp_at, bytes_of(&Rsdp::new(OEM_ID, xsdt_at))));
    if next > ACPI_TABLES_END.0 {
        return Err(Error::AcpiTooLarge {
            bytes: next - rsdp_at,
            room: ACPI_TABLES_END.0 - rsdp_at,
        });
    }
    for (at, bytes) in tables {
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(|source| Error::GuestMemory {
                what: "ACPI tables",
                addr: at,
                source,
            })?;
    }
    Ok(ACPI_RSDP_START)
}

#[cfg(test)]
mod tests;
