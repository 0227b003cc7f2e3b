#!/usr/bin/env python3
"""What ACPI costs at start-up: the trivial built-in guest, start -> exit,
with ACPI tables (the default) and with `--no-acpi` (MP table), side by
side in one run.

    cargo build --release -p keel && python3 benches/acpi_startup.py [RUNS]   (default 40)

Each run is `keel --memory 128M --cmdline "exit code=0" --serial none`
(plus `--no-acpi` for the other column); the two alternate run by run.
Prints the median wall time (spawn to reap) and CPU time (user + system,
from wait4) of each, and the difference. Target (issue 14): ACPI within
0.5 ms of no ACPI.
"""
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target", "release", "keel")


def run(extra):
    start = time.perf_counter()
    proc = subprocess.Popen([KEEL, "--memory", "128M", "--cmdline", "exit code=0", "--serial", "none"] + extra,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - start) * 1e3
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"keel {extra} exited {os.waitstatus_to_exitcode(status)}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1e3


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    acpi, mp = [], []
    for _ in range(runs):
        acpi.append(run([]))
        mp.append(run(["--no-acpi"]))
    med = statistics.median
    for name, rows in (("ACPI (default)", acpi), ("--no-acpi (MP table)", mp)):
        print(f"{name:22} wall {med(r[0] for r in rows):6.2f} ms   CPU {med(r[1] for r in rows):6.2f} ms")
    print(f"ACPI - no ACPI: wall {med(r[0] for r in acpi) - med(r[0] for r in mp):+.2f} ms, "
          f"CPU {med(r[1] for r in acpi) - med(r[1] for r in mp):+.2f} ms (target: within 0.5 ms)")


if __name__ == "__main__":
    main()
