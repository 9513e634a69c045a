"""Exactly-once mutations: a unary mutation sent with an idempotency key runs once per
(principal, method, key); retries within the window get the first outcome replayed.

The client sends ``idempotency-key`` metadata (a random 128-bit value per logical call, reused
by its retries). IdempotencyInterceptor, registered inside ObservingInterceptor (so replays are
logged and counted like any call), keeps each keyed call's outcome in an OutcomeCache: the
serialized response, or the final status (code, message, trailing metadata with the google.rpc
status details) of a call that failed. A retry

- arriving while the first execution still runs waits for it (up to its own deadline), then
  gets its outcome;
- arriving within `window_seconds` of the first execution's end gets that outcome (the same
  response bytes, or the same status), with
  ``idempotency-replayed: true`` in the trailing metadata, and runs nothing;
- carrying the same key with a different request body is refused with INVALID_ARGUMENT.

Memory is bounded: at most `max_entries` finished outcomes are kept, the oldest dropped first;
calls still running are bounded by the server's threads. Calls without a key and reads are
not affected; Submit streams are deduplicated batch by batch (submit_once). The principal is
"" until authentication supplies one: pass `principal=` (a function of the call's context) to
IdempotencyInterceptor.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import structlog

from foliod.mm import FoliodError, InvalidArgument
from foliod.rpc.auth import VIEWS
from foliod.rpc.interceptors import REQUEST_ID_KEY
from foliod.rpc.status import internal_status, to_status

IDEMPOTENCY_KEY = "idempotency-key"
REPLAYED_KEY = "idempotency-replayed"
MAX_KEY_LENGTH = 128
DEFAULT_WINDOW_SECONDS = 600.0
DEFAULT_MAX_ENTRIES = 65_536
# How often a retry waiting for the first execution checks that its own client still waits.
_WAIT_SLICE_SECONDS = 0.1
_log = structlog.get_logger("foliod.rpc")

# The unary Foliod methods that change state: only these honour an idempotency key. Every
# unary method must be in exactly one of MUTATIONS and READS (a test checks the descriptor).
MUTATIONS = frozenset(
    {
        "Allocate",
        "Free",
        "ReleaseOwner",
        "WriteFolio",
        "SetThpPolicy",
        "CreateFile",
        "OpenFile",
        "CloseFile",
        "WriteFile",
        "TruncateFile",
        "DropFileRange",
        "DeleteFile",
        "Writeback",
        "Fsync",
        "Reclaim",
        "DropCaches",
        "SetFaults",
        "CreateGuest",
        "DestroyGuest",
        "SetBalloon",
        "ReportFreePages",
    }
)
# ReadFile changes only the cache (readahead, LRU): a read, as the client retries it.
READS = frozenset({*VIEWS, "ReadFile"})
FOLIOD_SERVICE = "foliod.v1.Foliod"

# (principal, method, key)
CacheKey: TypeAlias = tuple[str, str, str]
Behavior = Callable[[Any, grpc.ServicerContext], Any]
Principal = Callable[[grpc.ServicerContext], str]


def no_principal(context: grpc.ServicerContext) -> str:
    """The principal of every call while foliod has no authentication."""
    return ""


@dataclass(frozen=True, slots=True)
class FailedOutcome:
    """A first execution that ended with an error status."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _Outcome(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


# What a finished entry's `done` becomes: an Event costs over a kilobyte, and only the few
# retries that overlap a running call wait on one.
_DONE = threading.Event()
_DONE.set()


class Entry:
    """One keyed call: its request digest, and once it has run its outcome (the serialized
    response, or a FailedOutcome) and when that outcome expires."""

    __slots__ = ("digest", "done", "expires_at", "outcome")

    def __init__(self, digest: bytes) -> None:
        self.digest = digest
        self.done = threading.Event()
        self.outcome: bytes | FailedOutcome | None = None
        self.expires_at = float("inf")

    def finished(self) -> None:
        """Wakes the retries waiting for this entry (they read `done` anew on each wait)."""
        done, self.done = self.done, _DONE
        done.set()


class OutcomeCache:
    """The outcomes of keyed calls: at most `max_entries` finished ones, each kept
    `window_seconds` after its call ended (by `clock`), the oldest dropped first; plus the calls
    still running, which are never dropped (their number is bounded by the server's threads)."""

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._running: dict[CacheKey, Entry] = {}
        # Finished entries in the order they finished, so expiry and eviction pop the front.
        self._finished: OrderedDict[CacheKey, Entry] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._running) + len(self._finished)

    def claim(self, key: CacheKey, digest: bytes) -> tuple[Entry, bool]:
        """The entry for key, and whether the caller is to run the call (the first with this
        key in the window) and then finish() or abandon() it. Raises InvalidArgument if the
        key was used with another request."""
        with self._lock:
            self._expire()
            entry = self._running.get(key) or self._finished.get(key)
            if entry is None:
                entry = self._running[key] = Entry(digest)
                return entry, True
        if entry.digest != digest:
            raise InvalidArgument(
                f"idempotency key {key[2]!r} was used for a different {key[1]} request "
                "(a retry must send the same request)",
                metadata={"method": key[1]},
            )
        return entry, False

    def finish(self, key: CacheKey, entry: Entry, outcome: bytes | FailedOutcome) -> None:
        """Records the first execution's outcome and wakes the retries waiting for it."""
        entry.outcome = outcome
        with self._lock:
            self._running.pop(key, None)
            entry.expires_at = self.clock() + self.window_seconds
            self._finished[key] = entry
            self._finished.move_to_end(key)
            while len(self._finished) > self.max_entries:
                self._finished.popitem(last=False)
            self._expire()
        entry.finished()

    def abandon(self, key: CacheKey, entry: Entry) -> None:
        """Forgets a first execution that ended without an outcome to replay; a waiting retry
        then runs the call itself."""
        with self._lock:
            self._running.pop(key, None)
        entry.finished()

    def _expire(self) -> None:
        now = self.clock()
        finished = self._finished
        while finished:
            key = next(iter(finished))
            if finished[key].expires_at > now:
                break
            del finished[key]


def _idempotency_key(context: grpc.ServicerContext) -> str:
    key = ""
    for name, value in context.invocation_metadata():
        if name == IDEMPOTENCY_KEY and isinstance(value, str):
            key = value
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(
            f"the {IDEMPOTENCY_KEY} metadata has {len(key)} characters, more than {MAX_KEY_LENGTH}",
            metadata={"max_length": str(MAX_KEY_LENGTH)},
        )
    return key


def _digest(request: Any) -> bytes:
    return hashlib.blake2b(request.SerializeToString(deterministic=True), digest_size=16).digest()


def _failed_outcome(exc: BaseException, context: grpc.ServicerContext) -> FailedOutcome | None:
    """The status a failed first execution ends with, as ObservingInterceptor would send it
    (request id aside); None if it ended without one to replay (the thread was interrupted)."""
    code = context.code()  # type: ignore[attr-defined]
    if isinstance(code, grpc.StatusCode):  # the handler aborted the call itself
        details = context.details() or ""  # type: ignore[attr-defined]
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        metadata = tuple(m for m in context.trailing_metadata() or () if m[0] != REQUEST_ID_KEY)
        return FailedOutcome(code, details, metadata)
    if isinstance(exc, FoliodError):
        status = to_status(exc)
    elif isinstance(exc, Exception):
        status = internal_status("internal error (see the server log)")
    else:
        return None
    return FailedOutcome(status.code, status.details, tuple(status.trailing_metadata))


def _replay(method: str, entry: Entry, context: grpc.ServicerContext) -> Any:
    """Returns, or raises as the call's status, the first execution's outcome."""
    # The call's own trailing metadata so far (its request id), then the marker.
    own = (*(context.trailing_metadata() or ()), (REPLAYED_KEY, "true"))
    _log.info(
        "replay",
        method=method,
        request_id=next((v for k, v in own if k == REQUEST_ID_KEY), ""),
        failed=isinstance(entry.outcome, FailedOutcome),
    )
    outcome = entry.outcome
    if isinstance(outcome, FailedOutcome):
        context.abort_with_status(
            _Outcome(
                outcome.code,
                outcome.details,
                (*[m for m in outcome.trailing_metadata if m[0] != REPLAYED_KEY], *own),
            )
        )
    context.set_trailing_metadata(own)
    return outcome


def _wait(entry: Entry, context: grpc.ServicerContext) -> None:
    """Waits for the first execution while the retry's own client still waits."""
    while not entry.done.wait(_WAIT_SLICE_SECONDS):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the first call with this idempotency key was still running at the deadline",
            )
        if not context.is_active():
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")


def run_once(
    cache: OutcomeCache,
    method: str,
    principal: Principal,
    inner: Behavior,
    serialize: Callable[[Any], bytes],
) -> Behavior:
    """A unary behavior that runs `inner` once per (principal, method, key) in the window.
    It keeps a response as `serialize` makes it, and returns those bytes to a replay: its
    handler's serializer must pass bytes through."""

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        key = _idempotency_key(context)
        if not key:
            return inner(request, context)
        cache_key = (principal(context), method, key)
        digest = _digest(request)
        while True:
            entry, first = cache.claim(cache_key, digest)
            if first:
                break
            _wait(entry, context)
            if entry.outcome is not None:
                return _replay(method, entry, context)
            # The first execution was abandoned: run the call now, if no one else has.
        try:
            response = inner(request, context)
        except BaseException as exc:
            failed = _failed_outcome(exc, context)
            if failed is None:
                cache.abandon(cache_key, entry)
            else:
                cache.finish(cache_key, entry, failed)
            raise
        data = serialize(response)
        cache.finish(cache_key, entry, data)
        return data

    return behavior


class IdempotencyInterceptor(grpc.ServerInterceptor):
    """Wraps the unary mutations of foliod.v1.Foliod in run_once; other methods pass through.

    Register it after (inside) ObservingInterceptor, and inside an authentication interceptor
    that `principal` reads from, so a replay is logged and counted and only an authenticated
    caller reaches the cache."""

    def __init__(self, cache: OutcomeCache, *, principal: Principal = no_principal) -> None:
        self.cache = cache
        self.principal = principal
        self._wrapped: dict[str, Any] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        full_method: str = details.method
        handler = continuation(details)
        _, _, rest = full_method.partition("/")
        service, _, method = rest.partition("/")
        if (
            handler is None
            or service != FOLIOD_SERVICE
            or method not in MUTATIONS
            or handler.request_streaming
            or handler.response_streaming
        ):
            return handler
        wrapped = self._wrapped.get(full_method)
        if wrapped is None:
            serialize: Callable[[Any], bytes] = handler.response_serializer or bytes

            def serialize_once(response: Any) -> bytes:
                # A replay returns the bytes the first execution's reply became.
                return response if type(response) is bytes else serialize(response)

            wrapped = self._wrapped[full_method] = grpc.unary_unary_rpc_method_handler(
                run_once(self.cache, method, self.principal, handler.unary_unary, serialize),
                request_deserializer=handler.request_deserializer,
                response_serializer=serialize_once,
            )
        return wrapped


def submit_once(
    cache: OutcomeCache,
    context: grpc.ServicerContext,
    batches: Iterator[Any],
    run: Callable[[Any], Any],
    *,
    principal: str,
    parse: Callable[[bytes], Any],
) -> Iterator[Any]:
    """Submit's batches under the stream's idempotency key: each batch runs once per
    (principal, key, batch id) within the window. A stream opened again with the same key (a
    retry after a broken connection) gets the recorded completion of every batch that already
    ran, bytes for bytes, and runs the others; a batch id reused with a different batch is
    refused with INVALID_ARGUMENT. Without a key every batch runs."""
    key = _idempotency_key(context)
    for request in batches:
        if not key:
            yield run(request)
            continue
        cache_key = (principal, "Submit", f"{key}#{request.id}")
        digest = _digest(request)
        while True:
            entry, first = cache.claim(cache_key, digest)
            if first:
                try:
                    response = run(request)
                except BaseException:
                    cache.abandon(cache_key, entry)
                    raise
                cache.finish(cache_key, entry, response.SerializeToString())
                yield response
                break
            _wait(entry, context)
            if isinstance(entry.outcome, bytes):
                _log.info("replay", method="Submit", batch_id=request.id, failed=False)
                yield parse(entry.outcome)
                break
            # The first run ended without an outcome (its thread was interrupted): run it.
