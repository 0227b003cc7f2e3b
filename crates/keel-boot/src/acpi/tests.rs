//! The tables against the ACPI specification's layouts (ACPI 6.5).

use super::*;
use keel_memory::{GuestLayout, MIB};

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// A platform with every kind of device.
fn full_platform() -> AcpiPlatform {
    let mut p = AcpiPlatform::new(2);
    p.virtio_mmio = vec![
        MmioDeviceWindow {
            base: 0xd000_1000,
            size: 0x1000,
            gsi: 5,
        },
        MmioDeviceWindow {
            base: 0xd000_2000,
            size: 0x1000,
            gsi: 6,
        },
    ];
    p.pci = Some(PciHostBridge {
        ecam_base: 0xc000_0000,
        last_bus: 0,
        mmio32: (0xe000_0000, 0xfec0_0000),
        mmio64: Some((0x1_0000_0000 + (1 << 30), 0x1_0000_0000 + (65 << 30))),
    });
    p.ged = Some(GedWindow {
        base: 0xfef0_0000,
        gsi: 9,
    });
    p
}

/// The tables as written: RSDP, then every table the XSDT lists, by
/// signature.
/// Tables by signature, in the order found.
type Tables = Vec<([u8; 4], Vec<u8>)>;

fn written(platform: &AcpiPlatform) -> (Vec<u8>, Tables) {
    let layout = GuestLayout::new(64 * MIB).unwrap();
    let mem = layout.create_memory().unwrap();
    let rsdp_at = write_acpi_tables(&mem, platform).unwrap();
    let mut rsdp = vec![0u8; 36];
    mem.read_slice(&mut rsdp, rsdp_at).unwrap();
    let read_table = |at: u64| {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(at)).unwrap();
        let mut table = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(at)).unwrap();
        table
    };
    let xsdt = read_table(u64_at(&rsdp, 24));
    let mut tables = vec![(*b"XSDT", xsdt.clone())];
    for entry in xsdt[36..].chunks(8) {
        let table = read_table(u64::from_le_bytes(entry.try_into().unwrap()));
        tables.push((table[0..4].try_into().unwrap(), table.clone()));
        if &table[0..4] == b"FACP" {
            let dsdt = read_table(u64_at(&table, 140));
            tables.push((*b"DSDT", dsdt));
        }
    }
    (rsdp, tables)
}

fn table<'a>(tables: &'a [([u8; 4], Vec<u8>)], signature: &[u8; 4]) -> &'a [u8] {
    &tables.iter().find(|(s, _)| s == signature).unwrap().1
}

#[test]
fn rsdp_has_both_checksums_and_points_at_the_xsdt() {
    let (rsdp, tables) = written(&full_platform());
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert!(sums_to_zero(&rsdp[..20]), "ACPI 1.0 checksum");
    assert!(sums_to_zero(&rsdp[..36]), "extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2: XSDT");
    assert_eq!(u32_at(&rsdp, 20), 36, "length");
    assert_eq!(&table(&tables, b"XSDT")[0..4], b"XSDT");
}

#[test]
fn every_table_has_a_valid_header_and_checksum() {
    let (_, tables) = written(&full_platform());
    let signatures: Vec<_> = tables.iter().map(|(s, _)| *s).collect();
    assert_eq!(signatures, [*b"XSDT", *b"FACP", *b"DSDT", *b"APIC", *b"MCFG"]);
    for (signature, bytes) in &tables {
        let name = String::from_utf8_lossy(signature);
        assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{name} length");
        assert!(sums_to_zero(bytes), "{name} checksum");
        assert_eq!(&bytes[10..16], b"KEEL  ", "{name} OEM ID");
    }
}

#[test]
fn fadt_is_hardware_reduced_with_reset_and_sleep_registers() {
    let (_, tables) = written(&full_platform());
    let fadt = table(&tables, b"FACP");
    assert_eq!(fadt.len(), 276, "ACPI 6.5 FADT");
    assert_eq!(fadt[8], 6, "major revision");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON: control-method power button");
    // RESET_REG (GAS at 116): system I/O, 8 bits, port 0x64; value 0xfe.
    assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 120), 0x64);
    assert_eq!(fadt[128], 0xfe);
    // SLEEP_CONTROL_REG (244) and SLEEP_STATUS_REG (256).
    assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 248), 0x600);
    assert_eq!(u64_at(fadt, 260), 0x601);
    assert_eq!(u32_at(fadt, 40), 0, "no FACS in a hardware-reduced platform");
}

#[test]
fn madt_lists_each_cpu_the_ioapic_and_no_pic_without_one() {
    let (_, tables) = written(&full_platform());
    let madt = table(&tables, b"APIC");
    assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
    assert_eq!(u32_at(madt, 40), 0, "no PCAT_COMPAT without a PIC");
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        entries.push(madt[at..at + madt[at + 1] as usize].to_vec());
        at += madt[at + 1] as usize;
    }
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0], [0, 8, 0, 0, 1, 0, 0, 0], "CPU 0, enabled");
    assert_eq!(entries[1], [0, 8, 1, 1, 1, 0, 0, 0], "CPU 1, enabled");
    assert_eq!(entries[2][..4], [1, 12, 2, 0], "IOAPIC with ID 2");
    assert_eq!(u32_at(&entries[2], 4), 0xfec0_0000);
    assert_eq!(u32_at(&entries[2], 8), 0, "GSI base");
}

#[test]
fn madt_with_a_pic_is_pcat_compatible_with_the_timer_override() {
    let mut platform = AcpiPlatform::new(1);
    platform.legacy_pic = true;
    let (_, tables) = written(&platform);
    let madt = table(&tables, b"APIC");
    assert_eq!(u32_at(madt, 40), 1);
    let iso = &madt[madt.len() - 10..];
    assert_eq!(iso, [2, 10, 0, 0, 2, 0, 0, 0, 0, 0], "ISA IRQ 0 → GSI 2");
}

#[test]
fn mcfg_describes_the_ecam_window() {
    let (_, tables) = written(&full_platform());
    let mcfg = table(&tables, b"MCFG");
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    assert_eq!(u64_at(mcfg, 44), 0xc000_0000);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "buses 0..=0");
}

#[test]
fn without_pci_there_is_no_mcfg_and_no_host_bridge() {
    let (_, tables) = written(&AcpiPlatform::new(1));
    assert!(tables.iter().all(|(s, _)| s != b"MCFG"));
    let dsdt = table(&tables, b"DSDT");
    assert!(!dsdt.windows(4).any(|w| w == b"PCI0"));
}

#[test]
fn dsdt_names_every_device() {
    let (_, tables) = written(&full_platform());
    let dsdt = table(&tables, b"DSDT");
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    for needle in [
        &b"C00_"[..],
        b"C01_",
        b"ACPI0007",
        b"CO01",
        b"RTC_",
        b"VR00",
        b"VR01",
        b"LNRO0005",
        b"PCI0",
        b"MRES",
        b"GED_",
        b"ACPI0013",
        b"_EVT",
        b"PWRB",
        b"_S5_",
    ] {
        assert!(has(needle), "DSDT lacks {}", String::from_utf8_lossy(needle));
    }
}

#[test]
fn tables_for_many_devices_still_fit_below_one_mib() {
    let mut platform = full_platform();
    platform.vcpus = 254;
    platform.virtio_mmio = (0..256)
        .map(|i| MmioDeviceWindow {
            base: 0xd000_0000 + i * 0x1000,
            size: 0x1000,
            gsi: 5,
        })
        .collect();
    let (_, tables) = written(&platform);
    assert!(table(&tables, b"DSDT").len() > 16 * 1024);
}

/// `iasl -d` must disassemble the DSDT without errors (Debian's
/// acpica-tools; `cargo xtask test` installs it).
#[test]
fn iasl_disassembles_the_dsdt_without_errors() {
    let Some(iasl) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("iasl"))
            .find(|p| p.exists())
    }) else {
        assert!(
            std::env::var_os("KEEL_REQUIRE_LINUX").is_none(),
            "iasl is missing but cargo xtask test requires it (package acpica-tools)"
        );
        eprintln!(
            "SKIPPED: iasl not installed (Debian package acpica-tools); `cargo xtask test` installs it"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("keel-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dsdt = dir.join("dsdt.dat");
    std::fs::write(&dsdt, dsdt_bytes(&full_platform())).unwrap();
    let out = std::process::Command::new(iasl)
        .arg("-d")
        .arg(&dsdt)
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl failed: {text}");
    assert!(!text.contains("Error"), "{text}");
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    for needle in [
        "LNRO0005", "PNP0A08", "ACPI0013", "PNP0C0C", "PNP0B00", "PNP0501", "_S5_",
    ] {
        assert!(dsl.contains(needle), "disassembly lacks {needle}:\n{dsl}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
