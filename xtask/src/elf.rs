//! Just enough ELF64 parsing to find the PVH entry note in `vmlinux`.
//!
//! Keel boots `vmlinux` through the x86/HVM direct boot ABI ("PVH"), whose
//! entry point is published in an ELF note `Xen`/`XEN_ELFNOTE_PHYS32_ENTRY`
//! (type 18). `CONFIG_PVH=y` produces it; the build checks it is there.

/// `XEN_ELFNOTE_PHYS32_ENTRY` from `include/xen/interface/elfnote.h`.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One ELF note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Owner name without the trailing NUL (`"Xen"`, `"GNU"`, `"Linux"`).
    pub name: String,
    /// Note type.
    pub kind: u32,
    /// Descriptor bytes.
    pub desc: Vec<u8>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn parse_notes(mut b: &[u8], out: &mut Vec<Note>) -> Option<()> {
    while b.len() >= 12 {
        let namesz = u32_at(b, 0)? as usize;
        let descsz = u32_at(b, 4)? as usize;
        let kind = u32_at(b, 8)?;
        let name_end = 12 + namesz;
        let desc_start = 12 + namesz.div_ceil(4) * 4;
        let desc_end = desc_start + descsz;
        let name = b.get(12..name_end)?;
        let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name)).into_owned();
        let desc = b.get(desc_start..desc_end)?.to_vec();
        out.push(Note { name, kind, desc });
        b = b.get((desc_end.div_ceil(4) * 4).min(b.len())..)?;
    }
    Some(())
}

/// All notes of a little-endian ELF64 file, from its `PT_NOTE` segments (or,
/// if it has none, its `SHT_NOTE` sections).
pub fn notes(elf: &[u8]) -> Result<Vec<Note>, String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a little-endian ELF64 file".into());
    }
    let bad = || "truncated ELF headers".to_string();
    let phoff = u64_at(elf, 0x20).ok_or_else(bad)? as usize;
    let shoff = u64_at(elf, 0x28).ok_or_else(bad)? as usize;
    let phentsize = u16_at(elf, 0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(elf, 0x38).ok_or_else(bad)? as usize;
    let shentsize = u16_at(elf, 0x3a).ok_or_else(bad)? as usize;
    let shnum = u16_at(elf, 0x3c).ok_or_else(bad)? as usize;

    let mut ranges = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph).ok_or_else(bad)? == 4 {
            // PT_NOTE: p_offset at +8, p_filesz at +32
            let off = u64_at(elf, ph + 8).ok_or_else(bad)? as usize;
            let size = u64_at(elf, ph + 32).ok_or_else(bad)? as usize;
            ranges.push((off, size));
        }
    }
    if ranges.is_empty() {
        for i in 0..shnum {
            let sh = shoff + i * shentsize;
            if u32_at(elf, sh + 4).ok_or_else(bad)? == 7 {
                // SHT_NOTE: sh_offset at +24, sh_size at +32
                let off = u64_at(elf, sh + 24).ok_or_else(bad)? as usize;
                let size = u64_at(elf, sh + 32).ok_or_else(bad)? as usize;
                ranges.push((off, size));
            }
        }
    }
    let mut out = Vec::new();
    for (off, size) in ranges {
        let seg = elf
            .get(off..off + size)
            .ok_or_else(|| "note outside the file".to_string())?;
        parse_notes(seg, &mut out).ok_or_else(|| "malformed note".to_string())?;
    }
    Ok(out)
}

/// The PVH entry address (guest-physical) if the kernel has the note.
pub fn pvh_entry(elf: &[u8]) -> Result<Option<u64>, String> {
    Ok(notes(elf)?
        .into_iter()
        .find(|n| n.name == "Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
        .map(|n| match n.desc.len() {
            4 => u64::from(u32_at(&n.desc, 0).unwrap_or(0)),
            _ => u64_at(&n.desc, 0).unwrap_or(0),
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &str, kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    /// A minimal ELF64 with one PT_NOTE segment holding `payload`.
    fn elf_with_notes(payload: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little endian
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        e[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        e.extend_from_slice(payload);
        e
    }

    #[test]
    fn finds_pvh_note() {
        let mut p = note("GNU", 3, &[1, 2, 3, 4, 5]);
        p.extend(note("Xen", 18, &0x0100_0abcu64.to_le_bytes()));
        let elf = elf_with_notes(&p);
        let n = notes(&elf).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].name, "GNU");
        assert_eq!(n[0].desc, [1, 2, 3, 4, 5]);
        assert_eq!(pvh_entry(&elf).unwrap(), Some(0x0100_0abc));
    }

    #[test]
    fn no_pvh_note() {
        let elf = elf_with_notes(&note("Xen", 5, b"xen-3.0\0"));
        assert_eq!(pvh_entry(&elf).unwrap(), None);
    }

    #[test]
    fn rejects_non_elf() {
        assert!(notes(b"MZ\x90\0").is_err());
        assert!(notes(b"\x7fELF\x01\x01").is_err());
    }
}
