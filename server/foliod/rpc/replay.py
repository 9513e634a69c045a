"""Trace replay (foliod.v1.Foliod/Replay): checks a columnar trace whole, then runs it in order
on one machine through PageCache.replay (reads) and PageCache.write (writes), and packs the
totals and the per-interval series."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from foliod.mm import PAGE_SIZE, InvalidArgument, Machine, VmEvent
from foliod.mm.filemap import MAX_IO_BYTES, IoStats
from foliod.v1 import foliod_pb2 as pb

# Page accesses one Replay call may carry: bounds the memory a call holds.
MAX_REPLAY_ACCESSES = 16 << 20
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_READ = (pb.REPLAY_OP_UNSPECIFIED, pb.REPLAY_OP_READ)
_KNOWN_OPS = frozenset((pb.REPLAY_OP_UNSPECIFIED, pb.REPLAY_OP_READ, pb.REPLAY_OP_WRITE))


@dataclass(slots=True)
class Trace:
    """A checked trace: runs of reads (as page keys) and writes (offset, length), in order."""

    machine: str = ""
    name: str = ""
    interval: int = 0
    # ("r", page keys, operations) or ("w", offset, length); consecutive reads are merged.
    steps: list[tuple[str, object, int]] = field(default_factory=list)
    accesses: int = 0
    last_byte: int = -1  # the highest byte any operation touches


def parse(chunks: Iterable[pb.ReplayChunk]) -> Trace:
    """Decodes and checks every chunk; raises InvalidArgument (naming the chunk and field) for
    the first bad one, before anything runs."""
    trace = Trace()
    keys: list[int] = []
    reads = 0
    for number, chunk in enumerate(chunks):
        where = f"chunk {number}"
        if number == 0:
            trace.machine, trace.name = chunk.machine, chunk.name
            trace.interval = chunk.interval_accesses
            if not chunk.name:
                raise InvalidArgument(f"{where}: the first chunk names the file", field="name")
        elif chunk.machine or chunk.name or chunk.interval_accesses:
            raise InvalidArgument(
                f"{where}: machine, name and interval_accesses go in the first chunk only",
                field="name",
            )
        offsets = list(chunk.offsets)
        lengths = list(chunk.lengths)
        ops = list(chunk.ops)
        n = len(offsets)
        if lengths and len(lengths) != n:
            raise InvalidArgument(
                f"{where}: {len(lengths)} lengths for {n} offsets", field="lengths"
            )
        if ops and len(ops) != n:
            raise InvalidArgument(f"{where}: {len(ops)} ops for {n} offsets", field="ops")
        if ops and not _KNOWN_OPS.issuperset(ops):
            bad = next(i for i, op in enumerate(ops) if op not in _KNOWN_OPS)
            raise InvalidArgument(f"{where}: op {bad} is {ops[bad]}, not an op", field="ops")
        if lengths and (min(lengths) < 1 or max(lengths) > MAX_IO_BYTES):
            bad = next(i for i, x in enumerate(lengths) if not 1 <= x <= MAX_IO_BYTES)
            raise InvalidArgument(
                f"{where}: length {bad} is {lengths[bad]}, not 1..{MAX_IO_BYTES} bytes",
                field="lengths",
            )
        if not n:
            continue
        if not lengths and not ops:
            # The common case, one page read at each offset: no per-operation branching.
            keys.extend([o >> PAGE_SHIFT for o in offsets])
            reads += n
            trace.accesses += n
            trace.last_byte = max(trace.last_byte, max(offsets) + PAGE_SIZE - 1)
            continue
        for i in range(n):
            offset = offsets[i]
            length = lengths[i] if lengths else PAGE_SIZE
            end = offset + length - 1
            trace.last_byte = max(trace.last_byte, end)
            first, last = offset >> PAGE_SHIFT, end >> PAGE_SHIFT
            trace.accesses += last - first + 1
            if not ops or ops[i] in _READ:
                keys.extend(range(first, last + 1)) if last > first else keys.append(first)
                reads += 1
            else:
                if keys:
                    trace.steps.append(("r", keys, reads))
                    keys, reads = [], 0
                trace.steps.append(("w", offset, length))
        if trace.accesses > MAX_REPLAY_ACCESSES:
            raise InvalidArgument(
                f"{where}: the trace exceeds {MAX_REPLAY_ACCESSES} page accesses per call",
                field="offsets",
            )
    if keys:
        trace.steps.append(("r", keys, reads))
    if not trace.name:
        raise InvalidArgument("the stream sent no chunk", field="name")
    return trace


class _Series:
    """Adds up the totals and cuts the interval series."""

    def __init__(self, machine: Machine, interval: int) -> None:
        self.machine = machine
        self.interval = interval
        self.totals = pb.ReplayTotals()
        self.intervals: list[pb.ReplayTotals] = []
        self.current = pb.ReplayTotals()
        self.events = self._events()

    def _events(self) -> tuple[int, int]:
        events = self.machine.events
        steals = events[VmEvent.PGSTEAL_DIRECT] + events[VmEvent.PGSTEAL_KSWAPD]
        return steals, events[VmEvent.WORKINGSET_REFAULT_FILE]

    def add(self, stats: IoStats, operations: int, accesses: int) -> None:
        steals, refaults = self._events()
        for target in (self.totals, self.current):
            target.operations += operations
            target.accesses += accesses
            target.stats.pages_hit += stats.pages_hit
            target.stats.pages_missed += stats.pages_missed
            target.stats.pages_readahead += stats.pages_readahead
            target.stats.device_seconds += stats.device_seconds
            target.stats.throttle_seconds += stats.throttle_seconds
            target.evictions += steals - self.events[0]
            target.refaults += refaults - self.events[1]
        self.events = steals, refaults
        if self.interval and self.current.accesses >= self.interval:
            self.cut()

    def cut(self) -> None:
        if self.current.operations:
            self.intervals.append(self.current)
            self.current = pb.ReplayTotals()


def run(machine: Machine, name: str, trace: Trace) -> pb.ReplayResult:
    """Runs a parsed trace on the machine (its lock held by the caller). The file must exist
    and hold every operation; that is checked before anything runs."""
    files = machine.files
    size = files.lookup(name).size
    if trace.last_byte >= size:
        raise InvalidArgument(
            f"the trace reaches byte {trace.last_byte} of {name!r}, which has {size} bytes",
            field="offsets",
        )
    series = _Series(machine, trace.interval)
    interval = trace.interval
    zeros = bytes(MAX_IO_BYTES)
    for kind, what, count in trace.steps:
        if kind == "w":
            offset = what
            assert isinstance(offset, int)
            stats = files.write(name, offset, zeros[:count])
            pages = ((offset + count - 1) >> PAGE_SHIFT) - (offset >> PAGE_SHIFT) + 1
            series.add(stats, 1, pages)
            continue
        keys = what
        assert isinstance(keys, list)
        if not interval:
            series.add(files.replay(name, keys), count, len(keys))
            continue
        # Cut at interval boundaries (operations are counted with the slice they start in;
        # a slice may split a multi-page read, which changes nothing the cache sees).
        start = 0
        while start < len(keys):
            room = interval - series.current.accesses
            part = keys[start : start + room]
            share = count if start + room >= len(keys) else 0
            series.add(files.replay(name, part), share, len(part))
            start += len(part)
    series.cut()
    return pb.ReplayResult(totals=series.totals, intervals=series.intervals)
