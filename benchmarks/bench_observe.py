"""Benchmark of observing this host: scan time and memory per GiB, and the worst RPC stall a
scan causes. Needs a readable /proc/kpageflags (root).
Run: .venv/bin/python -m benchmarks.bench_observe
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import grpc

from foliod.config import Config
from foliod.logs import configure_logging
from foliod.mm import kpageflags as kpf
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc


def scan_figures(runs: int = 3) -> None:
    seconds = []
    for _ in range(runs):
        seconds.append(kpf.scan_kpageflags(ram_ranges=kpf.read_ram_ranges()).seconds)
    tracemalloc.start()
    scan = kpf.scan_kpageflags(ram_ranges=kpf.read_ram_ranges())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gib = scan.present_frames * kpf.PAGE_SIZE / (1 << 30)
    median = statistics.median(seconds)
    print(
        f"scan: {scan.nr_frames} frames ({gib:.1f} GiB present) in {median:.3f} s median of "
        f"{runs} ({median / gib * 1000:.1f} ms/GiB); peak traced memory {peak / (1 << 20):.1f} "
        f"MiB ({peak / gib / (1 << 20):.2f} MiB/GiB, bounded by the {kpf.CHUNK_FRAMES}-frame chunk)"
    )


def rpc_stall(seconds: float = 10.0) -> None:
    """GetMachine latency on the simulated host, with and without scans running."""
    configure_logging("warning", "json")
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.replace(
            Config(),
            listen="127.0.0.1:0",
            metrics_listen="",
            state_dir=Path(tmp),
            observe_host=True,
            observe_interval_seconds=0.0,
        )
        server = FoliodServer(config)
        server.start()
        observer = server.observer
        assert observer is not None
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as chan:
                stub = foliod_pb2_grpc.FoliodStub(chan)
                stub.GetMachine(pb.GetMachineRequest())
                for scanning in (False, True):
                    stop = threading.Event()
                    scans = 0

                    def scanner(stop: threading.Event = stop) -> None:
                        nonlocal scans
                        while not stop.is_set():
                            observer.scan_once()
                            scans += 1

                    thread = threading.Thread(target=scanner) if scanning else None
                    if thread:
                        thread.start()
                    latencies = []
                    end = time.perf_counter() + seconds
                    while time.perf_counter() < end:
                        started = time.perf_counter()
                        stub.GetMachine(pb.GetMachineRequest())
                        latencies.append(time.perf_counter() - started)
                    stop.set()
                    if thread:
                        thread.join()
                    latencies.sort()
                    p99 = latencies[int(len(latencies) * 0.99)]
                    print(
                        f"GetMachine {'during scans' if scanning else 'idle'}: "
                        f"{len(latencies)} calls, p50 {statistics.median(latencies) * 1e3:.2f} ms, "
                        f"p99 {p99 * 1e3:.2f} ms, worst {latencies[-1] * 1e3:.1f} ms"
                        + (f" ({scans} scans)" if scanning else "")
                    )
        finally:
            server.stop(0)


def main() -> int:
    if not kpf.readable():
        print("/proc/kpageflags is not readable (needs root or CAP_SYS_ADMIN)", file=sys.stderr)
        return 1
    scan_figures()
    rpc_stall()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
