//! Giving guest pages back to the host: `madvise(MADV_DONTNEED)` on the
//! host mapping of guest RAM, for ranges checked to lie inside one region.

use crate::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// The balloon's page size: PFNs in the inflate and deflate queues count
/// 4 KiB pages whatever the guest's own page size (virtio 1.2, 5.5.6).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// The offset bits of an address in a balloon page.
const PAGE_OFFSET_MASK: u64 = BALLOON_PAGE_SIZE - 1;

/// Why a guest range was not released.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReleaseError {
    /// Not entirely inside one region of guest RAM.
    #[error("{len:#x} bytes at guest address {addr:#x} are not inside guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    /// The host refused (e.g. a mapping that cannot drop 4 KiB pages).
    #[error("madvise(MADV_DONTNEED) of {len:#x} bytes at guest address {addr:#x}: {source}")]
    Madvise {
        addr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Drops the host pages behind `[addr, addr + len)` of guest RAM: the host
/// frees them, and the next guest access finds zero-filled pages. The
/// range must be page-aligned and inside one region of `mem`.
pub(crate) fn release(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), ReleaseError> {
    let outside = || ReleaseError::OutsideRam { addr: addr.0, len };
    if len == 0 {
        return Ok(());
    }
    if !addr.0.is_multiple_of(BALLOON_PAGE_SIZE) || !len.is_multiple_of(BALLOON_PAGE_SIZE) {
        return Err(outside());
    }
    let count = usize::try_from(len).map_err(|_| outside())?;
    // get_slice fails unless the whole range is inside one region.
    let slice = mem.get_slice(addr, count).map_err(|_| outside())?;
    let host = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `host .. host + count` is part of `mem`'s mapping (get_slice
    // checked it against one region), which stays mapped while `mem` is
    // borrowed. Guest memory is only ever accessed through volatile
    // pointers and copies, never through Rust references that assume its
    // contents are stable, so the pages turning into zero-filled ones is
    // the same as the guest writing zeros there. The address is page-aligned:
    // regions start on host page boundaries and `addr` is 4 KiB-aligned.
    let ret = unsafe { libc::madvise(host.cast(), count, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(ReleaseError::Madvise {
            addr: addr.0,
            len,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Collects PFNs into runs of consecutive pages, so a guest that gives
/// back contiguous memory costs one `madvise` per run, not per page.
#[derive(Debug, Default)]
pub(crate) struct PfnRuns {
    run: Option<(u64, u64)>,
}

/// What releasing a set of pages came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Released {
    /// Pages released on the host.
    pub pages: u64,
    /// Pages ignored: outside guest RAM, or refused by the host.
    pub ignored: u64,
}

impl PfnRuns {
    /// Adds one page; releases the previous run if `pfn` does not extend it.
    pub fn push(&mut self, mem: &GuestMemoryMmap, pfn: u32, done: &mut Released) {
        let pfn = u64::from(pfn);
        match &mut self.run {
            // The count stays below 2^32 + 1: PFNs are 32-bit.
            Some((start, count)) if start.checked_add(*count) == Some(pfn) => {
                *count = count.saturating_add(1)
            }
            _ => {
                self.flush(mem, done);
                self.run = Some((pfn, 1));
            }
        }
    }

    /// Releases the run collected so far.
    pub fn flush(&mut self, mem: &GuestMemoryMmap, done: &mut Released) {
        let Some((start, count)) = self.run.take() else {
            return;
        };
        match release_pages(mem, start, count) {
            Ok(()) => done.pages = done.pages.saturating_add(count),
            // A run across a region boundary or partly outside RAM: page by
            // page, so the good pages are still released.
            Err(_) if count > 1 => {
                // PFNs are 32-bit: start + count < 2^33.
                for pfn in start..start.saturating_add(count) {
                    release_one(mem, pfn, done);
                }
            }
            Err(e) => note_ignored(&e, done),
        }
    }
}

/// Releases `count` pages from page `pfn` on. (A range past the end of the
/// address space is outside RAM too; with 32-bit PFNs, start + count <
/// 2^33 pages, 2^45 bytes, it never is.)
fn release_pages(mem: &GuestMemoryMmap, pfn: u64, count: u64) -> Result<(), ReleaseError> {
    match (
        pfn.checked_mul(BALLOON_PAGE_SIZE),
        count.checked_mul(BALLOON_PAGE_SIZE),
    ) {
        (Some(addr), Some(len)) => release(mem, GuestAddress(addr), len),
        _ => Err(ReleaseError::OutsideRam {
            addr: pfn.saturating_mul(BALLOON_PAGE_SIZE),
            len: count.saturating_mul(BALLOON_PAGE_SIZE),
        }),
    }
}

fn release_one(mem: &GuestMemoryMmap, pfn: u64, done: &mut Released) {
    match release_pages(mem, pfn, 1) {
        Ok(()) => done.pages = done.pages.saturating_add(1),
        Err(e) => note_ignored(&e, done),
    }
}

fn note_ignored(error: &ReleaseError, done: &mut Released) {
    keel_ratelimit::warn_limited!("virtio-balloon: page ignored: {error}");
    done.ignored = done.ignored.saturating_add(1);
}

/// Releases the whole 4 KiB pages inside `[addr, addr + len)`: a free page
/// report need not be page-aligned at its ends. Returns the bytes released.
pub(crate) fn release_inner_pages(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<u64, ReleaseError> {
    // Rounded down and up to whole pages. A start past the last page of
    // the address space leaves no whole page.
    let end = addr.0.saturating_add(len) & !PAGE_OFFSET_MASK;
    let Some(start) = addr.0.checked_next_multiple_of(BALLOON_PAGE_SIZE) else {
        return Ok(0);
    };
    let Some(whole) = end.checked_sub(start).filter(|&whole| whole > 0) else {
        return Ok(0);
    };
    release(mem, GuestAddress(start), whole)?;
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: usize = 1 << 20;

    fn touched(size: usize) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        for page in (0..size).step_by(4096) {
            mem.write_obj(0xa5u8, GuestAddress(page as u64)).unwrap();
        }
        mem
    }

    #[test]
    fn released_pages_read_back_as_zero() {
        let mem = touched(MIB);
        release(&mem, GuestAddress(0x8000), 0x2000).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000)).unwrap(), 0xa5);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 0xa5);
    }

    #[test]
    fn refuses_ranges_outside_ram_or_misaligned() {
        let mem = touched(MIB);
        for (addr, len) in [
            (MIB as u64, 4096),
            (MIB as u64 - 4096, 8192),
            (u64::MAX - 4095, 4096),
            (0x800, 4096),
            (0, 100),
        ] {
            let err = release(&mem, GuestAddress(addr), len).unwrap_err();
            assert!(
                matches!(err, ReleaseError::OutsideRam { .. }),
                "{addr:#x}+{len:#x}: {err}"
            );
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0xa5);
    }

    #[test]
    fn pfn_runs_release_good_pages_and_count_bad_ones() {
        let mem = touched(MIB);
        let mut runs = PfnRuns::default();
        let mut done = Released::default();
        // 254..258 straddles the end of RAM (page 256); then a far PFN.
        for pfn in [1, 2, 3, 254, 255, 256, 257, u32::MAX, 10] {
            runs.push(&mem, pfn, &mut done);
        }
        runs.flush(&mem, &mut done);
        assert_eq!(done, Released { pages: 6, ignored: 3 });
        for pfn in [1u64, 2, 3, 254, 255, 10] {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(pfn * 4096)).unwrap(),
                0,
                "pfn {pfn}"
            );
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4 * 4096)).unwrap(), 0xa5);
    }

    #[test]
    fn inner_pages_of_an_unaligned_report_are_released() {
        let mem = touched(MIB);
        let released = release_inner_pages(&mem, GuestAddress(0x1800), 0x3000).unwrap();
        assert_eq!(released, 0x2000, "pages 0x2000 and 0x3000; the partial ones stay");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0xa5);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 0xa5);
        assert_eq!(release_inner_pages(&mem, GuestAddress(0x1800), 0x100).unwrap(), 0);
    }
}
