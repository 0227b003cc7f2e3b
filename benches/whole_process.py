#!/usr/bin/env python3
"""Whole-process start-up figures: Keel next to QEMU microvm, same script.

    python3 benches/whole_process.py [RUNS]        (default 20 runs each)

Each VMM boots a guest that ends at once and exits; the script records, per
run, wall time (spawn to reap), CPU time (user + system) and peak RSS of the
VMM process (from wait4), and prints medians and the Keel / QEMU ratios.

- Keel: `target/release/keel --memory M --cmdline "exit code=0" --serial none`
  (the built-in guest: ~140 emulated ring-0 instructions, then ring 3 writes
  status 0 to the exit port). Built with `cargo build --release -p keel`.
- QEMU: `qemu-system-x86_64 -M microvm -enable-kvm` with a 64 KiB firmware
  image whose reset vector writes 0 to an `isa-debug-exit` device (QEMU then
  exits with status 1). Debian's `qemu-system-x86`; the script installs it
  with apt-get when missing (root).

Keel is also run with a 2 GiB guest, to show guest memory is not touched:
peak RSS barely moves with guest size.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target", "release", "keel")


def firmware(path):
    """64 KiB image; the reset vector (last 16 bytes) runs
    mov al, 0; out 0xf4, al; hlt."""
    image = bytearray(b"\xf4" * 65536)
    image[0xFFF0:0xFFF5] = b"\xb0\x00\xe6\xf4\xf4"
    with open(path, "wb") as f:
        f.write(image)


def measure(cmd, expect):
    """Wall and CPU from wait4; peak RSS from GNU time, because a child's
    ru_maxrss also counts the forked Python process it was before exec."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        timed = ["/usr/bin/time", "-q", "-o", rss_file.name, "-f", "%M"] + cmd
        start = time.perf_counter()
        proc = subprocess.Popen(timed, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != expect:
            sys.exit(f"{cmd[0]} exited {code}, expected {expect}: {proc.stderr.read().decode(errors='replace')}")
        rss_kib = int(rss_file.read().split()[-1])
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3, rss_kib / 1024


def run(name, cmd, expect, runs):
    rows = [measure(cmd, expect) for _ in range(runs)]
    wall, cpu, rss = (statistics.median(col) for col in zip(*rows))
    print(f"{name:<22} wall {wall:7.1f} ms   cpu {cpu:6.1f} ms   peak RSS {rss:6.1f} MiB   (median of {runs})")
    return wall, cpu, rss


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    if not os.path.exists(KEEL):
        subprocess.run(["cargo", "build", "--release", "-p", "keel"], cwd=ROOT, check=True)
    if not os.path.exists("/usr/bin/time"):
        subprocess.run(["apt-get", "install", "-y", "-q", "time"], check=True)
    if shutil.which("qemu-system-x86_64") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        fw = os.path.join(tmp, "exit.fw")
        firmware(fw)
        qemu = ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", "128", "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none",
                "-bios", fw, "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
        keel = [KEEL, "--memory", "128M", "--cmdline", "exit code=0", "--serial", "none"]
        keel_2g = [KEEL, "--memory", "2G", "--cmdline", "exit code=0", "--serial", "none"]
        # Interleave the warm-up so neither gets a cold page cache.
        measure(keel, 0)
        measure(qemu, 1)
        k = run("keel (128 MiB guest)", keel, 0, runs)
        q = run("qemu microvm (128 MiB)", qemu, 1, runs)
        run("keel (2 GiB guest)", keel_2g, 0, runs)
        print(f"keel / qemu: wall {k[0] / q[0]:.2f}, cpu {k[1] / q[1]:.2f}, peak RSS {k[2] / q[2]:.2f}")


if __name__ == "__main__":
    main()
