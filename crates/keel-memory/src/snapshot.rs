//! Guest memory to and from a snapshot's memory file.
//!
//! The memory file is the guest's RAM regions back to back, in address
//! order (for a guest above 3 GiB: the RAM below the MMIO gap, then the
//! RAM above 4 GiB), so its length is the guest's memory size. It is
//! *sparse*: pages the guest never touched, and pages that hold only
//! zeros, are holes, so a 2 GiB guest that used 40 MiB costs 40 MiB of
//! disk.
//!
//! Restoring maps the file copy-on-write ([`RestoreMode::CopyOnWrite`],
//! `MAP_PRIVATE`): nothing is read up front, a page comes from the page
//! cache when the guest first touches it, and every VM restored from one
//! file shares the pages none of them wrote. The file must then stay
//! unchanged while such a VM runs. [`RestoreMode::Copy`] reads the data
//! into anonymous memory instead, leaving the file free.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion};

use crate::{GuestLayout, GuestMemoryMmap, GuestRegionMmap};

/// The page size the memory file is written in.
const PAGE: usize = 4096;

/// How [`restore_memory`] gets the guest's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RestoreMode {
    /// Map the file `MAP_PRIVATE`: restore cost does not grow with the
    /// guest's size, and clones share the pages they did not write.
    #[default]
    CopyOnWrite,
    /// Read the file's data into anonymous memory.
    Copy,
}

/// Errors from writing or reading a memory file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file is not the size the layout needs.
    #[error("memory file is {found} bytes, but the guest's memory is {expected} bytes")]
    WrongSize {
        /// The layout's memory size.
        expected: u64,
        /// The file's length.
        found: u64,
    },
    /// Reading or writing the file failed.
    #[error("memory file: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Mapping the file failed.
    #[error("cannot map {size} bytes of the memory file at offset {offset}: {reason}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// Offset in the file.
        offset: u64,
        /// What vm-memory reported.
        reason: String,
    },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { op, source }
}

/// What [`save_memory`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SavedMemory {
    /// The file's length: the guest's memory size.
    pub size: u64,
    /// Bytes of data written (the rest are holes).
    pub data_bytes: u64,
}

/// Writes every region of `mem` to `file`, back to back, leaving a hole
/// wherever a page is all zeros or was never touched. `file` should be new
/// (empty): what it held before is replaced.
///
/// The guest must not run meanwhile (pause it first).
pub fn save_memory(mem: &GuestMemoryMmap, file: &File) -> Result<SavedMemory, SnapshotError> {
    file.set_len(0).map_err(io("truncate"))?;
    let mut offset = 0u64;
    let mut data_bytes = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|e| io("region size")(std::io::Error::other(e)))?;
        // SAFETY: the mapping is `len` bytes, alive while `mem` is borrowed;
        // the guest is paused and nothing in this VMM writes guest memory
        // while it is, so the bytes do not change under the slice.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let touched = resident_pages(region, len);
        let mut page = 0;
        let pages = len / PAGE;
        while page < pages {
            let is_data = |p: usize| {
                touched.as_ref().is_none_or(|t| t[p] & 1 != 0)
                    && bytes[p * PAGE..(p + 1) * PAGE].iter().any(|&b| b != 0)
            };
            if !is_data(page) {
                page += 1;
                continue;
            }
            let start = page;
            while page < pages && is_data(page) {
                page += 1;
            }
            let chunk = &bytes[start * PAGE..page * PAGE];
            file.write_all_at(chunk, offset + (start * PAGE) as u64)
                .map_err(io("write"))?;
            data_bytes += chunk.len() as u64;
        }
        offset += region.len();
    }
    file.set_len(offset).map_err(io("set length"))?;
    file.sync_data().map_err(io("sync"))?;
    Ok(SavedMemory {
        size: offset,
        data_bytes,
    })
}

/// Writes the pages in `ranges` (offsets in the memory file's layout, as
/// [`crate::take_dirty_pages`] gives them) to `file`, a diff memory file:
/// those pages as they are, zeros included, everything else a hole. Its
/// length is the guest's memory size; merge it onto its base with
/// [`merge_memory_diff`].
pub fn save_memory_diff(
    mem: &GuestMemoryMmap,
    file: &File,
    ranges: &[(u64, u64)],
) -> Result<SavedMemory, SnapshotError> {
    file.set_len(0).map_err(io("truncate"))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io("set length"))?;
    let mut data_bytes = 0u64;
    let mut region_start = 0u64;
    let regions: Vec<_> = mem.iter().collect();
    let mut next = regions.iter();
    let mut current = next.next();
    for &(offset, len) in ranges {
        // Find the region holding `offset` (ranges are sorted).
        while let Some(region) = current {
            if offset < region_start + region.len() {
                break;
            }
            region_start += region.len();
            current = next.next();
        }
        let Some(region) = current else {
            return Err(SnapshotError::Map {
                size: len,
                offset,
                reason: "a dirty range lies past the guest's memory".into(),
            });
        };
        let within = offset - region_start;
        if within + len > region.len() {
            return Err(SnapshotError::Map {
                size: len,
                offset,
                reason: "a dirty range crosses a region's end".into(),
            });
        }
        let (Ok(from), Ok(n)) = (usize::try_from(within), usize::try_from(len)) else {
            return Err(io("range")(std::io::Error::other("range too large")));
        };
        // SAFETY: `from..from + n` lies inside the region's mapping
        // (checked above), alive while `mem` is borrowed; the guest is
        // paused, so the bytes do not change under the slice.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().add(from).cast_const(), n) };
        file.write_all_at(bytes, offset).map_err(io("write"))?;
        data_bytes += len;
    }
    file.sync_data().map_err(io("sync"))?;
    Ok(SavedMemory {
        size: total,
        data_bytes,
    })
}

/// Copies the pages in `ranges` from the diff memory file `diff` onto the
/// memory file `base` (in place): `base` then holds the memory as the
/// diff saw it. Returns the bytes copied.
pub fn merge_memory_diff(diff: &File, base: &File, ranges: &[(u64, u64)]) -> Result<u64, SnapshotError> {
    let diff_len = diff.metadata().map_err(io("stat"))?.len();
    let base_len = base.metadata().map_err(io("stat"))?.len();
    if diff_len != base_len {
        return Err(SnapshotError::WrongSize {
            expected: diff_len,
            found: base_len,
        });
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    for &(offset, len) in ranges {
        if offset.checked_add(len).is_none_or(|end| end > base_len) {
            return Err(SnapshotError::Map {
                size: len,
                offset,
                reason: format!("the range lies past the {base_len}-byte memory file"),
            });
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            diff.read_exact_at(&mut buf[..n], offset + done)
                .map_err(io("read the diff"))?;
            base.write_all_at(&buf[..n], offset + done)
                .map_err(io("write the base"))?;
            done += n as u64;
        }
        copied += len;
    }
    base.sync_data().map_err(io("sync"))?;
    Ok(copied)
}

/// For an anonymous region: one byte per page, bit 0 set where the page
/// is resident (`mincore`); a page never touched is known to be zero.
/// `None` for a file-backed region (a restored guest's), whose
/// non-resident pages may hold data.
fn resident_pages(region: &GuestRegionMmap, len: usize) -> Option<Vec<u8>> {
    if region.file_offset().is_some() {
        return None;
    }
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: the range is the region's own page-aligned mapping, alive
    // while `region` is borrowed, and `vec` has one byte per page of it.
    let ret = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
    (ret == 0).then_some(vec)
}

/// Builds guest memory for `layout` from a memory file [`save_memory`]
/// wrote, in `mode`.
pub fn restore_memory(
    layout: &GuestLayout,
    file: &File,
    mode: RestoreMode,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let found = file.metadata().map_err(io("stat"))?.len();
    if found != layout.mem_size() {
        return Err(SnapshotError::WrongSize {
            expected: layout.mem_size(),
            found,
        });
    }
    match mode {
        RestoreMode::CopyOnWrite => map_private(layout, file),
        RestoreMode::Copy => copy_in(layout, file),
    }
}

fn map_private(layout: &GuestLayout, file: &File) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in layout.ram_ranges() {
        let map_error = |reason: String| SnapshotError::Map {
            size: len,
            offset,
            reason,
        };
        let size = usize::try_from(len).map_err(|e| map_error(e.to_string()))?;
        let dup = file.try_clone().map_err(io("duplicate descriptor"))?;
        let bitmap = <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size);
        let mapping = MmapRegionBuilder::new_with_bitmap(size, bitmap)
            .with_file_offset(FileOffset::new(dup, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_error(e.to_string()))?;
        let region =
            GuestRegionMmap::new(mapping, start).ok_or_else(|| map_error("region overflows".into()))?;
        populate_data(&region, file, offset)?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Map {
        size: layout.mem_size(),
        offset: 0,
        reason: e.to_string(),
    })
}

/// Maps the file's data pages of `region` (at `offset` in `file`) into
/// the host's page tables up front, read-only and shared with the page
/// cache (`MADV_POPULATE_READ`), so the restored guest's first touches do
/// not each take a host page fault; a page it writes is still copied at
/// its first write. Holes stay unmapped. On kernels without
/// `MADV_POPULATE_READ` (before Linux 5.14) the pages fault in lazily.
fn populate_data(region: &GuestRegionMmap, file: &File, offset: u64) -> Result<(), SnapshotError> {
    const MADV_POPULATE_READ: i32 = 22;
    let end = offset + region.len();
    let mut at = offset;
    while at < end {
        let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let (Ok(from), Ok(len)) = (usize::try_from(data - offset), usize::try_from(hole - data)) else {
            break;
        };
        // SAFETY: `from..from + len` lies inside the region's mapping
        // (data and hole are clamped to the region's part of the file),
        // which is alive while `region` is borrowed; MADV_POPULATE_READ
        // only faults pages in, it changes no contents.
        let ret = unsafe { libc::madvise(region.as_ptr().add(from).cast(), len, MADV_POPULATE_READ) };
        if ret != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(()); // an older kernel: fault lazily
            }
            return Err(io("populate")(e));
        }
        at = hole;
    }
    Ok(())
}

fn copy_in(layout: &GuestLayout, file: &File) -> Result<GuestMemoryMmap, SnapshotError> {
    let mem = layout.create_memory().map_err(|e| SnapshotError::Map {
        size: layout.mem_size(),
        offset: 0,
        reason: e.to_string(),
    })?;
    let mut file = file;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|e| io("region size")(std::io::Error::other(e)))?;
        // SAFETY: the mapping is `len` bytes, alive while `mem` lives, new
        // and not yet seen by any vCPU or device.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len) };
        // Only the file's data extents are read; holes stay untouched
        // (zero, and not resident).
        let end = offset + region.len();
        let mut at = offset;
        while at < end {
            let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            file.seek(SeekFrom::Start(data)).map_err(io("seek"))?;
            let from = usize::try_from(data - offset).unwrap_or(len);
            let to = usize::try_from(hole - offset).unwrap_or(len);
            file.read_exact(&mut bytes[from..to]).map_err(io("read"))?;
            at = hole;
        }
        offset = end;
    }
    Ok(mem)
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`; `None` past the last data.
fn seek(file: &File, at: u64, whence: i32) -> Result<Option<u64>, SnapshotError> {
    use std::os::fd::AsRawFd;
    let at = libc::off_t::try_from(at).map_err(|e| io("seek")(std::io::Error::other(e)))?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(io("seek")(e))
        };
    }
    Ok(Some(ret as u64))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::MIB;

    fn temp_file(name: &str) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("keel-memory-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (file, path)
    }

    /// Bytes of the file actually allocated on disk.
    fn allocated(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn the_file_is_sparse_and_both_modes_give_the_guest_its_bytes_back() {
        let layout = GuestLayout::new(64 * MIB).unwrap();
        let mem = layout.create_memory().unwrap();
        mem.write_obj(0x1122_3344_u32, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(32 * MIB)).unwrap();
        // Touched, but zero: also a hole.
        mem.write_obj(0u64, GuestAddress(48 * MIB)).unwrap();
        let (file, path) = temp_file("sparse");
        let saved = save_memory(&mem, &file).unwrap();
        assert_eq!(saved.size, 64 * MIB);
        assert_eq!(saved.data_bytes, 4 * PAGE as u64);
        assert!(
            allocated(&file) <= 64 * 1024,
            "allocated {} bytes",
            allocated(&file)
        );

        for mode in [RestoreMode::CopyOnWrite, RestoreMode::Copy] {
            let back = restore_memory(&layout, &file, mode).unwrap();
            assert_eq!(
                back.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
                0x1122_3344,
                "{mode:?}"
            );
            let mut buf = [0u8; 3 * PAGE];
            back.read_slice(&mut buf, GuestAddress(32 * MIB)).unwrap();
            assert!(buf.iter().all(|&b| b == 7), "{mode:?}");
            assert_eq!(back.read_obj::<u64>(GuestAddress(60 * MIB)).unwrap(), 0);
            // A write to the restored guest never reaches the file.
            back.write_obj(0xdead_u32, GuestAddress(0x1000)).unwrap();
            let mut word = [0u8; 4];
            file.read_exact_at(&mut word, 0x1000).unwrap();
            assert_eq!(u32::from_le_bytes(word), 0x1122_3344, "{mode:?}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_restored_guest_can_be_saved_again_with_its_untouched_file_pages() {
        let layout = GuestLayout::new(16 * MIB).unwrap();
        let mem = layout.create_memory().unwrap();
        mem.write_obj(0xaaaa_u32, GuestAddress(0x2000)).unwrap();
        let (file, path) = temp_file("resave-a");
        save_memory(&mem, &file).unwrap();
        drop(mem);
        // Evict nothing in particular: file-backed pages may or may not be
        // resident, and must be saved either way.
        let restored = restore_memory(&layout, &file, RestoreMode::CopyOnWrite).unwrap();
        restored.write_obj(0xbbbb_u32, GuestAddress(0x3000)).unwrap();
        let (again, path2) = temp_file("resave-b");
        let saved = save_memory(&restored, &again).unwrap();
        assert_eq!(saved.data_bytes, 2 * PAGE as u64);
        let back = restore_memory(&layout, &again, RestoreMode::Copy).unwrap();
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0xaaaa);
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0xbbbb);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(path2).unwrap();
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused_naming_both_sizes() {
        let layout = GuestLayout::new(16 * MIB).unwrap();
        let (file, path) = temp_file("short");
        file.set_len(8 * MIB).unwrap();
        let err = restore_memory(&layout, &file, RestoreMode::CopyOnWrite).unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory file is 8388608 bytes, but the guest's memory is 16777216 bytes"
        );
        std::fs::remove_file(path).unwrap();
    }
}
