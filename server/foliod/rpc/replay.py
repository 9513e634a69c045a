"""Trace replay (foliod.v1.Foliod/Replay): checks a columnar trace whole, then runs it in order on
one machine, reads through PageCache.replay and writes through PageCache.write, and packs the
totals and the per-interval series. batch.py's counterpart for Submit; the servicer unpacks the
stream and calls parse() outside the machine's lock and run() under it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from foliod.api import MAX_REPLAY_ACCESSES, PAGE_SHIFT, PAGE_SIZE
from foliod.api.pb_enums import MEMMAP_MODEL
from foliod.mm import InvalidArgument, Machine, VmEvent
from foliod.mm.filemap import MAX_IO_BYTES, IoStats
from foliod.v1 import foliod_pb2 as pb

_WRITE = pb.REPLAY_OP_WRITE
_KNOWN_OPS = frozenset((pb.REPLAY_OP_UNSPECIFIED, pb.REPLAY_OP_READ, pb.REPLAY_OP_WRITE))
_ZEROS = bytes(MAX_IO_BYTES)

# Steps of a parsed trace: (kind, file, what, count).
#   STEP_READS: what is the page keys of a run of reads of one file, count the reads;
#   STEP_WRITE: what is the byte offset, count the length;
#   STEP_CUT: an interval of the series ends here.
STEP_READS, STEP_WRITE, STEP_CUT = 0, 1, 2
Step = tuple[int, int, "list[int] | int", int]


@dataclass(slots=True)
class Trace:
    """A checked trace: its steps in order and, per file, the highest page and byte it
    touches (checked against the files' sizes under the machine's lock)."""

    machine: str = ""
    names: list[str] = field(default_factory=list)
    interval_accesses: int = 0
    steps: list[Step] = field(default_factory=list)
    operations: int = 0
    accesses: int = 0
    last_page: list[int] = field(default_factory=list)
    last_byte: list[int] = field(default_factory=list)


class _Parser:
    """Builds a Trace chunk by chunk: consecutive reads of one file become one run of keys."""

    def __init__(self) -> None:
        self.trace = Trace()
        self.keys: list[int] = []
        self.run_file = 0
        self.run_ops = 0
        self.since_cut = 0  # accesses since the last cut

    def flush(self) -> None:
        if self.keys:
            self.trace.steps.append((STEP_READS, self.run_file, self.keys, self.run_ops))
            self.keys, self.run_ops = [], 0

    def cut(self) -> None:
        self.flush()
        self.trace.steps.append((STEP_CUT, 0, 0, 0))
        self.since_cut = 0

    def first(self, chunk: pb.ReplayChunk) -> None:
        trace = self.trace
        trace.machine, trace.names = chunk.machine, list(chunk.names)
        trace.interval_accesses = chunk.interval_accesses
        if not trace.names:
            raise InvalidArgument("chunk 0: the first chunk names the files", field="names")
        trace.last_page = [-1] * len(trace.names)
        trace.last_byte = [-1] * len(trace.names)

    def add(self, number: int, chunk: pb.ReplayChunk) -> None:
        where = f"chunk {number}"
        if number == 0:
            self.first(chunk)
        elif chunk.machine or chunk.names or chunk.interval_accesses:
            raise InvalidArgument(
                f"{where}: machine, names and interval_accesses go in the first chunk only",
                field="names",
            )
        offsets, lengths, ops, files = chunk.offsets, chunk.lengths, chunk.ops, chunk.files
        n = len(offsets)
        for column, values in (("lengths", lengths), ("ops", ops), ("files", files)):
            if values and len(values) != n:
                raise InvalidArgument(
                    f"{where}: {len(values)} {column} for {n} offsets", field=column
                )
        if ops and not _KNOWN_OPS.issuperset(ops):
            row = next(i for i, op in enumerate(ops) if op not in _KNOWN_OPS)
            raise InvalidArgument(f"{where}: ops[{row}] is {ops[row]}, not a ReplayOp", field="ops")
        if lengths and (min(lengths) < 1 or max(lengths) > MAX_IO_BYTES):
            row = next(i for i, x in enumerate(lengths) if not 1 <= x <= MAX_IO_BYTES)
            raise InvalidArgument(
                f"{where}: lengths[{row}] is {lengths[row]}, not 1..{MAX_IO_BYTES} bytes",
                field="lengths",
            )
        nr_files = len(self.trace.names)
        if files and max(files) >= nr_files:
            row = next(i for i, x in enumerate(files) if x >= nr_files)
            raise InvalidArgument(
                f"{where}: files[{row}] is {files[row]}, but the trace names {nr_files} files",
                field="files",
            )
        if not n:
            return
        if lengths or ops or (files and min(files) != max(files)):
            self.add_rows(offsets, lengths, ops, files)
        else:
            self.add_pages([o >> PAGE_SHIFT for o in offsets], files[0] if files else 0)
        if self.trace.accesses > MAX_REPLAY_ACCESSES:
            raise InvalidArgument(
                f"{where}: the trace exceeds {MAX_REPLAY_ACCESSES} page accesses, the most "
                "one call may carry (MAX_REPLAY_ACCESSES); send it in several calls",
                field="offsets",
            )

    def add_pages(self, pages: list[int], file: int) -> None:
        """The common case: one-page reads of one file, no per-operation branching."""
        trace = self.trace
        top = max(pages)
        trace.last_page[file] = max(trace.last_page[file], top)
        trace.operations += len(pages)
        trace.accesses += len(pages)
        if file != self.run_file:
            self.flush()
            self.run_file = file
        interval = self.trace.interval_accesses
        if not interval:
            self.keys += pages
            self.run_ops += len(pages)
            return
        at = 0
        while at < len(pages):
            part = pages[at : at + interval - self.since_cut]
            self.keys += part
            self.run_ops += len(part)
            self.since_cut += len(part)
            at += len(part)
            if self.since_cut >= interval:
                self.cut()

    def add_rows(
        self,
        offsets: Iterable[int],
        lengths: Iterable[int],
        ops: Iterable[int],
        files: Iterable[int],
    ) -> None:
        """Operations one by one: multi-page reads, writes, several files."""
        trace = self.trace
        last_page, last_byte, steps = trace.last_page, trace.last_byte, trace.steps
        lengths_of, ops_of, files_of = list(lengths), list(ops), list(files)
        interval = trace.interval_accesses
        keys = self.keys
        for row, at in enumerate(offsets):
            file = files_of[row] if files_of else 0
            first = at >> PAGE_SHIFT
            if lengths_of:
                offset, length = at, lengths_of[row]
                end = offset + length - 1
                last = end >> PAGE_SHIFT
                last_byte[file] = max(last_byte[file], end)
            else:
                offset, length, last = first << PAGE_SHIFT, PAGE_SIZE, first
                last_page[file] = max(last_page[file], first)
            nr_pages = last - first + 1
            if ops_of and ops_of[row] == _WRITE:
                self.flush()
                keys = self.keys
                steps.append((STEP_WRITE, file, offset, length))
            else:
                if file != self.run_file:
                    self.flush()
                    keys = self.keys
                    self.run_file = file
                if nr_pages == 1:
                    keys.append(first)
                else:
                    keys += range(first, last + 1)
                self.run_ops += 1
            trace.operations += 1
            trace.accesses += nr_pages
            if interval:
                self.since_cut += nr_pages
                if self.since_cut >= interval:
                    self.cut()
                    keys = self.keys

    def finish(self) -> Trace:
        if not self.trace.names:
            raise InvalidArgument(
                "the stream sent no chunk: the first names the files", field="names"
            )
        self.flush()
        return self.trace


def parse(chunks: Iterable[pb.ReplayChunk]) -> Trace:
    """Decodes and checks every chunk; raises InvalidArgument (naming the chunk, the column
    and the row) for the first bad one, before anything runs."""
    parser = _Parser()
    for number, chunk in enumerate(chunks):
        parser.add(number, chunk)
    return parser.finish()


@dataclass(slots=True)
class _Stretch:
    """What part of a run did so far."""

    operations: int = 0
    accesses: int = 0
    stats: IoStats = field(default_factory=IoStats)
    read_stats: IoStats = field(default_factory=IoStats)

    def add(self, stats: IoStats, operations: int, accesses: int, *, read: bool) -> None:
        self.operations += operations
        self.accesses += accesses
        for target in (self.stats, self.read_stats) if read else (self.stats,):
            target.add(stats)


def _io_stats(stats: IoStats) -> pb.IoStats:
    return pb.IoStats(
        pages_hit=stats.pages_hit,
        pages_missed=stats.pages_missed,
        pages_readahead=stats.pages_readahead,
        device_seconds=stats.device_seconds,
        throttle_seconds=stats.throttle_seconds,
    )


class _Series:
    """The totals and the interval series: page-cache stats added up per step, the machine's
    counters (evictions, refaults) and the clock read at each cut."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.totals = _Stretch()
        self.current = _Stretch()
        self.intervals: list[pb.ReplayTotals] = []
        self.start = self.mark = self._counters()

    def _counters(self) -> tuple[float, int, int]:
        events = self.machine.events
        steals = events[VmEvent.PGSTEAL_DIRECT] + events[VmEvent.PGSTEAL_KSWAPD]
        return time.perf_counter(), steals, events[VmEvent.WORKINGSET_REFAULT_FILE]

    def add(self, stats: IoStats, operations: int, accesses: int, *, read: bool) -> None:
        self.totals.add(stats, operations, accesses, read=read)
        self.current.add(stats, operations, accesses, read=read)

    def _pack(self, stretch: _Stretch, since: tuple[float, int, int]) -> pb.ReplayTotals:
        now = self._counters()
        machine = self.machine
        return pb.ReplayTotals(
            operations=stretch.operations,
            accesses=stretch.accesses,
            stats=_io_stats(stretch.stats),
            read_stats=_io_stats(stretch.read_stats),
            evictions=now[1] - since[1],
            refaults=now[2] - since[2],
            elapsed_seconds=now[0] - since[0],
            nr_cached=machine.files.nr_pages,
            memmap=[
                pb.MemmapTotal(model=MEMMAP_MODEL.to_pb[cost.model], total_bytes=cost.total_bytes)
                for cost in machine.memmap()
            ],
        )

    def cut(self) -> None:
        """Ends the current interval (an empty one is not kept)."""
        if self.current.accesses:
            self.intervals.append(self._pack(self.current, self.mark))
            self.current = _Stretch()
            self.mark = self._counters()

    def result(self, *, intervals: bool) -> pb.ReplayResult:
        if intervals:
            self.cut()
        return pb.ReplayResult(totals=self._pack(self.totals, self.start), intervals=self.intervals)


def run(machine: Machine, names: list[str], trace: Trace) -> pb.ReplayResult:
    """Runs a parsed trace on the machine (its lock held by the caller) over files `names`
    (the trace's names, resolved in the caller's namespace). Every file must exist and hold
    every operation; that is checked before anything runs."""
    files = machine.files
    for number, name in enumerate(names):
        size = files.lookup(name).size  # UnknownFile: NOT_FOUND
        pages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if trace.last_byte[number] >= size or trace.last_page[number] >= pages:
            reach = max(trace.last_byte[number] + 1, (trace.last_page[number] + 1) << PAGE_SHIFT)
            raise InvalidArgument(
                f"the trace reaches byte {reach} of {trace.names[number]!r}, which has "
                f"{size} bytes",
                field="offsets",
            )
    series = _Series(machine)
    for kind, file, what, count in trace.steps:
        if kind == STEP_READS:
            assert isinstance(what, list)
            series.add(files.replay(names[file], what), count, len(what), read=True)
        elif kind == STEP_WRITE:
            assert isinstance(what, int)
            stats = files.write(names[file], what, _ZEROS[:count])
            nr_pages = ((what + count - 1) >> PAGE_SHIFT) - (what >> PAGE_SHIFT) + 1
            series.add(stats, 1, nr_pages, read=False)
        else:
            series.cut()
    return series.result(intervals=trace.interval_accesses > 0)
