"""foliod benchmarks: throughput of the simulated allocator, of the gRPC service and of reports.

Run with ``make bench`` (``.venv/bin/python tests/bench.py``). Flags: ``--json`` prints one JSON
object instead of the table; ``--quick`` uses about 5x smaller counts.

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
   by the same client code, so the ratio shows what foliod adds on top of grpcio itself.

3. The memory-map report on a 1 TiB machine: boot (machine construction) time, ``memmap()``
   reports per second, and the resident memory of a fresh process before and after boot.

Every measurement is repeated 3 times; the best (highest rate, lowest time) and the median are
reported. The figures are throughputs and ratios that depend on the machine and its load: they
are for comparing changes on one machine and are never used as assertions in tests.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

import grpc

from foliod.mm import MAX_PAGE_ORDER, FolioKind, Machine
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

REPEATS = 3
QUICK_DIVISOR = 5
SERVER_READY_TIMEOUT_S = 10.0
SERVER_STOP_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 30.0
CLIENT_THREADS = 8
BENCH_RAM = 4 << 30
BIG_RAM = 1 << 40
ANON_MAPPING_BYTES = 64 << 20
PAGE_SIZE = 4096
SERVICE = "foliod.v1.Foliod"


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

    def scaled(self, divisor: int) -> Counts:
        return Counts(
            **{
                name: max(1, value // divisor) if name != "anon_mappings" else value
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


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result


def summarize(
    section: str, name: str, unit: str, samples: Sequence[float], *, higher_is_better: bool = True
) -> Result:
    best = max(samples) if higher_is_better else min(samples)
    return Result(
        section, name, unit, best, statistics.median(samples), list(samples), higher_is_better
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


def sequential_calls(stub: foliod_pb2_grpc.FoliodStub, n: int) -> None:
    request = allocate_request()
    for _ in range(n):
        stub.Allocate(request, timeout=RPC_TIMEOUT_S)


def rpc_rate_sequential(stub: foliod_pb2_grpc.FoliodStub, n: int) -> tuple[int, float]:
    start = time.perf_counter()
    sequential_calls(stub, n)
    return n, time.perf_counter() - start


def rpc_rate_concurrent(
    stub: foliod_pb2_grpc.FoliodStub, pool: futures.ThreadPoolExecutor, n: int
) -> tuple[int, float]:
    """n calls split over CLIENT_THREADS threads, each with one call in flight."""
    shares = [n // CLIENT_THREADS + (i < n % CLIENT_THREADS) for i in range(CLIENT_THREADS)]
    barrier = threading.Barrier(CLIENT_THREADS + 1, timeout=RPC_TIMEOUT_S)

    def worker(share: int) -> None:
        barrier.wait()
        sequential_calls(stub, share)

    jobs = [pool.submit(worker, share) for share in shares]
    barrier.wait()
    start = time.perf_counter()
    for job in jobs:
        job.result()
    return n, time.perf_counter() - start


def measure_rpc(
    stub: foliod_pb2_grpc.FoliodStub, counts: Counts, reset: Callable[[], None]
) -> tuple[list[float], list[float]]:
    """Returns (sequential rates, concurrent rates); reset() runs untimed between repetitions."""
    sequential_calls(stub, counts.rpc_warmup)
    reset()
    with futures.ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="client") as pool:
        rpc_rate_concurrent(stub, pool, counts.rpc_warmup)
        reset()
        one: list[float] = []
        many: list[float] = []
        for _ in range(REPEATS):
            calls, seconds = rpc_rate_sequential(stub, counts.rpc_calls)
            one.append(calls / seconds)
            reset()
            calls, seconds = rpc_rate_concurrent(stub, pool, counts.rpc_calls)
            many.append(calls / seconds)
            reset()
    return one, many


def run_against(
    name: str, argv: list[str], port: int, log_path: Path, counts: Counts, *, foliod: bool
) -> tuple[list[float], list[float]]:
    server = ServerProcess(name, argv, port, log_path)
    try:
        with grpc.insecure_channel(server.target) as channel:
            server.wait_ready(channel)
            stub = foliod_pb2_grpc.FoliodStub(channel)

            def reset() -> None:
                if foliod:
                    stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="bench"), timeout=RPC_TIMEOUT_S)

            if foliod:
                # The real server must also free by handle: check Free works on what we made.
                handle = stub.Allocate(allocate_request(), timeout=RPC_TIMEOUT_S).first_handle
                stub.Free(pb.FreeRequest(handles=[handle]), timeout=RPC_TIMEOUT_S)
            return measure_rpc(stub, counts, reset)
    finally:
        server.stop()


def bench_grpc(report: Report, counts: Counts) -> None:
    section = "2. gRPC Allocate (client and server in separate processes)"
    with tempfile.TemporaryDirectory(prefix="foliod-bench-") as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        foliod_argv = [
            sys.executable,
            "-m",
            "foliod.main",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            "",
            "--ram",
            "4GiB",
            "--log-level",
            "info",  # the default: one access-log line per call, as deployed
            "--state-dir",
            str(tmp_path / "state"),
        ]
        real_one, real_many = run_against(
            "foliod", foliod_argv, port, tmp_path / "foliod.log", counts, foliod=True
        )
        port = free_port()
        baseline_argv = [sys.executable, os.path.abspath(__file__), "--serve-baseline", str(port)]
        empty_one, empty_many = run_against(
            "baseline", baseline_argv, port, tmp_path / "baseline.log", counts, foliod=False
        )
    n = counts.rpc_calls
    for label, real, empty in (
        ("1 in flight", real_one, empty_one),
        (f"{CLIENT_THREADS} in flight", real_many, empty_many),
    ):
        real_result = report.add(
            summarize(section, f"foliod Allocate, {label} ({n:,} calls)", "RPC/s", real)
        )
        empty_result = report.add(
            summarize(section, f"empty grpcio handler, {label}", "RPC/s", empty)
        )
        report.add(
            Result(
                section,
                f"ratio foliod / empty, {label}",
                "x",
                real_result.best / empty_result.best,
                real_result.median / empty_result.median,
                [r / e for r, e in zip(real, empty, strict=True)],
            )
        )


def serve_baseline(port: int) -> int:
    """An empty Allocate handler with foliod's method shape; serves until SIGTERM or SIGINT."""

    def allocate(request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        return pb.AllocateResponse()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Allocate": grpc.unary_unary_rpc_method_handler(
                allocate,
                request_deserializer=pb.AllocateRequest.FromString,
                response_serializer=pb.AllocateResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=CLIENT_THREADS))
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


# -- output --------------------------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}"
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "MiB":
        return f"{value:.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


NAME_WIDTH = 54


def print_header(header: dict[str, object]) -> None:
    print(
        f"foliod benchmark: python {header['python']} ({header['implementation']}), "
        f"cpu_count {header['cpu_count']}, {header['date']}, "
        f"{'quick' if header['quick'] else 'normal'} counts, best and median of {REPEATS}",
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
        print(f"  {result.name:<{NAME_WIDTH}}{best:>14}{median:>14}  {unit}", flush=True)


SECTIONS = (("allocator", bench_allocator), ("grpc", bench_grpc), ("memmap", bench_memmap))


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
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--probe-boot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline is not None:
        return serve_baseline(args.serve_baseline)
    if args.probe_boot:
        return probe_boot()

    counts = Counts().scaled(QUICK_DIVISOR) if args.quick else Counts()
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
            "results": [asdict(result) for result in report.results],
            "notes": report.notes,
            "command": "make bench",
        }
        print(json.dumps(payload, indent=2))
    else:
        print()
        for note in report.notes:
            print(note)
        print(f"elapsed {elapsed:.1f} s; produced by: make bench")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
