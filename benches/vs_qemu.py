#!/usr/bin/env python3
"""Keel next to QEMU microvm running the SAME guest: exit and virtio-blk paths.

    python3 benches/vs_qemu.py [ROUNDS]        (default 5 rounds)

Both VMMs boot the same ELF, Keel's built-in test guest (the file cargo built
and `keel` embeds; the script checks the bytes match), and run the same guest
programs; the guest times its own loops with the TSC, so boot time is not in
the figures. Per round each program runs once under each VMM, the order
alternating between rounds; the table gives medians.

- Keel: `target/release/keel --memory 128M --cmdline PROGRAM [--transport mmio --disk IMG]`.
  Keel enters the guest through its PVH entry or its 64-bit entry (its
  `--boot-protocol auto` picks PVH when the ELF has the note); the paths
  measured here run in ring 3 either way.
- QEMU: `qemu-system-x86_64 -M microvm,acpi=off,ioapic2=off -enable-kvm -cpu
  host -m 128 -kernel keel-guest.elf -append PROGRAM ...` with
  `isa-debug-exit` at port 0xf4 (QEMU exits with (status << 1) | 1) and, for
  the disk, `-global virtio-mmio.force-legacy=false -drive
  id=d0,file=IMG,format=raw,if=none -device virtio-blk-device,drive=d0`
  (QEMU's defaults: cache=writeback, aio=threads). QEMU boots the ELF
  through its PVH note with its qboot firmware. `acpi=off` matters: only
  then does microvm append `virtio_mmio.device=512@0xfeb00e00:12` for its
  virtio-mmio transport to the command line (with ACPI it describes the
  transports in the DSDT only, which the guest does not read); with ACPI
  off there is no second IOAPIC either, so the GSI is a pin of the first.
  Debian's `qemu-system-x86`; installed with apt-get when missing (root).

Programs: `pio-loop` (one-byte writes to port 0x80: no device in either VMM,
so each is a full exit to user space and back), `mmio-loop` (32-bit writes to
0xd000_0000, unassigned in both: an MMIO exit to user space each, where both
ignore it), `virtio-blk-bench` with 4 KiB and 64 KiB requests (queue depth 1,
polled; sequential writes then reads on a sparse 64 MiB raw image in the
page cache).
"""
import glob
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target", "release", "keel")
MEMORY_MIB = 128
DISK_MIB = 64
EXITS = 20000
MMIO_ADDR = 0xD000_0000
TIMEOUT = 120

# (name, guest command line, needs the disk)
PROGRAMS = [
    ("pio", f"pio-loop count={EXITS}", False),
    ("mmio", f"mmio-loop mmio={MMIO_ADDR:#x} count={EXITS}", False),
    ("blk4k", "virtio-blk-bench size=4096 count=2048", True),
    ("blk64k", "virtio-blk-bench size=65536 count=512", True),
]


def guest_elf():
    """The guest ELF `keel` embeds: the newest one cargo built that is
    byte-for-byte inside the keel binary."""
    with open(KEEL, "rb") as f:
        keel = f.read()
    pattern = os.path.join(ROOT, "target", "release", "build", "keel-guest-*", "out", "keel-guest.elf")
    for path in sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True):
        with open(path, "rb") as f:
            if f.read() in keel:
                return path
    sys.exit(f"no guest ELF matching {pattern} is the one embedded in {KEEL}")


def keel_cmd(program, disk):
    cmd = [KEEL, "--memory", f"{MEMORY_MIB}M", "--cmdline", program]
    # virtio-mmio on both sides: QEMU's microvm has it, and like is compared with like.
    return cmd + (["--transport", "mmio", "--disk", disk] if disk else [])


def qemu_cmd(elf, program, disk):
    cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off,ioapic2=off", "-enable-kvm", "-cpu", "host",
           "-m", str(MEMORY_MIB), "-smp", "1", "-kernel", elf, "-append", program,
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
    if disk:
        cmd += ["-global", "virtio-mmio.force-legacy=false",
                "-drive", f"id=d0,file={disk},format=raw,if=none",
                "-device", "virtio-blk-device,drive=d0"]
    return cmd


def run(cmd, expect):
    """Runs one VM; returns the guest's serial output (stdout)."""
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        sys.exit(f"timed out after {TIMEOUT} s: {shlex.join(cmd)}")
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != expect or "PASS (status 0)" not in out:
        sys.exit(f"{shlex.join(cmd)}\nexited {proc.returncode}, expected {expect}:\n{out}"
                 f"{proc.stderr.decode(errors='replace')}")
    return out


def figures(name, out):
    """{figure: value} from one run's serial output."""
    result = {}
    if name in ("pio", "mmio"):
        m = re.search(r"writes to [^,]+, (\d+) TSC ticks each", out)
        result[f"{name} exit (TSC ticks)"] = int(m.group(1))
    else:
        size = "4 KiB" if name == "blk4k" else "64 KiB"
        for m in re.finditer(r"vda: (write|read) \d+ x \d+ bytes in [\d.]+ ms: (\d+) requests/s, ([\d.]+) MiB/s", out):
            result[f"blk {size} {m.group(1)} (requests/s)"] = int(m.group(2))
            result[f"blk {size} {m.group(1)} (MiB/s)"] = float(m.group(3))
        m = re.search(r"TSC (\d+) MHz", out)
        if m:
            result["guest TSC (MHz)"] = int(m.group(1))
    if not result:
        sys.exit(f"no figures for {name} in:\n{out}")
    return result


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    subprocess.run(["cargo", "build", "--release", "-p", "keel"], cwd=ROOT, check=True)
    if shutil.which("qemu-system-x86_64") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"], check=True)
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    source = guest_elf()
    with tempfile.TemporaryDirectory(prefix="keel-vs-qemu-") as tmp:
        elf = os.path.join(tmp, "keel-guest.elf")
        shutil.copyfile(source, elf)
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(DISK_MIB << 20)
        print(f"guest: {source} ({os.path.getsize(elf)} bytes, the image keel embeds)")
        print(f"qemu: {version.splitlines()[0]}")
        # Once each, to show what each VMM handed the guest.
        for label, cmd, expect in [("keel", keel_cmd("hello", disk), 0),
                                   ("qemu", qemu_cmd(elf, "hello", disk), 1)]:
            line = re.search(r"command line: .*", run(cmd, expect)).group(0)
            print(f"{label} hello: {line}")
        samples = {"keel": {}, "qemu": {}}
        for r in range(rounds):
            for name, program, needs_disk in PROGRAMS:
                d = disk if needs_disk else None
                contenders = [("keel", keel_cmd(program, d), 0), ("qemu", qemu_cmd(elf, program, d), 1)]
                if r % 2:
                    contenders.reverse()
                for label, cmd, expect in contenders:
                    for figure, value in figures(name, run(cmd, expect)).items():
                        samples[label].setdefault(figure, []).append(value)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
        print()
        for name, program, needs_disk in PROGRAMS:
            d = "IMG" if needs_disk else None
            print(f"  {name}: {shlex.join(keel_cmd(program, d))}")
            print(f"  {name}: {shlex.join(qemu_cmd('keel-guest.elf', program, d))}")
        print()
        print(f"| figure (median of {rounds}) | Keel | QEMU | Keel/QEMU |")
        print("|---|---:|---:|---:|")
        mhz = statistics.median(samples["keel"].get("guest TSC (MHz)", [0]))
        for figure in samples["keel"]:
            if figure == "guest TSC (MHz)":
                continue
            k = statistics.median(samples["keel"][figure])
            q = statistics.median(samples["qemu"][figure])
            if figure.endswith("(TSC ticks)") and mhz:
                cell = lambda v: f"{v:,.0f} ({v / mhz:.1f} µs)"
            elif figure.endswith("(MiB/s)"):
                cell = lambda v: f"{v:,.1f}"
            else:
                cell = lambda v: f"{v:,.0f}"
            print(f"| {figure} | {cell(k)} | {cell(q)} | {k / q:.2f} |")
        tsc = {label: statistics.median(s.get("guest TSC (MHz)", [0])) for label, s in samples.items()}
        print(f"\nguest TSC: {tsc['keel']} MHz under keel, {tsc['qemu']} MHz under qemu "
              "(exit costs: lower is better; rates: higher is better)")


if __name__ == "__main__":
    main()
