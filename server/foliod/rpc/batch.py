"""Batched submission (foliod.v1.Foliod/Submit): decodes a columnar batch, runs it, encodes its
completions.

A batch is checked whole before anything runs: too many operations, too much payload, an
unknown op code, a column of the wrong length, a name index outside the name table or write data
that does not add up reject it with one batch-level INVALID_ARGUMENT (a size limit is a property
of the request, as a unary call over MAX_IO_BYTES is INVALID_ARGUMENT; RESOURCE_EXHAUSTED would
read as out of memory), and an unknown machine with NOT_FOUND; then nothing changes. An accepted
batch runs under one hold of its machine's lock, operations in order; a domain error fails only
its operation, with the status a unary call would get (status_code_of), and later ones run.
"""

from __future__ import annotations

import structlog
from google.rpc import code_pb2

from foliod.api import MAX_BATCH_OPS as MAX_BATCH_OPS  # noqa: PLC0414 -- re-exported
from foliod.api import MAX_BATCH_PAYLOAD_BYTES as MAX_BATCH_PAYLOAD_BYTES  # noqa: PLC0414 -- re-exported
from foliod.api.pb_enums import FOLIO_KIND
from foliod.mm import FoliodError, FolioKind, InvalidArgument, Machines, check_machine
from foliod.mm.filemap import IoStats
from foliod.rpc.status import BAD_REQUEST_CODES, status_code_of
from foliod.rpc.tenancy import WHOLE, Namespace
from foliod.v1 import foliod_pb2 as pb

READ = pb.OP_CODE_READ
WRITE = pb.OP_CODE_WRITE
FSYNC = pb.OP_CODE_FSYNC
ALLOCATE = pb.OP_CODE_ALLOCATE
FREE = pb.OP_CODE_FREE
# The op codes this server runs (tests/test_batch.py checks they are all the proto declares).
_OP_CODES = frozenset((READ, WRITE, FSYNC, ALLOCATE, FREE))

_INTERNAL = code_pb2.INTERNAL

_log = structlog.get_logger("foliod.rpc")

# One planned operation, (op code, name, x, y, z, data):
#   READ (name, offset, length, 0, b""), WRITE (name, offset, 0, 0, data),
#   FSYNC and FREE ("", handle, 0, 0, b""), ALLOCATE (owner, kind, order, count, b"").
Planned = tuple[int, str, int, int, int, bytes]


def submit_batch(
    machines: Machines,
    request: pb.SubmitRequest,
    *,
    debug_checks: bool = False,
    namespace: Namespace = WHOLE,
) -> pb.SubmitResponse:
    """Runs one batch and returns its completions; never raises a domain error. Names and
    handles are the caller's (namespace): a tenant's map into its own namespace."""
    try:
        machine = machines.get(request.machine)
        plan = plan_batch(request)
    except FoliodError as exc:
        return pb.SubmitResponse(id=request.id, error=_error(0, exc))
    ns = namespace
    out = _Completions()
    with machine.lock:
        for index, (code, name, x, y, z, data) in enumerate(plan):
            try:
                if code == READ:
                    out.read(*machine.files.read(ns.file(name), x, y))
                elif code == WRITE:
                    out.write(machine.files.write(ns.file(name), x, data))
                elif code == FSYNC:
                    ns.check_file_handle(machine, x)
                    out.handled(machine.files.fsync(x))
                elif code == FREE:
                    ns.check_folio(machine, x, "handles")
                    out.handled(machine.free((x,)).nr_pages)
                else:
                    done = machine.allocate(ns.owner(name), _kind(x), order=y, count=z)
                    out.allocated(done.first_handle, done.count, done.nr_pages)
            except FoliodError as exc:
                out.failed(code, _error(index, exc))
            except Exception:
                _log.exception("unhandled error in a batch", op=code, index=index)
                failure = pb.SubmitError(
                    index=index, code=_INTERNAL, message="internal error (see the server log)"
                )
                out.failed(code, failure)
        if machine.memcgs:
            machine.enforce_memcg_limits()
        if debug_checks:
            check_machine(machine)
    return out.response(request.id)


def plan_batch(request: pb.SubmitRequest) -> list[Planned]:
    """The batch's operations with their arguments; InvalidArgument if it is malformed or over
    a limit. Checks only the encoding: each operation's own arguments are checked when it runs."""
    ops = list(request.ops)
    if len(ops) > MAX_BATCH_OPS:
        raise InvalidArgument(
            f"a batch holds at most {MAX_BATCH_OPS} operations (MAX_BATCH_OPS), not {len(ops)}",
            field="ops",
        )
    unknown = set(ops) - _OP_CODES
    if unknown:
        bad = min(unknown)
        raise InvalidArgument(
            f"operation {ops.index(bad)} has the unknown op code {bad}", field="ops"
        )
    nr_read, nr_write = ops.count(READ), ops.count(WRITE)
    nr_allocate = ops.count(ALLOCATE)
    nr_handle_ops = ops.count(FSYNC) + ops.count(FREE)
    names, name_indexes = list(request.names), list(request.name_indexes)
    offsets, lengths, handles = list(request.offsets), list(request.lengths), list(request.handles)
    kinds, orders, counts = list(request.kinds), list(request.orders), list(request.counts)
    for column, values, used in (
        ("name_indexes", name_indexes, nr_read + nr_write + nr_allocate),
        ("offsets", offsets, nr_read + nr_write),
        ("lengths", lengths, nr_read + nr_write),
        ("handles", handles, nr_handle_ops),
        ("kinds", kinds, nr_allocate),
        ("orders", orders, nr_allocate),
        ("counts", counts, nr_allocate),
    ):
        if len(values) != used:
            raise InvalidArgument(
                f"column {column} has {len(values)} entries, the operations use {used}",
                field=column,
            )
    if name_indexes and max(name_indexes) >= len(names):
        raise InvalidArgument(
            f"name index {max(name_indexes)} is outside the {len(names)} names", field="names"
        )
    payload = sum(lengths)
    if payload > MAX_BATCH_PAYLOAD_BYTES:
        raise InvalidArgument(
            f"a batch moves at most {MAX_BATCH_PAYLOAD_BYTES} bytes (MAX_BATCH_PAYLOAD_BYTES) "
            f"of write data and read lengths, not {payload}",
            field="lengths",
        )
    data = request.data
    plan: list[Planned] = []
    append = plan.append
    at_name = at_io = at_handle = at_allocate = at_data = 0
    for op in ops:
        if op == READ:
            append((op, names[name_indexes[at_name]], offsets[at_io], lengths[at_io], 0, b""))
            at_name += 1
            at_io += 1
        elif op == WRITE:
            end = at_data + lengths[at_io]
            append((op, names[name_indexes[at_name]], offsets[at_io], 0, 0, data[at_data:end]))
            at_data = end
            at_name += 1
            at_io += 1
        elif op == ALLOCATE:
            owner = names[name_indexes[at_name]]
            a = at_allocate
            append((op, owner, kinds[a], orders[a], counts[a], b""))
            at_name += 1
            at_allocate += 1
        else:
            append((op, "", handles[at_handle], 0, 0, b""))
            at_handle += 1
    if at_data != len(data):
        raise InvalidArgument(
            f"data has {len(data)} bytes, the WRITE lengths add up to {at_data}", field="data"
        )
    return plan


def _kind(value: int) -> FolioKind:
    kind = FOLIO_KIND.from_pb.get(pb.FolioKind.ValueType(value))
    if kind is None:
        raise InvalidArgument(f"kind {value} is not a folio kind", field="kind")
    return kind


def _error(index: int, exc: FoliodError) -> pb.SubmitError:
    """What a unary call's status would carry for exc (status.to_status), as one message."""
    code = status_code_of(exc)
    return pb.SubmitError(
        index=index,
        code=code.value[0],
        message=exc.message,
        reason=exc.reason,
        field=exc.field if code in BAD_REQUEST_CODES else "",
        metadata=exc.metadata,
    )


class _Completions:
    """The response columns of one batch, filled operation by operation."""

    __slots__ = (
        "chunks",
        "codes",
        "counts",
        "data_lengths",
        "device_seconds",
        "errors",
        "first_handles",
        "hit",
        "missed",
        "nr_pages",
        "readahead",
        "throttle_seconds",
    )

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.errors: list[pb.SubmitError] = []
        self.chunks: list[bytes] = []
        self.data_lengths: list[int] = []
        self.hit: list[int] = []
        self.missed: list[int] = []
        self.readahead: list[int] = []
        self.device_seconds: list[float] = []
        self.throttle_seconds: list[float] = []
        self.first_handles: list[int] = []
        self.counts: list[int] = []
        self.nr_pages: list[int] = []

    def read(self, data: bytes, stats: IoStats) -> None:
        self.chunks.append(data)
        self.data_lengths.append(len(data))
        self.write(stats)

    def write(self, stats: IoStats) -> None:
        self.codes.append(0)
        self.hit.append(stats.pages_hit)
        self.missed.append(stats.pages_missed)
        self.readahead.append(stats.pages_readahead)
        self.device_seconds.append(stats.device_seconds)
        self.throttle_seconds.append(stats.throttle_seconds)

    def allocated(self, first_handle: int, count: int, nr_pages: int) -> None:
        self.codes.append(0)
        self.first_handles.append(first_handle)
        self.counts.append(count)
        self.nr_pages.append(nr_pages)

    def handled(self, nr_pages: int) -> None:
        self.codes.append(0)
        self.nr_pages.append(nr_pages)

    def failed(self, op: int, error: pb.SubmitError) -> None:
        """A failed operation: its error, and zeros in the columns its kind has an entry in."""
        self.errors.append(error)
        if op == READ:
            self.data_lengths.append(0)
        if op in (READ, WRITE):
            self.write(IoStats())
        elif op == ALLOCATE:
            self.allocated(0, 0, 0)
        else:
            self.handled(0)
        self.codes[-1] = error.code

    def response(self, batch_id: int) -> pb.SubmitResponse:
        return pb.SubmitResponse(
            id=batch_id,
            codes=self.codes,
            op_errors=self.errors,
            data=b"".join(self.chunks),
            data_lengths=self.data_lengths,
            pages_hit=self.hit,
            pages_missed=self.missed,
            pages_readahead=self.readahead,
            device_seconds=self.device_seconds,
            first_handles=self.first_handles,
            counts=self.counts,
            nr_pages=self.nr_pages,
            throttle_seconds=self.throttle_seconds,
        )
