"""Batched submission (Submit): a batch builder, its results, and a submission stream for each
client.

    with client.open_submission() as s:
        batch = Batch()
        w = batch.write("log", 0, b"hello")
        r = batch.read("log", 0, 5)
        result = s.submit(batch)
        assert result.ok and result[r].data == b"hello"

A Submission is one open Submit stream: submit() sends a batch and waits for its completion,
submit_many() keeps up to `window` batches in flight and yields their results in order. A batch
the server rejects whole comes back with BatchResult.error set; a failed operation with its own
OpResult.code (its OpResult.error is the exception a unary call would raise). Only a broken
stream raises, with the client's error tree.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
from collections import deque
from collections.abc import AsyncGenerator, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Self

import grpc
from grpc import aio

from foliod.api import MAX_BATCH_OPS, MAX_BATCH_PAYLOAD_BYTES, FolioKind
from foliod.api.pb_enums import FOLIO_KIND, OP_NAMES
from foliod.v1 import foliod_pb2 as pb
from foliodclient import errors
from foliodclient._types import IoStats

# Batches submit_many keeps in flight on one stream.
DEFAULT_WINDOW = 4

_READ: Final = pb.OP_CODE_READ
_WRITE: Final = pb.OP_CODE_WRITE
_FSYNC: Final = pb.OP_CODE_FSYNC
_ALLOCATE: Final = pb.OP_CODE_ALLOCATE
_FREE: Final = pb.OP_CODE_FREE
_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}
_NO_STATS: Final = IoStats(0, 0, 0, 0.0)


class Batch:
    """Operations to submit together, applied in the order added; each method returns the
    operation's index in the batch (and in BatchResult.results). At most MAX_OPS operations
    and MAX_PAYLOAD_BYTES of write data plus read lengths (``payload_bytes``): the server
    rejects a larger batch whole. A batch can be submitted more than once."""

    MAX_OPS: ClassVar[int] = MAX_BATCH_OPS
    MAX_PAYLOAD_BYTES: ClassVar[int] = MAX_BATCH_PAYLOAD_BYTES

    __slots__ = (
        "_counts",
        "_data",
        "_handles",
        "_kinds",
        "_lengths",
        "_name_indexes",
        "_names",
        "_offsets",
        "_ops",
        "_orders",
        "payload_bytes",
    )

    def __init__(self) -> None:
        self._ops: list[pb.OpCode.ValueType] = []
        self._names: dict[str, int] = {}
        self._name_indexes: list[int] = []
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._data: list[bytes] = []
        self._handles: list[int] = []
        self._kinds: list[pb.FolioKind.ValueType] = []
        self._orders: list[int] = []
        self._counts: list[int] = []
        # Write data plus requested read lengths so far, as the server counts them.
        self.payload_bytes = 0

    def __len__(self) -> int:
        return len(self._ops)

    def _name(self, name: str) -> None:
        index = self._names.get(name)
        if index is None:
            index = self._names[name] = len(self._names)
        self._name_indexes.append(index)

    def _add(self, op: pb.OpCode.ValueType) -> int:
        self._ops.append(op)
        return len(self._ops) - 1

    def read(self, name: str, offset: int, length: int) -> int:
        """Reads `length` bytes of a file from `offset` through the page cache (as read_file)."""
        self._name(name)
        self._offsets.append(offset)
        self._lengths.append(length)
        self.payload_bytes += length
        return self._add(_READ)

    def write(self, name: str, offset: int, data: bytes) -> int:
        """Writes `data` into a file at `offset` (as write_file)."""
        self._name(name)
        self._offsets.append(offset)
        self._lengths.append(len(data))
        self._data.append(bytes(data))
        self.payload_bytes += len(data)
        return self._add(_WRITE)

    def fsync(self, handle: int) -> int:
        """Makes a file handle's file durable (as fsync)."""
        self._handles.append(handle)
        return self._add(_FSYNC)

    def allocate(self, owner: str, kind: FolioKind | str, order: int = 0, count: int = 1) -> int:
        """Allocates `count` folios of a kind and order for an owner (as allocate)."""
        self._name(owner)
        self._kinds.append(FOLIO_KIND.to_pb[FolioKind(kind)])
        self._orders.append(order)
        self._counts.append(count)
        return self._add(_ALLOCATE)

    def free(self, handle: int) -> int:
        """Frees one folio by handle (as free)."""
        self._handles.append(handle)
        return self._add(_FREE)

    def request(self, batch_id: int = 0, machine: str = "") -> pb.SubmitRequest:
        """The batch encoded as one SubmitRequest."""
        return pb.SubmitRequest(
            id=batch_id,
            machine=machine,
            ops=self._ops,
            names=list(self._names),
            name_indexes=self._name_indexes,
            offsets=self._offsets,
            lengths=self._lengths,
            data=b"".join(self._data),
            handles=self._handles,
            kinds=self._kinds,
            orders=self._orders,
            counts=self._counts,
        )


@dataclass(frozen=True, slots=True)
class OpResult:
    """One operation's completion. `data` and `stats` are a read's (`stats` a write's too);
    `first_handle` and `count` an allocation's; `nr_pages` the pages allocated, freed or
    written back (allocate, free, fsync). A failed operation has its code, message, ErrorInfo
    reason, field and metadata, and zeros elsewhere."""

    index: int
    op: str
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    reason: str = ""
    field: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    data: bytes = b""
    stats: IoStats | None = None
    first_handle: int = 0
    count: int = 0
    nr_pages: int = 0

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def handles(self) -> range:
        return range(self.first_handle, self.first_handle + self.count)

    @property
    def error(self) -> errors.CallError | None:
        """The exception the same call made alone would raise; None when it succeeded."""
        if self.ok:
            return None
        return _call_error(self.code, self.message, self.reason, self.field, self.metadata)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The completion of one batch: `error` is set when the server rejected it whole (nothing
    ran, `results` is empty); otherwise `results` has one OpResult per operation, in order.
    `ok`: accepted and every operation succeeded. Indexing and iteration go over `results`."""

    id: int
    error: errors.CallError | None
    results: tuple[OpResult, ...]

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.code is grpc.StatusCode.OK for r in self.results)

    @property
    def failed(self) -> tuple[OpResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> OpResult:
        return self.results[index]

    def __iter__(self) -> Iterator[OpResult]:
        return iter(self.results)


def _call_error(
    code: grpc.StatusCode, message: str, reason: str, field: str, metadata: Mapping[str, str]
) -> errors.CallError:
    """The client error tree's class for a foliod error, as error_from_rpc picks it."""
    cls = errors._BY_REASON.get(reason) or errors._BY_DOMAIN_CODE.get(code, errors.CallError)
    return cls(message, code=code, field=field, metadata={**metadata, "grpc_code": code.name})


def _error_of(error: pb.SubmitError) -> tuple[grpc.StatusCode, str, str, str, dict[str, str]]:
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return code, error.message, error.reason, error.field, dict(error.metadata)


def decode(ops: list[int], reply: pb.SubmitResponse) -> BatchResult:
    """Reads the completion columns of a batch whose operations were `ops`."""
    if reply.HasField("error"):
        return BatchResult(reply.id, _call_error(*_error_of(reply.error)), ())
    codes = reply.codes
    if len(codes) != len(ops):
        raise errors.RemoteError(
            f"batch {reply.id}: {len(codes)} completions for {len(ops)} operations",
            code=grpc.StatusCode.INTERNAL,
        )
    failures = {e.index: e for e in reply.op_errors}
    data = reply.data
    lengths, first_handles, counts = reply.data_lengths, reply.first_handles, reply.counts
    hit, missed, readahead = reply.pages_hit, reply.pages_missed, reply.pages_readahead
    seconds, nr_pages = reply.device_seconds, reply.nr_pages
    # A server older than the throttle_seconds column sends none.
    throttled = reply.throttle_seconds
    results: list[OpResult] = []
    append = results.append
    at_data = at_read = at_io = at_alloc = at_pages = 0
    for index, op in enumerate(ops):
        failure = failures.get(index)
        if failure is not None:
            code, message, reason, field_name, metadata = _error_of(failure)
            append(OpResult(index, OP_NAMES[op], code, message, reason, field_name, metadata))
        if op in (_READ, _WRITE):
            if failure is None:
                stats = IoStats(
                    hit[at_io],
                    missed[at_io],
                    readahead[at_io],
                    seconds[at_io],
                    throttled[at_io] if at_io < len(throttled) else 0.0,
                )
                chunk = b""
                if op == _READ:
                    end = at_data + lengths[at_read]
                    chunk = data[at_data:end]
                    at_data = end
                append(OpResult(index, OP_NAMES[op], data=chunk, stats=stats))
            at_io += 1
            at_read += op == _READ
        elif op == _ALLOCATE:
            if failure is None:
                append(
                    OpResult(
                        index,
                        "allocate",
                        first_handle=first_handles[at_alloc],
                        count=counts[at_alloc],
                        nr_pages=nr_pages[at_pages],
                    )
                )
            at_alloc += 1
            at_pages += 1
        else:
            if failure is None:
                append(OpResult(index, OP_NAMES[op], nr_pages=nr_pages[at_pages]))
            at_pages += 1
    return BatchResult(reply.id, None, tuple(results))


class _Stream:
    """Ids, machine and in-flight bookkeeping shared by both submission kinds."""

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self._ids = itertools.count(1)
        # (id, op codes) of each batch sent whose completion has not been read, oldest first.
        self._in_flight: deque[tuple[int, list[int]]] = deque()

    def _encode(self, batch: Batch) -> pb.SubmitRequest:
        request = batch.request(next(self._ids), self.machine)
        self._in_flight.append((request.id, list(batch._ops)))
        return request

    def _decode(self, reply: pb.SubmitResponse) -> BatchResult:
        batch_id, ops = self._in_flight.popleft()
        if reply.id != batch_id:
            raise errors.RemoteError(
                f"completion of batch {reply.id} came when batch {batch_id} was next",
                code=grpc.StatusCode.INTERNAL,
            )
        return decode(ops, reply)


_CLOSE = object()


class Submission(_Stream):
    """One open Submit stream of a FoliodClient; get it from open_submission() and use it as a
    context manager (leaving it half-closes the stream and waits for the server to end it; an
    exception cancels it instead). Use it from one thread at a time."""

    def __init__(
        self,
        stub: Any,
        machine: str,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> None:
        super().__init__(machine)
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._responses: Any = stub.Submit(
            iter(self._requests.get, _CLOSE), metadata=metadata, timeout=timeout
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.cancel()

    def _send(self, batch: Batch) -> None:
        if self._closed:
            raise ValueError("the submission is closed")
        self._requests.put(self._encode(batch))

    def _receive(self) -> BatchResult:
        try:
            reply = next(self._responses)
        except StopIteration:
            raise errors.RemoteError(
                "the server ended the submission stream", code=grpc.StatusCode.UNKNOWN
            ) from None
        except grpc.RpcError as exc:
            raise errors.error_from_rpc(exc) from exc
        return self._decode(reply)

    def submit(self, batch: Batch) -> BatchResult:
        """Sends one batch and waits for its completion."""
        self._send(batch)
        return self._receive()

    def submit_many(
        self, batches: Iterable[Batch], *, window: int = DEFAULT_WINDOW
    ) -> Generator[BatchResult, None, None]:
        """Sends the batches with up to `window` in flight; yields their results in order."""
        sent = 0
        try:
            for batch in batches:
                self._send(batch)
                sent += 1
                if sent >= window:
                    sent -= 1
                    yield self._receive()
            while sent:
                sent -= 1
                yield self._receive()
        except GeneratorExit:
            # Abandoned early: read the rest so that the next submit gets its own completion.
            for _ in range(sent):
                self._receive()
            raise

    def close(self) -> None:
        """Half-closes the stream and waits for the server to end it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_CLOSE)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as exc:
            raise errors.error_from_rpc(exc) from exc

    def cancel(self) -> None:
        """Abandons the stream at once: batches in flight may or may not have run."""
        self._closed = True
        self._requests.put(_CLOSE)
        self._responses.cancel()


class AsyncSubmission(_Stream):
    """One open Submit stream of an AsyncFoliodClient: ``async with`` it, ``await submit()``,
    ``async for result in submit_many(batches)``."""

    def __init__(
        self,
        stub: Any,
        machine: str,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
    ) -> None:
        super().__init__(machine)
        self._call: aio.StreamStreamCall[pb.SubmitRequest, pb.SubmitResponse] = stub.Submit(
            metadata=metadata, timeout=timeout
        )
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            self.cancel()

    async def _send(self, batch: Batch) -> None:
        if self._closed:
            raise ValueError("the submission is closed")
        try:
            await self._call.write(self._encode(batch))
        except grpc.RpcError as exc:
            raise errors.error_from_rpc(exc) from exc

    async def _receive(self) -> BatchResult:
        try:
            reply = await self._call.read()
        except grpc.RpcError as exc:
            raise errors.error_from_rpc(exc) from exc
        if reply is aio.EOF:
            raise errors.RemoteError(
                "the server ended the submission stream", code=grpc.StatusCode.UNKNOWN
            )
        assert isinstance(reply, pb.SubmitResponse)
        return self._decode(reply)

    async def submit(self, batch: Batch) -> BatchResult:
        """Sends one batch and waits for its completion."""
        await self._send(batch)
        return await self._receive()

    async def submit_many(
        self, batches: Iterable[Batch], *, window: int = DEFAULT_WINDOW
    ) -> AsyncGenerator[BatchResult, None]:
        """Sends the batches with up to `window` in flight; yields their results in order."""
        sent = 0
        try:
            for batch in batches:
                await self._send(batch)
                sent += 1
                if sent >= window:
                    sent -= 1
                    yield await self._receive()
            while sent:
                sent -= 1
                yield await self._receive()
        except GeneratorExit:
            for _ in range(sent):
                await self._receive()
            raise

    async def close(self) -> None:
        """Half-closes the stream and waits for the server to end it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._call.done_writing()
            while await self._call.read() is not aio.EOF:
                pass
        except grpc.RpcError as exc:
            raise errors.error_from_rpc(exc) from exc

    def cancel(self) -> None:
        """Abandons the stream at once: batches in flight may or may not have run."""
        self._closed = True
        self._call.cancel()
