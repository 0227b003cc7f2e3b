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


def compare(runs, a, b, label, note=""):
    """Runs the two (name, extra flags) columns alternately `runs` times and
    prints each one's median wall and CPU time and, as `label`, their
    difference."""
    rows = {a[0]: [], b[0]: []}
    for _ in range(runs):
        for name, extra in (a, b):
            rows[name].append(run(extra))
    med = statistics.median
    for name, times in rows.items():
        print(f"{name:22} wall {med(r[0] for r in times):6.2f} ms   CPU {med(r[1] for r in times):6.2f} ms")
    first, second = rows[a[0]], rows[b[0]]
    print(f"{label}: wall {med(r[0] for r in first) - med(r[0] for r in second):+.2f} ms, "
          f"CPU {med(r[1] for r in first) - med(r[1] for r in second):+.2f} ms{note}")


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    compare(runs, ("ACPI (default)", []), ("--no-acpi (MP table)", ["--no-acpi"]),
            "ACPI - no ACPI", " (target: within 0.5 ms)")


if __name__ == "__main__":
    main()
