#!/usr/bin/env python3
"""Whole-process start-up figures: Keel next to QEMU microvm, same script.

    python3 benches/whole_process.py [RUNS]        (default 20 runs each)

Each VMM boots a guest that ends at once and exits; the script records, per
run, wall time (spawn to reap) and CPU time (user + system, from wait4),
running the contenders alternately, then peak RSS (GNU time, separate runs),
and prints medians and the Keel / QEMU ratios. It also prints Keel's own
memory overhead: peak RSS minus the guest pages touched (keel logs those at
debug level, counted with mincore), for a 128 MiB and a 2 GiB guest.

- Keel: `target/release/keel --memory M --cmdline "exit code=0" --serial none`
  (the built-in guest: ~140 emulated ring-0 instructions, then ring 3 writes
  status 0 to the exit port). Built with `cargo build --release -p keel`.
- QEMU: `qemu-system-x86_64 -M microvm -enable-kvm` with a 64 KiB firmware
  image whose reset vector writes 0 to an `isa-debug-exit` device (QEMU then
  exits with status 1). Debian's `qemu-system-x86`; the script installs it
  with apt-get when missing (root).

Keel is also run with a 2 GiB guest, to show guest memory is not touched
(peak RSS barely moves with guest size), and with `--irqchip kernel`, KVM's
in-kernel PIC/IOAPIC/PIT instead of its default split irqchip.
"""
import os
import re
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


def timed(cmd, expect, env=None):
    """Wall time (spawn to reap) and CPU time (user + system, from wait4) of
    one run. Python starts the child with vfork, so the child's usage is the
    VMM's own; no wrapper process stands in between."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != expect:
        sys.exit(f"{cmd[0]} exited {proc.returncode}, expected {expect}: {stderr.decode(errors='replace')}")
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3, stderr.decode(errors="replace")


def peak_rss(cmd, expect):
    """Peak RSS in MiB from GNU time, in a run of its own: a child's
    ru_maxrss seen from Python also counts the Python process it was forked
    from, and GNU time's own CPU must not be charged to the VMM."""
    with tempfile.NamedTemporaryFile("r") as out:
        timed(["/usr/bin/time", "-q", "-o", out.name, "-f", "%M"] + cmd, expect)
        return int(out.read().split()[-1]) / 1024


def guest_resident(cmd, expect):
    """KiB of guest memory resident when keel's guest ended (keel logs it at
    debug level): the guest's own pages, to subtract from peak RSS."""
    env = dict(os.environ, RUST_LOG="keel_vmm=debug")
    _, _, stderr = timed(cmd, expect, env)
    m = re.search(r"guest memory resident at exit: (\d+) KiB", stderr)
    if not m:
        sys.exit(f"no residency line in keel's log:\n{stderr}")
    return int(m.group(1)) / 1024


def interleaved(contenders, runs):
    """Runs each contender `runs` times, alternating between them so drift on
    a shared machine hits all alike; returns median (wall, cpu, rss) each."""
    rows = {name: [] for name, _, _ in contenders}
    for _ in range(runs):
        for name, cmd, expect in contenders:
            wall, cpu, _ = timed(cmd, expect)
            rows[name].append((wall, cpu))
    result = {}
    for name, cmd, expect in contenders:
        wall = statistics.median(r[0] for r in rows[name])
        cpu = statistics.median(r[1] for r in rows[name])
        rss = statistics.median(peak_rss(cmd, expect) for _ in range(max(3, runs // 4)))
        result[name] = (wall, cpu, rss)
        print(f"{name:<24} wall {wall:7.1f} ms   cpu {cpu:6.1f} ms   peak RSS {rss:6.1f} MiB   (median of {runs})")
    return result


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
        # KVM's in-kernel PIC/IOAPIC/PIT instead of the split irqchip: what
        # their teardown grace periods cost (benches/kvm_teardown.rs).
        keel_kernel = keel + ["--irqchip", "kernel"]
        # Warm-up so neither gets a cold page cache.
        timed(keel, 0)
        timed(qemu, 1)
        r = interleaved([("keel (128 MiB guest)", keel, 0), ("qemu microvm (128 MiB)", qemu, 1),
                         ("keel (2 GiB guest)", keel_2g, 0),
                         ("keel (--irqchip kernel)", keel_kernel, 0)], runs)
        k, q = r["keel (128 MiB guest)"], r["qemu microvm (128 MiB)"]
        print(f"keel / qemu: wall {k[0] / q[0]:.2f}, cpu {k[1] / q[1]:.2f}, peak RSS {k[2] / q[2]:.2f}")
        for name, cmd in [("keel (128 MiB guest)", keel), ("keel (2 GiB guest)", keel_2g)]:
            guest = guest_resident(cmd, 0)
            rss = r[name][2]
            print(f"{name:<24} VMM overhead {rss - guest:5.2f} MiB = peak RSS {rss:.2f} MiB "
                  f"- guest pages touched {guest:.2f} MiB")


if __name__ == "__main__":
    main()
