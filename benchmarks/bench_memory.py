"""What foliod itself spends per simulated page, measured from outside: server RSS over gRPC.

Run by ``make bench`` (section 9, ``--only memory``) or alone:
``.venv/bin/python benchmarks/bench_memory.py [--json] [--quick] [--big] [--baseline-ref REF]``.
Progress goes to stderr, the figures to stdout (one JSON object with ``--json``).

Each figure starts a fresh server (``python -m foliod.main``, the ``foliod`` entry point, with
PYTHONPATH set to the server code measured, on 127.0.0.1 and an ephemeral port, its state in a
temporary directory) and reads the server's VmRSS from /proc/<pid>/status, after a short pause
once the calls returned, before and after; growth / pages is the cost per page.

1. Allocate: 4 GiB of order-0 file folios (1,048,576 folios) in one call, then order 2 and
   order 9, and 4 GiB of order-0 anon folios, each on a 16 GiB machine. A call refused with
   INVALID_ARGUMENT for the per-call folio limit is split into calls within the limit (a note
   says so). For order 0 the call's wall time (one RPC included) gives folios per second, as
   does the ReleaseOwner that frees them.
2. Page cache: a 4 GiB sparse file (TruncateFile; a 1-byte write at its end on a server
   without it) read start to end in 2 MiB ReadFile calls (the most one call reads), with base
   pages and no readahead, readahead 32 pages with folios up to order 2, and readahead 512
   pages with folios up to order 9; growth / pages cached (StatFile), and the time it took.
3. A 64 GiB guest backed by base pages on an 80 GiB host, filled with order-0 file folios
   (Allocate calls on the guest machine, each backing its frames on the host): seconds.
4. ``--big`` (or FOLIOD_BENCH_BIG=1): a 256 GiB host (64 GiB with ``--quick``): every page
   above the min watermark allocated as order-0 file folios, RSS, GetMemmap and a Prometheus
   scrape of the metrics endpoint timed (median of several), ReleaseOwner; then the RAM read
   into the page cache as one file in base pages, RSS again. A part whose RSS, projected from
   the 4 GiB figures of 1. and 2., would take over half of this machine's available memory is
   not run: the projection is reported instead.

``--baseline-ref REF`` runs all of it a second time against the server code of a git commit
(a ``git worktree`` of REF in a temporary directory, removed afterwards, its server run with
PYTHONPATH=<worktree>/server by the same Python) and prints each baseline figure and the
ratio current / baseline under the current one.

Every loop is bounded in calls and by a time budget per figure (shorter with ``--quick``);
one that runs out is reported as "did not finish in N s", a figure that misses its target
(the budget), and the run goes on. Filling also stops when this machine's available memory
runs low. ``--quick`` keeps the 4 GiB (1M page) figures, which the targets are about, and
shortens the budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

import grpc

from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
GIB = 1 << 30
SERVER_RAM = "16GiB"
FILE_BYTES = 4 * GIB
ONE_CALL_FOLIOS = FILE_BYTES // PAGE  # 1,048,576 order-0 folios
READ_BYTES = 2 << 20  # the most one ReadFile reads
WARMUP_READS = 4  # before the page cache baseline (see page_cache_figures)
# Allocate's documented limit (AllocateRequest.count: 1..1048576); fills start with it.
DOCUMENTED_FOLIO_LIMIT = 1 << 20
MAX_CALLS = 100_000  # any loop of RPCs, whatever its budget
CALL_TIMEOUT_S = 600.0  # one Allocate / ReleaseOwner at most (further capped by the budget)
READ_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
GIT_TIMEOUT_S = 300.0
RSS_SETTLE_S = 0.5
QUERY_REPEATS = 20  # GetMemmap calls timed (at most; within the query budget)
SCRAPE_REPEATS = 5
# Filling stops when this machine's MemAvailable falls under this; a part whose projected RSS
# is over MEMORY_SHARE of MemAvailable is not run.
MEMORY_FLOOR_BYTES = 2 * GIB
MEMORY_SHARE = 0.5
MAX_MESSAGE_BYTES = 8 << 20

# Targets: bytes of server RSS per 4 KiB page by folio order (the compact memory map), call
# rates, the big host's RSS, GetMemmap and scrape times.
PER_PAGE_TARGETS = {0: 48.0, 2: 12.0, 9: 2.0}
RATE_TARGET = 2_000_000.0
BIG_RSS_TARGET_GIB = 8.0
BIG_QUERY_TARGET_S = 0.05
GUEST_TARGET_S = 10.0


@dataclass(frozen=True)
class Budgets:
    """Seconds each part may take before it is given up (reported as not finished)."""

    allocate_s: float
    release_s: float
    fill_s: float
    guest_s: float
    big_allocate_s: float
    big_fill_s: float
    query_s: float


NORMAL = Budgets(300, 300, 600, 300, 1800, 1800, 60)
QUICK = Budgets(120, 120, 300, 120, 600, 600, 30)

STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[memory {time.monotonic() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Figure:
    """One printed row: `key` pairs a figure with the same one measured on the baseline."""

    key: str
    name: str
    unit: str
    value: float
    target: float | None = None
    higher_is_better: bool = True


@dataclass(frozen=True)
class Code:
    """Server code to measure: its ``server`` directory (PYTHONPATH) and module to run."""

    label: str
    server_dir: Path
    module: str = "foliod.main"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def timeout(self, cap: float) -> float:
        """A call's deadline: at most `cap`, never past the budget."""
        return max(0.001, min(cap, self.left()))


class OutOfTime(Exception):
    """A part ran out of its budget; key and what name the figure it was for."""

    def __init__(self, key: str, what: str, budget: Budget) -> None:
        super().__init__(f"{what}: did not finish in {budget.seconds:.0f} s")
        self.key = key
        self.what = what
        self.budget = budget


def status(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


def deadline_passed(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def meminfo_bytes(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_low() -> bool:
    """This machine's available memory is under MEMORY_FLOOR_BYTES: stop filling."""
    return meminfo_bytes("MemAvailable") < MEMORY_FLOOR_BYTES


def scrape(url: str, timeout: float) -> bytes:
    """One Prometheus scrape: the whole body of GET url."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def server_env(code: Code) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code.server_dir), "PYTHONUNBUFFERED": "1"}


class Server:
    """A foliod server process of `code`, with a stub to it; close() stops it."""

    def __init__(self, code: Code, ram: str, *, metrics: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="foliod-bench-memory-"))
        self.log_path = self.tmp / "server.log"
        port = free_port()
        self.metrics_port = free_port() if metrics else 0
        argv = [
            sys.executable,
            "-m",
            code.module,
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}" if metrics else "",
            "--ram",
            ram,
            "--log-level",
            "warning",
            "--state-dir",
            str(self.tmp / "state"),
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.tmp,
                env=server_env(code),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = foliod_pb2_grpc.FoliodStub(self.channel)
        # Once a call was abandoned at its deadline the server may still be running it: close()
        # kills it rather than waiting for a graceful stop.
        self.abandoned = False

    def wait_ready(self) -> None:
        budget = Budget(READY_TIMEOUT_S)
        while budget.left() > 0:
            if self.proc.poll() is not None:
                break
            try:
                grpc.channel_ready_future(self.channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
        raise RuntimeError(
            f"the server did not start (exit code {self.proc.poll()}); its output ends with:\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        """The server's resident memory once it settled after the last call."""
        time.sleep(RSS_SETTLE_S)
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("the server's /proc status has no VmRSS")

    def close(self) -> None:
        try:
            self.channel.close()
            if self.proc.poll() is None:
                if self.abandoned:
                    self.proc.kill()
                else:
                    self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def running(code: Code, ram: str, *, metrics: bool = False) -> Iterator[Server]:
    server = Server(code, ram, metrics=metrics)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def limit_refusal(error: grpc.RpcError, n: int) -> int | None:
    """When `error` refused an Allocate of n folios for the per-call folio limit
    (INVALID_ARGUMENT "at most 1048576 folios per call, not ..."), the count to try instead:
    the limit it names, else half of n; None for any other error."""
    details = error.details() or ""
    if error.code() != grpc.StatusCode.INVALID_ARGUMENT or "per call" not in details or n < 2:
        return None
    found = re.search(r"at most (\d+)", details)
    limit = int(found.group(1)) if found else n // 2
    return limit if 0 < limit < n else None


@dataclass
class Run:
    """The figures of one server code; errors are kept, not raised, and the run goes on."""

    code: Code
    budgets: Budgets
    quick: bool
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Bytes per page measured here, by figure key, for the big host's projections.
    per_page: dict[str, float] = field(default_factory=dict)

    def add(
        self,
        key: str,
        name: str,
        unit: str,
        value: float,
        *,
        target: float | None = None,
        higher_is_better: bool = True,
    ) -> None:
        self.figures.append(Figure(key, name, unit, value, target, higher_is_better))
        shown = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        progress(f"{self.code.label}: {name.strip()}: {shown} {unit}")

    def note(self, text: str) -> None:
        self.notes.append(f"{self.code.label}: {text}")
        progress(f"{self.code.label}: note: {text}")

    def unfinished(self, key: str, what: str, budget: Budget) -> None:
        # At least the budget by construction, so the verdict is always "below".
        value = max(budget.elapsed(), budget.seconds + 0.001)
        self.add(
            f"{key} unfinished",
            f"{what}: did not finish in {budget.seconds:.0f} s",
            "s",
            value,
            target=budget.seconds,
            higher_is_better=False,
        )

    def part(self, what: str, measure: Callable[[], None]) -> None:
        """Runs one measurement; a budget that ran out or an error is recorded, not raised."""
        progress(f"{self.code.label}: {what} ...")
        try:
            measure()
        except OutOfTime as out:
            self.unfinished(out.key, out.what, out.budget)
        except grpc.RpcError as error:
            self.errors.append(f"{self.code.label}: {what}: {status(error)}")
            progress(f"{self.code.label}: {what}: ERROR {status(error)}")
        except (RuntimeError, OSError, urllib.error.URLError) as error:
            self.errors.append(f"{self.code.label}: {what}: {error}")
            progress(f"{self.code.label}: {what}: ERROR {error}")

    def server(self, ram: str, *, metrics: bool = False) -> AbstractContextManager[Server]:
        return running(self.code, ram, metrics=metrics)

    # -- helpers -------------------------------------------------------------------------------

    def allocate(
        self,
        srv: Server,
        request: pb.AllocateRequest,
        count: int,
        *,
        limit: int,
        budget: Budget,
        key: str,
        what: str,
    ) -> tuple[int, int, bool]:
        """Allocates `count` folios as `request` says, in calls of at most `limit` folios,
        fewer when the server refuses a call for its per-call limit (noted); stops at the
        budget (OutOfTime when nothing was made) or when this machine's memory runs low.
        Returns (folios made, calls, finished)."""
        made = calls = 0
        while made < count and calls < MAX_CALLS:
            if budget.left() <= 0:
                if not made:
                    raise OutOfTime(key, what, budget)
                return made, calls, False
            if memory_low():
                self.note(f"{what}: stopped after {made:,} folios, this machine's memory ran low")
                return made, calls, False
            n = min(limit, count - made)
            request.count = n
            try:
                reply = srv.stub.Allocate(request, timeout=budget.timeout(CALL_TIMEOUT_S))
            except grpc.RpcError as error:
                refused_for = limit_refusal(error, n)
                if refused_for is not None:
                    limit = refused_for
                    self.note(
                        f"{what}: Allocate of {n:,} folios refused ({status(error)}); "
                        f"falling back to calls of at most {limit:,} folios"
                    )
                    continue
                if deadline_passed(error):
                    srv.abandoned = True
                    if not made:
                        raise OutOfTime(key, what, budget) from None
                    return made, calls, False
                raise
            made += reply.count
            calls += 1
            if reply.count != n:
                raise RuntimeError(f"Allocate of {n:,} folios made {reply.count:,}")
        return made, calls, made >= count

    def release(self, srv: Server, machine: str, owner: str, budget: Budget, key: str) -> int:
        """ReleaseOwner within the budget; returns the folios it freed."""
        what = f"ReleaseOwner({owner})"
        try:
            reply = srv.stub.ReleaseOwner(
                pb.ReleaseOwnerRequest(machine=machine, owner=owner),
                timeout=budget.timeout(CALL_TIMEOUT_S),
            )
        except grpc.RpcError as error:
            if deadline_passed(error):
                srv.abandoned = True
                raise OutOfTime(key, what, budget) from None
            raise
        return int(reply.folios)

    def make_sparse(self, srv: Server, name: str, size: int) -> None:
        """Makes the file `size` bytes long without writing them."""
        try:
            srv.stub.TruncateFile(
                pb.TruncateFileRequest(name=name, size_bytes=size), timeout=READ_TIMEOUT_S
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            self.note("no TruncateFile: the file made sparse by a 1-byte write at its end")
            srv.stub.WriteFile(
                pb.WriteFileRequest(name=name, offset=size - 1, data=b"\0"), timeout=READ_TIMEOUT_S
            )

    def create_file(self, srv: Server, name: str, max_order: int, ra_pages: int) -> None:
        stat = srv.stub.CreateFile(
            pb.CreateFileRequest(name=name, max_order=max_order, ra_pages=ra_pages),
            timeout=READ_TIMEOUT_S,
        )
        if (stat.max_order, stat.ra_pages) != (max_order, ra_pages):
            self.note(
                f"file {name}: asked for max_order {max_order}, ra_pages {ra_pages}; the server "
                f"says {stat.max_order}, {stat.ra_pages}"
            )

    def read_through(
        self, srv: Server, name: str, size: int, budget: Budget, start: int = 0
    ) -> bool:
        """Reads the file from `start` to its end in READ_BYTES calls; False when the budget
        ran out or this machine's memory ran low first."""
        for i, offset in enumerate(range(start, size, READ_BYTES)):
            if budget.left() <= 0:
                return False
            if i % 64 == 0 and memory_low():
                self.note(f"reading {name}: stopped at {offset:,} bytes, memory ran low here")
                return False
            try:
                srv.stub.ReadFile(
                    pb.ReadFileRequest(
                        name=name, offset=offset, length=min(READ_BYTES, size - offset)
                    ),
                    timeout=budget.timeout(READ_TIMEOUT_S),
                )
            except grpc.RpcError as error:
                if deadline_passed(error):
                    srv.abandoned = True
                    return False
                raise
        return True

    def timed_median(self, call: Callable[[], object], n: int, budget: Budget) -> float:
        """Median seconds of up to n calls within the budget (at least one)."""
        seconds: list[float] = []
        while len(seconds) < n and (not seconds or budget.left() > 0):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    # -- 1. Allocate ---------------------------------------------------------------------------

    def allocate_figures(self, kind_name: str, kind: pb.FolioKind.ValueType, order: int) -> None:
        key = f"allocate {kind_name} {order}"
        count = ONE_CALL_FOLIOS >> order
        what = f"Allocate 4 GiB {kind_name} order {order}"
        with self.server(SERVER_RAM) as srv:
            before = srv.rss_bytes()
            request = pb.AllocateRequest(owner="bench", kind=kind, order=order)
            budget = Budget(self.budgets.allocate_s)
            start = time.perf_counter()
            made, calls, finished = self.allocate(
                srv, request, count, limit=count, budget=budget, key=key, what=what
            )
            seconds = time.perf_counter() - start
            if not finished:
                raise OutOfTime(key, what, budget)
            after = srv.rss_bytes()
            per_page = (after - before) / (count << order)
            self.per_page[key] = per_page
            self.add(
                key,
                f"{what}: RSS per page",
                "B",
                per_page,
                target=PER_PAGE_TARGETS[order],
                higher_is_better=False,
            )
            if order != 0:
                return
            how = "in one call" if calls == 1 else f"in {calls} calls (per-call limit)"
            self.add(
                f"{key} rate",
                f"  {count:,} folios {how} (wall time, one RPC)",
                "folios/s",
                made / seconds,
                target=RATE_TARGET,
            )
            release_budget = Budget(self.budgets.release_s)
            start = time.perf_counter()
            self.release(srv, "", "bench", release_budget, f"{key} release")
            seconds = time.perf_counter() - start
            self.add(
                f"{key} release",
                "  ReleaseOwner of them (wall time, one RPC)",
                "folios/s",
                made / seconds,
                target=RATE_TARGET,
            )

    # -- 2. page cache -------------------------------------------------------------------------

    def page_cache_figures(self, max_order: int, ra_pages: int) -> None:
        key = f"page cache {max_order}"
        what = f"page cache, order <= {max_order}, readahead {ra_pages} pages, 4 GiB"
        with self.server(SERVER_RAM) as srv:
            self.create_file(srv, "f", max_order, ra_pages)
            self.make_sparse(srv, "f", FILE_BYTES)
            # A few reads first, so that the buffers every read uses are there before the
            # baseline and the first read's transient ones (about 6 MB) are gone.
            for i in range(WARMUP_READS):
                srv.stub.ReadFile(
                    pb.ReadFileRequest(name="f", offset=i * READ_BYTES, length=READ_BYTES),
                    timeout=READ_TIMEOUT_S,
                )
            first = srv.stub.StatFile(pb.StatFileRequest(name="f"), timeout=READ_TIMEOUT_S)
            before = srv.rss_bytes()
            budget = Budget(self.budgets.fill_s)
            start = time.perf_counter()
            finished = self.read_through(
                srv, "f", FILE_BYTES, budget, start=WARMUP_READS * READ_BYTES
            )
            seconds = time.perf_counter() - start
            after = srv.rss_bytes()
            stat = srv.stub.StatFile(pb.StatFileRequest(name="f"), timeout=READ_TIMEOUT_S)
        pages = stat.nr_cached - first.nr_cached
        if pages <= 0:
            raise RuntimeError(f"{what}: no page was cached")
        suffix = "" if finished else f" (partial: {stat.nr_cached:,} pages)"
        per_page = (after - before) / pages
        if finished:
            self.per_page[key] = per_page
        self.add(
            key,
            f"{what}: RSS per page{suffix}",
            "B",
            per_page,
            target=PER_PAGE_TARGETS[max_order],
            higher_is_better=False,
        )
        self.add(f"{key} time", "  filled by sequential 2 MiB ReadFile calls in", "s", seconds)
        self.add(f"{key} rate", "  read in at", "pages/s", pages / seconds)
        if not finished:
            self.unfinished(key, f"{what}: filling", budget)
        folios = ", ".join(f"{n:,} of order {o}" for o, n in sorted(stat.folios_by_order.items()))
        self.note(f"{what}: {stat.nr_cached:,} pages cached in folios: {folios}")

    # -- 3. guest ------------------------------------------------------------------------------

    def guest_figures(self) -> None:
        key = "guest"
        what = "64 GiB base-backed guest filled with order-0 folios"
        with self.server("80GiB") as srv:
            srv.stub.CreateGuest(
                pb.CreateGuestRequest(name="vm", ram_bytes=64 * GIB, backing=pb.GUEST_BACKING_BASE),
                timeout=CALL_TIMEOUT_S,
            )
            info = srv.stub.GetMachine(pb.GetMachineRequest(machine="vm"), timeout=READ_TIMEOUT_S)
            room = info.nr_free_pages - info.watermarks.nr_min
            request = pb.AllocateRequest(
                machine="vm", owner="app", kind=pb.FOLIO_KIND_FILE, order=0
            )
            budget = Budget(self.budgets.guest_s)
            start = time.perf_counter()
            made, _, finished = self.allocate(
                srv, request, room, limit=DOCUMENTED_FOLIO_LIMIT, budget=budget, key=key, what=what
            )
            seconds = time.perf_counter() - start
        if not finished:
            self.note(f"{what}: {made:,} of {room:,} folios made")
            raise OutOfTime(key, what, budget)
        self.add(key, what, "s", seconds, target=GUEST_TARGET_S, higher_is_better=False)

    # -- 4. the big host -----------------------------------------------------------------------

    def projected(self, key: str, what: str, idle: int, pages: int, measured: str) -> bool:
        """True when the RSS projected for `pages` pages at the cost measured by the figure
        `measured` fits this machine; else reports the projection as the figure."""
        per_page = self.per_page.get(measured)
        if per_page is None:
            return True
        estimate = idle + pages * per_page
        available = meminfo_bytes("MemAvailable")
        if estimate <= available * MEMORY_SHARE:
            return True
        self.add(
            key,
            f"{what}: RSS, projected (not run)",
            "GiB",
            estimate / GIB,
            target=BIG_RSS_TARGET_GIB,
            higher_is_better=False,
        )
        self.note(
            f"{what}: not run: at the {per_page:.1f} B a page measured by '{measured}' it "
            f"needs about {estimate / GIB:.1f} GiB of server RSS, over "
            f"{MEMORY_SHARE:.0%} of this machine's {available / GIB:.1f} GiB available"
        )
        return False

    def big_figures(self, ram_gib: int) -> None:
        host = f"{ram_gib} GiB host"
        with self.server(f"{ram_gib}GiB", metrics=True) as srv:
            machine = srv.stub.GetMachine(pb.GetMachineRequest(), timeout=READ_TIMEOUT_S)
            idle = srv.rss_bytes()
            room = machine.nr_free_pages - machine.watermarks.nr_min
            what = f"{host} full of order-0 folios"
            if self.projected("big allocate", what, idle, room, "allocate file 0"):
                self.big_allocate(srv, what, room)
            what = f"{host} of base-page cache"
            size = (machine.nr_pages - 2 * machine.watermarks.nr_high) * PAGE
            if self.projected("big page cache", what, idle, size // PAGE, "page cache 0"):
                self.big_page_cache(srv, what, size)

    def big_allocate(self, srv: Server, what: str, room: int) -> None:
        key = "big allocate"
        budget = Budget(self.budgets.big_allocate_s)
        request = pb.AllocateRequest(owner="fill", kind=pb.FOLIO_KIND_FILE, order=0)
        start = time.perf_counter()
        made, calls, finished = self.allocate(
            srv, request, room, limit=DOCUMENTED_FOLIO_LIMIT, budget=budget, key=key, what=what
        )
        seconds = time.perf_counter() - start
        rss = srv.rss_bytes()
        suffix = "" if finished else f" (partial: {made:,} of {room:,} folios)"
        self.add(
            key,
            f"{what}: RSS{suffix}",
            "GiB",
            rss / GIB,
            target=BIG_RSS_TARGET_GIB,
            higher_is_better=False,
        )
        self.add(f"{key} time", f"  allocated in {calls} calls in", "s", seconds)
        if not finished:
            self.unfinished(key, what, budget)
            if srv.abandoned:
                return
        query = Budget(self.budgets.query_s)
        try:
            memmap_s = self.timed_median(
                lambda: srv.stub.GetMemmap(
                    pb.GetMemmapRequest(), timeout=query.timeout(READ_TIMEOUT_S)
                ),
                QUERY_REPEATS,
                query,
            )
        except grpc.RpcError as error:
            if not deadline_passed(error):
                raise
            srv.abandoned = True
            raise OutOfTime(f"{key} memmap", "  GetMemmap", query) from None
        self.add(
            f"{key} memmap",
            "  GetMemmap",
            "s",
            memmap_s,
            target=BIG_QUERY_TARGET_S,
            higher_is_better=False,
        )
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        query = Budget(self.budgets.query_s)
        try:
            scrape_s = self.timed_median(
                lambda: scrape(url, query.timeout(READ_TIMEOUT_S)),
                SCRAPE_REPEATS,
                query,
            )
        except (TimeoutError, urllib.error.URLError) as error:
            if query.left() > 0:
                raise
            srv.abandoned = True
            raise OutOfTime(f"{key} scrape", "  one Prometheus scrape", query) from error
        self.add(
            f"{key} scrape",
            "  one Prometheus scrape (HTTP GET /metrics)",
            "s",
            scrape_s,
            target=BIG_QUERY_TARGET_S,
            higher_is_better=False,
        )
        release = Budget(self.budgets.release_s)
        start = time.perf_counter()
        self.release(srv, "", "fill", release, f"{key} release")
        self.add(f"{key} release", "  ReleaseOwner of them", "s", time.perf_counter() - start)

    def big_page_cache(self, srv: Server, what: str, size: int) -> None:
        key = "big page cache"
        if srv.abandoned:
            self.note(f"{what}: not run, the server is still busy with an abandoned call")
            return
        self.create_file(srv, "all", 0, 0)
        self.make_sparse(srv, "all", size)
        budget = Budget(self.budgets.big_fill_s)
        start = time.perf_counter()
        finished = self.read_through(srv, "all", size, budget)
        seconds = time.perf_counter() - start
        rss = srv.rss_bytes()
        cached = srv.stub.StatFile(pb.StatFileRequest(name="all"), timeout=READ_TIMEOUT_S)
        suffix = "" if finished else f" (partial: {cached.nr_cached:,} of {size // PAGE:,} pages)"
        self.add(
            key,
            f"{what}: RSS{suffix}",
            "GiB",
            rss / GIB,
            target=BIG_RSS_TARGET_GIB,
            higher_is_better=False,
        )
        self.add(f"{key} time", "  read in by 2 MiB ReadFile calls in", "s", seconds)
        if not finished:
            self.unfinished(key, what, budget)

    # -- all of it -----------------------------------------------------------------------------

    def measure(self, *, big: bool) -> None:
        for kind_name, kind, order in (
            ("file", pb.FOLIO_KIND_FILE, 0),
            ("file", pb.FOLIO_KIND_FILE, 2),
            ("file", pb.FOLIO_KIND_FILE, 9),
            ("anon", pb.FOLIO_KIND_ANON, 0),
        ):
            self.part(
                f"Allocate {kind_name} order {order}",
                partial(self.allocate_figures, kind_name, kind, order),
            )
        for max_order, ra_pages in ((0, 0), (2, 32), (9, 512)):
            self.part(
                f"page cache order <= {max_order}",
                partial(self.page_cache_figures, max_order, ra_pages),
            )
        self.part("guest", self.guest_figures)
        if big:
            ram_gib = 64 if self.quick else 256
            self.part(f"{ram_gib} GiB host", partial(self.big_figures, ram_gib))


# -- the baseline --------------------------------------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
    )
    return done.stdout.strip()


@contextmanager
def baseline_code(ref: str) -> Iterator[Code]:
    """The server code of commit `ref`, checked out as a git worktree in a temporary directory
    (removed afterwards)."""
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tmp = Path(tempfile.mkdtemp(prefix="foliod-bench-baseline-"))
    tree = tmp / "tree"
    try:
        git("worktree", "add", "--detach", "--quiet", str(tree), sha)
        try:
            server_dir = tree / "server"
            module = "foliod" if (server_dir / "foliod" / "__main__.py").exists() else "foliod.main"
            code = Code(f"baseline {ref} ({sha[:10]})", server_dir, module)
            # The venv's editable install must not win over PYTHONPATH.
            found = subprocess.run(
                [sys.executable, "-c", "import foliod.main; print(foliod.main.__file__)"],
                cwd=tmp,
                env=server_env(code),
                check=True,
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
            ).stdout.strip()
            if not Path(found).resolve().is_relative_to(server_dir.resolve()):
                raise RuntimeError(f"the baseline's foliod.main comes from {found}")
            yield code
        finally:
            try:
                git("worktree", "remove", "--force", str(tree))
            except subprocess.SubprocessError:
                shutil.rmtree(tree, ignore_errors=True)
                git("worktree", "prune")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged(current: list[Figure], baseline: list[Figure], label: str) -> list[Figure]:
    """Each current figure, then the baseline's under it and the ratio current / baseline; the
    baseline's figures the current run has not (e.g. one that did not finish) at the end."""
    by_key = {figure.key: figure for figure in baseline}
    rows: list[Figure] = []
    for figure in current:
        rows.append(figure)
        base = by_key.pop(figure.key, None)
        if base is None:
            continue
        indent = " " * (len(figure.name) - len(figure.name.lstrip()) + 2)
        rows.append(
            Figure(
                f"{base.key} baseline",
                f"{indent}{label}",
                base.unit,
                base.value,
                base.target,
                base.higher_is_better,
            )
        )
        if base.value > 0 and base.unit == figure.unit:
            rows.append(
                Figure(
                    f"{base.key} ratio",
                    f"{indent}ratio current / baseline",
                    "x",
                    figure.value / base.value,
                )
            )
    rows.extend(
        Figure(
            f"{base.key} baseline",
            f"{label}: {base.name.strip()}",
            base.unit,
            base.value,
            base.target,
            base.higher_is_better,
        )
        for base in baseline
        if base.key in by_key
    )
    return rows


@dataclass(frozen=True)
class Outcome:
    """What the run prints: the figures (rows), notes, and errors of the current server."""

    quick: bool
    big: bool
    baseline_ref: str | None
    figures: list[Figure]
    notes: list[str]
    failures: list[str]


def measure(*, quick: bool, big: bool, baseline_ref: str | None) -> Outcome:
    budgets = QUICK if quick else NORMAL
    current = Run(Code("current", REPO / "server"), budgets, quick)
    current.measure(big=big)
    figures = current.figures
    notes = current.notes
    failures = current.errors
    if baseline_ref:
        base: Run | None = None
        try:
            with baseline_code(baseline_ref) as code:
                base = Run(code, budgets, quick)
                base.measure(big=big)
        except (subprocess.SubprocessError, RuntimeError, OSError) as error:
            failures = [*failures, f"baseline {baseline_ref}: {error}"]
        if base is not None:
            figures = merged(current.figures, base.figures, base.code.label)
            # The baseline's errors (an older API, say) are notes: it is not what is tested.
            notes = [*notes, *base.notes, *(f"error: {error}" for error in base.errors)]
    return Outcome(quick, big, baseline_ref, figures, notes, failures)


def print_table(outcome: Outcome) -> None:
    for figure in outcome.figures:
        line = f"{figure.name:<64}{figure.value:>16,.3f} {figure.unit}"
        if figure.target is not None:
            if figure.higher_is_better:
                relation, meets = ">=", figure.value >= figure.target
            else:
                relation, meets = "<=", figure.value <= figure.target
            verdict = "meets" if meets else "below"
            line = f"{line:<92} target {relation} {figure.target:g}: {verdict}"
        print(line)
    for note in outcome.notes:
        print(f"note: {note}")
    for failure in outcome.failures:
        print(f"error: {failure}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="shorter budgets; a 64 GiB big host")
    parser.add_argument(
        "--big",
        action="store_true",
        default=os.environ.get("FOLIOD_BENCH_BIG", "") not in ("", "0"),
        help="also the real-size host (256 GiB; 64 GiB with --quick); env FOLIOD_BENCH_BIG=1",
    )
    parser.add_argument(
        "--baseline-ref",
        metavar="REF",
        help="also measure the server code of this git commit and print the ratios",
    )
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers, worktree

    signal.signal(signal.SIGTERM, stop)
    outcome = measure(quick=args.quick, big=args.big, baseline_ref=args.baseline_ref)
    if args.json:
        print(json.dumps(asdict(outcome)))
    else:
        print_table(outcome)
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
