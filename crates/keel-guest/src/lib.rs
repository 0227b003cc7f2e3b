//! Keel's built-in test guest: a tiny operating system, built from source
//! with the workspace, that a VMM boots like a Linux `vmlinux` to test
//! itself.
//!
//! # Why it exists
//!
//! A VMM's devices, interrupt wiring and exit handling are best tested with a
//! guest that does exactly one thing and says whether it worked, in well
//! under a second. Linux cannot be that guest on every machine: where KVM
//! emulates guest ring 0 in software (about a million instructions per
//! second, some instructions not at all) a kernel takes minutes to boot. This
//! guest keeps ring 0 to about 110 hand-written instructions at boot plus a
//! handful per interrupt or exception, and runs everything else — drivers
//! and test programs, in Rust — in ring 3, which such hosts run natively.
//! On a real VT-x/AMD-V host it behaves the same, only faster.
//!
//! The image needs no download: `build.rs` compiles `guest/` with the host
//! toolchain (`no_std`, freestanding, statically linked at [`LOAD_ADDR`]),
//! and [`elf`] returns the result.
//!
//! # Boot contract
//!
//! The guest can be entered two ways, as a Linux `vmlinux` can: Linux's
//! 64-bit boot protocol as Firecracker implements it for an ELF `vmlinux`
//! (the ELF entry point), or PVH (the entry in the ELF's PVH note), which
//! is what QEMU offers for ELF kernels (`-M microvm -kernel`). Keel's
//! `VmConfig::boot_protocol` (`keel --boot-protocol`) selects either. The
//! 64-bit entry runs 108 emulated ring-0 instructions before ring 3, the
//! PVH entry 121.
//!
//! * The image is loaded with `linux_loader::loader::Elf::load(mem, None,
//!   image, Some(GuestAddress(0x10_0000)))`: each `PT_LOAD` at its `p_paddr`
//!   (equal to `p_vaddr`).
//! * **64-bit entry**: RIP is the ELF entry point ([`LOAD_ADDR`]); 64-bit
//!   long mode at CPL 0 with paging on and the image identity-mapped (the
//!   guest loads its own page tables with its third instruction),
//!   interrupts off, and **RSI = the address of the zero page** (`struct
//!   boot_params`). The guest sets up its own stack, GDT, TSS and IDT, so
//!   the VMM's (conventionally RSP = 0x8ff0, CS = 0x10, DS = 0x18, a GDT at
//!   0x500 and an empty IDT) only have to last until then. In the zero page
//!   the guest reads the command line pointer (`u32` at 0x228, a
//!   NUL-terminated string of at most 2048 bytes), the e820 entry count
//!   (`u8` at 0x1e8) and the e820 table (20-byte entries at 0x2d0).
//! * **PVH entry**: a `PT_NOTE` segment holds one note, name `Xen`, type 18
//!   (`XEN_ELFNOTE_PHYS32_ENTRY`), an 8-byte descriptor with the 32-bit
//!   entry address (`linux_loader` reports it as
//!   `PvhBootCapability::PvhEntryPresent`). Entered as the PVH ABI says: 32-bit
//!   protected mode at CPL 0, flat 4 GiB code and data segments, paging off,
//!   **EBX = the address of `struct hvm_start_info`**. The guest needs no
//!   stack, GDT or page tables from the VMM: a 16-instruction stub loads its
//!   own page tables, sets CR4.PAE, EFER.LME and CR0.PG, loads its GDT and
//!   far-jumps to 64-bit code, which joins the 64-bit entry with the start
//!   info in RSI. From `hvm_start_info` (magic 0x336e_c578 at offset 0,
//!   which is how the guest tells it from a zero page) it reads the command
//!   line (`u64` address at 24, at most 2048 bytes) and, from version 1 on,
//!   the memory map (`u64` address at 40, `u32` count at 48; 24-byte
//!   entries `{addr u64, size u64, type u32, reserved u32}`, e820 types).
//! * Either way, a structure, command line or memory map outside the RAM the
//!   guest maps (the first GiB) is ignored (no command line: `hello`; no
//!   memory map) rather than read, so a broken VMM cannot fault the guest
//!   before it can say so. At most 128 memory map entries are read.
//! * At least 16 MiB ([`MIN_MEMORY_MIB`]) of RAM from address 0. The guest identity-maps the first
//!   GiB (RAM) and 0xC000_0000–0xFFFF_FFFF (the 32-bit MMIO gap, where MMIO
//!   devices under test must live), all user-accessible.
//! * Platform: a local APIC at 0xFEE0_0000 (xAPIC mode, enabled in
//!   `IA32_APIC_BASE` as after reset) and an IOAPIC at 0xFEC0_0000 with at
//!   least 24 pins, GSI N on pin N — either KVM's in-kernel irqchip or a
//!   split irqchip (local APIC in KVM, IOAPIC in the VMM). No 8259 PIC and
//!   no 8254 PIT are needed: the guest masks both PICs (writes to ports
//!   0x21 and 0xa1 nobody answers are harmless) and LAPIC LINT0, and only
//!   falls back to the PIT when calibrating the TSC if no CPUID leaf gives
//!   its frequency (without a PIT the frequency is reported unknown). Pin
//!   N is programmed to vector 0x20 + N, fixed delivery to the boot CPU's
//!   APIC ID, edge-triggered, active high. Also a 16550 UART at port 0x3f8
//!   raising IRQ 4, an i8042 whose command 0xfe on port 0x64 resets the
//!   machine, and the exit port [`EXIT_PORT`], where a one-byte write of `V`
//!   ends the VM with status `V`.
//! * When the host's KVM cannot emulate a ring-0 `int3` (it stops with
//!   `KVM_EXIT_INTERNAL_ERROR`), the VMM injects `#BP` itself: RIP += 1, then
//!   `KVM_SET_VCPU_EVENTS` with exception 3 injected. Only the `int3`
//!   program needs this.
//!
//! # Programs
//!
//! The command line is `[key=value ...] PROGRAM [key=value ...]`: the program
//! is the first word without `=` (`hello` when there is none); numbers are
//! decimal or `0x` hexadecimal; keys a program does not know are reported
//! with a `note:` line and ignored, so a VMM may add its own parameters. The
//! names are in [`PROGRAMS`].
//!
//! | program | arguments | does | passes with |
//! |---|---|---|---|
//! | `hello` | `[mmio=ADDR] [expect=V]` | prints `Keel test guest: hello`, the RAM size from e820, the command line; reads the `u32` at ADDR and prints `mmio[ADDR] = V`; last `serial: N bytes sent, I interrupts, P polled` | [`STATUS_PASS`] if serial interrupts arrived and the MMIO value matches `expect` |
//! | `mmio-rw` | `mmio=ADDR` | drives the scratch device at ADDR: magic at +8 must be [`SCRATCH_MAGIC`]; patterns written to +0 read back; the read-only access counter at +4 grows by one per access to +0 and ignores writes | [`STATUS_PASS`] |
//! | `exit` | `code=N` | exits at once with status N (0–255) | status N |
//! | `reset` | | writes 0xfe to port 0x64 | a VM reset |
//! | `int3` | | ring 0 executes `int3`; the `#BP` handler must run once | [`STATUS_PASS`] |
//! | `triple-fault` | | ring 0 executes `ud2` with an empty IDT | a VM shutdown (`KVM_EXIT_SHUTDOWN`) |
//! | `bad-insn` | | ring 0 executes `popcnt`, which KVM's instruction emulator lacks | an emulation-failure stop on emulating hosts; [`STATUS_PASS`] elsewhere |
//! | `serial-echo` | `[timeout-ms=N]` | prints `KEEL-SERIAL: ready`, reads one line from COM1 (polled, at most N ms between bytes, default 5000) and prints `KEEL-SERIAL: got <line>` | [`STATUS_PASS`], or [`STATUS_FAIL`] on a timeout |
//! | `pio-loop` | `[count=N] [port=P]` | N one-byte writes to port P (default 1000 to 0x80), then prints TSC ticks per write | [`STATUS_PASS`] |
//! | `mmio-loop` | `mmio=ADDR [count=N]` | N 32-bit writes to ADDR (default 1000) | [`STATUS_PASS`] |
//! | `fault` | `[addr=ADDR]` | reads ADDR (default 0x7000_0000_0000, canonical and unmapped) from ring 3 | status `0x80 \| 14` (`#PF`) |
//! | `virtio-blk` | `[pattern=N] [irq=0\|1] [event-idx=0\|1] [indirect=0\|1]` | drives every virtio-blk device; see [virtio programs](#virtio-programs) | [`STATUS_PASS`] if every check on every disk passed |
//! | `virtio-blk-bench` | `[size=N] [count=N] [disk=N] [irq=0\|1]` | N sequential writes, then N sequential reads of `size` bytes (default 4096 × 256) on disk N (default 0, `vda`) and prints the rates; `irq=1` has each completion interrupt the guest | [`STATUS_PASS`] if every request succeeded |
//! | `virtio-blk-flush-wait` | `[pattern=N]` | writes sectors 0–7 of the first disk with byte N (default 0x5a), FLUSHes, prints `KEEL-FLUSHED pattern=N`, then spins forever (for the host's SIGKILL data-safety test) | never exits on success; [`STATUS_FAIL`] if the write or flush fails |
//! | `virtio-rng` | `[irq=0\|1]` | fills buffers of 1 B to 64 KiB from every virtio-rng device | [`STATUS_PASS`] if every buffer came back filled and random-looking |
//! | `virtio-balloon` | `[touch-mib=N] [report-mib=N] [deflate=0\|1] [stats-rounds=N] [wait-ms=N] [irq=0\|1]` | a balloon driver on the first virtio-balloon device: accepts every feature offered, posts its first statistics, writes one word into each page of the first N MiB of RAM from 16 MiB (`touch-mib`, default 0); reads the target `num_pages` (waiting up to `wait-ms`, default 10000, after printing `virtio-balloon: waiting for a target` if it is 0), inflates with pages from 16 MiB up (256 frame numbers per request), writes `actual` and prints `virtio-balloon: inflated P pages (M MiB), actual P`; answers `stats-rounds` statistics requests (default 2) with the RAM size and free memory; reports `report-mib` MiB of touched pages past the balloon on the reporting queue (2 MiB per report); with `deflate=1`, prints `virtio-balloon: waiting for a smaller target`, deflates to the new target and checks the deflated pages read back as zero (the host released them) | [`STATUS_PASS`] if every request was used, `actual` read back, and every deflated touched page came back zero-filled |
//! | `virtio-request` | `type=N [send=TEXT] [reply-bytes=N] [count=N] [irq=0\|1]` | a generic driver for a device type of the embedder's own: brings up the first device with device ID N (no features, queue 0), then N times (default 1) posts a chain of one device-readable buffer holding TEXT (default `hello`, at most 4096 bytes) and one device-writable buffer of `reply-bytes` (default 256), waits for it to be used and prints `virtio-request: reply I: U bytes: "TEXT"` | [`STATUS_PASS`] if every request was used within 5 s, with at most `reply-bytes` bytes written |
//! | `virtio-console` | `[lines=N] [timeout-ms=N] [irq=0\|1]` | writes `KEEL-HVC: hello from the guest` on port 0, then reads N lines (default 1) and echoes each as `KEEL-HVC: got LINE` | [`STATUS_PASS`] |
//! | `virtio-hostile` | | broken chains, bad addresses, bad queues and resets mid-I/O against the first virtio-blk (and virtio-rng) device | [`STATUS_PASS`] if the devices refused every case and kept working |
//! | `virtio-net` | `[mac=MAC] [host=IP] [me=IP] [udp-port=N] [burst=N] [flood=N]` | on the first virtio-net card (VERSION_1 + MAC): prints the MAC, ARPs for `host` (default 10.0.2.1), pings it, has UDP datagrams of 1–1472 bytes echoed by `host:udp-port` (default 7777) and checks every byte, lets 128 echoes arrive with only 64 receive buffers posted (none may be lost), floods N 60-byte frames (default 4000), times a burst of N 1472-byte datagrams to `udp-port+1` (default 2000), then asks a blaster at `udp-port+2` for N datagrams of 18 and of 1472 bytes and times their reception (`burst=0` skips both bursts; `udp-port` at most 65533) | [`STATUS_PASS`] if every check passed (rx bursts: at least one datagram each, none malformed or duplicated) |
//! | `pci-hostile` | | PCI configuration space and MSI-X abuse against the first virtio-blk device on PCI; see [`pci-hostile`](#pci-hostile) | [`STATUS_PASS`] if every case passed and the device kept working |
//! | `flood` | `[ms=N]` | for N ms (default 500), round after round: notifies queue 7 of the first virtio-blk device (which has one queue), reads the sector just past its end, and programs IOAPIC entry 20 with a reserved delivery mode; prints `flood: R rounds in N ms: …` — for testing that the VMM's log stays bounded | [`STATUS_PASS`] if every past-the-end read got IOERR |
//! | `acpi-poweroff` | | writes `SLP_EN \| SLP_TYP(5) << 2` to the ACPI sleep control register (port 0x600), as Linux powers off | a VM power-off ("guest powered off"); [`STATUS_FAIL`] if it keeps running |
//! | `acpi-power-button` | `[timeout-ms=N]` | unmasks the ACPI generic event device's GSI (from `keel.ged=ADDR:GSI`, which Keel adds when ACPI is on), prints `acpi: waiting for the power button`, and on its interrupt reads the event register (must say power button, and reading must clear it), then powers off through S5 | a VM power-off; [`STATUS_FAIL`] without an interrupt within N ms (default 10000) |
//! | `virtio-vsock` | `[port=N] [host-port=M] [conns=K] [bytes=B] [timeout-ms=T]` | a vsock driver with credit accounting: accepts K host connections on port N (default 1234), receives B bytes (default 65536) of a pattern on each and answers with B bytes (REQUESTs to other ports get RST); opens K connections to host port M (default 1235), sends B bytes and checks B back; then resets the first and shuts down the others (SHUTDOWN, waits for the RST) | [`STATUS_PASS`] if every byte matched and every connection ended as planned |
//!
//! An `mmio=` address must be 4-byte aligned, inside the identity map and
//! outside e820 RAM, otherwise the program fails with [`STATUS_BAD_ARGS`].
//!
//! # Virtio programs
//!
//! The `virtio-*` programs drive devices over either transport with one
//! driver. They find virtio-mmio devices the way Linux does with
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`: one `virtio_mmio.device=SIZE@BASE:GSI`
//! entry per device (`4K@0xd0001000:5`; SIZE and BASE take a K/M/G suffix,
//! BASE a `0x` prefix), in command-line order, which is what a VMM appends
//! for each virtio-mmio device; then virtio-pci devices by walking PCI bus
//! 0 (device 0–31, functions 1–7 where function 0 has the multi-function
//! bit) for modern virtio functions (vendor 0x1af4, device 0x1040 + type),
//! whose vendor capabilities give the common, notification, ISR and device
//! configuration structures, and whose MSI-X capability gives the table.
//! `pci=conf1` (the default) reaches configuration space through ports
//! 0xCF8/0xCFC, `pci=ecam` through the ECAM window at 0xC000_0000,
//! `pci=off` skips PCI. Every program accepts these keys (they never draw a
//! `note:`) and lists what it found, one line per device: `virtio: 0xBASE
//! GSI G: TYPE (device ID N, vendor 0xV)` or `virtio: PCI 00:DD.F BAR
//! 0xADDR: TYPE (…)`. A window outside the identity map, in RAM, without
//! the magic "virt" or not version 2 fails the program, as does a virtio-pci
//! function whose structures are missing or unmappable. Devices of a type
//! are numbered in that order: disks `vda`, `vdb`, …; entropy devices
//! `rng0`, `rng1`, ….
//!
//! The driver runs in ring 3 (`guest/virtio/`): reset, ACKNOWLEDGE, DRIVER,
//! feature negotiation in two 32-bit pages (always `VERSION_1`; plus the
//! device's own features the driver knows and, where the program asks,
//! `RING_EVENT_IDX` and `RING_INDIRECT_DESC`), FEATURES_OK read back, split
//! virtqueues in a static arena in `.bss` (descriptor table 16-byte,
//! available ring 2-byte, used ring 4-byte aligned, exactly: the used ring
//! starts at the first 4-byte boundary after the available ring), QueueReady,
//! DRIVER_OK, notifications (`QueueNotify` over MMIO, the queue's
//! notification address over PCI; honouring `VIRTQ_USED_F_NO_NOTIFY` or
//! `avail_event`). Completion is found by polling the used ring; while a
//! request is outstanding the driver reads the status register every
//! millisecond and reports `DEVICE_NEEDS_RESET` instead of waiting forever
//! (2 s per request at most). Unless the program got `irq=0`, a virtio-mmio
//! device whose GSI is an IOAPIC pin (below 24, not the serial port's 4) has
//! that pin unmasked, and a virtio-pci device gets an interrupt line I of
//! its own (5–23, not used by an MMIO device's GSI; shared once all are
//! taken): every MSI-X table entry is pointed at vector 0x20 + I on this
//! CPU (address `0xfee0_0000 | APIC ID << 12`), configuration changes get
//! entry 0 and queue `q` entry `q + 1`, and MSI-X is enabled. The ring-0
//! stubs count interrupts per vector, so the boot path is unchanged. The
//! driver acknowledges the interrupt status (`InterruptStatus`, or the ISR,
//! which reading clears) whenever interrupts arrived, and at its end each
//! program prints `PREFIX: interrupts: N on IRQ I for C completions,
//! used-buffer bit in InterruptStatus U times` and fails if N stayed 0 for
//! 2 s after the last request (a device without a line: `PREFIX:
//! completion polled only (…)`). Every failure is a `FAIL:` line naming the
//! device and the request.
//!
//! ## `virtio-blk`
//!
//! For every disk, in order, lines starting `virtio-blk: vdX: `:
//! `features offered 0x… accepted 0x…`; `capacity N sectors (K KiB),
//! size_max …, seg_max …, blk_size …, num_queues …, queue size …`; the
//! discard and write-zeroes limits when negotiated; `read-only` or
//! `read-write`; `id "…"` (GET_ID, up to 20 bytes, non-printable bytes as
//! `?`). Then, on a **read-write** disk (which must have at least
//! [`BLK_MIN_SECTORS`] sectors), where `P` is `pattern=` (default
//! [`BLK_DEFAULT_PATTERN`]), `D` the disk's index (0 for `vda`) and `C` its
//! capacity in sectors:
//!
//! 1. writes the pattern to [`BLK_HEAD_RANGE`] (sectors 0–7, one 4 KiB
//!    segment), [`BLK_MULTI_RANGE`] (sectors 64–191, one 64 KiB request in
//!    16 segments, fewer if `seg_max` says so) and sector `C - 1`, reads
//!    each back (the 64 KiB in one segment) and compares;
//! 2. FLUSH (must be OK when negotiated);
//! 3. writes the pattern to [`BLK_DISCARD_RANGE`] (sectors 256–263) and
//!    DISCARDs it: afterwards each sector must read as zeros or as before;
//! 4. writes the pattern to [`BLK_ZEROED_RANGE`] (sectors 320–335) and
//!    WRITE_ZEROES it (no unmap): it must read back as zeros;
//! 5. prints the summary the host can check the image against:
//!    `virtio-blk: vdX: written pattern=P disk=D ranges=0+8,64+128,C-1+1
//!    discarded=256+8 zeroed=320+16` (`discarded=none` / `zeroed=none` when
//!    the feature was not negotiated; then the range still holds the
//!    pattern). Nothing else on the disk is written.
//!
//! Sector `s` of the pattern holds 64 little-endian words,
//! [`blk_pattern_word`]`(P, D, s, i)` for `i` in 0..64;
//! [`blk_pattern_sector`] fills a sector the same way, for host tests.
//!
//! On a **read-only** disk (`VIRTIO_BLK_F_RO`): a write must get IOERR, a
//! DISCARD and a WRITE_ZEROES IOERR or UNSUPP (`… refused: STATUS` lines);
//! reads of sectors 0–7 and `C - 1` and a FLUSH must still work. Nothing is
//! written.
//!
//! On every disk: reads at sector `C` and across the end (2 sectors at
//! `C - 1`) must get IOERR; then `virtio-blk: vdX: sectors 0+8
//! fnv1a64=0x…` gives [`fnv1a64`] of what sectors 0–7 read, so a host test
//! can compare it with its image; then the interrupt line.
//!
//! ## `virtio-blk-bench`
//!
//! `size=` is a multiple of 512 up to 65536; request `i` goes to sector
//! `(i mod ⌊C / (size/512)⌋) · size/512`, so the disk is written from its
//! start (the data is 0x6b bytes; a read-only disk only gets the reads).
//! One request at a time, completion polled, interrupts suppressed
//! (`VRING_AVAIL_F_NO_INTERRUPT`, no ring features) unless `irq=1`, which
//! enables the device's interrupt (IOAPIC pin or MSI-X) so each completion
//! is also delivered to the guest. Output:
//! `virtio-blk-bench: TSC M MHz (SOURCE)` — SOURCE is `CPUID 0x40000010`,
//! `CPUID 0x15`, `CPUID 0x16 base frequency` or `calibrated against the
//! PIT` (two samples of PIT channel 2 and the TSC, 20 ms apart), tried in
//! that order — or `TSC frequency unknown: reporting cycles per request`
//! (also when there is no PIT, as with a split irqchip: a count that does
//! not move within 1000 samples ends the calibration);
//! then per direction `virtio-blk-bench: vdX: write|read N x SIZE bytes in
//! T ms: R requests/s, M MiB/s, K cycles/request` (without a frequency:
//! `… N x SIZE bytes: K TSC cycles per request`).
//!
//! ## `virtio-rng`
//!
//! Per device and request size (1, 16, 100, 512, 4096, 65536 bytes):
//! `virtio-rng: rngN: S bytes requested, F filled`; F must be 1..=S, the
//! bytes not all equal (from 16 bytes on) and the 64 bytes after the
//! buffer untouched. Then one chain of two 256-byte buffers (all 512 bytes
//! filled, the gap between them untouched) and two 64-byte requests that
//! must differ; `virtio-rng: rngN: T bytes in all`; the interrupt line.
//!
//! ## `virtio-console`
//!
//! Uses port 0 of the first console (no `MULTIPORT`): receiveq 0 gets four
//! 64-byte buffers, then `KEEL-HVC: hello from the guest\n` goes out on
//! transmitq 1 (serial: `virtio-console: sent "…"`). For each of `lines=`
//! lines (a line ends at `\n`; a `\r` before it is dropped; longer than
//! 200 bytes is cut) it prints `virtio-console: received "LINE"` and
//! transmits `KEEL-HVC: got LINE\n`; no line within `timeout-ms=` (default
//! 10000) fails. `lines=0` only says hello.
//!
//! ## `virtio-hostile`
//!
//! Against the first virtio-blk device (queue of 16 entries,
//! `RING_INDIRECT_DESC` accepted, interrupts not used), each case on a
//! freshly initialised device, with its buffers in a 64 KiB arena filled
//! with a canary: a descriptor outside RAM, at the device's own MMIO
//! window, wrapping around 2^64, of 3 GiB (read and write); chains that
//! loop (to the data, to the head, a descriptor to itself), a `next` past
//! the table, an indirect table longer than the queue, an indirect
//! descriptor inside an indirect table, an indirect table outside RAM or
//! of a length that is no multiple of 16; zero-length header, status, only
//! descriptor and (legal) zero-length descriptors mixed in; a status
//! descriptor nothing links to; a writable buffer before the header; no
//! writable buffer; reads past the end, across it and at a sector whose
//! byte offset overflows; an unknown request type; a 100-byte read; an
//! 8-byte header; a DISCARD with a 10-byte payload; an available-ring head
//! past the table; an available index more than a queue ahead; queues
//! with a ring outside RAM (each of the three), wrapping around 2^64,
//! misaligned, of size 3 or larger than the maximum (checked at DRIVER_OK);
//! a reset right after notifying 14 reads (5 without indirect descriptors;
//! after the status write the used index and memory must stay still); notifications of queues that do
//! not exist. Against the first virtio-rng device, if any: a buffer outside
//! RAM, wrapping, of 3 GiB, a loop, and a readable-only chain.
//!
//! A case passes when the device answers IOERR or UNSUPP (in the status
//! byte: the last byte of the last non-empty writable buffer) or sets
//! `DEVICE_NEEDS_RESET` (the entropy device: or uses the chain with length
//! 0; the legal zero-length mix may also succeed with the right data), the
//! device wrote nothing outside the writable buffers, and after a reset and
//! a new initialisation it serves a normal read of sector 0 with the data a
//! reference read gave at the start (the entropy device: 64 random bytes).
//! Each case prints `hostile: NAME ... ok (WHAT)` (WHAT is `IOERR`,
//! `UNSUPP`, `DEVICE_NEEDS_RESET`, `DEVICE_NEEDS_RESET at DRIVER_OK`, …) or
//! a `FAIL:` line and `hostile: NAME ... FAILED`; the last line is
//! `hostile: N cases, F failed`. Only reads reach the disk.
//!
//! ## `pci-hostile`
//!
//! Against the first virtio-blk device on PCI (interrupts on MSI-X), with
//! a reference read of sector 0 first; after every case a normal read must
//! still return that data. Cases, each printed as `pci-hostile: NAME ... ok
//! (WHAT)` or a `FAIL:` line and `... FAILED`:
//!
//! - `conf1-and-ecam-agree`: both mechanisms list the same functions, with
//!   a host bridge (class 06:00) at 00:00.0;
//! - `read-only-registers`: all ones and zeros to the IDs, class, header
//!   type, subsystem IDs and capability pointer change nothing; ones to
//!   the status register keep the capability-list bit; the expansion ROM
//!   BAR reads 0 after sizing;
//! - `malformed-config-accesses`: misaligned ECAM reads return all ones and
//!   misaligned writes do nothing; extended space reads 0; absent functions
//!   read all ones; `CONFIG_DATA` with the enable bit clear reads all ones;
//!   `CONFIG_ADDRESS` keeps no reserved bits;
//! - `bar-sizing`: decoding off, all ones, the size (a power of two) and
//!   the 64-bit memory flags read back, the address restored;
//! - `bar-relocation`: BAR 0 moved within the window; the device works
//!   there (its notifications too) with an MSI-X interrupt, then moves back;
//! - `bar-outside-the-windows`: BAR 0 pointed at RAM, the IOAPIC and the
//!   ECAM window; nothing breaks;
//! - `overlapping-bars`: a second function's BAR 0 on the first's (when
//!   there is one); the first keeps working;
//! - `msix-out-of-range-entries`: writes past the table and of bad widths
//!   are ignored, the PBA ignores writes;
//! - `msix-vector-changed-while-running`: every entry's data moved to
//!   another vector while unmasked: the next completion arrives there, not
//!   on the old one;
//! - `msix-function-mask-holds-and-releases`: with the function masked a
//!   completion leaves a pending bit and no interrupt, which arrives on
//!   unmask;
//! - `msix-address-outside-interrupt-range`: an entry aimed at RAM gives no
//!   interrupt and writes nothing;
//! - `msix-queue-vector-out-of-range`: a queue vector past the table reads
//!   back `NO_VECTOR`;
//! - `msix-disabled-while-running`: without MSI-X a completion shows in the
//!   ISR and raises no interrupt.
//!
//! The last line is `pci-hostile: N cases, F failed`.
//!
//! # Output and exit statuses
//!
//! Everything goes to the serial port, one byte per THR-empty interrupt
//! (falling back to polling, and saying so in the `serial:` counts, when an
//! interrupt does not come). Lines end in `\r\n`. Every failure prints a line
//! starting with `FAIL:`, and every program that returns prints
//! `keel-guest: PROGRAM: PASS (status 0)` or `... FAIL (status N)` before
//! writing its status to [`EXIT_PORT`]:
//!
//! * [`STATUS_PASS`] (0), [`STATUS_FAIL`] (1), [`STATUS_BAD_ARGS`] (2),
//!   [`STATUS_PANIC`] (3);
//! * [`STATUS_EXCEPTION`]` | vector` for an exception the guest did not
//!   expect, after a line `keel-guest: unexpected exception V (#NAME)
//!   error=.. rip=.. cs=.. cr2=..` when it happened in ring 3 (an exception in
//!   ring 0 writes the status without printing).
//!
//! # Inside the guest
//!
//! Ring 0 is assembly only: the PVH entry's 32-bit stub (see [Boot
//! contract](#boot-contract)) reaches long mode and joins `_start` after its
//! page-table switch; `_start` switches to the guest's page tables
//! (assembled at link time), GDT (Linux's selectors: kernel 0x10/0x18, user
//! data 0x2b, user code 0x33), a TSS whose I/O permission bitmap gives ring 3
//! every port, and an IDT for vectors 0–63 (assembled at link time, each
//! gate completed by one `add`), enables SSE and `iretq`s to ring 3 — 108
//! instructions through the 64-bit entry, 121 through the PVH entry,
//! measured by single-stepping (`tests/raw_kvm.rs`,
//! `count_ring0_instructions_before_ring3`). Interrupt handlers (vectors
//! 0x20–0x37, IOAPIC pins 0–23) count per pin and write the local APIC's EOI
//! register, four instructions per interrupt; the spurious vector 0x3f
//! returns without EOI; `#BP` counts and returns; any other exception is
//! reported.
//!
//! Ring 3 (`guest/*.rs` besides `ring0.rs`) holds the drivers (`port`,
//! `serial`, `irq`, `mmio`, `boot_params`, `cmdline`, `console`, `exit`,
//! `tsc`, `dma` and `virtio`) and the programs (`programs.rs`, the virtio
//! ones in `programs/`). It reaches ring 0 through `ud2` with a request in RAX,
//! since neither `syscall` nor `int n` from ring 3 works where KVM emulates
//! ring 0: 1 = execute `int3`, 2 = triple fault, 3 = execute `popcnt`, 4 =
//! set RFLAGS.IF (`sti` needs IOPL 3, which such hosts do not give ring 3).
//!
//! # Example
//!
//! ```
//! let image = keel_guest::elf();
//! assert_eq!(&image[..4], b"\x7fELF");
//! assert!(keel_guest::PROGRAMS.contains(&"hello"));
//! // A VMM test boots `image` with the command line "hello", runs the vCPU
//! // until the guest writes to keel_guest::EXIT_PORT, and expects status
//! // keel_guest::STATUS_PASS and "Keel test guest: hello" on the serial port.
//! ```
//!
//! `tests/raw_kvm.rs` is a complete, self-contained example: a minimal VMM on
//! raw `kvm-ioctls` that boots every program (through the 64-bit entry, and
//! `hello` through the PVH entry too).

#![deny(missing_docs)]

include!("../guest/abi.rs");

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keel-guest.elf"));

/// The guest ELF image (x86_64, statically linked, loaded at its physical
/// addresses starting at [`LOAD_ADDR`]).
pub fn elf() -> &'static [u8] {
    IMAGE
}

/// The least RAM the guest runs in, in MiB (see the boot contract).
pub const MIN_MEMORY_MIB: u64 = 16;

/// The exit status the guest reports for an unexpected exception `vector`.
pub const fn exception_status(vector: u8) -> u8 {
    STATUS_EXCEPTION | (vector & 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PT_NOTE: u32 = 4;

    fn u16_at(offset: usize) -> u16 {
        u16::from_le_bytes(elf()[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(offset: usize) -> u32 {
        u32::from_le_bytes(elf()[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(offset: usize) -> u64 {
        u64::from_le_bytes(elf()[offset..offset + 8].try_into().unwrap())
    }

    /// (p_type, p_filesz, p_vaddr, p_paddr, p_memsz) of every program header.
    fn program_headers() -> Vec<(u32, u64, u64, u64, u64)> {
        let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
        (0..usize::from(phnum))
            .map(|i| {
                let ph = phoff + i * phentsize;
                (
                    u32_at(ph),
                    u64_at(ph + 0x20),
                    u64_at(ph + 0x10),
                    u64_at(ph + 0x18),
                    u64_at(ph + 0x28),
                )
            })
            .collect()
    }

    #[test]
    fn image_is_a_static_x86_64_executable() {
        let image = elf();
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(image[4], 2, "ELFCLASS64");
        assert_eq!(image[5], 1, "little endian");
        assert_eq!(u16_at(0x10), 2, "ET_EXEC, not a PIE");
        assert_eq!(u16_at(0x12), 62, "EM_X86_64");
        for (kind, ..) in program_headers() {
            assert!(
                ![PT_DYNAMIC, PT_INTERP].contains(&kind),
                "unexpected program header type {kind}"
            );
        }
    }

    #[test]
    fn entry_point_is_the_load_address() {
        assert_eq!(u64_at(0x18), LOAD_ADDR);
    }

    #[test]
    fn segments_are_identity_mapped_from_the_load_address_below_16_mib() {
        let loads: Vec<_> = program_headers().into_iter().filter(|h| h.0 == PT_LOAD).collect();
        assert!(!loads.is_empty());
        assert_eq!(loads[0].2, LOAD_ADDR);
        for (_, filesz, vaddr, paddr, memsz) in loads {
            assert_eq!(vaddr, paddr, "p_vaddr == p_paddr");
            assert!(filesz <= memsz);
            assert!(
                vaddr >= LOAD_ADDR && vaddr + memsz <= 16 << 20,
                "segment {vaddr:#x}+{memsz:#x}"
            );
        }
    }

    #[test]
    fn image_has_a_pvh_entry_note_inside_the_code_segment() {
        let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
        let notes: Vec<(usize, usize, u64)> = (0..usize::from(phnum))
            .map(|i| phoff + i * phentsize)
            .filter(|&ph| u32_at(ph) == PT_NOTE)
            .map(|ph| {
                (
                    u64_at(ph + 0x08) as usize,
                    u64_at(ph + 0x20) as usize,
                    u64_at(ph + 0x30),
                )
            })
            .collect();
        assert_eq!(notes.len(), 1, "one PT_NOTE segment");
        let (offset, size, align) = notes[0];
        // Loaders step through notes 4-byte aligned (QEMU aligns the name by
        // p_align, so it must be 4).
        assert_eq!(align, 4);
        assert_eq!(size, 24);
        assert_eq!(u32_at(offset), 4, "namesz");
        assert_eq!(u32_at(offset + 4), 8, "descsz");
        assert_eq!(u32_at(offset + 8), 18, "XEN_ELFNOTE_PHYS32_ENTRY");
        assert_eq!(&elf()[offset + 12..offset + 16], b"Xen\0");
        let entry = u64_at(offset + 16);
        let (_, filesz, text, ..) = program_headers().into_iter().find(|h| h.0 == PT_LOAD).unwrap();
        assert!(
            entry > LOAD_ADDR && entry < text + filesz,
            "PVH entry {entry:#x} outside the code"
        );
    }

    #[test]
    fn image_stays_small() {
        // The virtio drivers and programs brought it from ~56 to ~180 KiB,
        // PCI and the virtio-pci transport to ~200 KiB (symbols included);
        // anything near this bound is a mistake.
        assert!(elf().len() < 256 * 1024, "image is {} bytes", elf().len());
    }

    #[test]
    fn virtio_programs_are_listed() {
        for name in [
            "virtio-blk",
            "virtio-blk-bench",
            "virtio-rng",
            "virtio-console",
            "virtio-hostile",
            "pci-hostile",
        ] {
            assert!(PROGRAMS.contains(&name), "{name}");
        }
    }

    #[test]
    fn blk_pattern_differs_per_disk_sector_and_word_and_is_stable() {
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        blk_pattern_sector(1, 0, 5, &mut a);
        blk_pattern_sector(1, 0, 5, &mut b);
        assert_eq!(a, b);
        assert_eq!(&a[8..16], &blk_pattern_word(1, 0, 5, 1).to_le_bytes());
        for (pattern, disk, sector) in [(2, 0, 5), (1, 1, 5), (1, 0, 6)] {
            blk_pattern_sector(pattern, disk, sector, &mut b);
            assert_ne!(a, b, "pattern {pattern} disk {disk} sector {sector}");
        }
        let words: std::collections::HashSet<u64> = (0..64).map(|i| blk_pattern_word(1, 0, 5, i)).collect();
        assert_eq!(words.len(), 64);
        // SplitMix64's first output for seed 0, pinned so the guest and a
        // host test can never silently disagree.
        assert_eq!(blk_pattern_word(0, 0, 0, 0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn blk_ranges_do_not_overlap_and_fit_the_minimum_disk() {
        let ranges = [
            BLK_HEAD_RANGE,
            BLK_MULTI_RANGE,
            BLK_DISCARD_RANGE,
            BLK_ZEROED_RANGE,
        ];
        for (i, a) in ranges.iter().enumerate() {
            assert!(a.0 + a.1 < BLK_MIN_SECTORS - 1);
            for b in &ranges[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0);
            }
        }
    }

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn statuses_are_distinct_and_exceptions_set_the_top_bit() {
        let plain = [STATUS_PASS, STATUS_FAIL, STATUS_BAD_ARGS, STATUS_PANIC];
        for (i, a) in plain.iter().enumerate() {
            assert!(a & STATUS_EXCEPTION == 0);
            assert!(plain[i + 1..].iter().all(|b| a != b));
        }
        assert_eq!(exception_status(14), 0x8e);
    }
}
