//! Where a virtio-blk device's bytes live.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Storage behind a [`Block`](crate::Block) device: a disk image, a block
/// device, memory, or anything else that reads and writes at byte offsets.
///
/// The device checks every request against [`capacity`](Self::capacity)
/// and the 512-byte sector grid before calling a backend, so offsets and
/// lengths are always in range and sector-aligned. Calls happen on the
/// event-loop thread, one at a time, in the guest's order; a call that
/// returns has done its work (for [`flush`](Self::flush): the data is on
/// stable storage).
///
/// # Example
///
/// ```
/// use keel_virtio::{BlockBackend, MemoryBackend};
///
/// let mut disk = MemoryBackend::new(4096);
/// disk.write_at(512, b"hello").unwrap();
/// let mut buf = [0u8; 5];
/// disk.read_at(512, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// disk.write_zeroes(0, 4096, false).unwrap();
/// disk.read_at(512, &mut buf).unwrap();
/// assert_eq!(buf, [0; 5]);
/// ```
pub trait BlockBackend: Send {
    /// Size in bytes. The device exposes whole 512-byte sectors; a trailing
    /// partial sector is not visible to the guest.
    fn capacity(&self) -> u64;

    /// Fills all of `buf` from `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;

    /// Tells the storage that `len` bytes at `offset` are no longer needed.
    /// Their contents afterwards are unspecified. The default does nothing,
    /// which is a valid discard.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros; `unmap` allows freeing
    /// the space as a discard would. The default writes zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _ = unmap;
        write_zero_blocks(self, offset, len)
    }
}

/// Writes zeros in chunks through [`BlockBackend::write_at`].
fn write_zero_blocks<B: BlockBackend + ?Sized>(backend: &mut B, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut at = offset;
    let mut left = len;
    while left > 0 {
        // At most `zeros.len()`, CHUNK.min(len): the chunk is always there.
        let chunk = zeros.get(..CHUNK.min(left) as usize).unwrap_or(&zeros);
        backend.write_at(at, chunk)?;
        // The device checked that `offset + len` is on the disk.
        at = at.saturating_add(chunk.len() as u64);
        left = left.saturating_sub(chunk.len() as u64);
    }
    Ok(())
}

/// A raw disk image (or a host block device) as a [`BlockBackend`].
///
/// Sparse images work: holes read as zeros. [`flush`](BlockBackend::flush)
/// is `fdatasync(2)`. Discard punches a hole
/// (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`) and is skipped
/// where the file system cannot; write-zeroes punches a hole when the guest
/// allows unmapping, zeroes the range in place (`FALLOC_FL_ZERO_RANGE`)
/// otherwise, and falls back to writing zeros.
///
/// Or a copy-on-write disk ([`FileBackend::with_overlay`]): a read-only
/// base image that many disks share, and an overlay file of this disk's
/// own that holds every cluster it wrote (Keel's overlay format; see
/// `docs/snapshots.md`).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    capacity: u64,
    overlay: Option<super::overlay::Overlay>,
}

impl FileBackend {
    /// Opens the image at `path`, read-write unless `read_only`.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::OpenDisk {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path)
    }

    /// Uses an already open image; `path` is only for messages.
    pub fn from_file(mut file: File, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        // Seeking to the end works for regular files and block devices alike
        // (a block device's metadata reports size 0).
        let capacity = file.seek(SeekFrom::End(0)).map_err(|source| Error::DiskSize {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file,
            path,
            capacity,
            overlay: None,
        })
    }

    /// A copy-on-write disk: `base` opened read-only (never written, so
    /// any number of disks may share it), every write going to the
    /// overlay file at `overlay` (created if missing or empty; an existing
    /// one must overlay a disk of the base's size). The disk reads as the
    /// base with the overlay's clusters on top.
    pub fn with_overlay(base: impl AsRef<Path>, overlay: impl AsRef<Path>) -> Result<Self> {
        let mut disk = Self::open(base, true)?;
        let overlay = overlay.as_ref();
        disk.overlay = Some(
            super::overlay::Overlay::open(overlay, disk.capacity).map_err(|source| Error::OpenDisk {
                path: overlay.to_owned(),
                source,
            })?,
        );
        Ok(disk)
    }

    /// How many 4 KiB clusters this disk's overlay holds (`None` without
    /// one).
    pub fn overlay_clusters(&self) -> Option<u64> {
        self.overlay.as_ref().map(|o| o.allocated_clusters())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned
        // by `self.file` and open for the duration of the call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Errors that mean "this file system cannot do that", not "it failed".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

impl BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.overlay {
            Some(overlay) => overlay.read_at(&self.file, offset, buf),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        match &mut self.overlay {
            Some(overlay) => overlay.write_at(&self.file, offset, buf),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.overlay {
            Some(overlay) => overlay.flush(),
            // sync_data is fdatasync(2).
            None => self.file.sync_data(),
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.overlay.is_some() {
            // The base is shared: nothing to free there (a valid discard).
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {
                log::debug!("{}: discard not supported here: {e}", self.path.display());
                Ok(())
            }
            other => other,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.overlay.is_some() {
            return write_zero_blocks(self, offset, len);
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if unsupported(&e) => {
                log::debug!(
                    "{}: fallocate mode {mode:#x} not supported, writing zeros: {e}",
                    self.path.display()
                );
                write_zero_blocks(self, offset, len)
            }
            other => other,
        }
    }
}

/// A disk in memory: for tests, and for guests that need scratch space that
/// disappears with the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBackend {
    data: Vec<u8>,
    flushes: u64,
}

impl MemoryBackend {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `data`.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        Self { data, flushes: 0 }
    }

    /// The disk's contents.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// How many times the disk was flushed.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// The `len` bytes at `offset`, if they are all on the disk.
    fn range(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        Some(start..start.checked_add(len)?)
    }
}

fn past_end(offset: u64, len: usize, disk_len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{len} bytes at {offset} are past the end of a {disk_len}-byte disk"),
    )
}

impl BlockBackend for MemoryBackend {
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let disk_len = self.data.len();
        let bytes = Self::range(offset, buf.len())
            .and_then(|range| self.data.get(range))
            .ok_or_else(|| past_end(offset, buf.len(), disk_len))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let disk_len = self.data.len();
        let bytes = Self::range(offset, buf.len())
            .and_then(|range| self.data.get_mut(range))
            .ok_or_else(|| past_end(offset, buf.len(), disk_len))?;
        bytes.copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushes = self.flushes.saturating_add(1);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let disk_len = self.data.len();
        let bytes = Self::range(offset, len)
            .and_then(|range| self.data.get_mut(range))
            .ok_or_else(|| past_end(offset, len, disk_len))?;
        bytes.fill(0);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A file in the temp directory, removed on drop.
    pub(crate) struct TempImage(pub PathBuf);

    impl TempImage {
        pub fn new(size: u64) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "keel-virtio-test-{}-{}.img",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ));
            let file = File::create(&path).unwrap();
            file.set_len(size).unwrap();
            Self(path)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn file_backend_reads_back_what_it_wrote_and_reports_its_size() {
        let image = TempImage::new(8192);
        let mut disk = FileBackend::open(&image.0, false).unwrap();
        assert_eq!(disk.capacity(), 8192);
        disk.write_at(4096, b"keel").unwrap();
        disk.flush().unwrap();
        let mut buf = [0u8; 4];
        disk.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"keel");
    }

    #[test]
    fn file_backend_sparse_holes_read_as_zeros() {
        let image = TempImage::new(1 << 30);
        let mut disk = FileBackend::open(&image.0, false).unwrap();
        let mut buf = [0xffu8; 512];
        disk.read_at((1 << 30) - 512, &mut buf).unwrap();
        assert_eq!(buf, [0; 512]);
    }

    #[test]
    fn file_backend_write_zeroes_and_discard_zero_the_range() {
        let image = TempImage::new(3 * 4096);
        {
            let mut f = OpenOptions::new().write(true).open(&image.0).unwrap();
            f.write_all(&[0xab; 3 * 4096]).unwrap();
        }
        let mut disk = FileBackend::open(&image.0, false).unwrap();
        disk.write_zeroes(4096, 4096, false).unwrap();
        disk.write_zeroes(0, 512, true).unwrap();
        let mut buf = vec![0u8; 3 * 4096];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..4096].iter().all(|&b| b == 0xab));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 0xab));
        disk.discard(8192, 4096).unwrap();
        assert_eq!(disk.capacity(), 3 * 4096, "KEEP_SIZE keeps the size");
    }

    #[test]
    fn file_backend_opened_read_only_refuses_writes() {
        let image = TempImage::new(4096);
        let mut disk = FileBackend::open(&image.0, true).unwrap();
        assert!(disk.write_at(0, b"x").is_err());
    }

    #[test]
    fn file_backend_open_names_the_missing_path() {
        let err = FileBackend::open("/nonexistent/keel/disk.img", false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/keel/disk.img"), "{err}");
    }

    #[test]
    fn default_write_zeroes_writes_zero_chunks() {
        struct Plain(MemoryBackend);
        impl BlockBackend for Plain {
            fn capacity(&self) -> u64 {
                self.0.capacity()
            }
            fn read_at(&mut self, o: u64, b: &mut [u8]) -> io::Result<()> {
                self.0.read_at(o, b)
            }
            fn write_at(&mut self, o: u64, b: &[u8]) -> io::Result<()> {
                self.0.write_at(o, b)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut disk = Plain(MemoryBackend::from_bytes(vec![7; 200 * 1024]));
        disk.write_zeroes(512, 150 * 1024, true).unwrap();
        disk.discard(0, 512).unwrap();
        assert_eq!(disk.0.data()[511], 7);
        assert!(disk.0.data()[512..512 + 150 * 1024].iter().all(|&b| b == 0));
        assert_eq!(disk.0.data()[512 + 150 * 1024], 7);
    }

    #[test]
    fn memory_backend_refuses_access_past_its_end() {
        let mut disk = MemoryBackend::new(1024);
        assert!(disk.read_at(1020, &mut [0; 8]).is_err());
        assert!(disk.write_at(u64::MAX, &[0]).is_err());
        assert!(disk.write_zeroes(1000, 100, false).is_err());
    }
}
