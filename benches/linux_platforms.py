#!/usr/bin/env python3
"""Linux boot time to `Run /init` on the three platforms Keel offers, side
by side in one run:

    cargo build --release -p keel && eval "$(cargo xtask guest)" && \\
        python3 benches/linux_platforms.py [RUNS] [OLD_VMLINUX]

1. MP table + `virtio_mmio.device=` command-line devices (`--no-acpi
   --transport mmio`), with OLD_VMLINUX: a kernel built with
   VIRTIO_MMIO_CMDLINE_DEVICES and without ACPI/PCI (Keel's test kernel
   before ACPI; `~/.cache/keel/guest/<older key>/vmlinux`). Skipped when
   not given.
2. ACPI + virtio-mmio (`--transport mmio`), Keel's current test kernel.
3. ACPI + virtio-pci (the default), Keel's current test kernel.

Each boot: 1 vCPU, 256 MiB, the initramfs, a 64 MiB disk and virtio-rng;
the time is what `keel` logs when the serial console shows `Run /init`
(its boot-progress watcher, measured from process start). Modes alternate
run by run; medians are printed.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target", "release", "keel")
CMDLINE = "console=ttyS0 reboot=k panic=-1 rodata=off"


def boot(kernel, initrd, disk, extra):
    cmd = [KEEL, "--kernel", kernel, "--initrd", initrd, "--memory", "256M", "--rng",
           "--disk", disk, "--serial", "none", "--log-level", "info", "--cmdline", CMDLINE] + extra
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    m = re.search(r"Run /init.*?(\d+(?:\.\d+)?) (ms|s)\b", out.stderr)
    if not m:
        sys.exit(f"{extra}: no 'Run /init' milestone in keel's log:\n{out.stderr[-2000:]}")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    old = sys.argv[2] if len(sys.argv) > 2 else None
    vmlinux, initrd = os.environ.get("vmlinux"), os.environ.get("initramfs")
    if not vmlinux or not initrd:
        sys.exit('run `eval "$(cargo xtask guest)"` first (sets vmlinux= and initramfs=)')
    modes = []
    if old:
        modes.append(("MP table + cmdline devices (old kernel)", old, ["--no-acpi", "--transport", "mmio"]))
    modes.append(("ACPI + virtio-mmio", vmlinux, ["--transport", "mmio"]))
    modes.append(("ACPI + virtio-pci", vmlinux, []))
    times = {name: [] for name, _, _ in modes}
    with tempfile.TemporaryDirectory() as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
        for _ in range(runs):
            for name, kernel, extra in modes:
                t = boot(kernel, initrd, disk, extra)
                times[name].append(t)
                print(f"  {name}: Run /init at {t:.1f} s", flush=True)
    for name, _, _ in modes:
        print(f"{name:42} median {statistics.median(times[name]):6.1f} s  ({len(times[name])} runs)")


if __name__ == "__main__":
    main()
