// The contract between the guest and whoever boots it. This one file is
// compiled into both the guest image and the host-side `keel-guest` library
// (through `include!`), so the two can never disagree on a number.

/// I/O port the guest writes one status byte to when it is done; the VMM ends
/// the VM and reports "guest exited with status V".
pub const EXIT_PORT: u16 = 0xf4;

/// Guest-physical (and, identity-mapped, virtual) address the image is linked
/// at: the start of its first `PT_LOAD` segment and of its entry point.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Names of the programs the guest can run, selected by the first word of the
/// kernel command line that is not a `key=value` pair (`hello` when there is
/// none). See the crate documentation for their arguments.
pub const PROGRAMS: &[&str] = &[
    "hello",
    "mmio-rw",
    "exit",
    "reset",
    "int3",
    "triple-fault",
    "bad-insn",
    "serial-echo",
    "pio-loop",
    "mmio-loop",
    "fault",
    "virtio-blk",
    "virtio-blk-bench",
    "virtio-blk-flush-wait",
    "virtio-rng",
    "virtio-balloon",
    "virtio-request",
    "virtio-console",
    "virtio-hostile",
    "virtio-net",
    "virtio-vsock",
    "pci-hostile",
    "flood",
    "snapshot-seq",
    "acpi-poweroff",
    "acpi-power-button",
];

/// Exit status: the program ran and every check passed.
pub const STATUS_PASS: u8 = 0;
/// Exit status: a check failed (the guest printed a `FAIL:` line saying which).
pub const STATUS_FAIL: u8 = 1;
/// Exit status: unknown program, or a missing or malformed argument.
pub const STATUS_BAD_ARGS: u8 = 2;
/// Exit status: the guest's own Rust code panicked (a bug in the guest).
pub const STATUS_PANIC: u8 = 3;
/// Exit status bit for an unexpected CPU exception: the status is
/// `STATUS_EXCEPTION | vector`, e.g. `0x8e` for a page fault.
pub const STATUS_EXCEPTION: u8 = 0x80;

/// Value the scratch device used by `mmio-rw` returns at offset 8 ("KEEL").
pub const SCRATCH_MAGIC: u32 = 0x4b45_454c;

/// `virtio-blk` on a writable disk: the pattern-filled range written as one
/// 4 KiB request, as `(first sector, sectors)`.
pub const BLK_HEAD_RANGE: (u64, u64) = (0, 8);
/// `virtio-blk`: the pattern-filled range written as one 64 KiB request of
/// several segments.
pub const BLK_MULTI_RANGE: (u64, u64) = (64, 128);
/// `virtio-blk`: a range filled with the pattern and then discarded; it
/// holds the pattern or zeros afterwards (a discard leaves the contents
/// unspecified).
pub const BLK_DISCARD_RANGE: (u64, u64) = (256, 8);
/// `virtio-blk`: a range filled with the pattern and then overwritten with
/// `WRITE_ZEROES`: zeros afterwards.
pub const BLK_ZEROED_RANGE: (u64, u64) = (320, 16);
/// Smallest writable disk `virtio-blk` accepts, in sectors (512 KiB). The
/// last sector (`capacity - 1`) is pattern-filled too.
pub const BLK_MIN_SECTORS: u64 = 1024;
/// The `pattern=` value `virtio-blk` uses when none is given.
pub const BLK_DEFAULT_PATTERN: u64 = 1;

/// Word `word` (0–63) of sector `sector` of disk `disk` (0 for `vda`) in
/// `virtio-blk`'s pattern: SplitMix64's output function applied to
/// `pattern ^ (disk << 56) ^ (sector * 64 + word)`. A sector holds its 64
/// words little endian.
pub const fn blk_pattern_word(pattern: u64, disk: u64, sector: u64, word: u64) -> u64 {
    let mut z = (pattern ^ (disk << 56) ^ sector.wrapping_mul(64).wrapping_add(word))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (512 bytes) with sector `sector` of `virtio-blk`'s pattern
/// for disk `disk`; see [`blk_pattern_word`].
pub fn blk_pattern_sector(pattern: u64, disk: u64, sector: u64, out: &mut [u8]) {
    for (word, bytes) in out.chunks_exact_mut(8).enumerate() {
        bytes.copy_from_slice(&blk_pattern_word(pattern, disk, sector, word as u64).to_le_bytes());
    }
}

/// 64-bit FNV-1a, the checksum `virtio-blk` prints as
/// `sectors 0+8 fnv1a64=0x...` for what it read back.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in data {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
