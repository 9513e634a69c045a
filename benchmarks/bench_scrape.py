"""Scrape cost: the server time one Prometheus scrape of a big, busy foliod takes.

Run with ``.venv/bin/python benchmarks/bench_scrape.py`` (``--quick`` for a smaller page cache,
``--json`` for one JSON object). A foliod server is started in process with a 1 TiB host, whose
page cache is filled to at least a million folios (a file read through readahead in base
pages, another in large folios, some of it dirty), with anonymous THP memory, slab and
hugetlb folios beside it, and every gRPC method it is asked about has its metrics children.
Then it measures:

- collect: ``prometheus_client.generate_latest`` on the server's own registry, in process: the
  server time of one scrape (every collector, the machine collector under the machine lock);
- http: a full GET of /metrics over loopback, client included, for reference.

Ten 16 GiB guests (two of each backing, each with some page cache) add ten machines and their
duplication figures to every scrape. Each measurement is repeated (default 30) and reported as
best, median and worst. The figures depend on the machine and its load; no test asserts on
them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from foliod.config import Config
from foliod.logs import configure_logging
from foliod.mm import FolioKind, Machine
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

RAM = 1 << 40
PAGE_SIZE = 4096
MIN_FOLIOS = 1_000_000
QUICK_FOLIOS = 100_000
LARGE_FILE_BYTES = 4 << 30  # read sequentially: readahead grows its folios up to 2 MiB
LARGE_FILE_RA_PAGES = 512
ANON_BYTES = 256 << 30  # faulted in as 2 MiB THPs
ANON_CALL_BYTES = 4 << 30  # what one call may map (a million pages)
DIRTY_BYTES = 64 << 20
SLAB_FOLIOS = 50_000
HUGETLB_FOLIOS = 64
REPEATS = 30
HTTP_TIMEOUT_S = 30.0
TARGET_MS = 50.0


@dataclass(frozen=True)
class ScrapeCost:
    """What one scrape costs; times in milliseconds."""

    page_cache_folios: int
    machine_folios: int
    series: int
    exposition_bytes: int
    collect_best_ms: float
    collect_median_ms: float
    collect_worst_ms: float
    http_best_ms: float
    http_median_ms: float
    build_seconds: float
    guests: int


def populate(machine: Machine, page_cache_folios: int) -> int:
    """Fills the machine as a busy host looks; returns the page cache's folio count."""
    files = machine.files
    files.create("base-pages", max_order=0)
    files.truncate("base-pages", page_cache_folios * PAGE_SIZE)
    files.replay("base-pages", range(page_cache_folios))
    files.create("large-folios", ra_pages=LARGE_FILE_RA_PAGES)
    files.truncate("large-folios", LARGE_FILE_BYTES)
    files.replay("large-folios", range(LARGE_FILE_BYTES // PAGE_SIZE))
    files.create("dirty")
    chunk = b"d" * (2 << 20)
    for offset in range(0, DIRTY_BYTES, len(chunk)):
        files.write("dirty", offset, chunk)
    for _ in range(ANON_BYTES // ANON_CALL_BYTES):
        machine.allocate("vm", FolioKind.ANON, nr_bytes=ANON_CALL_BYTES)
    machine.allocate("slab", FolioKind.SLAB, order=0, count=SLAB_FOLIOS)
    machine.allocate("hugetlb", FolioKind.HUGETLB, order=9, count=HUGETLB_FOLIOS)
    return sum(len(inode.folios) for inode in files.files.values())


GUEST_BACKINGS = ("base", "thp", "hugetlb_2m", "hugetlb_1g", "mthp")
GUEST_RAM = 16 << 30
GUEST_FILE_BYTES = 8 << 20


def add_guests(server: FoliodServer) -> None:
    """Ten guests, two of each backing, each with a file in its page cache."""
    for i in range(2 * len(GUEST_BACKINGS)):
        backing = GUEST_BACKINGS[i % len(GUEST_BACKINGS)]
        guest = server.guests.create(
            f"vm{i}",
            GUEST_RAM,
            backing,
            mthp_size_kb=64 if backing == "mthp" else 0,
            hvo=backing.startswith("hugetlb") and i % 2 == 0,
        )
        with guest.machine.lock:
            files = guest.machine.files
            files.create("data")
            for offset in range(0, GUEST_FILE_BYTES, 1 << 21):
                files.write("data", offset, bytes(1 << 21))


def touch_every_method(port: int) -> None:
    """Calls each read-only method once and a few failing ones, so that the gRPC metrics have
    the children a long-running server has."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = foliod_pb2_grpc.FoliodStub(channel)
        stub.GetMachine(pb.GetMachineRequest())
        stub.GetBuddyInfo(pb.GetBuddyInfoRequest())
        stub.GetMeminfo(pb.GetMeminfoRequest())
        stub.GetMemmap(pb.GetMemmapRequest())
        stub.GetVmstat(pb.GetVmstatRequest())
        stub.GetThpPolicy(pb.GetThpPolicyRequest())
        stub.ListFiles(pb.ListFilesRequest())
        stub.StatFile(pb.StatFileRequest(name="dirty"))
        stub.ReadFile(pb.ReadFileRequest(name="base-pages", offset=0, length=4096))
        stub.GetFaults(pb.GetFaultsRequest())
        for call in (
            lambda: stub.ReadFile(pb.ReadFileRequest(name="missing", offset=0, length=1)),
            lambda: stub.Free(pb.FreeRequest(handles=[1 << 60])),
            lambda: stub.GetMachine(pb.GetMachineRequest(machine="no-such-guest")),
        ):
            with contextlib.suppress(grpc.RpcError):
                call()


def timed(repeats: int, body: Callable[[], object]) -> list[float]:
    """Milliseconds of each of `repeats` calls of body."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        body()
        times.append((time.perf_counter() - start) * 1000)
    return times


def measure(page_cache_folios: int, repeats: int, state_dir: Path) -> ScrapeCost:
    config = dataclasses.replace(
        Config(),
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        ram=RAM,
        state_dir=state_dir,
        dirty_writeback_seconds=0.0,
        grace_seconds=0.0,
    )
    server = FoliodServer(config)
    server.start()
    try:
        host = server.machines.get("")
        start = time.perf_counter()
        with host.lock:
            cached = populate(host, page_cache_folios)
        add_guests(server)
        build_seconds = time.perf_counter() - start
        touch_every_method(server.grpc_port)
        gc.collect()
        text = generate_latest(server.registry)
        series = sum(len(f.samples) for f in text_string_to_metric_families(text.decode()))
        collect = timed(repeats, lambda: generate_latest(server.registry))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"

        def get() -> None:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                response.read()

        http = timed(repeats, get)
        return ScrapeCost(
            page_cache_folios=cached,
            machine_folios=sum(host.nr_folios.values()),
            series=series,
            exposition_bytes=len(text),
            collect_best_ms=min(collect),
            collect_median_ms=statistics.median(collect),
            collect_worst_ms=max(collect),
            http_best_ms=min(http),
            http_median_ms=statistics.median(http),
            build_seconds=build_seconds,
            guests=len(server.guests.by_name),
        )
    finally:
        server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_FOLIOS:,} folios")
    parser.add_argument("--folios", type=int, help="page cache folios to build (overrides)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    folios = args.folios or (QUICK_FOLIOS if args.quick else MIN_FOLIOS)
    configure_logging("warning", "console")
    with tempfile.TemporaryDirectory(prefix="foliod-bench-scrape-") as tmp:
        cost = measure(folios, args.repeats, Path(tmp))
    if args.json:
        print(json.dumps(dataclasses.asdict(cost)))
        return 0
    target = "meets" if cost.collect_median_ms < TARGET_MS else "above"
    print(f"scrape cost, 1 TiB host, {args.repeats} repeats")
    print(f"  page cache folios                      {cost.page_cache_folios:>12,}")
    print(f"  folios on the machine (all kinds)      {cost.machine_folios:>12,}")
    print(f"  series in one scrape                   {cost.series:>12,}")
    print(f"  exposition size                        {cost.exposition_bytes:>12,} bytes")
    print(f"  building the machine                   {cost.build_seconds:>12.1f} s")
    print("  measurement                                  best      median       worst")
    print(
        f"  collect (generate_latest, server)   {cost.collect_best_ms:>9.2f} ms"
        f" {cost.collect_median_ms:>8.2f} ms {cost.collect_worst_ms:>8.2f} ms"
        f"   target < {TARGET_MS:.0f} ms: {target}"
    )
    print(
        f"  GET /metrics over loopback          {cost.http_best_ms:>9.2f} ms"
        f" {cost.http_median_ms:>8.2f} ms"
    )
    print(f"  guests (16 GiB each, with page cache)  {cost.guests:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
