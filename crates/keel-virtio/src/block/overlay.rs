//! Keel's copy-on-write overlay: a read-only base image shared by many
//! disks, and one overlay file per disk that holds only the clusters that
//! disk wrote. Clones of one snapshot each get their own overlay, so they
//! never see each other's writes and the base never changes.
//!
//! # The overlay file (format version 1)
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `KEELOVL1` |
//! | 8 | 4 | format version, 1, little endian |
//! | 12 | 4 | cluster size in bytes, 4096, little endian |
//! | 16 | 8 | the disk's size in bytes (the base's), little endian |
//! | 24 | 8 | the offset of the data area, little endian |
//! | 4096 | ⌈clusters / 8⌉ | the allocation bitmap: bit `i % 8` of byte `i / 8` set when cluster `i` is in the overlay |
//! | data area | clusters × 4096 | cluster `i` at `data + i × 4096` (a sparse file: unwritten clusters take no space) |
//!
//! The data area starts at the first 4 KiB boundary after the bitmap. A
//! cluster's data is written before its bitmap bit, so a crash between the
//! two loses that write (which the guest had not seen acknowledged) but
//! never exposes a half-written cluster. A flush syncs both.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The overlay's first eight bytes.
pub const OVERLAY_MAGIC: [u8; 8] = *b"KEELOVL1";
const VERSION: u32 = 1;
const CLUSTER: u64 = 4096;
const BITMAP_OFFSET: u64 = 4096;

#[derive(Debug)]
pub(crate) struct Overlay {
    file: File,
    /// One bit per cluster.
    bitmap: Vec<u8>,
    data_offset: u64,
    size: u64,
}

fn invalid(path: &Path, what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("overlay {}: {what}", path.display()),
    )
}

/// An offset outside the overlay file's layout. `open` checked that the
/// whole layout fits in a u64 and `check` that requests stay on the disk,
/// so this is never returned.
fn outside_layout() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset outside the overlay's layout")
}

impl Overlay {
    /// Opens the overlay at `path` for a disk of `size` bytes, creating it
    /// if it does not exist or is empty; an existing one must be an
    /// overlay of a disk of the same size.
    pub fn open(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let clusters = size.div_ceil(CLUSTER);
        let bitmap_len = usize::try_from(clusters.div_ceil(8))
            .map_err(|_| invalid(path, format!("a {size}-byte disk is too large")))?;
        let too_large = || invalid(path, format!("a {size}-byte disk is too large"));
        let data_offset = BITMAP_OFFSET
            .checked_add(bitmap_len as u64)
            .and_then(|end| end.checked_next_multiple_of(CLUSTER))
            .ok_or_else(too_large)?;
        let file_len = clusters
            .checked_mul(CLUSTER)
            .and_then(|data| data.checked_add(data_offset))
            .ok_or_else(too_large)?;
        if file.metadata()?.len() == 0 {
            let mut header = [0u8; 32];
            header[0..8].copy_from_slice(&OVERLAY_MAGIC);
            header[8..12].copy_from_slice(&VERSION.to_le_bytes());
            header[12..16].copy_from_slice(&(CLUSTER as u32).to_le_bytes());
            header[16..24].copy_from_slice(&size.to_le_bytes());
            header[24..32].copy_from_slice(&data_offset.to_le_bytes());
            file.write_all_at(&header, 0)?;
            file.set_len(file_len)?;
            file.sync_all()?;
            return Ok(Self {
                file,
                bitmap: vec![0; bitmap_len],
                data_offset,
                size,
            });
        }
        let mut header = [0u8; 32];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| invalid(path, format!("cannot read the header: {e}")))?;
        // A little-endian field of up to 8 bytes; the ranges are constants
        // inside the header.
        let field = |range: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            for (dst, src) in b.iter_mut().zip(header.get(range).unwrap_or_default()) {
                *dst = *src;
            }
            u64::from_le_bytes(b)
        };
        if header[0..8] != OVERLAY_MAGIC {
            return Err(invalid(path, "not a Keel overlay (no KEELOVL1 magic)".into()));
        }
        if field(8..12) != u64::from(VERSION) {
            return Err(invalid(
                path,
                format!("format version {}, expected {VERSION}", field(8..12)),
            ));
        }
        if field(12..16) != CLUSTER {
            return Err(invalid(
                path,
                format!("cluster size {}, expected {CLUSTER}", field(12..16)),
            ));
        }
        if field(16..24) != size {
            return Err(invalid(
                path,
                format!(
                    "it overlays a {}-byte disk, the base has {size} bytes",
                    field(16..24)
                ),
            ));
        }
        if field(24..32) != data_offset {
            return Err(invalid(
                path,
                format!("data area at {}, expected {data_offset}", field(24..32)),
            ));
        }
        let mut bitmap = vec![0u8; bitmap_len];
        file.read_exact_at(&mut bitmap, BITMAP_OFFSET)
            .map_err(|e| invalid(path, format!("cannot read the bitmap: {e}")))?;
        Ok(Self {
            file,
            bitmap,
            data_offset,
            size,
        })
    }

    fn present(&self, cluster: u64) -> bool {
        let byte = usize::try_from(cluster / 8).unwrap_or(usize::MAX);
        self.bitmap
            .get(byte)
            .is_some_and(|b| b & (1 << (cluster % 8)) != 0)
    }

    /// How many clusters the overlay holds.
    pub fn allocated_clusters(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at {offset} are past the end of a {}-byte disk",
                    self.size
                ),
            )),
        }
    }

    /// Reads `buf` at `offset`: each cluster from the overlay if it holds
    /// it, else from `base`.
    pub fn read_at(&self, base: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let mut at = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let (cluster, within, chunk_len) = locate(at, rest.len());
            let (chunk, tail) = std::mem::take(&mut rest)
                .split_at_mut_checked(chunk_len)
                .ok_or_else(outside_layout)?;
            if self.present(cluster) {
                let data = self.cluster_data(cluster)?;
                let from = data.checked_add(within).ok_or_else(outside_layout)?;
                self.file.read_exact_at(chunk, from)?;
            } else {
                base.read_exact_at(chunk, at)?;
            }
            // At most `offset + buf.len()`, on the disk (`check`).
            at = at.saturating_add(chunk_len as u64);
            rest = tail;
        }
        Ok(())
    }

    /// Where cluster `cluster`'s data is in the overlay file.
    fn cluster_data(&self, cluster: u64) -> io::Result<u64> {
        cluster
            .checked_mul(CLUSTER)
            .and_then(|start| start.checked_add(self.data_offset))
            .ok_or_else(outside_layout)
    }

    /// Writes `buf` at `offset` into the overlay, copying the rest of a
    /// cluster from `base` the first time part of it is written.
    pub fn write_at(&mut self, base: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let mut whole = vec![0u8; CLUSTER as usize];
        let mut at = offset;
        let mut rest = buf;
        while !rest.is_empty() {
            let (cluster, within, chunk_len) = locate(at, rest.len());
            let (chunk, tail) = rest.split_at_checked(chunk_len).ok_or_else(outside_layout)?;
            let data = self.cluster_data(cluster)?;
            if self.present(cluster) {
                let to = data.checked_add(within).ok_or_else(outside_layout)?;
                self.file.write_all_at(chunk, to)?;
            } else {
                // The cluster's other bytes come from the base (the last
                // cluster may be short). `at` is on the disk, so the
                // cluster starts below its end.
                let cluster_start = at.saturating_sub(within);
                let valid = self.size.saturating_sub(cluster_start).min(CLUSTER) as usize;
                whole.fill(0);
                if chunk_len < valid {
                    let start = whole.get_mut(..valid).ok_or_else(outside_layout)?;
                    base.read_exact_at(start, cluster_start)?;
                }
                whole
                    .get_mut(within as usize..)
                    .and_then(|w| w.get_mut(..chunk_len))
                    .ok_or_else(outside_layout)?
                    .copy_from_slice(chunk);
                self.file.write_all_at(&whole, data)?;
                let byte = (cluster / 8) as usize;
                if let Some(b) = self.bitmap.get_mut(byte) {
                    *b |= 1 << (cluster % 8);
                    let value = *b;
                    // Below the data area (`open`).
                    let bitmap_at = BITMAP_OFFSET.saturating_add(byte as u64);
                    self.file.write_all_at(&[value], bitmap_at)?;
                }
            }
            // At most `offset + buf.len()`, on the disk (`check`).
            at = at.saturating_add(chunk_len as u64);
            rest = tail;
        }
        Ok(())
    }

    /// Makes the overlay's data and bitmap durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Where disk byte `at` is: its cluster, its offset in the cluster, and how
/// many of `len` bytes from there lie in that cluster (1 to `CLUSTER`, for
/// a `len` above 0).
fn locate(at: u64, len: usize) -> (u64, u64, usize) {
    let within = at % CLUSTER;
    // `within` is below CLUSTER.
    let left_in_cluster = CLUSTER.saturating_sub(within);
    // At most CLUSTER, so it fits in usize.
    (at / CLUSTER, within, (left_in_cluster as usize).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("keel-overlay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn base(name: &str, size: usize) -> (File, std::path::PathBuf) {
        let p = temp(name);
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        (File::open(&p).unwrap(), p)
    }

    #[test]
    fn writes_land_in_the_overlay_and_reads_merge_with_the_base() {
        let size = 5 * 4096 + 512;
        let (base_file, base_path) = base("merge-base", size);
        let ovl_path = temp("merge-ovl");
        let mut ovl = Overlay::open(&ovl_path, size as u64).unwrap();
        // A write across a cluster boundary and one in the short last cluster.
        ovl.write_at(&base_file, 4096 - 100, &[0xaa; 200]).unwrap();
        ovl.write_at(&base_file, 5 * 4096 + 10, &[0xbb; 20]).unwrap();
        assert_eq!(ovl.allocated_clusters(), 3);
        let mut all = vec![0u8; size];
        ovl.read_at(&base_file, 0, &mut all).unwrap();
        for (i, &b) in all.iter().enumerate() {
            let expected = if (4096 - 100..4096 + 100).contains(&i) {
                0xaa
            } else if (5 * 4096 + 10..5 * 4096 + 30).contains(&i) {
                0xbb
            } else {
                (i % 251) as u8
            };
            assert_eq!(b, expected, "byte {i}");
        }
        // The base is untouched.
        let base_now = std::fs::read(&base_path).unwrap();
        assert!(base_now.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // Reopened, the overlay still has its clusters.
        ovl.flush().unwrap();
        drop(ovl);
        let again = Overlay::open(&ovl_path, size as u64).unwrap();
        let mut word = [0u8; 4];
        again.read_at(&base_file, 4096, &mut word).unwrap();
        assert_eq!(word, [0xaa; 4]);
        assert!(
            again.read_at(&base_file, size as u64 - 2, &mut word).is_err(),
            "past the end"
        );
        std::fs::remove_file(base_path).unwrap();
        std::fs::remove_file(ovl_path).unwrap();
    }

    #[test]
    fn an_overlay_of_another_disk_or_another_file_is_refused_by_name() {
        let ovl_path = temp("other");
        drop(Overlay::open(&ovl_path, 8192).unwrap());
        let err = Overlay::open(&ovl_path, 4096).unwrap_err().to_string();
        assert!(
            err.contains("overlays a 8192-byte disk, the base has 4096 bytes"),
            "{err}"
        );
        std::fs::write(&ovl_path, b"hello").unwrap();
        let err = Overlay::open(&ovl_path, 4096).unwrap_err().to_string();
        assert!(
            err.contains("cannot read the header") || err.contains("not a Keel overlay"),
            "{err}"
        );
        std::fs::write(&ovl_path, [7u8; 64]).unwrap();
        let err = Overlay::open(&ovl_path, 4096).unwrap_err().to_string();
        assert!(err.contains("not a Keel overlay"), "{err}");
        std::fs::remove_file(ovl_path).unwrap();
    }
}
