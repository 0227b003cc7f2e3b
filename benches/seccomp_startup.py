#!/usr/bin/env python3
"""What the seccomp filters cost at start-up: the trivial built-in guest,
start -> exit, with the filters (the default) and with `--no-seccomp`, side
by side in one run.

    cargo build --release -p keel && python3 benches/seccomp_startup.py [RUNS]   (default 40)

Each run is `keel --memory 128M --cmdline "exit code=0" --serial none`
(plus `--no-seccomp` for the other column); the two alternate
run by run. Prints the median wall time (spawn to reap) and CPU time of
each, and the difference. Uses `compare` from acpi_startup.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acpi_startup import compare  # noqa: E402


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    compare(runs, ("seccomp (default)", []), ("--no-seccomp", ["--no-seccomp"]), "filters - none")


if __name__ == "__main__":
    main()
