//! The guest's memory statistics (virtio 1.2, 5.5.6.3): a packed array of
//! `{ le16 tag; le64 val; }` entries, and what a VMM reports of them under
//! Firecracker's names.

/// Bytes of one `virtio_balloon_stat` entry.
pub(crate) const STAT_ENTRY_BYTES: usize = 10;

/// Most bytes of a statistics buffer that are read; the spec's tags fit in
/// 160, so anything past this is a driver padding its buffer.
pub(crate) const MAX_STATS_BYTES: usize = 4096;

/// The statistics tags (Linux's `VIRTIO_BALLOON_S_*`).
mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
    pub const ASYNC_SCAN: u16 = 12;
    pub const DIRECT_SCAN: u16 = 13;
    pub const ASYNC_RECLAIM: u16 = 14;
    pub const DIRECT_RECLAIM: u16 = 15;
}

/// The balloon's state and the guest's latest memory statistics, with
/// Firecracker's field names (`GET /balloon/statistics`). Guest values are
/// `None` until the guest has reported them; sizes are in bytes, as the
/// guest reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonStats {
    /// Pages (4 KiB) the device asks the guest to hold in the balloon.
    pub target_pages: u32,
    /// Pages the guest says the balloon holds (`actual`).
    pub actual_pages: u32,
    /// `target_pages` in MiB.
    pub target_mib: u32,
    /// `actual_pages` in MiB.
    pub actual_mib: u32,
    /// Memory swapped in, in bytes.
    pub swap_in: Option<u64>,
    /// Memory swapped out, in bytes.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Memory the guest does not use at all, in bytes.
    pub free_memory: Option<u64>,
    /// Memory the guest can use, in bytes.
    pub total_memory: Option<u64>,
    /// Memory available for new work without swapping, in bytes (Linux's
    /// `MemAvailable`).
    pub available_memory: Option<u64>,
    /// Memory in the guest's disk caches, in bytes.
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
    /// Processes the guest's OOM killer has killed.
    pub oom_kill: Option<u64>,
    /// Allocation stalls.
    pub alloc_stall: Option<u64>,
    /// Pages scanned by background reclaim.
    pub async_scan: Option<u64>,
    /// Pages scanned by direct reclaim.
    pub direct_scan: Option<u64>,
    /// Pages reclaimed in the background.
    pub async_reclaim: Option<u64>,
    /// Pages reclaimed directly.
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// Records one `tag = value` entry; unknown tags are ignored (a newer
    /// guest may report more than this device knows). Returns whether the
    /// tag was known.
    pub(crate) fn set(&mut self, tag: u16, value: u64) -> bool {
        let field = match tag {
            tag::SWAP_IN => &mut self.swap_in,
            tag::SWAP_OUT => &mut self.swap_out,
            tag::MAJFLT => &mut self.major_faults,
            tag::MINFLT => &mut self.minor_faults,
            tag::MEMFREE => &mut self.free_memory,
            tag::MEMTOT => &mut self.total_memory,
            tag::AVAIL => &mut self.available_memory,
            tag::CACHES => &mut self.disk_caches,
            tag::HTLB_PGALLOC => &mut self.hugetlb_allocations,
            tag::HTLB_PGFAIL => &mut self.hugetlb_failures,
            tag::OOM_KILL => &mut self.oom_kill,
            tag::ALLOC_STALL => &mut self.alloc_stall,
            tag::ASYNC_SCAN => &mut self.async_scan,
            tag::DIRECT_SCAN => &mut self.direct_scan,
            tag::ASYNC_RECLAIM => &mut self.async_reclaim,
            tag::DIRECT_RECLAIM => &mut self.direct_reclaim,
            _ => return false,
        };
        *field = Some(value);
        true
    }

    /// Replaces the guest's values with the entries in `bytes` (a whole
    /// statistics buffer; a trailing partial entry is ignored). Returns how
    /// many entries had known tags.
    pub(crate) fn update_from(&mut self, bytes: &[u8]) -> usize {
        let (target_pages, actual_pages) = (self.target_pages, self.actual_pages);
        *self = BalloonStats::default();
        self.set_pages(target_pages, actual_pages);
        bytes
            .chunks_exact(STAT_ENTRY_BYTES)
            .filter(|entry| {
                // Every chunk is STAT_ENTRY_BYTES long: a 2-byte tag and an
                // 8-byte value.
                let Some((tag, value)) = entry.split_first_chunk::<2>() else {
                    return false;
                };
                let Ok(value) = <[u8; 8]>::try_from(value) else {
                    return false;
                };
                self.set(u16::from_le_bytes(*tag), u64::from_le_bytes(value))
            })
            .count()
    }

    /// Sets the balloon's own figures (pages and MiB).
    pub(crate) fn set_pages(&mut self, target_pages: u32, actual_pages: u32) {
        self.target_pages = target_pages;
        self.actual_pages = actual_pages;
        self.target_mib = target_pages >> 8;
        self.actual_mib = actual_pages >> 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut bytes = tag.to_le_bytes().to_vec();
        bytes.extend_from_slice(&value.to_le_bytes());
        bytes
    }

    #[test]
    fn parses_every_known_tag_into_its_firecracker_field() {
        let mut buffer = Vec::new();
        for tag in 0..16u16 {
            buffer.extend(entry(tag, 1000 + u64::from(tag)));
        }
        let mut stats = BalloonStats::default();
        stats.set_pages(512, 256);
        assert_eq!(stats.update_from(&buffer), 16);
        assert_eq!(stats.swap_in, Some(1000));
        assert_eq!(stats.swap_out, Some(1001));
        assert_eq!(stats.major_faults, Some(1002));
        assert_eq!(stats.minor_faults, Some(1003));
        assert_eq!(stats.free_memory, Some(1004));
        assert_eq!(stats.total_memory, Some(1005));
        assert_eq!(stats.available_memory, Some(1006));
        assert_eq!(stats.disk_caches, Some(1007));
        assert_eq!(stats.hugetlb_allocations, Some(1008));
        assert_eq!(stats.hugetlb_failures, Some(1009));
        assert_eq!(stats.oom_kill, Some(1010));
        assert_eq!(stats.direct_reclaim, Some(1015));
        assert_eq!(
            (stats.target_mib, stats.actual_mib),
            (2, 1),
            "pages kept, MiB derived"
        );
    }

    #[test]
    fn unknown_tags_and_a_trailing_partial_entry_are_ignored() {
        let mut buffer = entry(5, 64 << 20);
        buffer.extend(entry(0x7fff, 1));
        buffer.extend_from_slice(&[4, 0, 1, 2]); // a cut-off MEMFREE
        let mut stats = BalloonStats::default();
        assert_eq!(stats.update_from(&buffer), 1);
        assert_eq!(stats.total_memory, Some(64 << 20));
        assert_eq!(stats.free_memory, None);
    }

    #[test]
    fn a_new_report_replaces_the_old_one_entirely() {
        let mut stats = BalloonStats::default();
        stats.update_from(&entry(4, 7));
        stats.update_from(&entry(5, 9));
        assert_eq!(stats.free_memory, None, "not in the latest report");
        assert_eq!(stats.total_memory, Some(9));
    }
}
