"""foliod-load mrc: miss-ratio curves, a trace replayed through the Replay RPC at every point of
a grid (reclaim policy x cache size x readahead x largest folio order), each point on a fresh
foliod machine, the points spread over several servers.

The reclaim policy and the cache capacity are a server's start flags (``--reclaim-policy``,
``--cache-capacity``; no RPC changes them), readahead and the folio order are per file
(CreateFile's ``ra_pages`` and ``max_order``). So without ``--server`` every point gets a foliod
process of its own (127.0.0.1, an ephemeral port, its state in a temporary directory), as many
at once as there are cores; ``--server POLICY:PAGES@ADDR`` names a server started with those
flags, and the points of that policy and size run there one after another, each on files of
its own that it deletes at the end (a fresh page cache, on the server's one machine).
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from foliod.api import DEVICE_PROFILES, PAGE_SHIFT, PAGE_SIZE, RECLAIM_POLICIES, parse_size
from foliodclient._client import DEFAULT_TIMEOUT_SECONDS, FoliodClient
from foliodclient._exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from foliodclient.errors import CallError, NotFound
from foliodclient.load.reference import (
    LIBCACHESIM,
    REFERENCES,
    libcachesim_available,
    libcachesim_misses,
)
from foliodclient.load.replay import CALL_ACCESSES, calls
from foliodclient.load.runner import memmap_bytes
from foliodclient.load.traces import (
    EXIT_BAD_TRACE,
    FORMAT_ALIASES,
    FORMATS,
    OBJECT_SIZES,
    TraceError,
    load_trace,
)
from foliodclient.load.workloads import Params, Replay, ReplayColumns

# Readahead window of a file with readahead on: foliod's default (ra_pages unset).
READAHEAD = {"on": None, "off": 0}
MAX_FOLIO_ORDER = 9
# A (file, page) as one libCacheSim object id: file << PAGE_KEY_BITS | page.
PAGE_KEY_BITS = 40
SERVER_START_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Point:
    """One point of the grid: policy, cache capacity in pages, readahead, largest folio order."""

    policy: str
    nr_pages: int
    readahead: str
    max_order: int


@dataclass(slots=True)
class PointResult:
    """What the trace did at one point; reference_misses is the textbook twin's count (None
    when the policy has none, or the point is not one where foliod promises to equal it), and
    libcachesim_misses libCacheSim's twin's at the same points (None too without libcachesim)."""

    policy: str
    nr_pages: int
    readahead: str
    max_order: int
    server: str
    accesses: int = 0
    pages_hit: int = 0
    pages_missed: int = 0
    pages_readahead: int = 0
    evictions: int = 0
    refaults: int = 0
    device_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    memmap_bytes: dict[str, int] = field(default_factory=dict)
    reference_misses: int | None = None
    libcachesim_misses: int | None = None
    error: str = ""

    @property
    def miss_ratio(self) -> float:
        return self.pages_missed / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["miss_ratio"] = self.miss_ratio
        return data


class UsageError(ValueError):
    """The command line names something that cannot run (exit 2)."""


# -- the command line ------------------------------------------------------------------------


def parse_policies(text: str) -> list[str]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RECLAIM_POLICIES]
    if unknown or not names:
        raise UsageError(
            f"--policies: not a reclaim policy: {', '.join(unknown) or repr(text)} "
            f"(choose from {', '.join(sorted(RECLAIM_POLICIES))})"
        )
    return list(dict.fromkeys(names))


def parse_nr_pages(text: str) -> int:
    """A cache size: a count of pages (digits alone) or a size with a unit (4MiB)."""
    text = text.strip()
    try:
        if text.isdigit():
            nr_pages = int(text)
        else:
            nr_bytes = parse_size(text)
            if nr_bytes % PAGE_SIZE:
                raise ValueError(f"not a whole number of 4 KiB pages: {text!r}")
            nr_pages = nr_bytes // PAGE_SIZE
    except ValueError as exc:
        raise UsageError(f"--sizes: {exc}") from exc
    if nr_pages <= 0:
        raise UsageError(f"--sizes: a cache holds at least one page: {text!r}")
    return nr_pages


def parse_sizes(text: str) -> list[int]:
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"--sizes: no sizes in {text!r} (pages, or sizes such as 4MiB)")
    return sorted({parse_nr_pages(item) for item in items})


def parse_readahead(text: str) -> list[str]:
    values = [value.strip().lower() for value in text.split(",") if value.strip()]
    if not values or any(value not in READAHEAD for value in values):
        raise UsageError(f"--readahead: on, off or on,off, not {text!r}")
    return list(dict.fromkeys(values))


def parse_orders(text: str) -> list[int]:
    try:
        orders = [int(value) for value in text.split(",") if value.strip()]
    except ValueError as exc:
        raise UsageError(f"--max-order: not a list of orders: {text!r}") from exc
    if not orders or any(not 0 <= order <= MAX_FOLIO_ORDER for order in orders):
        raise UsageError(f"--max-order: orders 0..{MAX_FOLIO_ORDER}, not {text!r}")
    return sorted(set(orders))


def parse_server(text: str) -> tuple[str, int, str]:
    """POLICY:PAGES@ADDR: a server started with --reclaim-policy POLICY and a cache capacity
    of PAGES pages."""
    spec, at, address = text.partition("@")
    policy, colon, size = spec.partition(":")
    if not (at and colon and address):
        raise UsageError(
            f"--server: POLICY:PAGES@ADDR (a server started with --reclaim-policy POLICY "
            f"--cache-capacity PAGES x 4 KiB), not {text!r}"
        )
    return parse_policies(policy)[0], parse_nr_pages(size), address


def grid(
    policies: Sequence[str], sizes: Sequence[int], readahead: Sequence[str], orders: Sequence[int]
) -> list[Point]:
    return [
        Point(policy, nr_pages, ra, order)
        for policy in policies
        for ra in readahead
        for order in orders
        for nr_pages in sizes
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="foliod-load mrc",
        description="Miss-ratio curves: replays --trace through the Replay RPC at every point "
        "of policies x sizes x readahead x max order, each on a fresh foliod machine, and "
        "reports the miss ratio, device time and memory map per point, with the textbook "
        "twin's misses for lru, fifo and clock.",
    )
    p.add_argument("--trace", type=Path, required=True, help="trace file (as foliod-load replay)")
    p.add_argument(
        "--trace-format", choices=[*FORMATS, *FORMAT_ALIASES], help="default: from the suffix"
    )
    p.add_argument("--trace-limit", type=int, help="requests to read at most")
    p.add_argument(
        "--trace-object-size",
        choices=OBJECT_SIZES,
        default="page",
        help="oracleGeneral objects: one page each, as libCacheSim's --ignore-obj-size "
        "(default), or their obj_size in whole pages",
    )
    p.add_argument("--policies", default="lru", help="comma-separated reclaim policies")
    p.add_argument("--sizes", required=True, help="cache sizes: pages (1024) or sizes (4MiB)")
    p.add_argument("--readahead", default="off", help="on, off or on,off (default off)")
    p.add_argument("--max-order", default="0", help="largest folio orders, e.g. 0,2 (default 0)")
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="POLICY:PAGES@ADDR",
        help="a server started with that policy and capacity (repeatable); none: start local "
        "foliod processes, one per core",
    )
    p.add_argument("--jobs", "-j", type=int, help="local servers at once (default: cores)")
    p.add_argument("--file-size", default="1GiB", help="bytes a trace file covers")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds")
    p.add_argument("--device", choices=sorted(DEVICE_PROFILES), default="nvme")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--html", type=Path, metavar="FILE", help="write an HTML page of the curves")
    return p


# -- servers ---------------------------------------------------------------------------------


@contextmanager
def local_server(state_dir: Path, point: Point) -> Iterator[str]:
    """A foliod process for one point, on 127.0.0.1 and an ephemeral port; stopped after."""
    ram_bytes = max(256 << 20, 2 * point.nr_pages * PAGE_SIZE + (64 << 20))
    command = [
        sys.executable,
        "-m",
        "foliod.main",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--state-dir",
        str(state_dir),
        "--ram",
        str(ram_bytes),
        "--reclaim-policy",
        point.policy,
        "--cache-capacity",
        str(point.nr_pages * PAGE_SIZE),
    ]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    address: list[str] = []
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            with suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "started":
                    address.append(str(record["grpc_address"]))
                    started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not started.wait(SERVER_START_SECONDS) or not address:
            raise RuntimeError(f"foliod did not start: {''.join(lines[-5:]).strip()}")
        yield address[0]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


# -- one point -------------------------------------------------------------------------------


class _PointReplay(Replay):
    """The replay workload with its files made for one point (readahead, folio order)."""

    def lay_out(self) -> ReplayColumns:
        """Finds the files the trace touches and lays the trace over them, once a grid."""
        trace, size = self.cursor.trace, self.params.file_size_bytes
        for address, length in zip(trace.addresses, trace.sizes, strict=True):
            self.files.update(range(address // size, (address + length - 1) // size + 1))
        return self.columns(DEVICE_PROFILES["nvme"])

    def create(self, client: FoliodClient, point: Point) -> None:
        size = self.params.file_size_bytes
        for index in sorted(self.files):
            name = self.file_name(index)
            with suppress(NotFound):
                client.delete_file(name)
            client.create_file(name, max_order=point.max_order, ra_pages=READAHEAD[point.readahead])
            client.truncate_file(name, size)


def page_keys(columns: ReplayColumns) -> Iterator[tuple[int, int]]:
    """Every page the trace touches, in order, as (file, page index)."""
    for offset, length, file in zip(columns.offsets, columns.lengths, columns.files, strict=True):
        for page in range(offset >> PAGE_SHIFT, ((offset + length - 1) >> PAGE_SHIFT) + 1):
            yield file, page


def run_point(
    target: str, point: Point, workload: _PointReplay, columns: ReplayColumns, timeout: float
) -> PointResult:
    """Replays the whole trace at one point on `target`, in order, in calls of at most
    CALL_ACCESSES page accesses; a failed call ends the point with its error."""
    result = PointResult(point.policy, point.nr_pages, point.readahead, point.max_order, target)
    with FoliodClient(target, timeout=timeout) as client:
        workload.create(client, point)
        try:
            started = time.perf_counter()
            for start, end in calls(columns, CALL_ACCESSES):
                totals = client.replay(
                    columns.names,
                    columns.offsets[start:end],
                    columns.lengths[start:end],
                    columns.writes[start:end],
                    columns.files[start:end],
                ).totals
                result.accesses += totals.accesses
                result.pages_hit += totals.stats.pages_hit
                result.pages_missed += totals.stats.pages_missed
                result.pages_readahead += totals.stats.pages_readahead
                result.device_seconds += totals.stats.device_seconds
                result.evictions += totals.evictions
                result.refaults += totals.refaults
                result.memmap_bytes = memmap_bytes(totals.memmap)
            result.elapsed_seconds = time.perf_counter() - started
        finally:
            for index in sorted(workload.files):
                with suppress(CallError):
                    client.delete_file(workload.file_name(index), timeout=timeout + 60)
    return result


# -- the grid --------------------------------------------------------------------------------


@dataclass(slots=True)
class Grid:
    """What every point shares: the trace and how its files are laid out."""

    workload: _PointReplay
    columns: ReplayColumns
    timeout: float
    references: dict[tuple[str, int], int] = field(default_factory=dict)
    libcachesim: dict[tuple[str, int], int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, params: Params, timeout: float) -> Grid:
        workload = _PointReplay(params)
        libcachesim: dict[tuple[str, int], int] | None = {} if libcachesim_available() else None
        return cls(workload, workload.lay_out(), timeout, libcachesim=libcachesim)

    def run(self, target: str, point: Point) -> PointResult:
        """One point on `target`, with the textbook twin's misses where they apply."""
        result = run_point(target, point, self.workload, self.columns, self.timeout)
        result.reference_misses = self.reference(point)
        result.libcachesim_misses = self.libcachesim_reference(point)
        return result

    def reference(self, point: Point) -> int | None:
        """The textbook twin's misses where foliod promises to equal them: a twin exists,
        readahead off, base pages and a trace of reads."""
        twin, columns = REFERENCES.get(point.policy), self.columns
        if twin is None or point.readahead != "off" or point.max_order or any(columns.writes):
            return None
        key = (point.policy, point.nr_pages)
        with self.lock:
            if key not in self.references:
                self.references[key] = twin(page_keys(columns), point.nr_pages)
            return self.references[key]

    def libcachesim_reference(self, point: Point) -> int | None:
        """libCacheSim's twin's misses at the points of reference(), each page one object of
        size 1 (--ignore-obj-size); None without the libcachesim package."""
        if self.libcachesim is None or point.policy not in LIBCACHESIM:
            return None
        if self.reference(point) is None:
            return None
        key = (point.policy, point.nr_pages)
        with self.lock:
            if key not in self.libcachesim:
                keys = ((file << PAGE_KEY_BITS) | page for file, page in page_keys(self.columns))
                self.libcachesim[key] = libcachesim_misses(point.policy, keys, point.nr_pages)
            return self.libcachesim[key]


def _failed(point: Point, server: str, exc: Exception) -> PointResult:
    result = PointResult(point.policy, point.nr_pages, point.readahead, point.max_order, server)
    result.error = str(exc)
    return result


def run_local(grid: Grid, points: Sequence[Point], jobs: int) -> list[PointResult]:
    """Each point on a foliod process of its own, `jobs` at once; results in grid order."""
    with tempfile.TemporaryDirectory(prefix="foliod-mrc-") as tmp:

        def one(number: int, point: Point) -> PointResult:
            try:
                with local_server(Path(tmp) / f"p{number}", point) as target:
                    result = grid.run(target, point)
            except (CallError, RuntimeError) as exc:
                return _failed(point, "local", exc)
            result.server = "local"
            return result

        with futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(one, range(len(points)), points))


def run_remote(
    grid: Grid, points: Sequence[Point], servers: Sequence[tuple[str, int, str]]
) -> list[PointResult]:
    """Each point on a server started with its policy and capacity (round robin among those),
    the servers at once, each running its points one after another."""
    queues: dict[str, list[int]] = {address: [] for _, _, address in servers}
    turn: dict[tuple[str, int], int] = {}
    for number, point in enumerate(points):
        key = (point.policy, point.nr_pages)
        matching = [address for policy, size, address in servers if (policy, size) == key]
        queues[matching[turn.get(key, 0) % len(matching)]].append(number)
        turn[key] = turn.get(key, 0) + 1
    results: list[PointResult | None] = [None] * len(points)

    def drain(address: str) -> None:
        for number in queues[address]:
            try:
                results[number] = grid.run(address, points[number])
            except CallError as exc:
                results[number] = _failed(points[number], address, exc)

    with futures.ThreadPoolExecutor(max_workers=len(queues)) as pool:
        list(pool.map(drain, list(queues)))
    return [result for result in results if result is not None]


# -- output ----------------------------------------------------------------------------------


def text(results: Sequence[PointResult], accesses: int) -> str:
    models = sorted({model for r in results for model in r.memmap_bytes})
    libcachesim = any(r.libcachesim_misses is not None for r in results)
    header = ["policy", "pages", "ra", "order", "miss ratio", "misses", "reference"]
    header += ["libCacheSim"] if libcachesim else []
    header += ["device s", *(f"{model} MiB" for model in models)]
    rows = []
    for r in results:
        row = [r.policy, f"{r.nr_pages:,}", r.readahead, str(r.max_order)]
        if r.error:
            row += [f"FAILED: {r.error}"]
        else:
            row += [f"{r.miss_ratio:.4f}", f"{r.pages_missed:,}"]
            row += [_compared(r.reference_misses, r.pages_missed)]
            row += [_compared(r.libcachesim_misses, r.pages_missed)] if libcachesim else []
            row += [f"{r.device_seconds:.3f}"]
            row += [f"{r.memmap_bytes.get(m, 0) / 2**20:.2f}" for m in models]
        rows.append(row)
    widths = [
        max([len(h), *(len(row[i]) for row in rows if i < len(row))]) for i, h in enumerate(header)
    ]
    lines = [f"foliod-load mrc: {len(results)} points, {accesses:,} page accesses each"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines) + "\n"


def _compared(misses: int | None, foliod_misses: int) -> str:
    """A twin's misses, marked where foliod's differ; - where there is no twin."""
    if misses is None:
        return "-"
    return f"{misses:,}" + (" (differs)" if misses != foliod_misses else "")


def write_html(data: dict[str, Any], path: Path) -> None:
    """One page: a miss-ratio curve and a device-time curve per (readahead, order), a line per
    policy (the references dotted), and the table, as inline SVG drawn by matplotlib."""
    import matplotlib  # noqa: PLC0415 -- optional: only --html needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    points = [p for p in data["points"] if not p["error"]]
    figures: list[str] = []
    panels = sorted({(p["readahead"], p["max_order"]) for p in points})
    with matplotlib.rc_context({"svg.hashsalt": "foliod-load", "svg.fonttype": "path"}):
        for readahead, order in panels:
            figure, (ratio, device) = plt.subplots(1, 2, figsize=(10, 3.6))
            for policy in sorted({p["policy"] for p in points}):
                line = sorted(
                    (p["nr_pages"], p)
                    for p in points
                    if (p["policy"], p["readahead"], p["max_order"]) == (policy, readahead, order)
                )
                if not line:
                    continue
                sizes = [size for size, _ in line]
                ratio.plot(sizes, [p["miss_ratio"] for _, p in line], marker="o", label=policy)
                device.plot(sizes, [p["device_seconds"] for _, p in line], marker="o", label=policy)
                if all(p["reference_misses"] is not None for _, p in line):
                    ratio.plot(
                        sizes,
                        [p["reference_misses"] / max(p["accesses"], 1) for _, p in line],
                        linestyle=":",
                        marker="x",
                        label=f"{policy} (textbook)",
                    )
            for axes, title in ((ratio, "miss ratio"), (device, "device seconds")):
                axes.set_xscale("log", base=2)
                axes.set_xlabel("cache size (pages)")
                axes.set_title(f"{title}, readahead {readahead}, max order {order}")
                axes.grid(True, alpha=0.3)
                axes.legend(loc="best", fontsize="small")
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
            plt.close(figure)
            svg = buffer.getvalue()
            figures.append(f"<figure>{svg[svg.index('<svg') :]}</figure>")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>foliod-load mrc</title><style>body{font-family:sans-serif;max-width:70em;"
        "margin:2em auto}pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style></head>"
        f"<body><h1>foliod-load mrc: {html.escape(data['trace'])}</h1>{''.join(figures)}"
        f"<pre>{html.escape(data['table'])}</pre></body></html>\n"
    )
    path.write_text(page, encoding="utf-8")


# -- main ------------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    print(f"foliod-load mrc: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        policies = parse_policies(args.policies)
        sizes = parse_sizes(args.sizes)
        points = grid(
            policies, sizes, parse_readahead(args.readahead), parse_orders(args.max_order)
        )
        servers = [parse_server(spec) for spec in args.server]
        try:
            file_size = parse_size(args.file_size)
        except ValueError as exc:
            raise UsageError(f"--file-size: {exc}") from exc
        have = {(policy, size) for policy, size, _ in servers}
        missing = sorted({(p.policy, p.nr_pages) for p in points} - have)
        if servers and missing:
            raise UsageError(
                "no --server for "
                + ", ".join(f"{policy}:{size}" for policy, size in missing)
                + " (each server runs one policy and one capacity, its start flags)"
            )
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if args.html is not None and importlib.util.find_spec("matplotlib") is None:
        return _fail("--html needs matplotlib: pip install 'foliod-client[load]'", EXIT_FAILURE)
    try:
        trace = load_trace(
            args.trace,
            args.trace_format,
            limit=args.trace_limit,
            object_size=args.trace_object_size,
        )
    except TraceError as exc:
        return _fail(str(exc), EXIT_BAD_TRACE)
    if not len(trace):
        return _fail(f"{args.trace}: no requests in the trace", EXIT_BAD_TRACE)
    params = Params(file_size_bytes=file_size, prefix="mrc", trace=trace)
    shared = Grid.of(params, args.timeout)
    jobs = args.jobs or os.cpu_count() or 1
    results = run_remote(shared, points, servers) if servers else run_local(shared, points, jobs)
    accesses = max((r.accesses for r in results), default=0)
    table = text(results, accesses)
    data = {
        "trace": str(args.trace),
        "trace_requests": len(trace),
        "accesses": accesses,
        "servers": [address for _, _, address in servers] or ["local"],
        "points": [r.as_dict() for r in results],
        "table": table,
    }
    if args.html is not None:
        write_html(data, args.html)
        print(f"foliod-load mrc: curves written to {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(data))
    else:
        sys.stdout.write(table)
    failed = [r for r in results if r.error]
    for r in failed:
        print(
            f"foliod-load mrc: {r.policy} {r.nr_pages} pages ra {r.readahead} order "
            f"{r.max_order} on {r.server} failed: {r.error}",
            file=sys.stderr,
        )
    return EXIT_FAILURE if failed else EXIT_OK
