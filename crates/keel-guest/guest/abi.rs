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
    "pio-loop",
    "mmio-loop",
    "fault",
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
