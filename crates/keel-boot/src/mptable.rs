//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns its CPUs, its IOAPIC and how ISA interrupts are wired.

use keel_memory::{GuestMemoryMmap, EBDA_START, IOAPIC_START, LAPIC_START};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// Most CPUs an MP table describes here (APIC IDs 0..=253; the IOAPIC
/// takes the ID after the last CPU).
pub const MAX_MPTABLE_CPUS: u8 = 254;
/// IOAPIC pins wired in the table (an ISA bus IRQ `n` goes to pin `n`).
const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9); // FPU, APIC
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ID_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The table for `cpus` CPUs, as bytes to be placed at `addr`: the
/// floating pointer structure first, the configuration table right after.
pub fn mptable_bytes(cpus: u8, addr: GuestAddress) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > MAX_MPTABLE_CPUS {
        return Err(Error::MpTableCpus { cpus });
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // The 8259's output reaches IOAPIC pin 0 as ExtINT; every other ISA IRQ
    // goes to the pin of the same number with the bus's default polarity.
    for irq in 0..IOAPIC_PINS {
        let kind = if irq == 0 { INT_TYPE_EXTINT } else { INT_TYPE_INT };
        entries.extend_from_slice(&[ENTRY_IOINT, kind, 0, 0, BUS_ID_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, BUS_ID_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, BUS_ID_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = addr.0 + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"KEEL    ");
    header.extend_from_slice(b"KEEL VM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table
    header.push(0);
    header.push(0);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a table follows
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` CPUs at the start of the EBDA, where Linux
/// looks for it.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    let bytes = mptable_bytes(cpus, EBDA_START)?;
    mem.write_slice(&bytes, EBDA_START)
        .map_err(|source| Error::GuestMemory {
            what: "MP table",
            addr: EBDA_START.0,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_checksums_are_zero() {
        let t = mptable_bytes(2, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(sum(&t[16..16 + len]), 0);
        assert_eq!(t.len(), 16 + len);
    }

    #[test]
    fn floating_pointer_points_at_the_table() {
        let t = mptable_bytes(1, GuestAddress(0x9fc00)).unwrap();
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
    }

    #[test]
    fn lists_every_cpu_with_the_first_as_boot_processor() {
        let t = mptable_bytes(4, EBDA_START).unwrap();
        let cpus: Vec<(u8, u8)> = t[16 + 44..]
            .chunks(20)
            .take(4)
            .map(|e| {
                assert_eq!(e[0], ENTRY_PROCESSOR);
                (e[1], e[3])
            })
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        let entry_count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(entry_count, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn ioapic_follows_the_cpus_and_isa_irqs_map_to_their_pins() {
        let t = mptable_bytes(2, EBDA_START).unwrap();
        let rest = &t[16 + 44 + 2 * 20..];
        assert_eq!(&rest[..8], &[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
        assert_eq!(rest[8..12], [ENTRY_IOAPIC, 2, IOAPIC_VERSION, 1]);
        let irq4 = &rest[16 + 4 * 8..16 + 5 * 8];
        assert_eq!(irq4, &[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, 4, 2, 4]);
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(
            mptable_bytes(0, EBDA_START),
            Err(Error::MpTableCpus { cpus: 0 })
        ));
        assert!(mptable_bytes(255, EBDA_START).is_err());
        assert!(mptable_bytes(254, EBDA_START).is_ok());
    }

    #[test]
    fn largest_table_fits_below_the_bios_area() {
        let t = mptable_bytes(MAX_MPTABLE_CPUS, EBDA_START).unwrap();
        assert!(
            EBDA_START.0 + t.len() as u64 <= 0xa0000 + 0x10000,
            "{} bytes",
            t.len()
        );
    }
}
