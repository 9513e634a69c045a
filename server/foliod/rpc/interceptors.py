"""Server interceptors: error mapping, and observation of every call for logs and metrics.

Servicers stay free of cross-cutting work: they raise the core's errors, and one interceptor,
ObservingInterceptor, turns them into rich gRPC statuses and reports each call's start and end
(method, peer, request id, status code, duration, messages) through a CallReporter to observers
such as the access log and metrics. It also refuses, before any handler runs, what no handler
should see: a request message that cannot be decoded (INVALID_ARGUMENT) and a unary call whose
deadline has already passed (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import importlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

import grpc
import structlog

from foliod.logs import render_access_lines, write_lines
from foliod.mm import FoliodError, InvalidArgument
from foliod.rpc.status import internal_status, to_status

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128
# Unknown methods get no handler; bound the cache so probing random names cannot grow it.
_MAX_CACHED_METHODS = 1024
# Generated request ids: a random per-process prefix and a counter (unique, and no syscall).
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_numbers = itertools.count()
# A client's deadline runs from before the server got the call, so the cancel a passed
# deadline sends can reach the server a little before the server's copy of the deadline:
# a call ended by its client this close to its deadline counts as DEADLINE_EXCEEDED.
DEADLINE_SLACK_SECONDS = 0.05
# How often the reporter thread reports queued calls, and most events it reports at once.
REPORT_INTERVAL_SECONDS = 0.05
_MAX_BATCH = 4096

Behavior = Callable[[Any, grpc.ServicerContext], Any]
if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
HandlerCallDetails = Any


def context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code set on a call so far (by abort or set_code), if any."""
    code = context.code()  # type: ignore[attr-defined]
    return code if isinstance(code, grpc.StatusCode) else None


@dataclass(slots=True)
class CallInfo:
    """One call as observers see it."""

    service: str
    method: str
    grpc_type: str
    request_id: str
    peer: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    # time.time() at the end of the handler, for the access line's timestamp.
    ended_at: float = 0.0
    messages_received: int = 0
    messages_sent: int = 0


# (service, method, grpc_type): what gRPC metrics are labelled with.
MethodKey: TypeAlias = tuple[str, str, str]


class CallEvent(NamedTuple):
    """A call that ended, and how long its handler ran."""

    call: CallInfo
    seconds: float


class UnaryRecord(NamedTuple):
    """What a unary call's handler queues, cheaper to build than a CallInfo, which the reporter
    makes of it. The peer is taken at once (about a microsecond), not the context kept for it:
    that kept grpc's calls alive until the reporter ran, 50 ms on, for no gain measurable
    through the noise of this VM."""

    method_key: MethodKey
    request_id: str
    peer: str
    code: grpc.StatusCode | None  # the code set on the call, if any
    start: float  # perf_counter() at the handler's start
    end: float  # and at its end
    messages_received: int
    messages_sent: int


class CallObserver(Protocol):
    """Hears of ended calls from a CallReporter, one thread at a time."""

    def report(self, events: Sequence[CallEvent]) -> None:
        """A batch of ended calls, in the order they ended."""


class StartCounts:
    """Calls started, per method, counted on the call's own thread without a lock: each thread
    adds to a table of its own (as the kernel keeps per-CPU counters) and a reader sums them.
    A start is counted the moment the call begins, so a scrape sees calls still in flight."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._tables: list[dict[MethodKey, int]] = []
        self._lock = threading.Lock()

    def add(self, key: MethodKey) -> None:
        try:
            table: dict[MethodKey, int] = self._local.table
        except AttributeError:
            table = self._local.table = {}
            with self._lock:
                self._tables.append(table)
        table[key] = table.get(key, 0) + 1

    def totals(self) -> dict[MethodKey, int]:
        with self._lock:
            tables = list(self._tables)
        totals: dict[MethodKey, int] = {}
        for table in tables:
            for key, count in list(table.items()):
                totals[key] = totals.get(key, 0) + count
        return totals


def _grpc_type(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a tolerant deserializer returns for a request message it cannot parse."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that never raises: an unparseable message becomes an Undecodable for
    the handler to refuse. grpc answers a deserializer's exception itself, with INTERNAL
    "Exception deserializing request!", reaching no handler (so no log line and no metric),
    and on a request stream that abort can leave the call unfinished, hanging the server's
    stop (grpcio 1.85, with two such Submit streams)."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return Undecodable(str(exc) or type(exc).__name__)

    return deserialize


def _undecodable(request: Undecodable, position: str = "") -> InvalidArgument:
    """The error that refuses a request message that cannot be decoded."""
    return InvalidArgument(f"the request message{position} cannot be decoded: {request.error}")


def _rebuild(handler: Handler, behavior: Behavior) -> Handler:
    """A handler like `handler` whose behavior is replaced and whose deserializer never
    raises."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: Handler) -> Behavior:
    behavior: Behavior | None = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    return behavior


def _cut_short_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code of a call cut short without a status set (grpc sets none when the client ends
    a call): DEADLINE_EXCEEDED once its deadline has passed, or nearly (DEADLINE_SLACK_SECONDS),
    CANCELLED if the client ended it otherwise, UNKNOWN while the call is still active (the
    handler failed on its own)."""
    if context.is_active():
        return grpc.StatusCode.UNKNOWN
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _client_cancelled_mark() -> object | None:
    """grpc's mark on a call's state that the client ended it (grpc._server._CANCELLED, a
    string in every grpcio 1.x so far), or None when this grpcio has no such mark.

    The only private grpc API foliod reads, and only behind this check: the public API tells
    whether a call is active, not, once it is over, whether the client ended it, and a stream's
    handler can see its requests end (the client's cancel arrives as the end of the requests)
    before grpc has processed the cancel. Without the mark the public checks still run (a
    request iterator that raised, is_active, time_remaining); only that race then reports OK."""
    try:
        server = importlib.import_module("grpc._server")
    except ImportError:
        return None
    mark = getattr(server, "_CANCELLED", None)
    return mark if isinstance(mark, str) else None


_CLIENT_CANCELLED = _client_cancelled_mark()


def _ended_by_client(context: grpc.ServicerContext) -> bool:
    """Whether grpc recorded, when the call closed, that its client cancelled it (or its
    deadline did); False where this grpcio keeps no such record (_client_cancelled_mark)."""
    if _CLIENT_CANCELLED is None:
        return False
    state = getattr(context, "_state", None)
    return getattr(state, "client", None) == _CLIENT_CANCELLED


_OK = grpc.StatusCode.OK
# Status codes' names, looked up without the enum's name property.
CODE_NAMES = {code: code.name for code in grpc.StatusCode}


def _request_id(context: grpc.ServicerContext) -> str:
    """The call's request id, from x-request-id metadata or generated, returned to the client
    in the trailing metadata."""
    request_id = ""
    for key, value in context.invocation_metadata():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            request_id = value[:_MAX_REQUEST_ID]
    if not request_id:
        request_id = f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _with_request_id(status: grpc.Status, request_id: str) -> grpc.Status:
    """The status with the call's request id added to its trailing metadata."""
    metadata = (*status.trailing_metadata, (REQUEST_ID_KEY, request_id))
    return _Status(status.code, status.details, metadata)


class CallReporter:
    """Hands observed calls to the observers, in batches, on a thread of its own.

    Handlers count each call's start in `starts` and queue its end (a C-level put), so access
    lines and metrics cost neither the response path nor grpc's poller thread; the thread wakes
    every REPORT_INTERVAL_SECONDS rather than once per call. A batch is taken and reported under
    `lock`: each observer gets its events, in order, in one report() call (the access log writes
    all its lines at once). flush() reports what is queued at once, on the caller's thread: a
    scrape calls it first, so metrics count every call answered before the scrape.
    """

    def __init__(self, observers: Sequence[CallObserver] = ()) -> None:
        self.observers = tuple(observers)
        # Held while a batch is taken and reported; readers of an observer's state take it too.
        self.lock = threading.Lock()
        self.starts = StartCounts()
        self._queue: queue.SimpleQueue[CallEvent | UnaryRecord] = queue.SimpleQueue()
        # Queues a unary call's record: the queue's own put, no wrapper.
        self.put: Callable[[UnaryRecord], None] = self._queue.put
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="call_reporter", daemon=True)
        self._log = structlog.get_logger("foliod.rpc")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stops the thread and reports everything still queued."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()

    def finished(self, call: CallInfo, seconds: float) -> None:
        self._queue.put(CallEvent(call, seconds))

    def flush(self) -> None:
        """Reports every event queued so far."""
        get = self._queue.get_nowait
        with self.lock:
            while True:
                batch: list[CallEvent | UnaryRecord] = []
                try:
                    while len(batch) < _MAX_BATCH:
                        batch.append(get())
                except queue.Empty:
                    self._report(batch)
                    return
                self._report(batch)

    @staticmethod
    def _events(items: list[CallEvent | UnaryRecord]) -> list[CallEvent]:
        """The batch as CallEvents: unary records become CallInfos, their perf_counter end
        turned into wall-clock time by the two clocks' offset now."""
        offset = time.time() - time.perf_counter()
        events: list[CallEvent] = []
        for item in items:
            if isinstance(item, CallEvent):
                events.append(item)
                continue
            service, method, grpc_type = item.method_key
            call = CallInfo(
                service,
                method,
                grpc_type,
                item.request_id,
                item.peer,
                code=item.code if isinstance(item.code, grpc.StatusCode) else grpc.StatusCode.OK,
                ended_at=item.end + offset,
                messages_received=item.messages_received,
                messages_sent=item.messages_sent,
            )
            events.append(CallEvent(call, item.end - item.start))
        return events

    def _run(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_SECONDS):
            self.flush()

    def _report(self, items: list[CallEvent | UnaryRecord]) -> None:
        if not items:
            return
        calls = self._events(items)
        for observer in self.observers:
            try:
                observer.report(calls)
            except Exception:
                self._log.exception("call observer failed", calls=len(calls))


class ObservingInterceptor(grpc.ServerInterceptor):
    """Maps errors to statuses and reports every call's start and end to a CallReporter.

    One wrapper does both, as one layer costs each call less than two. The call's request id
    (from x-request-id metadata, or generated: unique per process) is returned to the client in
    the trailing metadata, errors included. A unary-response handler's FoliodError becomes its
    rich status (rpc.status); any other exception becomes INTERNAL, logged with the request id.
    Streaming handlers map their own errors (Submit answers per operation); a domain error one
    raises anyway ends its call as it would a unary call.

    A request message that cannot be decoded reaches no handler: the call ends with
    INVALID_ARGUMENT (on a request stream, when the handler reads that message), and is logged
    and counted like any other. A unary call whose deadline has passed by the time its handler
    would start ends with DEADLINE_EXCEEDED and runs nothing: a client that retries after a
    deadline then cannot apply a mutation twice.

    A unary call is reported when its handler returns, with the code it ended with; a streaming
    call once it is over, from grpc's completion callback, so a cancelled stream is reported as
    CANCELLED. The duration is the handler's. Streaming handlers, and unary ones fed by a
    request stream, run inside `blocking()`, as they wait on their client.
    """

    def __init__(
        self,
        reporter: CallReporter,
        *,
        blocking: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        self._reporter = reporter
        # Streaming handlers run inside blocking(): they hold their thread while the client
        # keeps the stream open (WorkerPool.blocking hands the thread's place to another).
        self._blocking = blocking
        self._log = structlog.get_logger("foliod.rpc")
        # Each method's handler is wrapped once; the wrapper serves every later call.
        self._wrapped: dict[str, Handler | None] = {}

    def intercept_service(
        self, continuation: Callable[[HandlerCallDetails], Any], details: HandlerCallDetails
    ) -> Handler | None:
        method: str = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler: Handler | None = continuation(details)
        wrapped = None if handler is None else self._wrap(method, handler)
        if len(self._wrapped) < _MAX_CACHED_METHODS:
            self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        _, _, rest = full_method.partition("/")
        service, _, method = rest.partition("/")
        grpc_type = _grpc_type(handler)
        method_key = (service, method, grpc_type)
        inner = _behavior(handler)
        started, finished = self._reporter.starts.add, self._reporter.finished
        put, record = self._reporter.put, UnaryRecord
        perf_counter = time.perf_counter
        log = self._log
        blocking = self._blocking
        request_streaming = handler.request_streaming

        def begin(context: grpc.ServicerContext) -> CallInfo:
            request_id = _request_id(context)
            started(method_key)
            return CallInfo(service, method, grpc_type, request_id, context.peer())

        def end(
            call: CallInfo,
            context: grpc.ServicerContext,
            seconds: float,
            cut_short: grpc.StatusCode | None,
        ) -> None:
            """Reports the call with the code it ended with: the status set on it, else
            cut_short for a handler that did not finish, else OK."""
            call.ended_at = time.time()
            call.code = context_code(context) or cut_short or grpc.StatusCode.OK
            finished(call, seconds)

        def count_requests(call: CallInfo, requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                call.messages_received += 1
                if type(request) is Undecodable:
                    raise _undecodable(request, f" {call.messages_received} of the stream")
                yield request

        def abort(request_id: str, context: grpc.ServicerContext, exc: Exception) -> None:
            """Ends the call with the status for exc (abort_with_status raises)."""
            if isinstance(exc, FoliodError):
                status = to_status(exc)
            else:
                log.exception("unhandled error", method=method, request_id=request_id)
                status = internal_status("internal error (see the server log)")
            context.abort_with_status(_with_request_id(status, request_id))

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            """The common case, kept lean: a few microseconds a call are a few per cent of a
            small RPC's server time. Queues a UnaryRecord, not a CallInfo."""
            request_id = _request_id(context)
            peer = context.peer()
            started(method_key)
            start = perf_counter()
            try:
                if type(request) is Undecodable:
                    raise _undecodable(request)
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the deadline passed before the call started; nothing was done",
                    )
                response = inner(request, context)
            except BaseException as exc:
                try:
                    if isinstance(exc, Exception) and context.code() is None:  # type: ignore[attr-defined]
                        abort(request_id, context, exc)
                    raise
                finally:
                    code = context_code(context) or _cut_short_code(context)
                    put(record(method_key, request_id, peer, code, start, perf_counter(), 1, 0))
            code = context.code()  # type: ignore[attr-defined]
            sent = 1 if code is None or code is _OK else 0
            put(record(method_key, request_id, peer, code, start, perf_counter(), 1, sent))
            return response

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            call = begin(context)
            start = time.perf_counter()
            failed = True
            try:
                with blocking():  # a request stream waits on its client
                    response = inner(count_requests(call, requests), context)
                failed = False
                code = context.code()  # type: ignore[attr-defined]
                if code is None or code is grpc.StatusCode.OK:
                    call.messages_sent = 1
                return response
            except Exception as exc:
                if context_code(context) is not None:  # already aborted by the servicer
                    raise
                # grpc's request iterator raises RpcError once the client ended the call.
                ended = isinstance(exc, grpc.RpcError) or not context.is_active()
                if ended or _ended_by_client(context):
                    raise  # the client ended the call: its requests fail, nothing to answer
                abort(call.request_id, context, exc)
            finally:
                end(
                    call,
                    context,
                    time.perf_counter() - start,
                    _cut_short_code(context) if failed else None,
                )

        def streaming_response(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = begin(context)
            if request_streaming:
                request = count_requests(call, request)
            else:
                call.messages_received = 1
            start = time.perf_counter()
            failed = True
            try:
                with blocking():
                    if type(request) is Undecodable:
                        raise _undecodable(request)
                    for response in inner(request, context):
                        call.messages_sent += 1
                        yield response
                failed = False
            except FoliodError as exc:
                if context_code(context) is not None:  # already aborted by the servicer
                    raise
                abort(call.request_id, context, exc)
            finally:
                seconds = time.perf_counter() - start
                # Asked now: once the stream is over no call is active. A stream the client
                # cancelled can also end with the handler done (its requests simply stop).
                cut_short = _cut_short_code(context) if failed or not context.is_active() else None

                def report() -> None:
                    ended = cut_short
                    if ended is None and _ended_by_client(context):
                        ended = _cut_short_code(context)  # the call is over: not UNKNOWN
                    end(call, context, seconds, ended)

                # Once the stream is over: a cancelled one has its code only then.
                if not context.add_callback(report):
                    report()

        if handler.response_streaming:
            return _rebuild(handler, streaming_response)
        return _rebuild(handler, stream_unary if request_streaming else unary_unary)


class AccessLog:
    """One access line per call: method, peer, code, duration, request id; never payloads.
    A batch's lines go out in one write."""

    def report(self, events: Sequence[CallEvent]) -> None:
        write_lines(
            render_access_lines(
                (
                    f"/{call.service}/{call.method}",
                    call.grpc_type,
                    call.peer,
                    CODE_NAMES[call.code],
                    round(seconds * 1000, 3),
                    call.request_id,
                    call.ended_at,
                )
                for call, seconds in events
            )
        )
