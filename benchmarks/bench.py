"""foliod benchmarks: throughput of the simulated allocator, of the gRPC service and of reports.

Run with ``make bench`` (``.venv/bin/python benchmarks/bench.py``). Flags: ``--json`` prints one
JSON object instead of the table; ``--quick`` uses about 5x smaller counts.

What is measured:

1. The in-process allocator of ``foliod.mm`` (no gRPC), each repetition on a fresh 4 GiB
   ``Machine`` so no state accumulates:

   a. raw buddy operations, ``Zone.rmqueue`` and ``Zone.free_one_page``: order-0 blocks, then
      mixed orders 0..10 weighted 2**(10 - order); blocks are freed in a shuffled order (seeded
      RNG). One op is one allocation or one free.
   b. folio-level calls: ``Machine.allocate(count=1)`` then ``Machine.free([handle])`` one folio
      at a time, and one batch ``allocate(count=N)`` followed by ``release_owner``.
   c. anonymous memory with the default THP policy (2 MiB folios): 64 MiB mappings faulted in by
      ``allocate(nr_bytes=...)``, then ``release_owner``; reported as pages faulted in per second.

2. gRPC: sequential (1 in flight) and concurrent (8 client threads) Allocate RPCs against a real
   foliod server, and against an empty grpcio handler of the same shape (it deserializes an
   AllocateRequest and returns an empty AllocateResponse), both in separate processes and driven
   by the same client code, so the ratio shows what foliod adds on top of grpcio itself. The
   empty handler runs on foliod's executor (``foliod.rpc.pool.WorkerPool``) with foliod's
   default threads, so the two differ only in the code a call runs.

3. The memory-map report on a 1 TiB machine: boot (machine construction) time, ``memmap()``
   reports per second, and the resident memory of a fresh process before and after boot.

4. Page cache replay (``--only replay``), in process: a page-access trace replayed through
   ``PageCache.replay`` on a machine whose page cache is capped at 10,000 pages, next to a plain
   ``collections.OrderedDict`` LRU of the same capacity run on the same trace in the same
   process; reported as page accesses per second and as ratios foliod / OrderedDict. Traces
   (seeded): Zipf (alpha 1.0) over 100,000 pages, the ranks scattered over the file by a seeded
   permutation, and a sequential loop over 1.5x the capacity. foliod runs in ``lru`` mode with
   base pages and no readahead, whose hit count must equal the OrderedDict's (a MISMATCH line is
   printed and the run exits non-zero otherwise), and in ``two_list`` mode with readahead (32
   pages, folios up to order 9). Each of the three runs 3 times per trace.

5. gRPC ReadFile (``--only read_rpc``): 4 KiB reads at random page-aligned offsets of a 1 MiB
   file that is fully in the page cache, 1 and 8 in flight, against a real foliod server (1 GiB
   of RAM, default info logging, to a file) and against an empty handler that returns 4 KiB of
   zeros (as in 2.), and against the same empty handler on a ``ThreadPoolExecutor`` of 8
   threads, as grpcio's examples serve (foliod's executor before it had its own), all in
   separate processes and driven by the same client code. In 2. and 5. the servers run side by
   side and are measured turn about, repetition by repetition, so each set of runs sees the
   same machine.

6. Guests (``--only guests``): creating and destroying a 64 GiB guest on a 256 GiB host, per
   backing (lazily backed ones allocate nothing up front; HugeTLB ones reserve every page).

7. Scrape cost (``--only scrape``): benchmarks/bench_scrape.py in its own process: the server time
   of one Prometheus scrape of a 1 TiB host with a page cache of a million folios and ten
   16 GiB guests.

9. Memory per simulated page (``--only memory``; ``--big`` adds the real-size host): in its own
   process, benchmarks/bench_memory.py starts fresh servers and reads their RSS from /proc around
   4 GiB Allocate calls (order 0, 2, 9 file and order-0 anon folios, with the call rates) and
   around reading a 4 GiB file into the page cache at three folio sizes; a 64 GiB base-backed
   guest filled; with ``--big``, a 256 GiB host (64 GiB with ``--quick``) allocated full of
   order-0 folios, with GetMemmap and a scrape timed. Targets are those of the compact memory
   map: <= 48, 12 and 2 bytes per page at orders 0, 2 and 9. Every part has a time budget
   (shorter with ``--quick``, which keeps the 4 GiB figures); one that runs out is a "did not
   finish in N s" row below its target. ``--baseline-ref REF`` measures the server code of that
   git commit too (a temporary worktree) and prints its figures and the ratios current /
   baseline under the current ones.

10. Trace replay through the service (``--only replay_rpc``): the Zipf trace of 4. (1M
   accesses) replayed on a fresh file of a foliod server process (lru, order 0, no readahead,
   the capacity of 4.) through one Replay RPC sent by FoliodClient.replay (encoding, transfer,
   checking and running counted: the client's clock from the call to its reply), and in this
   process through PageCache.replay, turn about; accesses/s of both, the ratio RPC /
   in-process (issue 15's target: >= 1/3) and the seconds the RPC run took end to end. Both
   must miss exactly as often.

8. Batched submission (``--only batch``): 4 KiB cache-hit reads of the 1 MiB hot file of 5.
   against one foliod server process (1 GiB): unary ReadFile RPCs (1 in flight) and page reads
   through Submit in batches of 256, sent with foliodclient's Submission (so the client's
   encoding and decoding of every batch is counted): one batch in flight on one stream, and
   pipelined (4 in flight on one stream). The repetitions of the three interleave, on the same
   server; reported as page reads per second and as ratios batched / unary.

Every measurement is repeated 3 times (7. repeats 30 times in its process); the best (highest
rate, lowest time) and the median are reported. The figures are throughputs and ratios that
depend on the machine and its load: they are for comparing changes on one machine and are never
used as assertions in tests. Targets printed next to some ratios (meets / below) are goals from
issues, judged on the median ratio; missing one does not fail the run.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import gc
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from types import FrameType
from typing import TypeVar

import grpc

from foliod.config import Config
from foliod.mm import MAX_PAGE_ORDER, FolioKind, Machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.guest import Guests, ReportingConfig
from foliod.mm.machine import Machines
from foliod.server import worker_pool
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import Batch, BatchResult, FoliodClient

REPEATS = 3
# RPC rates pair foliod's runs with the empty handler's, in short blocks: RPC_ROUNDS rounds,
# each of rpc_calls / RPC_BLOCKS calls per server and mode.
RPC_ROUNDS = 24
RPC_BLOCKS = 12
REPLAY_REPEATS = 5
QUICK_DIVISOR = 5
SERVER_READY_TIMEOUT_S = 10.0
SERVER_STOP_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 30.0
CLIENT_THREADS = 8
BENCH_RAM = 4 << 30
GIB_F = float(1 << 30)
BIG_RAM = 1 << 40
ANON_MAPPING_BYTES = 64 << 20
PAGE_SIZE = 4096
SERVICE = "foliod.v1.Foliod"
# Section 4, page cache replay.
REPLAY_RAM = 1 << 30
REPLAY_KEYS = 100_000
REPLAY_CAPACITY = 10_000
REPLAY_LOOP_PAGES = REPLAY_CAPACITY * 3 // 2
ZIPF_ALPHA = 1.0
SEED = 42
TARGET_REPLAY_LRU = 1 / 3
TARGET_REPLAY_TWO_LIST = 1 / 10
# Section 10, the Replay RPC.
TARGET_REPLAY_RPC = 1 / 3
# Section 5, gRPC ReadFile.
HOT_FILE = "hot"
HOT_FILE_BYTES = 1 << 20
TARGET_READ_RPC = 0.8
# Section 8, batched submission.
BATCH_READS = 256
BATCH_WINDOW = 4
TARGET_BATCH = 10.0

T = TypeVar("T")


@dataclass(frozen=True)
class Counts:
    """How much work each measurement does in one repetition; every loop is bounded by these."""

    buddy_order0: int = 200_000
    buddy_mixed: int = 100_000
    folio_single: int = 50_000
    folio_batch: int = 200_000
    anon_mappings: int = 20
    anon_rounds: int = 10
    rpc_calls: int = 3_000
    rpc_warmup: int = 200
    memmap_calls: int = 20_000
    replay_zipf: int = 1_000_000
    replay_loop: int = 10 * REPLAY_LOOP_PAGES
    scrape_folios: int = 1_000_000
    batch_reads: int = 200 * BATCH_READS
    # Options of benchmarks/bench_memory.py (section 9): --quick, --big, --baseline-ref REF.
    memory_options: tuple[str, ...] = ()

    def scaled(self, divisor: int) -> Counts:
        return Counts(
            **{
                name: max(1, value // divisor)
                if name not in ("anon_mappings", "memory_options")
                else value
                for name, value in asdict(self).items()
            }
        )


@dataclass(frozen=True)
class Result:
    """One measurement: a rate (higher is better) or a duration (lower is better)."""

    section: str
    name: str
    unit: str
    best: float
    median: float
    samples: list[float]
    higher_is_better: bool = True
    # A goal for this figure (from an issue), judged on the median; None when there is none.
    target: float | None = None

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.median >= self.target
        return self.median <= self.target


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Correctness failures (not slowness): printed loudly, and the run exits non-zero.
    failures: list[str] = field(default_factory=list)

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"MISMATCH: {message}", file=sys.stderr, flush=True)


def summarize(
    section: str, name: str, unit: str, samples: Sequence[float], *, higher_is_better: bool = True
) -> Result:
    best = max(samples) if higher_is_better else min(samples)
    return Result(
        section, name, unit, best, statistics.median(samples), list(samples), higher_is_better
    )


def ratio(
    section: str, name: str, real: Result, base: Result, target: float | None = None
) -> Result:
    """real / base for two rate results: best / best, and the median of the run-by-run ratios
    (the runs pair up when both have as many, measured turn about; else every real run with
    every base run). Pairing cancels most of this shared VM's drift, which a median / median
    ratio of separately drifting runs does not."""
    if len(real.samples) == len(base.samples):
        samples = [r / b for r, b in zip(real.samples, base.samples, strict=True)]
    else:
        samples = [r / b for r in real.samples for b in base.samples]
    return Result(
        section,
        name,
        "x",
        real.best / base.best,
        statistics.median(samples),
        samples,
        target=target,
    )


# -- timing helpers ------------------------------------------------------------------------------


class Stopwatch:
    """Accumulates the time spent inside ``with stopwatch.running():`` blocks."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.elapsed += time.perf_counter() - start


def repeat(run: Callable[[], tuple[int, float]]) -> list[float]:
    """Runs a measurement REPEATS times; each returns (operations, seconds). Returns ops/s."""
    rates = []
    for _ in range(REPEATS):
        gc.collect()
        ops, seconds = run()
        rates.append(ops / seconds if seconds > 0 else float("inf"))
    return rates


# -- 1. in-process allocator ---------------------------------------------------------------------


def bench_buddy_order0(n: int) -> tuple[int, float]:
    zone = Machine("bench", BENCH_RAM).zone
    watch = Stopwatch()
    pfns: list[int] = []
    with watch.running():
        for _ in range(n):
            pfn = zone.rmqueue(0)
            if pfn is None:
                break
            pfns.append(pfn)
    random.Random(42).shuffle(pfns)
    with watch.running():
        for pfn in pfns:
            zone.free_one_page(pfn, 0)
    return 2 * len(pfns), watch.elapsed


def bench_buddy_mixed(n: int) -> tuple[int, float]:
    zone = Machine("bench", BENCH_RAM).zone
    rng = random.Random(42)
    orders = list(range(MAX_PAGE_ORDER + 1))
    wanted = rng.choices(orders, weights=[2 ** (MAX_PAGE_ORDER - o) for o in orders], k=n)
    watch = Stopwatch()
    blocks: list[tuple[int, int]] = []
    with watch.running():
        for order in wanted:
            pfn = zone.rmqueue(order)
            if pfn is not None:
                blocks.append((pfn, order))
    rng.shuffle(blocks)
    with watch.running():
        for pfn, order in blocks:
            zone.free_one_page(pfn, order)
    return len(wanted) + len(blocks), watch.elapsed


def bench_folio_single(n: int) -> tuple[float, float]:
    """Returns (allocate calls/s, free calls/s)."""
    machine = Machine("bench", BENCH_RAM)
    handles: list[int] = []
    start = time.perf_counter()
    for _ in range(n):
        handles.append(machine.allocate("o", FolioKind.FILE, order=0, count=1).first_handle)
    allocated = time.perf_counter()
    for handle in handles:
        machine.free([handle])
    freed = time.perf_counter()
    return n / (allocated - start), n / (freed - allocated)


def bench_folio_batch(n: int) -> tuple[float, float]:
    """Returns (folios/s allocated in one call, folios/s released by release_owner)."""
    machine = Machine("bench", BENCH_RAM)
    start = time.perf_counter()
    allocation = machine.allocate("o", FolioKind.FILE, order=0, count=n)
    allocated = time.perf_counter()
    release = machine.release_owner("o")
    released = time.perf_counter()
    return allocation.count / (allocated - start), release.folios / (released - allocated)


def bench_anon(mappings: int, rounds: int) -> tuple[float, float]:
    """Returns (pages/s faulted in, pages/s released), over `rounds` fill-and-release rounds."""
    machine = Machine("bench", BENCH_RAM)
    faulted = released = 0
    fault_s = release_s = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(mappings):
            faulted += machine.allocate("p", FolioKind.ANON, nr_bytes=ANON_MAPPING_BYTES).nr_pages
        mid = time.perf_counter()
        released += machine.release_owner("p").nr_pages
        end = time.perf_counter()
        fault_s += mid - start
        release_s += end - mid
    return faulted / fault_s, released / release_s


def pairs(run: Callable[[], tuple[float, float]]) -> tuple[list[float], list[float]]:
    firsts, seconds = [], []
    for _ in range(REPEATS):
        gc.collect()
        first, second = run()
        firsts.append(first)
        seconds.append(second)
    return firsts, seconds


def bench_allocator(report: Report, counts: Counts) -> None:
    section = "1. allocator (in process)"
    report.add(
        summarize(
            section,
            f"buddy order-0 rmqueue/free ({counts.buddy_order0:,} blocks)",
            "ops/s",
            repeat(lambda: bench_buddy_order0(counts.buddy_order0)),
        )
    )
    report.add(
        summarize(
            section,
            f"buddy mixed orders 0..{MAX_PAGE_ORDER} ({counts.buddy_mixed:,} blocks)",
            "ops/s",
            repeat(lambda: bench_buddy_mixed(counts.buddy_mixed)),
        )
    )
    allocs, frees = pairs(lambda: bench_folio_single(counts.folio_single))
    report.add(
        summarize(section, f"allocate(count=1) x {counts.folio_single:,}", "calls/s", allocs)
    )
    report.add(summarize(section, f"free([handle]) x {counts.folio_single:,}", "calls/s", frees))
    allocs, frees = pairs(lambda: bench_folio_batch(counts.folio_batch))
    report.add(
        summarize(section, f"allocate(count={counts.folio_batch:,}), one call", "folios/s", allocs)
    )
    report.add(summarize(section, "release_owner of that batch", "folios/s", frees))
    faults, releases = pairs(lambda: bench_anon(counts.anon_mappings, counts.anon_rounds))
    label = f"{counts.anon_rounds} x {counts.anon_mappings} x {ANON_MAPPING_BYTES >> 20} MiB"
    report.add(summarize(section, f"anon fault-in, THP ({label})", "pages/s", faults))
    report.add(summarize(section, "anon release_owner", "pages/s", releases))


# -- 2. gRPC -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class ServerProcess:
    """A server in a child process, stopped with SIGTERM (killed after a timeout)."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, channel: grpc.Channel) -> None:
        try:
            grpc.channel_ready_future(channel).result(timeout=SERVER_READY_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            raise RuntimeError(
                f"{self.name} server did not accept connections on {self.target} within "
                f"{SERVER_READY_TIMEOUT_S:.0f} s (exit code {self.proc.poll()}); "
                f"its output:\n{self.log_path.read_text(errors='replace')}"
            ) from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def allocate_request() -> pb.AllocateRequest:
    return pb.AllocateRequest(owner="bench", kind=pb.FOLIO_KIND_FILE, order=0, count=1)


# Makes RPC number i (its argument) and waits for the reply; the same code drives both servers.
RpcCall = Callable[[int], object]
# One server's RPC rates: (1 in flight, CLIENT_THREADS in flight), one rate per round.
RpcRates = tuple[list[float], list[float]]


def sequential_calls(call: RpcCall, first: int, n: int) -> None:
    for i in range(first, first + n):
        call(i)


def rpc_rate_sequential(call: RpcCall, n: int) -> tuple[int, float]:
    start = time.perf_counter()
    sequential_calls(call, 0, n)
    return n, time.perf_counter() - start


def rpc_rate_concurrent(
    call: RpcCall, pool: futures.ThreadPoolExecutor, n: int
) -> tuple[int, float]:
    """n calls split over CLIENT_THREADS threads, each with one call in flight."""
    shares = [n // CLIENT_THREADS + (i < n % CLIENT_THREADS) for i in range(CLIENT_THREADS)]
    firsts = [0, *accumulate(shares)][:CLIENT_THREADS]
    barrier = threading.Barrier(CLIENT_THREADS + 1, timeout=RPC_TIMEOUT_S)

    def worker(first: int, share: int) -> None:
        barrier.wait()
        sequential_calls(call, first, share)

    jobs = [pool.submit(worker, first, share) for first, share in zip(firsts, shares, strict=True)]
    barrier.wait()
    start = time.perf_counter()
    for job in jobs:
        job.result()
    return n, time.perf_counter() - start


@dataclass(frozen=True)
class Subject:
    """One server's side of an RPC measurement: the timed call, and what runs untimed between
    repetitions."""

    call: RpcCall
    reset: Callable[[], None] = lambda: None


def measure_rpc(subjects: Sequence[Subject], counts: Counts) -> list[RpcRates]:
    """(sequential rates, concurrent rates) of each server, one rate per round. Each round
    times a block of rpc_calls / RPC_BLOCKS calls on each server, turn about and in
    alternating order, sequential then concurrent: blocks a fraction of a second long pair up
    runs that saw the same machine (this shared VM's speed drifts by 2x within minutes, and a
    few seconds apart two runs no longer compare)."""
    rates: list[RpcRates] = [([], []) for _ in subjects]
    block = max(CLIENT_THREADS, counts.rpc_calls // RPC_BLOCKS)
    indexed = list(enumerate(subjects))
    with futures.ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="client") as pool:
        for _, subject in indexed:
            sequential_calls(subject.call, 0, counts.rpc_warmup)
            rpc_rate_concurrent(subject.call, pool, counts.rpc_warmup)
            subject.reset()
        for round_ in range(RPC_ROUNDS):
            order = indexed if round_ % 2 == 0 else indexed[::-1]
            for i, subject in order:
                calls, seconds = rpc_rate_sequential(subject.call, block)
                rates[i][0].append(calls / seconds)
                subject.reset()
            for i, subject in order:
                calls, seconds = rpc_rate_concurrent(subject.call, pool, block)
                rates[i][1].append(calls / seconds)
                subject.reset()
    return rates


# The baselines: "empty" serves empty handlers on foliod's own executor (WorkerPool) with the
# same threads as foliod's defaults, so a ratio against it shows what foliod's code adds to a
# call; "stock" serves them as grpcio's examples do, on a ThreadPoolExecutor of 8 threads.
BASELINES = ("empty", "stock")


def run_servers(
    tmp_path: Path,
    ram: str,
    baselines: Sequence[str],
    body: Callable[[list[foliod_pb2_grpc.FoliodStub]], T],
) -> T:
    """Starts foliod and the baselines, each in its own process, runs body with a stub
    connected to each (foliod's first), and stops them all."""
    with ExitStack() as stack:
        servers = []
        for name in ("foliod", *baselines):
            port = free_port()
            argv = (
                foliod_argv(port, ram, tmp_path / "state")
                if name == "foliod"
                else baseline_argv(port, name)
            )
            server = ServerProcess(name, argv, port, tmp_path / f"{name}.log")
            stack.callback(server.stop)
            servers.append(server)
        channels = [stack.enter_context(grpc.insecure_channel(s.target)) for s in servers]
        for server, channel in zip(servers, channels, strict=True):
            server.wait_ready(channel)
        return body([foliod_pb2_grpc.FoliodStub(channel) for channel in channels])


def foliod_argv(port: int, ram: str, state_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "foliod.main",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        "",
        "--ram",
        ram,
        "--log-level",
        "info",  # the default: one access-log line per call, as deployed
        "--state-dir",
        str(state_dir),
    ]


def baseline_argv(port: int, kind: str) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--serve-baseline",
        str(port),
        "--baseline-kind",
        kind,
    ]


def allocate_subject(stub: foliod_pb2_grpc.FoliodStub, *, foliod: bool) -> Subject:
    request = allocate_request()

    def call(i: int) -> object:
        return stub.Allocate(request, timeout=RPC_TIMEOUT_S)

    if not foliod:
        return Subject(call)

    def reset() -> None:
        stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="bench"), timeout=RPC_TIMEOUT_S)

    # The real server must also free by handle: check Free works on what we made.
    handle = stub.Allocate(allocate_request(), timeout=RPC_TIMEOUT_S).first_handle
    stub.Free(pb.FreeRequest(handles=[handle]), timeout=RPC_TIMEOUT_S)
    return Subject(call, reset)


def add_rpc_results(
    report: Report,
    section: str,
    what: str,
    n: int,
    rates: Sequence[RpcRates],
    *,
    target: float | None = None,
) -> None:
    """Rows for foliod's rates (rates[0]) and each baseline's (in BASELINES order), and the
    ratios foliod / baseline."""
    block = max(CLIENT_THREADS, n // RPC_BLOCKS)
    for mode, label in enumerate(("1 in flight", f"{CLIENT_THREADS} in flight")):
        real = report.add(
            summarize(
                section,
                f"foliod {what}, {label} ({RPC_ROUNDS} x {block:,} calls)",
                "RPC/s",
                rates[0][mode],
            )
        )
        for kind, baseline_rates in zip(BASELINES, rates[1:], strict=False):
            name = BASELINE_NAMES[kind]
            base = report.add(summarize(section, f"{name}, {label}", "RPC/s", baseline_rates[mode]))
            report.add(
                ratio(
                    section,
                    f"ratio foliod / {kind}, {label}",
                    real,
                    base,
                    target if kind == "empty" else None,
                )
            )


BASELINE_NAMES = {
    "empty": "empty handler, foliod's threads",
    "stock": "empty handler, ThreadPoolExecutor(8)",
}


def bench_grpc(report: Report, counts: Counts) -> None:
    section = "2. gRPC Allocate (client and server in separate processes)"
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        rates = run_servers(
            Path(tmp),
            "4GiB",
            BASELINES[:1],
            lambda stubs: measure_rpc(
                [allocate_subject(stubs[0], foliod=True), allocate_subject(stubs[1], foliod=False)],
                counts,
            ),
        )
    add_rpc_results(report, section, "Allocate", counts.rpc_calls, rates)


def serve_baseline(port: int, kind: str) -> int:
    """Empty Allocate and ReadFile handlers with foliod's method shapes (ReadFile returns 4 KiB
    of zeros), on the executor of the baseline `kind` (BASELINES); serves until SIGTERM or
    SIGINT."""

    def allocate(request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        return pb.AllocateResponse()

    def read_file(
        request: pb.ReadFileRequest, context: grpc.ServicerContext
    ) -> pb.ReadFileResponse:
        return pb.ReadFileResponse(data=bytes(PAGE_SIZE))

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Allocate": grpc.unary_unary_rpc_method_handler(
                allocate,
                request_deserializer=pb.AllocateRequest.FromString,
                response_serializer=pb.AllocateResponse.SerializeToString,
            ),
            "ReadFile": grpc.unary_unary_rpc_method_handler(
                read_file,
                request_deserializer=pb.ReadFileRequest.FromString,
                response_serializer=pb.ReadFileResponse.SerializeToString,
            ),
        },
    )
    executor: futures.Executor = (
        worker_pool(Config()) if kind == "empty" else futures.ThreadPoolExecutor(max_workers=8)
    )
    server = grpc.server(executor)  # type: ignore[arg-type]  # grpc only submits
    server.add_generic_rpc_handlers((handler,))
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    while not stop.wait(3600):
        pass
    server.stop(0).wait()
    return 0


# -- 3. memory-map report ------------------------------------------------------------------------


def maxrss_mib() -> float:
    # ru_maxrss is in KiB on Linux: the peak resident set of this process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(key: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) / 1024
    return None


def probe_boot() -> int:
    """In a fresh process: resident memory before and after booting a 1 TiB machine, as JSON.

    ru_maxrss survives exec on Linux (a child starts with its parent's peak), so the probe
    prefers VmHWM, the peak of this process's own address space, and falls back to ru_maxrss.
    """
    gc.collect()
    before = status_mib("VmHWM") or maxrss_mib()
    start = time.perf_counter()
    machine = Machine("big", BIG_RAM)
    boot_s = time.perf_counter() - start
    after = status_mib("VmHWM") or maxrss_mib()
    print(json.dumps({"before_mib": before, "after_mib": after, "boot_s": boot_s}))
    del machine
    return 0


def populate(machine: Machine) -> None:
    """A little of every kind and several orders, so reports have non-empty breakdowns."""
    for order in range(10):
        machine.allocate("files", FolioKind.FILE, order=order, count=4)
    machine.allocate("slabs", FolioKind.SLAB, order=0, count=64)
    machine.allocate("proc", FolioKind.ANON, nr_bytes=ANON_MAPPING_BYTES)


def bench_memmap(report: Report, counts: Counts) -> None:
    section = "3. memory map, 1 TiB machine"
    boots: list[float] = []
    rates: list[float] = []
    for _ in range(REPEATS):
        gc.collect()
        start = time.perf_counter()
        machine = Machine("big", BIG_RAM)
        boots.append(time.perf_counter() - start)
        populate(machine)
        start = time.perf_counter()
        for _ in range(counts.memmap_calls):
            machine.memmap()
        rates.append(counts.memmap_calls / (time.perf_counter() - start))
        del machine
    report.add(summarize(section, "boot Machine(1 TiB)", "s", boots, higher_is_better=False))
    report.add(summarize(section, f"memmap() x {counts.memmap_calls:,}", "reports/s", rates))
    probe = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--probe-boot"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rss = json.loads(probe.stdout)
    for name, value in (
        ("peak RSS of a fresh process, before boot", rss["before_mib"]),
        ("peak RSS of that process after boot", rss["after_mib"]),
        ("growth due to boot (the 1 TiB free lists)", rss["after_mib"] - rss["before_mib"]),
    ):
        report.add(Result(section, name, "MiB", value, value, [value]))
    report.notes.append(
        f"memory: peak RSS (ru_maxrss) of this benchmark process at the end: "
        f"{maxrss_mib():.0f} MiB (the process maximum, all sections included)"
    )


# -- 4. page cache replay ------------------------------------------------------------------------


def zipf_trace(n_keys: int, alpha: float, n: int, seed: int) -> list[int]:
    """n page indices in 0..n_keys-1, Zipf(alpha) by inverse CDF; rank r (0 the most popular)
    is drawn with probability proportional to 1 / (r + 1) ** alpha, and the ranks are scattered
    over the file by a seeded permutation so the hot pages are not neighbours."""
    rng = random.Random(seed)
    cumulative = list(accumulate((rank + 1) ** -alpha for rank in range(n_keys)))
    total = cumulative[-1]
    page_of_rank = list(range(n_keys))
    rng.shuffle(page_of_rank)
    last = n_keys - 1
    return [
        page_of_rank[min(bisect.bisect_right(cumulative, rng.random() * total), last)]
        for _ in range(n)
    ]


def loop_trace(n_pages: int, n: int) -> list[int]:
    """n accesses looping sequentially over pages 0..n_pages-1."""
    return [i % n_pages for i in range(n)]


def replay_ordered_dict(keys: Sequence[int], capacity: int) -> tuple[int, float]:
    """A plain OrderedDict LRU of capacity entries; returns (hits, seconds)."""
    gc.collect()
    cache: OrderedDict[int, bool] = OrderedDict()
    hits = 0
    start = time.perf_counter()
    for key in keys:
        if cache.get(key) is not None:
            cache.move_to_end(key)
            hits += 1
        else:
            cache[key] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits, time.perf_counter() - start


def replay_foliod(
    keys: list[int], store_dir: Path, policy: str, *, ra_pages: int, max_file_order: int
) -> tuple[int, float]:
    """keys replayed through a fresh machine's page cache; returns (pages hit, seconds)."""
    shutil.rmtree(store_dir, ignore_errors=True)
    machine = Machine(
        "bench",
        REPLAY_RAM,
        store=BackingStore(store_dir, DEVICE_PROFILES["nvme"]),
        reclaim_policy=policy,
        cache_capacity_pages=REPLAY_CAPACITY,
        ra_pages=ra_pages,
        max_file_order=max_file_order,
    )
    files = machine.files
    files.create("trace")
    files.truncate("trace", REPLAY_KEYS * PAGE_SIZE)
    gc.collect()
    start = time.perf_counter()
    stats = files.replay("trace", keys)
    seconds = time.perf_counter() - start
    if stats.pages_hit + stats.pages_missed != len(keys):
        raise RuntimeError(
            f"foliod {policy}: {stats.pages_hit} hits + {stats.pages_missed} misses "
            f"for {len(keys)} accesses"
        )
    return stats.pages_hit, seconds


def replay_runs(
    runs: Sequence[Callable[[], tuple[int, float]]], repeats: int, n: int
) -> list[tuple[list[float], int]]:
    """Runs each of runs repeats times, turn about (run 0, 1, 2, then again), so that each
    repetition's runs see the same machine. Returns (accesses/s of each repetition, hits) per
    run; every repetition of a run must hit as often."""
    rates: list[list[float]] = [[] for _ in runs]
    hits: list[set[int]] = [set() for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            run_hits, seconds = run()
            hits[i].add(run_hits)
            rates[i].append(n / seconds if seconds > 0 else float("inf"))
    if any(len(h) != 1 for h in hits):
        raise RuntimeError(f"repetitions of one run hit different numbers of times: {hits}")
    return [(r, h.pop()) for r, h in zip(rates, hits, strict=True)]


def replay_trace(report: Report, section: str, tag: str, keys: list[int], store: Path) -> None:
    """One trace: the OrderedDict LRU, foliod in lru and in two_list mode, turn about."""
    n = len(keys)
    (od_rates, od_hits), (lru_rates, lru_hits), (two_rates, two_hits) = replay_runs(
        [
            lambda: replay_ordered_dict(keys, REPLAY_CAPACITY),
            lambda: replay_foliod(keys, store / "lru", "lru", ra_pages=0, max_file_order=0),
            lambda: replay_foliod(
                keys, store / "two_list", "two_list", ra_pages=32, max_file_order=9
            ),
        ],
        REPLAY_REPEATS,
        n,
    )
    od = report.add(
        summarize(section, f"{tag}: OrderedDict LRU ({n:,} accesses)", "acc/s", od_rates)
    )
    lru = report.add(
        summarize(section, f"{tag}: foliod lru, order 0, no readahead", "acc/s", lru_rates)
    )
    two = report.add(
        summarize(section, f"{tag}: foliod two_list, readahead 32, order<=9", "acc/s", two_rates)
    )
    report.add(ratio(section, f"{tag}: ratio foliod lru / OrderedDict", lru, od, TARGET_REPLAY_LRU))
    report.add(
        ratio(
            section,
            f"{tag}: ratio foliod two_list / OrderedDict",
            two,
            od,
            TARGET_REPLAY_TWO_LIST,
        )
    )
    for name, hits in (
        ("OrderedDict LRU", od_hits),
        ("foliod lru", lru_hits),
        ("foliod two_list + readahead", two_hits),
    ):
        report.add(Result(section, f"{tag}: hits, {name}", "hits", hits, hits, [hits]))
    if lru_hits != od_hits:
        report.fail(
            f"replay {tag}: foliod lru hit {lru_hits:,} times, the OrderedDict LRU "
            f"{od_hits:,} times, on the same {n:,}-access trace with the same capacity"
        )


def bench_replay(report: Report, counts: Counts) -> None:
    section = (
        f"4. page cache replay (in process), capacity {REPLAY_CAPACITY:,} pages, "
        f"each run {REPLAY_REPEATS} times, turn about"
    )
    traces: list[tuple[str, str, Callable[[], list[int]]]] = [
        (
            "zipf",
            f"Zipf {ZIPF_ALPHA} over {REPLAY_KEYS:,} pages (ranks scattered by a seeded shuffle)",
            lambda: zipf_trace(REPLAY_KEYS, ZIPF_ALPHA, counts.replay_zipf, SEED),
        ),
        (
            "loop",
            f"sequential loop over pages 0..{REPLAY_LOOP_PAGES - 1:,} (1.5x the capacity)",
            lambda: loop_trace(REPLAY_LOOP_PAGES, counts.replay_loop),
        ),
    ]
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        for tag, description, make in traces:
            keys = make()
            report.notes.append(f"replay {tag}: {description}, {len(keys):,} accesses")
            replay_trace(report, section, tag, keys, Path(tmp) / tag)


# -- 10. Replay RPC ------------------------------------------------------------------------------


def replay_rpc(client: FoliodClient, keys: list[int]) -> tuple[int, float]:
    """keys replayed on a fresh file of the server through one Replay call; (hits, seconds)."""
    client.delete_file("trace", timeout=120)
    client.create_file("trace")
    client.truncate_file("trace", REPLAY_KEYS * PAGE_SIZE)
    offsets = [key * PAGE_SIZE for key in keys]
    gc.collect()
    start = time.perf_counter()
    result = client.replay("trace", offsets)
    seconds = time.perf_counter() - start
    if result.totals.accesses != len(keys):
        raise RuntimeError(f"Replay ran {result.totals.accesses} of {len(keys)} accesses")
    return result.totals.stats.pages_hit, seconds


def bench_replay_rpc(report: Report, counts: Counts) -> None:
    section = (
        f"10. trace replay through the Replay RPC, lru, capacity {REPLAY_CAPACITY:,} pages, "
        f"each run {REPLAY_REPEATS} times, turn about"
    )
    keys = zipf_trace(REPLAY_KEYS, ZIPF_ALPHA, counts.replay_zipf, SEED)
    n = len(keys)
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        port = free_port()
        argv = foliod_argv(port, "1GiB", Path(tmp) / "state")
        argv += ["--reclaim-policy", "lru", "--ra-kb", "0", "--max-file-order", "0"]
        argv += ["--cache-capacity", str(REPLAY_CAPACITY * PAGE_SIZE)]
        server = ServerProcess("foliod", argv, port, Path(tmp) / "foliod.log")
        try:
            with grpc.insecure_channel(server.target) as channel:
                server.wait_ready(channel)
            with FoliodClient(server.target, timeout=60) as client:
                client.create_file("trace")
                (rpc_rates, rpc_hits), (local_rates, local_hits) = replay_runs(
                    [
                        lambda: replay_rpc(client, keys),
                        lambda: replay_foliod(
                            keys, Path(tmp) / "local", "lru", ra_pages=0, max_file_order=0
                        ),
                    ],
                    REPLAY_REPEATS,
                    n,
                )
        finally:
            server.stop()
    rpc = report.add(summarize(section, f"zipf, Replay RPC ({n:,} accesses)", "acc/s", rpc_rates))
    local = report.add(
        summarize(section, "zipf, in-process PageCache.replay", "acc/s", local_rates)
    )
    report.add(ratio(section, "zipf: ratio Replay RPC / in-process", rpc, local, TARGET_REPLAY_RPC))
    report.add(
        summarize(
            section,
            f"zipf: seconds for the {n:,}-access trace through the RPC, end to end",
            "s",
            [n / rate for rate in rpc_rates],
            higher_is_better=False,
        )
    )
    if rpc_hits != local_hits:
        report.fail(
            f"Replay RPC hit {rpc_hits:,} times, in-process replay {local_hits:,} times, on the "
            f"same {n:,}-access trace with the same capacity"
        )


# -- 5. gRPC ReadFile ----------------------------------------------------------------------------


def read_requests(n: int) -> list[pb.ReadFileRequest]:
    """n 4 KiB reads of the hot file at random (seeded) page-aligned offsets."""
    rng = random.Random(SEED)
    pages = HOT_FILE_BYTES // PAGE_SIZE
    return [
        pb.ReadFileRequest(name=HOT_FILE, offset=rng.randrange(pages) * PAGE_SIZE, length=PAGE_SIZE)
        for _ in range(n)
    ]


def pgmajfault(stub: foliod_pb2_grpc.FoliodStub) -> int:
    vmstat = stub.GetVmstat(pb.GetVmstatRequest(), timeout=RPC_TIMEOUT_S)
    return next(entry.value for entry in vmstat.entries if entry.name == "pgmajfault")


def read_subject(
    stub: foliod_pb2_grpc.FoliodStub, requests: list[pb.ReadFileRequest], *, foliod: bool
) -> Subject:
    if foliod:
        # The hot file: written, then read once whole, so every page is in the cache.
        data = random.Random(SEED).randbytes(HOT_FILE_BYTES)
        stub.CreateFile(pb.CreateFileRequest(name=HOT_FILE), timeout=RPC_TIMEOUT_S)
        stub.WriteFile(
            pb.WriteFileRequest(name=HOT_FILE, offset=0, data=data), timeout=RPC_TIMEOUT_S
        )
        whole = stub.ReadFile(
            pb.ReadFileRequest(name=HOT_FILE, offset=0, length=HOT_FILE_BYTES),
            timeout=RPC_TIMEOUT_S,
        )
        if whole.data != data:
            raise RuntimeError("foliod read back other bytes than were written to the hot file")
    for request in requests[:8]:
        reply = stub.ReadFile(request, timeout=RPC_TIMEOUT_S)
        if len(reply.data) != PAGE_SIZE or (foliod and reply.stats.pages_missed):
            raise RuntimeError(f"unexpected ReadFile reply: {len(reply.data)} bytes, {reply.stats}")

    def call(i: int) -> object:
        return stub.ReadFile(requests[i % len(requests)], timeout=RPC_TIMEOUT_S)

    return Subject(call)


def measure_read(
    stubs: list[foliod_pb2_grpc.FoliodStub],
    requests: list[pb.ReadFileRequest],
    counts: Counts,
    notes: list[str],
) -> list[RpcRates]:
    """ReadFile rates of foliod (stubs[0]) and the baselines; foliod's state is checked and
    noted."""
    subjects = [read_subject(stub, requests, foliod=i == 0) for i, stub in enumerate(stubs)]
    stub = stubs[0]
    faults = pgmajfault(stub)
    rates = measure_rpc(subjects, counts)
    faults = pgmajfault(stub) - faults
    stat = stub.StatFile(pb.StatFileRequest(name=HOT_FILE), timeout=RPC_TIMEOUT_S)
    notes.append(
        f"read_rpc: foliod's pgmajfault grew by {faults} during the timed reads (0: all hits); "
        f"'{HOT_FILE}' then had {stat.nr_cached} pages cached, {stat.nr_dirty} dirty"
    )
    if faults:
        raise RuntimeError(f"the ReadFile measurement was not all cache hits: {faults} misses")
    return rates


def bench_read_rpc(report: Report, counts: Counts) -> None:
    section = "5. gRPC ReadFile 4 KiB, cache hits (client and server in separate processes)"
    requests = read_requests(counts.rpc_calls)
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        rates = run_servers(
            Path(tmp),
            "1GiB",
            BASELINES,
            lambda stubs: measure_read(stubs, requests, counts, report.notes),
        )
    add_rpc_results(report, section, "ReadFile", counts.rpc_calls, rates, target=TARGET_READ_RPC)


# -- output --------------------------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}"
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "MiB":
        return f"{value:.1f}"
    if unit == "hits":
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


NAME_WIDTH = 54


def print_header(header: dict[str, object]) -> None:
    print(
        f"foliod benchmark: python {header['python']} ({header['implementation']}), "
        f"cpu_count {header['cpu_count']}, {header['date']}, "
        f"{'quick' if header['quick'] else 'normal'} counts; best and median of {REPEATS} runs "
        f"({REPLAY_REPEATS} rounds turn about for replay, {RPC_ROUNDS} rounds of short blocks "
        "turn about for RPC rates); ratios: best / best, and the median of the paired ratios",
        flush=True,
    )


def print_section(results: Sequence[Result]) -> None:
    """Prints the rows of one section as soon as it is done."""
    if not results:
        return
    print()
    print(results[0].section)
    print(f"  {'measurement':<{NAME_WIDTH}}{'best':>14}{'median':>14}  unit")
    for result in results:
        unit = "ms" if result.unit == "s" else result.unit
        best = format_value(result.best, result.unit).removesuffix(" ms")
        median = format_value(result.median, result.unit).removesuffix(" ms")
        line = f"  {result.name:<{NAME_WIDTH}}{best:>14}{median:>14}  {unit}"
        if result.target is not None:
            relation = ">=" if result.higher_is_better else "<="
            verdict = "meets" if result.meets_target else "below"
            target = format_value(result.target, result.unit).removesuffix(" ms")
            line = f"{line:<{NAME_WIDTH + 38}} target {relation} {target}: {verdict}"
        print(line, flush=True)


# -- 6. guests ------------------------------------------------------------------------------------


GUEST_HOST_RAM = 256 << 30
BIG_GUEST_RAM = 64 << 30
# (backing, hvo)
GUEST_BACKINGS = (
    ("base", False),
    ("thp", False),
    ("hugetlb_2m", False),
    ("hugetlb_2m", True),
    ("hugetlb_1g", True),
)


def bench_guests(report: Report, counts: Counts) -> None:
    section = f"6. guests: create + destroy a {BIG_GUEST_RAM >> 30} GiB guest on a 256 GiB host"
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        store = Path(tmp)
        host = Machine("host", GUEST_HOST_RAM)
        guests = Guests(
            Machines(host),
            lambda name, ram: Machine(
                name, ram, store=BackingStore(store / name, DEVICE_PROFILES["nvme"])
            ),
            ReportingConfig(),
            time.monotonic,
        )
        for backing, hvo in GUEST_BACKINGS:
            label = backing + (" + HVO" if hvo else "")
            seconds: list[float] = []
            for _ in range(REPEATS):
                gc.collect()
                start = time.perf_counter()
                guests.create("vm", BIG_GUEST_RAM, backing, hvo=hvo)
                guests.destroy("vm", delete_files=True)
                seconds.append(time.perf_counter() - start)
            report.add(summarize(section, label, "s", seconds, higher_is_better=False))
        if host.zone.nr_free != host.nr_pages:
            report.fail(f"guests: the host has {host.nr_pages - host.zone.nr_free} pages in use")


# -- 7. scrape cost ------------------------------------------------------------------------------


def bench_scrape(report: Report, counts: Counts) -> None:
    """benchmarks/bench_scrape.py in its own process (a 1 TiB host, ten guests)."""
    section = "7. one Prometheus scrape (server time), 1 TiB host, ten 16 GiB guests"
    argv = [
        sys.executable,
        str(Path(__file__).with_name("bench_scrape.py")),
        "--json",
        f"--folios={counts.scrape_folios}",
    ]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=900)
    cost = json.loads(done.stdout)
    report.add(
        Result(
            section,
            "collect (generate_latest); the issue asks < 50 ms",
            "s",
            cost["collect_best_ms"] / 1000,
            cost["collect_median_ms"] / 1000,
            [cost["collect_best_ms"] / 1000, cost["collect_median_ms"] / 1000],
            higher_is_better=False,
        )
    )
    report.notes.append(
        f"scrape: {cost['page_cache_folios']:,} page cache folios, {cost['series']:,} series, "
        f"{cost['guests']} guests"
    )


# -- 9. memory per simulated page ---------------------------------------------------------------

# bench_memory.py bounds each of its parts by a time budget; this only backs them up.
MEMORY_TIMEOUT_S = 4 * 3600
MEMORY_STOP_S = 60


def one(
    section: str,
    name: str,
    unit: str,
    value: float,
    *,
    target: float | None = None,
    higher_is_better: bool = True,
) -> Result:
    """A figure measured once."""
    return Result(section, name, unit, value, value, [value], higher_is_better, target)


def bench_memory(report: Report, counts: Counts) -> None:
    """benchmarks/bench_memory.py in its own process (its progress on stderr): server RSS per page
    through the API; its rows, targets included, come as JSON."""
    section = "9. memory per simulated page (server RSS through the API)"
    argv = [
        sys.executable,
        str(Path(__file__).with_name("bench_memory.py")),
        "--json",
        *counts.memory_options,
    ]
    # Its own session, so that a timeout stops it and every server it started.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=MEMORY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        report.fail(f"memory: bench_memory.py did not finish in {MEMORY_TIMEOUT_S} s")
        return
    finally:
        if proc.poll() is None:
            proc.terminate()  # its finally blocks stop the servers and remove the worktree
            try:
                proc.wait(timeout=MEMORY_STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not out:
        report.fail(f"memory: bench_memory.py exited with {proc.returncode} and no figures")
        return
    figures = json.loads(out)
    for row in figures["figures"]:
        report.add(
            one(
                section,
                row["name"],
                row["unit"],
                row["value"],
                target=row["target"],
                higher_is_better=row["higher_is_better"],
            )
        )
    report.notes.extend(f"memory: {note}" for note in figures["notes"])
    for failure in figures["failures"]:
        report.fail(f"memory: {failure}")


# -- 8. batched submission ----------------------------------------------------------------------


def read_batches(n: int) -> list[Batch]:
    """n 4 KiB reads of the hot file (as read_requests), BATCH_READS to a batch."""
    batches = []
    requests = read_requests(n)
    for first in range(0, n, BATCH_READS):
        batch = Batch()
        for request in requests[first : first + BATCH_READS]:
            batch.read(request.name, request.offset, request.length)
        batches.append(batch)
    return batches


def measure_batch(
    target: str, stub: foliod_pb2_grpc.FoliodStub, counts: Counts, notes: list[str]
) -> tuple[list[float], list[float], list[float]]:
    """(unary ReadFile rates, batched page reads/s with 1 batch in flight, pipelined)."""
    data = random.Random(SEED).randbytes(HOT_FILE_BYTES)
    stub.CreateFile(pb.CreateFileRequest(name=HOT_FILE), timeout=RPC_TIMEOUT_S)
    stub.WriteFile(pb.WriteFileRequest(name=HOT_FILE, offset=0, data=data), timeout=RPC_TIMEOUT_S)
    stub.ReadFile(
        pb.ReadFileRequest(name=HOT_FILE, offset=0, length=HOT_FILE_BYTES), timeout=RPC_TIMEOUT_S
    )
    requests = read_requests(counts.rpc_calls)
    batches = read_batches(counts.batch_reads)
    nr_reads = sum(len(batch) for batch in batches)

    def call(i: int) -> object:
        return stub.ReadFile(requests[i % len(requests)], timeout=RPC_TIMEOUT_S)

    def check(results: list[BatchResult]) -> None:
        for result in results:
            for op in result:
                if not op.ok or len(op.data) != PAGE_SIZE or op.stats is None:
                    raise RuntimeError(f"unexpected batched read: {op}")
                if op.stats.pages_missed:
                    raise RuntimeError(f"a batched read missed the cache: {op}")

    unary: list[float] = []
    one: list[float] = []
    pipelined: list[float] = []
    with (
        FoliodClient(target, timeout=RPC_TIMEOUT_S) as client,
        client.open_submission() as submission,
    ):
        sequential_calls(call, 0, counts.rpc_warmup)
        check([submission.submit(batch) for batch in batches[:4]])
        faults = pgmajfault(stub)
        for _ in range(REPEATS):
            gc.collect()
            calls, seconds = rpc_rate_sequential(call, counts.rpc_calls)
            unary.append(calls / seconds)
            gc.collect()
            start = time.perf_counter()
            results = [submission.submit(batch) for batch in batches]
            one.append(nr_reads / (time.perf_counter() - start))
            check(results)
            gc.collect()
            start = time.perf_counter()
            results = list(submission.submit_many(batches, window=BATCH_WINDOW))
            pipelined.append(nr_reads / (time.perf_counter() - start))
            check(results)
        faults = pgmajfault(stub) - faults
    notes.append(
        f"batch: {len(batches)} batches of {BATCH_READS} reads per run; foliod's pgmajfault grew "
        f"by {faults} during the timed reads (0: all hits)"
    )
    if faults:
        raise RuntimeError(f"the batch measurement was not all cache hits: {faults} misses")
    return unary, one, pipelined


def bench_batch(report: Report, counts: Counts) -> None:
    section = (
        f"8. batched submission: 4 KiB cache-hit reads, unary ReadFile vs Submit "
        f"({BATCH_READS} reads a batch; one server process)"
    )
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        server = ServerProcess(
            "foliod", foliod_argv(port, "1GiB", tmp_path / "state"), port, tmp_path / "foliod.log"
        )
        try:
            with grpc.insecure_channel(server.target) as channel:
                server.wait_ready(channel)
                stub = foliod_pb2_grpc.FoliodStub(channel)
                unary, one, pipelined = measure_batch(server.target, stub, counts, report.notes)
        finally:
            server.stop()
    unary_result = report.add(
        summarize(
            section, f"unary ReadFile, 1 in flight ({counts.rpc_calls:,} calls)", "RPC/s", unary
        )
    )
    one_result = report.add(
        summarize(
            section,
            f"Submit, 1 batch in flight ({counts.batch_reads:,} reads)",
            "reads/s",
            one,
        )
    )
    pipelined_result = report.add(
        summarize(section, f"Submit, {BATCH_WINDOW} batches in flight", "reads/s", pipelined)
    )
    report.add(
        ratio(section, "ratio Submit 1 in flight / unary", one_result, unary_result, TARGET_BATCH)
    )
    report.add(
        ratio(
            section,
            f"ratio Submit {BATCH_WINDOW} in flight / unary",
            pipelined_result,
            unary_result,
            TARGET_BATCH,
        )
    )


SECTIONS = (
    ("allocator", bench_allocator),
    ("grpc", bench_grpc),
    ("memmap", bench_memmap),
    ("replay", bench_replay),
    ("read_rpc", bench_read_rpc),
    ("guests", bench_guests),
    ("scrape", bench_scrape),
    ("batch", bench_batch),
    ("memory", bench_memory),
    ("replay_rpc", bench_replay_rpc),
)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="about 5x smaller counts")
    parser.add_argument(
        "--only",
        choices=[name for name, _ in SECTIONS],
        action="append",
        help="run only these sections (repeatable)",
    )
    parser.add_argument(
        "--big",
        action="store_true",
        help="section 9 also fills a 256 GiB host (64 GiB with --quick); takes minutes",
    )
    parser.add_argument(
        "--baseline-ref",
        metavar="REF",
        help="section 9 also measures the server code of this git commit, with ratios",
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline-kind", choices=BASELINES, default="empty", help=argparse.SUPPRESS
    )
    parser.add_argument("--probe-boot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        return serve_baseline(args.serve_baseline, args.baseline_kind)
    if args.probe_boot:
        return probe_boot()

    counts = Counts().scaled(QUICK_DIVISOR) if args.quick else Counts()
    memory_options = (
        (["--quick"] if args.quick else [])
        + (["--big"] if args.big else [])
        + (["--baseline-ref", args.baseline_ref] if args.baseline_ref else [])
    )
    counts = replace(counts, memory_options=tuple(memory_options))
    started = time.perf_counter()
    header: dict[str, object] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": REPEATS,
    }
    if not args.json:
        print_header(header)
    report = Report()
    for name, section in SECTIONS:
        if args.only and name not in args.only:
            continue
        done = len(report.results)
        section(report, counts)
        if not args.json:
            print_section(report.results[done:])
    elapsed = time.perf_counter() - started
    if args.json:
        payload = {
            **header,
            "elapsed_s": elapsed,
            "counts": asdict(counts),
            "results": [
                {**asdict(result), "meets_target": result.meets_target} for result in report.results
            ],
            "notes": report.notes,
            "failures": report.failures,
            "command": "make bench",
        }
        print(json.dumps(payload, indent=2))
    else:
        print()
        for note in report.notes:
            print(note)
        for failure in report.failures:
            print(f"MISMATCH: {failure}")
        print(f"elapsed {elapsed:.1f} s; produced by: make bench")
    if report.failures:
        print(f"bench: {len(report.failures)} MISMATCH(ES), exiting with status 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
