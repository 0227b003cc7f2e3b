#!/usr/bin/env python3
"""The control plane's costs, side by side with the CLI in one run.

    cargo build --release -p keel && python3 benches/api_start.py [RUNS]   (default 20)

Measures, as medians over RUNS (the contenders alternating run by run):

1. exec → API socket ready: `keel --api-sock S` is spawned; the clock stops
   at the first `GET /` answered on S. Target: ≤ 5 ms.
2. The whole VM through the API versus the CLI, spawn → process exit: the
   API path spawns `keel --api-sock`, sends PUT /machine-config, PUT
   /boot-source (the built-in guest, program `exit code=0`) and PUT
   /actions InstanceStart, and waits for the process to exit with the
   guest; the CLI path runs `keel --memory 32M --cmdline "exit code=0"
   --transport mmio --serial none`. Target: the API path within 2 ms of
   the CLI path.
3. Pause → resume round trip through the API (PATCH /vm Paused, then
   Resumed, one after the other on one connection), on a running guest
   with 1 and with 2 vCPUs, measured from sending the first request to
   receiving the second answer. Target: ≤ 1 ms for 1 vCPU.

The requests are raw HTTP/1.1 on the Unix socket (Python's standard
library), so the client's own cost is small and the same for every run.
"""
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEL = os.path.join(ROOT, "target", "release", "keel")


class Client:
    """One keep-alive HTTP/1.1 connection to the API socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def call(self, method, path, body=None):
        data = (body or "").encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n\r\n"
        self.sock.sendall(head.encode() + data)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"{method} {path}: connection closed")
            self.buf += chunk
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buf = rest[length:]
        return status, rest[:length].decode()

    def ok(self, method, path, body=None):
        status, text = self.call(method, path, body)
        if status >= 300:
            sys.exit(f"{method} {path}: {status} {text}")
        return text

    def close(self):
        self.sock.close()


def spawn_api(sock):
    if os.path.exists(sock):
        os.unlink(sock)
    start = time.perf_counter()
    proc = subprocess.Popen([KEEL, "--api-sock", sock, "--serial", "none"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        try:
            client = Client(sock)
            client.ok("GET", "/")
            return proc, client, (time.perf_counter() - start) * 1e3
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None:
                sys.exit(f"keel --api-sock exited: {proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.0002)


def configure(client, vcpus, program):
    client.ok("PUT", "/machine-config", f'{{"vcpu_count": {vcpus}, "mem_size_mib": 32}}')
    client.ok("PUT", "/boot-source",
              f'{{"kernel_image_path": "keel:built-in-guest", "boot_args": "{program}"}}')


def api_run(sock):
    start = time.perf_counter()
    proc, client, _ = spawn_api(sock)
    configure(client, 1, "exit code=0")
    client.ok("PUT", "/actions", '{"action_type": "InstanceStart"}')
    code = proc.wait()
    client.close()
    if code != 0:
        sys.exit(f"API run exited {code}: {proc.stderr.read().decode(errors='replace')}")
    return (time.perf_counter() - start) * 1e3


def cli_run():
    start = time.perf_counter()
    code = subprocess.call([KEEL, "--memory", "32M", "--cmdline", "exit code=0", "--transport", "mmio",
                            "--serial", "none"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    if code != 0:
        sys.exit(f"CLI run exited {code}")
    return (time.perf_counter() - start) * 1e3


def pause_resume(sock, vcpus, rounds):
    proc, client, _ = spawn_api(sock)
    configure(client, vcpus, "pio-loop count=4000000000 port=0x80")
    client.ok("PUT", "/actions", '{"action_type": "InstanceStart"}')
    time.sleep(0.05)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        client.ok("PATCH", "/vm", '{"state": "Paused"}')
        client.ok("PATCH", "/vm", '{"state": "Resumed"}')
        times.append((time.perf_counter() - start) * 1e3)
        time.sleep(0.002)
    client.close()
    proc.kill()
    proc.wait()
    return times


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    if not os.path.exists(KEEL):
        sys.exit(f"{KEEL} missing: cargo build --release -p keel")
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "api.sock")
        ready, api, cli = [], [], []
        for _ in range(runs):
            proc, client, ms = spawn_api(sock)
            ready.append(ms)
            client.close()
            proc.kill()
            proc.wait()
            api.append(api_run(sock))
            cli.append(cli_run())
        med = statistics.median
        print(f"exec -> API socket ready:      median {med(ready):6.2f} ms  (min {min(ready):.2f}, target <= 5 ms)")
        print(f"CLI: spawn -> guest exit -> process exit: median {med(cli):6.2f} ms")
        print(f"API: spawn -> configure + InstanceStart -> process exit: median {med(api):6.2f} ms"
              f"  (API - CLI = {med(api) - med(cli):+.2f} ms, target <= +2 ms)")
        for vcpus in (1, 2):
            t = pause_resume(sock, vcpus, max(runs * 5, 50))
            print(f"pause -> resume round trip, {vcpus} vCPU(s): median {med(t):.3f} ms, "
                  f"p90 {sorted(t)[int(len(t) * 0.9)]:.3f} ms  (target <= 1 ms for 1 vCPU)")


if __name__ == "__main__":
    main()
