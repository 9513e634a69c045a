"""Workloads: what each worker sends, one operation at a time, looked up by name in WORKLOADS.

A Workload prepares the server (files, guests) with ``setup``, hands every worker a Stream of
its own (so create -> write -> read -> delete of a small file, or allocate -> free of a folio,
stay in order without locks), and undoes its setup with ``teardown``. Ops are plain data; the
runner sends them unary or in batches. Randomness comes from per-worker generators seeded from
``--seed``, so a run with one worker is reproducible op for op.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import random
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from foliod.api import MAX_IO_BYTES, PAGE_SHIFT, PAGE_SIZE, DeviceModel
from foliod.api.pb_enums import OP_NAMES
from foliodclient._calls import CallOptions
from foliodclient._client import FoliodClient
from foliodclient._types import IoStats
from foliodclient.errors import NotFound
from foliodclient.load.traces import Trace, split

MAX_ORDER = 10


class OpKind(StrEnum):
    READ = "read"
    WRITE = "write"
    FSYNC = "fsync"
    ALLOCATE = "allocate"
    FREE = "free"
    CREATE = "create"
    DELETE = "delete"


# What a Batch can carry, the kinds with a Submit op code of their name; anything else is sent
# unary, in order, between batches.
BATCHABLE = frozenset(kind for kind in OpKind if kind in OP_NAMES.values())


@dataclass(slots=True)
class Op:
    """One operation: a file I/O (name, offset, length or data), an fsync or free (handle), an
    allocation (owner, folio kind, order), a create or delete (name), on `machine`."""

    kind: OpKind
    name: str = ""
    offset: int = 0
    length: int = 0
    data: bytes = b""
    handle: int = 0
    owner: str = ""
    folio_kind: str = ""
    order: int = 0
    machine: str | None = None


@dataclass(slots=True)
class Outcome:
    """What an op did: its status code name ("OK" when it succeeded), page-cache stats, bytes
    moved and folio handles allocated."""

    code: str = "OK"
    stats: IoStats | None = None
    nr_bytes: int = 0
    handles: range = range(0)
    # The error's message, when the op failed.
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"


@dataclass(frozen=True, slots=True)
class Params:
    """Workload parameters from the command line; sizes in bytes."""

    file_size_bytes: int = 16 << 20
    io_size_bytes: int = PAGE_SIZE
    files: int = 4
    distribution: str = "uniform"
    zipf_alpha: float = 1.0
    read_ratio: float = 0.7
    fsync_every: int = 0
    small_file_bytes: int = 16 << 10
    alloc_kind: str = "slab"
    churn_bytes: int = 16 << 20
    guests: int = 2
    guest_ram_bytes: int = 64 << 20
    guest_backing: str = "base"
    prefix: str = "load"
    seed: int = 0
    workers: int = 1
    trace: Trace | None = None


class Stream(Protocol):
    """One worker's operations: None when it has no more; complete() sees each op's outcome."""

    def next_op(self) -> Op | None: ...

    def complete(self, op: Op, outcome: Outcome) -> None: ...


class GeneratorStream:
    """A Stream from a generator of ops, for workloads that need no outcomes."""

    def __init__(self, ops: Iterator[Op]) -> None:
        self._ops = ops

    def next_op(self) -> Op | None:
        return next(self._ops, None)

    def complete(self, op: Op, outcome: Outcome) -> None:
        return None


class Workload:
    """The base: no setup, no teardown; subclasses define stream()."""

    name = ""
    description = ""

    def __init__(self, params: Params) -> None:
        self.params = params
        self._data = random.Random(params.seed).randbytes(
            max(params.io_size_bytes, params.small_file_bytes)
        )

    def setup(self, client: FoliodClient) -> None:
        return None

    def stream(self, worker: int) -> Stream:
        raise NotImplementedError

    def teardown(self, client: FoliodClient) -> None:
        return None

    def rng(self, worker: int) -> random.Random:
        return random.Random(self.params.seed * 1_000_003 + worker)

    def payload(self, length: int) -> bytes:
        return self._data[:length]


# Undoing a run frees what it cached, under the machine's lock: DeleteFile of a 64 MiB file
# once took 15.5 s on a loaded server (issue 15), so a teardown call's deadline is the
# client's plus a second per TEARDOWN_BYTES_PER_SECOND of what it frees.
TEARDOWN_BYTES_PER_SECOND = 1 << 20


def teardown_options(client: FoliodClient, nr_bytes: int) -> CallOptions:
    """The deadline of a call that frees up to nr_bytes, as call options (none when the
    client has no deadline)."""
    if client.timeout is None:
        return {}
    return {"timeout": client.timeout + nr_bytes / TEARDOWN_BYTES_PER_SECOND}


def _create_sized(client: FoliodClient, name: str, size: int, machine: str | None = None) -> None:
    """Creates (or recreates) a file of `size` bytes: a sparse file whose reads miss."""
    machine = client.machine if machine is None else machine
    with contextlib.suppress(NotFound):
        options = teardown_options(client, size)
        options["machine"] = machine
        client.delete_file(name, **options)
    client.create_file(name, machine=machine)
    client.truncate_file(name, size, machine=machine)


class _FileSet(Workload):
    """Workloads over `files` files of `file_size_bytes`, read and written in io_size pieces."""

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.names = [f"{params.prefix}/{self.name}/f{i}" for i in range(params.files)]
        self.io_size = min(params.io_size_bytes, params.file_size_bytes, MAX_IO_BYTES)
        self.blocks_per_file = max(params.file_size_bytes // self.io_size, 1)
        self.handles: list[int] = []
        self._pick: Callable[[random.Random], int] | None = None

    def setup(self, client: FoliodClient) -> None:
        for name in self.names:
            _create_sized(client, name, self.params.file_size_bytes)
        if self.params.fsync_every:
            self.handles = [client.open_file(name) for name in self.names]

    def teardown(self, client: FoliodClient) -> None:
        for handle in self.handles:
            client.close_file(handle)
        options = teardown_options(client, self.params.file_size_bytes)
        for name in self.names:
            client.delete_file(name, **options)

    def block_picker(self) -> Callable[[random.Random], int]:
        """Draws a block (file * blocks_per_file + block) uniformly or by Zipf's law; Zipf
        ranks are scattered over the blocks by a seeded shuffle, so hot blocks are not all at
        the start of the first file. Built once, shared by the workers (read only)."""
        if self._pick is not None:
            return self._pick
        nr_blocks = self.blocks_per_file * len(self.names)
        if self.params.distribution == "uniform":
            self._pick = lambda rng: rng.randrange(nr_blocks)
            return self._pick
        alpha = self.params.zipf_alpha
        cumulative = list(
            itertools.accumulate(1.0 / rank**alpha for rank in range(1, nr_blocks + 1))
        )
        total = cumulative[-1]
        blocks = list(range(nr_blocks))
        random.Random(self.params.seed).shuffle(blocks)

        def pick(rng: random.Random) -> int:
            return blocks[min(bisect.bisect_left(cumulative, rng.random() * total), nr_blocks - 1)]

        self._pick = pick
        return pick

    def io(self, kind: OpKind, block: int, writes: itertools.count[int]) -> Iterator[Op]:
        """The op on one block, and an fsync of its file every fsync_every writes."""
        file, index = divmod(block, self.blocks_per_file)
        name, offset = self.names[file], index * self.io_size
        if kind is OpKind.READ:
            yield Op(OpKind.READ, name, offset, self.io_size)
            return
        yield Op(OpKind.WRITE, name, offset, self.io_size, data=self.payload(self.io_size))
        every = self.params.fsync_every
        if every and next(writes) % every == every - 1:
            yield Op(OpKind.FSYNC, name, handle=self.handles[file])


class _Sequential(_FileSet):
    kind = OpKind.READ

    def stream(self, worker: int) -> Stream:
        def ops() -> Iterator[Op]:
            writes = itertools.count()
            first = worker * self.blocks_per_file
            for block in itertools.cycle(range(first, first + self.blocks_per_file)):
                yield from self.io(
                    self.kind, block % (self.blocks_per_file * len(self.names)), writes
                )

        return GeneratorStream(ops())


class SeqRead(_Sequential):
    """Each worker reads its own file (worker mod files) front to back, over and over."""

    name = "seq-read"
    description = "sequential reads, one file per worker, wrapping at the end"


class SeqWrite(_Sequential):
    """Each worker writes its own file front to back, over and over."""

    name = "seq-write"
    description = "sequential writes, one file per worker, wrapping at the end"
    kind = OpKind.WRITE


class _Random(_FileSet):
    def read_ratio(self) -> float:
        raise NotImplementedError

    def stream(self, worker: int) -> Stream:
        pick, rng, ratio = self.block_picker(), self.rng(worker), self.read_ratio()

        def ops() -> Iterator[Op]:
            writes = itertools.count()
            while True:
                kind = OpKind.READ if rng.random() < ratio else OpKind.WRITE
                yield from self.io(kind, pick(rng), writes)

        return GeneratorStream(ops())


class RandRead(_Random):
    name = "rand-read"
    description = "random reads over all files (--distribution uniform|zipf)"

    def read_ratio(self) -> float:
        return 1.0


class RandWrite(_Random):
    name = "rand-write"
    description = "random writes over all files (--distribution uniform|zipf)"

    def read_ratio(self) -> float:
        return 0.0


class Mixed(_Random):
    name = "mixed"
    description = "random reads and writes, --read-ratio of them reads"

    def read_ratio(self) -> float:
        return self.params.read_ratio


class SmallFiles(Workload):
    """A build: each worker creates a file of 1..small_file_bytes, writes it, reads it twice
    (the second read hits), and deletes its oldest file once it keeps `files` of them."""

    name = "small-files"
    description = "build-like: many small files created, written, read twice and deleted"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._live: list[deque[str]] = []
        self._lock = threading.Lock()

    def stream(self, worker: int) -> Stream:
        rng, live = self.rng(worker), deque[str]()
        with self._lock:
            self._live.append(live)

        def ops() -> Iterator[Op]:
            for n in itertools.count():
                name = f"{self.params.prefix}/small/w{worker}/{n}.o"
                size = min(rng.randint(1, self.params.small_file_bytes), MAX_IO_BYTES)
                live.append(name)  # before the yield: the run may end right after the create
                yield Op(OpKind.CREATE, name)
                yield Op(OpKind.WRITE, name, 0, size, data=self.payload(size))
                yield Op(OpKind.READ, name, 0, size)
                yield Op(OpKind.READ, name, 0, size)
                if len(live) > self.params.files:
                    yield Op(OpKind.DELETE, live.popleft())

        return GeneratorStream(ops())

    def teardown(self, client: FoliodClient) -> None:
        for live in self._live:
            for name in live:
                with contextlib.suppress(NotFound):
                    client.delete_file(name)


class _ChurnStream:
    """One worker's live folios: allocate a random order 0..MAX_ORDER while under the budget,
    else free a random live folio (handles learnt from completed allocations only)."""

    def __init__(self, workload: AllocChurn, worker: int) -> None:
        self.workload = workload
        self.rng = workload.rng(worker)
        self.owner = f"{workload.params.prefix}-churn-w{worker}"
        self.live: dict[int, int] = {}  # handle -> bytes
        self.live_bytes = 0
        self.budget = max(workload.params.churn_bytes // max(workload.params.workers, 1), PAGE_SIZE)

    def next_op(self) -> Op | None:
        order = self.rng.randint(0, MAX_ORDER)
        size = PAGE_SIZE << order
        if self.live and (self.live_bytes + size > self.budget or self.rng.random() < 0.3):
            handle = self.rng.choice(list(self.live))
            self.live_bytes -= self.live.pop(handle)
            return Op(OpKind.FREE, handle=handle)
        self.live_bytes += size  # reserved now, so a batch cannot overshoot the budget
        return Op(
            OpKind.ALLOCATE,
            owner=self.owner,
            folio_kind=self.workload.params.alloc_kind,
            order=order,
        )

    def complete(self, op: Op, outcome: Outcome) -> None:
        if op.kind is not OpKind.ALLOCATE:
            return
        size = PAGE_SIZE << op.order
        if not outcome.ok or not outcome.handles:
            self.live_bytes -= size
            return
        for handle in outcome.handles:
            self.live[handle] = size


class AllocChurn(Workload):
    """Allocation churn across orders 0..10 under a live-bytes budget: fragments the buddy
    allocator (compare buddyinfo before and after). The default kind, slab, takes every order."""

    name = "alloc-churn"
    description = "allocate/free folios of orders 0..10 (fragmentation); buddyinfo before/after"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.owners: list[str] = []

    def stream(self, worker: int) -> Stream:
        stream = _ChurnStream(self, worker)
        self.owners.append(stream.owner)
        return stream

    def teardown(self, client: FoliodClient) -> None:
        for owner in self.owners:
            with contextlib.suppress(NotFound):
                client.release_owner(owner)


class MultiGuest(_FileSet):
    """`guests` guests of guest_ram_bytes on the host, each with its own files; reads and
    writes (--read-ratio) spread uniformly over guests and blocks. Guests are destroyed after."""

    name = "multi-guest"
    description = "N guests (create_guest), reads/writes spread over them; destroyed after"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.guests = [f"{params.prefix}-g{i}" for i in range(params.guests)]
        self.created: list[str] = []

    def setup(self, client: FoliodClient) -> None:
        for guest in self.guests:
            with contextlib.suppress(NotFound):
                client.destroy_guest(guest, delete_files=True)
            client.create_guest(guest, self.params.guest_ram_bytes, self.params.guest_backing)
            self.created.append(guest)
            for name in self.names:
                _create_sized(client, name, self.params.file_size_bytes, machine=guest)

    def teardown(self, client: FoliodClient) -> None:
        params = self.params
        nr_bytes = params.guest_ram_bytes + len(self.names) * params.file_size_bytes
        for guest in self.created:
            client.destroy_guest(guest, delete_files=True, **teardown_options(client, nr_bytes))

    def stream(self, worker: int) -> Stream:
        rng, ratio = self.rng(worker), self.params.read_ratio
        nr_blocks = self.blocks_per_file * len(self.names)

        def ops() -> Iterator[Op]:
            while True:
                guest = rng.choice(self.guests)
                file, index = divmod(rng.randrange(nr_blocks), self.blocks_per_file)
                name, offset = self.names[file], index * self.io_size
                if rng.random() < ratio:
                    yield Op(OpKind.READ, name, offset, self.io_size, machine=guest)
                else:
                    data = self.payload(self.io_size)
                    yield Op(OpKind.WRITE, name, offset, self.io_size, data=data, machine=guest)

        return GeneratorStream(ops())


@dataclass(slots=True)
class ReplayColumns:
    """A trace laid over files, as the Replay RPC takes it: per operation its byte offset,
    length, write flag and file (an index into `names`), the pages it touches and what it
    would cost on the device if every page missed (0 for a write)."""

    names: list[str]
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    lengths: array[int] = field(default_factory=lambda: array("I"))
    writes: array[int] = field(default_factory=lambda: array("B"))
    files: array[int] = field(default_factory=lambda: array("I"))
    accesses: array[int] = field(default_factory=lambda: array("I"))
    all_miss_seconds: array[float] = field(default_factory=lambda: array("d"))


@dataclass(slots=True)
class _Cursor:
    """The position in a trace, shared by every worker: requests go out in trace order."""

    trace: Trace
    position: int = 0
    pending: deque[Op] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Replay(Workload):
    """Replays a trace (foliodclient.load.traces) once, in order, over files of
    file_size_bytes named <prefix>/trace/f<N>; every file a request touches is created first."""

    name = "replay"
    description = "replay --trace FILE (text page keys, CSV or MSR block trace, oracleGeneral)"

    def __init__(self, params: Params) -> None:
        if params.trace is None:
            raise ValueError("the replay workload needs --trace FILE")
        super().__init__(params)
        self.cursor = _Cursor(params.trace)
        self.max_io = min(MAX_IO_BYTES, params.file_size_bytes)
        self._data = random.Random(params.seed).randbytes(self.max_io)
        self.files: set[int] = set()

    def file_name(self, index: int) -> str:
        return f"{self.params.prefix}/trace/f{index}"

    def setup(self, client: FoliodClient) -> None:
        trace, size = self.cursor.trace, self.params.file_size_bytes
        for address, length in zip(trace.addresses, trace.sizes, strict=True):
            self.files.update(range(address // size, (address + length - 1) // size + 1))
        for index in sorted(self.files):
            _create_sized(client, self.file_name(index), size)

    def teardown(self, client: FoliodClient) -> None:
        options = teardown_options(client, self.params.file_size_bytes)
        for index in sorted(self.files):
            client.delete_file(self.file_name(index), **options)

    def columns(self, device: DeviceModel) -> ReplayColumns:
        """The trace as the Replay RPC's columns, over the files setup() made, in order."""
        trace, size = self.cursor.trace, self.params.file_size_bytes
        number = {index: n for n, index in enumerate(sorted(self.files))}
        columns = ReplayColumns([self.file_name(index) for index in sorted(self.files)])
        offsets, lengths, writes, files = (
            columns.offsets,
            columns.lengths,
            columns.writes,
            columns.files,
        )
        accesses, all_miss = columns.accesses, columns.all_miss_seconds
        for write, address, nr_bytes in zip(
            trace.writes, trace.addresses, trace.sizes, strict=True
        ):
            for index, offset, length in split(address, nr_bytes, size, self.max_io):
                offsets.append(offset)
                lengths.append(length)
                writes.append(write)
                files.append(number[index])
                nr_pages = ((offset + length - 1) >> PAGE_SHIFT) - (offset >> PAGE_SHIFT) + 1
                accesses.append(nr_pages)
                all_miss.append(0.0 if write else device.read_seconds(nr_pages * PAGE_SIZE))
        return columns

    def next_op(self) -> Op | None:
        cursor = self.cursor
        with cursor.lock:
            while not cursor.pending:
                if cursor.position >= len(cursor.trace):
                    return None
                at = cursor.position
                cursor.position += 1
                write = cursor.trace.writes[at]
                pieces = split(
                    cursor.trace.addresses[at],
                    cursor.trace.sizes[at],
                    self.params.file_size_bytes,
                    self.max_io,
                )
                for index, offset, length in pieces:
                    name = self.file_name(index)
                    if write:
                        op = Op(OpKind.WRITE, name, offset, length, data=self._data[:length])
                    else:
                        op = Op(OpKind.READ, name, offset, length)
                    cursor.pending.append(op)
            return cursor.pending.popleft()

    def complete(self, op: Op, outcome: Outcome) -> None:
        return None

    def stream(self, worker: int) -> Stream:
        return self


WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls
    for cls in (
        SeqRead,
        SeqWrite,
        RandRead,
        RandWrite,
        Mixed,
        SmallFiles,
        AllocChurn,
        MultiGuest,
        Replay,
    )
}
