"""Soak: foliod's RSS over a long run at full load, to show memory levels off with the page cache.

Not part of ``make test``. Run: ``.venv/bin/python -m benchmarks.soak [--minutes 30] [--ram 2GiB]``.
Starts one foliod (127.0.0.1, ephemeral ports, a temporary state directory) and runs
``foliod-load mixed`` against it with 4 workers until the time is up (bounded: the load driver
gets --duration, and everything is killed 10 minutes after it should have ended). Every
``--every`` seconds it prints the server's VmRSS, its page cache (Cached in GetMeminfo) and
free memory, then a summary: RSS over the first and the last fifth of the run, and the growth
between them in MiB and per hour.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

MIB = 1 << 20
# The load driver deletes its files at the end; DeleteFile of a large cached file is slow
# (issue 15), so it gets this long before it is killed.
TEARDOWN_SECONDS = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Returns once the server answers GetMachine (bounded by timeout)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = foliod_pb2_grpc.FoliodStub(channel)
        while True:
            try:
                stub.GetMachine(pb.GetMachineRequest(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--ram", default="2GiB")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    duration = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="foliod-soak-") as state:
        port = free_port()
        target = f"127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "foliod.main", "--listen", target),
                *("--metrics-listen", "", "--state-dir", state, "--ram", args.ram),
                *("--log-level", "warning"),  # no access lines: a soak makes millions
            ],
            stderr=subprocess.DEVNULL,
        )
        wait_serving(target)
        load = subprocess.Popen(
            [
                *(sys.executable, "-m", "foliodclient.load.cli", "mixed"),
                *("--server", target, "--duration", str(duration), "--no-progress", "--json"),
                *("--concurrency", str(args.concurrency), "--file-size", "64MiB"),
                *("--files", "16", "--timeout", "60"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        print(f"{'min':>6} {'RSS MiB':>9} {'cached MiB':>11} {'free MiB':>9}", flush=True)
        with grpc.insecure_channel(target) as channel:
            stub = foliod_pb2_grpc.FoliodStub(channel)
            try:
                while (
                    load.poll() is None and time.monotonic() - start < duration + TEARDOWN_SECONDS
                ):
                    time.sleep(args.every)
                    rss = rss_bytes(server.pid)
                    info = stub.GetMeminfo(pb.GetMeminfoRequest(), timeout=30)
                    minutes = (time.monotonic() - start) / 60
                    samples.append((minutes, rss))
                    print(
                        f"{minutes:6.1f} {rss / MIB:9.1f} {info.cached_bytes / MIB:11.1f} "
                        f"{info.mem_free_bytes / MIB:9.1f}",
                        flush=True,
                    )
            finally:
                if load.poll() is None:
                    load.kill()
                _, errors = load.communicate(timeout=60)
                server.kill()
                server.wait(30)
        if load.returncode != 0:
            print(f"foliod-load exited {load.returncode}: {errors.strip()[-2000:]}")
        if len(samples) >= 5:
            fifth = max(1, len(samples) // 5)
            first = sum(r for _, r in samples[:fifth]) / fifth / MIB
            last = sum(r for _, r in samples[-fifth:]) / fifth / MIB
            hours = (samples[-1][0] - samples[0][0]) / 60 or 1.0
            print(
                f"RSS: first fifth {first:.1f} MiB, last fifth {last:.1f} MiB, "
                f"growth {last - first:+.1f} MiB ({(last - first) / hours:+.1f} MiB/h), "
                f"peak {max(r for _, r in samples) / MIB:.1f} MiB"
            )
        return 0 if load.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
