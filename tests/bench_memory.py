"""What foliod itself spends per simulated page, measured from outside: server RSS over gRPC.

Run by ``make bench`` (``--only memory``) or alone: ``.venv/bin/python tests/bench_memory.py``
(``--json``, ``--big`` for the real-size host, ``--quick`` for its 64 GiB variant). Each figure
starts a fresh server (127.0.0.1, an ephemeral port) and reads its VmRSS from /proc before and
after the calls, once the server is idle; growth / pages is the cost per page.

1. Allocate: one call of 4 GiB of order-0 file folios (1,048,576 folios), then order 2 and
   order 9, and 4 GiB of order-0 anon folios; the call's wall time (one RPC included) gives
   folios per second, as does the ReleaseOwner that frees them.
2. Page cache: a 4 GiB sparse file (TruncateFile) read start to end in 2 MiB ReadFile calls,
   with base pages and no readahead, readahead 32 pages with folios up to order 2, and
   readahead 512 pages with folios up to order 9; growth / pages cached.
3. A 64 GiB guest backed by base pages on an 80 GiB host, filled with order-0 file folios
   (Allocate calls on the guest machine, each backing its frames on the host): seconds.
4. ``--big``: a 256 GiB host (64 GiB with --quick): every free page allocated as order-0 file
   folios, RSS, GetMemmap and a Prometheus scrape of the metrics endpoint timed (median of
   several), ReleaseOwner; then the page cache part only when the base-page cost measured in
   2. says it fits in half of this machine's available memory (else reported as not attempted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

PAGE = 4096
GIB = 1 << 30
FILE_BYTES = 4 * GIB
READ_BYTES = 2 << 20
MAX_FOLIOS_PER_CALL = 1 << 20
CALL_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 20.0
# Per-figure budget for filling the page cache: give up past it (reported, not hung).
FILL_BUDGET_S = 600.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Server:
    """A foliod server process and a stub to it."""

    def __init__(self, proc: subprocess.Popen[bytes], stub: foliod_pb2_grpc.FoliodStub) -> None:
        self.proc = proc
        self.stub = stub
        self.metrics_port = 0

    def rss_bytes(self) -> int:
        """The server's resident memory now, after a moment to settle."""
        time.sleep(0.3)
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS for the server")


@contextmanager
def server(ram: str, *, metrics: bool = False) -> Iterator[Server]:
    """A fresh foliod with ram bytes of RAM, stopped (killed if need be) on exit."""
    state = Path(tempfile.mkdtemp(prefix="foliod-bench-memory-"))
    port = free_port()
    metrics_port = free_port() if metrics else 0
    argv = [
        sys.executable,
        "-m",
        "foliod.main",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}" if metrics else "",
        "--ram",
        ram,
        "--log-level",
        "warning",
        "--state-dir",
        str(state),
    ]
    log = (state / "server.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 8 << 20)]
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
        running = Server(proc, foliod_pb2_grpc.FoliodStub(channel))
        running.metrics_port = metrics_port
        yield running
    finally:
        channel.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(state, ignore_errors=True)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def allocate_figures(kind: pb.FolioKind.ValueType, order: int) -> dict[str, float]:
    """RSS per page and rates of one 4 GiB Allocate of one kind and order, and its release."""
    count = (FILE_BYTES // PAGE) >> order
    with server("16GiB") as srv:
        before = srv.rss_bytes()
        request = pb.AllocateRequest(owner="bench", kind=kind, order=order, count=count)
        seconds = timed(lambda: srv.stub.Allocate(request, timeout=CALL_TIMEOUT_S))
        after = srv.rss_bytes()
        release = pb.ReleaseOwnerRequest(owner="bench")
        release_s = timed(lambda: srv.stub.ReleaseOwner(release, timeout=CALL_TIMEOUT_S))
    return {
        "bytes_per_page": (after - before) / (count << order),
        "folios_per_s": count / seconds,
        "release_folios_per_s": count / release_s,
        "seconds": seconds,
    }


def fill_file(srv: Server, name: str, nr_bytes: int, deadline: float) -> bool:
    """Reads the file start to end in READ_BYTES calls; False when the deadline passed first."""
    for offset in range(0, nr_bytes, READ_BYTES):
        if time.monotonic() > deadline:
            return False
        srv.stub.ReadFile(
            pb.ReadFileRequest(name=name, offset=offset, length=READ_BYTES), timeout=60
        )
    return True


def page_cache_figures(max_order: int, ra_pages: int) -> dict[str, float]:
    """RSS per cached page of a 4 GiB file read through, with the file's settings."""
    with server("16GiB") as srv:
        srv.stub.CreateFile(pb.CreateFileRequest(name="f", max_order=max_order, ra_pages=ra_pages))
        srv.stub.TruncateFile(pb.TruncateFileRequest(name="f", size_bytes=FILE_BYTES))
        # One read first, so the buffers every read uses are there before the baseline.
        srv.stub.ReadFile(pb.ReadFileRequest(name="f", offset=0, length=READ_BYTES), timeout=60)
        first = srv.stub.StatFile(pb.StatFileRequest(name="f")).nr_cached
        before = srv.rss_bytes()
        start = time.perf_counter()
        done = fill_file(srv, "f", FILE_BYTES, time.monotonic() + FILL_BUDGET_S)
        seconds = time.perf_counter() - start
        after = srv.rss_bytes()
        cached = srv.stub.StatFile(pb.StatFileRequest(name="f")).nr_cached
    return {
        "bytes_per_page": (after - before) / max(cached - first, 1),
        "pages_cached": cached,
        "pages_per_s": (cached - first) / seconds,
        "finished": float(done),
    }


def fill_with_folios(srv: Server, machine: str, owner: str) -> int:
    """Allocates every page above a machine's min watermark as order-0 file folios, as many
    calls as the per-call limit needs; returns the folios made."""
    info = srv.stub.GetMachine(pb.GetMachineRequest(machine=machine))
    room = info.nr_free_pages - info.watermarks.nr_min
    made = 0
    while made < room:
        count = min(MAX_FOLIOS_PER_CALL, room - made)
        srv.stub.Allocate(
            pb.AllocateRequest(
                machine=machine, owner=owner, kind=pb.FOLIO_KIND_FILE, order=0, count=count
            ),
            timeout=CALL_TIMEOUT_S,
        )
        made += count
    return made


def guest_fill_figures() -> dict[str, float]:
    """A 64 GiB base-backed guest on an 80 GiB host, every free guest page allocated."""
    with server("80GiB") as srv:
        srv.stub.CreateGuest(
            pb.CreateGuestRequest(name="vm", ram_bytes=64 * GIB, backing=pb.GUEST_BACKING_BASE)
        )
        start = time.perf_counter()
        made = fill_with_folios(srv, "vm", "app")
        seconds = time.perf_counter() - start
        backed = srv.stub.GetGuest(pb.GetGuestRequest(name="vm")).backed_bytes
    return {"seconds": seconds, "pages": made, "backed_bytes": backed}


def median_seconds(call: Callable[[], object], n: int) -> float:
    return statistics.median(timed(call) for _ in range(n))


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def big_host_figures(ram_gib: int, page_cache_bytes_per_page: float) -> dict[str, float]:
    """A real-size host: all free memory as order-0 file folios, then (if it fits here) its
    RAM as page cache in base pages."""
    out: dict[str, float] = {"ram_gib": ram_gib}
    with server(f"{ram_gib}GiB", metrics=True) as srv:
        before = srv.rss_bytes()
        machine = srv.stub.GetMachine(pb.GetMachineRequest())
        start = time.perf_counter()
        made = fill_with_folios(srv, "", "fill")
        out["allocate_s"] = time.perf_counter() - start
        out["folios"] = made
        out["rss_bytes"] = srv.rss_bytes()
        out["bytes_per_page"] = (out["rss_bytes"] - before) / made
        out["memmap_s"] = median_seconds(
            lambda: srv.stub.GetMemmap(pb.GetMemmapRequest(), timeout=60), 20
        )
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        out["scrape_s"] = median_seconds(lambda: urllib.request.urlopen(url, timeout=60).read(), 5)
        out["release_s"] = timed(
            lambda: srv.stub.ReleaseOwner(
                pb.ReleaseOwnerRequest(owner="fill"), timeout=CALL_TIMEOUT_S
            )
        )
        nr_pages = machine.nr_pages
        estimate = nr_pages * page_cache_bytes_per_page
        out["page_cache_estimate_bytes"] = estimate
        if estimate > available_bytes() / 2:
            out["page_cache_attempted"] = 0.0
            return out
        out["page_cache_attempted"] = 1.0
        srv.stub.CreateFile(pb.CreateFileRequest(name="all", max_order=0, ra_pages=0))
        size = (nr_pages - 2 * machine.watermarks.nr_high) * PAGE
        srv.stub.TruncateFile(pb.TruncateFileRequest(name="all", size_bytes=size))
        start = time.perf_counter()
        out["page_cache_finished"] = float(
            fill_file(srv, "all", size, time.monotonic() + FILL_BUDGET_S)
        )
        out["page_cache_s"] = time.perf_counter() - start
        out["page_cache_rss_bytes"] = srv.rss_bytes()
        out["page_cache_pages"] = srv.stub.StatFile(pb.StatFileRequest(name="all")).nr_cached
    return out


def measure(*, big: bool, quick: bool) -> dict[str, object]:
    results: dict[str, object] = {
        "allocate": {
            f"{name} order {order}": allocate_figures(kind, order)
            for name, kind, order in (
                ("file", pb.FOLIO_KIND_FILE, 0),
                ("file", pb.FOLIO_KIND_FILE, 2),
                ("file", pb.FOLIO_KIND_FILE, 9),
                ("anon", pb.FOLIO_KIND_ANON, 0),
            )
        },
        "page_cache": {
            f"order {order}": page_cache_figures(order, ra_pages)
            for order, ra_pages in ((0, 0), (2, 32), (9, 512))
        },
    }
    results["guest"] = guest_fill_figures()
    if big:
        per_page = results["page_cache"]["order 0"]["bytes_per_page"]  # type: ignore[index]
        results["big"] = big_host_figures(64 if quick else 256, float(per_page))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--big", action="store_true", help="also the real-size host")
    parser.add_argument("--quick", action="store_true", help="a 64 GiB host for --big")
    args = parser.parse_args(argv)
    results = measure(big=args.big, quick=args.quick)
    print(json.dumps(results, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
