"""Server interceptors: error mapping, and observation of every call for logs and metrics.

Servicers stay free of cross-cutting work: they raise the core's errors, ErrorMapper turns them
into rich gRPC statuses, and ObservingInterceptor reports each call's start and end (method, peer,
request id, status code, duration, messages) to observers such as the access log and metrics.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import grpc
import structlog

from foliod.logs import log_access
from foliod.mm import FoliodError
from foliod.rpc.status import internal_status, to_status

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128
# Unknown methods get no handler; bound the cache so probing random names cannot grow it.
_MAX_CACHED_METHODS = 1024
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

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
    messages_received: int = 0
    messages_sent: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class CallObserver(Protocol):
    def started(self, call: CallInfo) -> None: ...

    def finished(self, call: CallInfo, seconds: float) -> None: ...


def _grpc_type(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _rebuild(handler: Handler, behavior: Behavior) -> Handler:
    """A handler like `handler` whose behavior is replaced."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: Handler) -> Behavior:
    behavior: Behavior | None = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    return behavior


class _CachingInterceptor(grpc.ServerInterceptor):
    """Wraps each method's handler once and reuses the wrapper for every later call."""

    def __init__(self) -> None:
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

    def _wrap(self, method: str, handler: Handler) -> Handler:
        raise NotImplementedError


class ErrorMapper(_CachingInterceptor):
    """Turns the core's errors into gRPC statuses; anything else becomes INTERNAL, logged."""

    def __init__(self) -> None:
        super().__init__()
        self._log = structlog.get_logger("foliod.rpc")

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.response_streaming:
            return handler
        inner = _behavior(handler)
        log = self._log

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except FoliodError as exc:
                context.abort_with_status(_with_request_id(to_status(exc)))
            except Exception:
                if context_code(context) is not None:  # already aborted by the servicer
                    raise
                log.exception("unhandled error", method=method, request_id=REQUEST_ID.get())
                status = internal_status("internal error (see the server log)")
                context.abort_with_status(_with_request_id(status))

        return _rebuild(handler, behavior)


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _with_request_id(status: grpc.Status) -> grpc.Status:
    """The status with the call's request id added to its trailing metadata."""
    metadata = (*status.trailing_metadata, (REQUEST_ID_KEY, REQUEST_ID.get()))
    return _Status(status.code, status.details, metadata)


class ObservingInterceptor(_CachingInterceptor):
    """Reports every call to observers, with the status code it ended with.

    The call's request id (from x-request-id metadata, or generated) is set in REQUEST_ID for
    the duration of the call and returned to the client in the trailing metadata. Observers
    hear of the end from a call-completion callback, once the status has been sent, so logging
    and metrics stay off the path of the response (the duration is the handler's).
    """

    def __init__(self, observers: Sequence[CallObserver]) -> None:
        super().__init__()
        self._observers = tuple(observers)

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        _, _, rest = full_method.partition("/")
        service, _, method = rest.partition("/")
        grpc_type = _grpc_type(handler)
        inner = _behavior(handler)
        observers = self._observers

        def begin(context: grpc.ServicerContext) -> CallInfo:
            request_id = ""
            for key, value in context.invocation_metadata():
                if key == REQUEST_ID_KEY and isinstance(value, str):
                    request_id = value[:_MAX_REQUEST_ID]
            call = CallInfo(service, method, grpc_type, request_id or os.urandom(16).hex())
            call.peer = context.peer()
            REQUEST_ID.set(call.request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
            for observer in observers:
                observer.started(call)
            return call

        def end(call: CallInfo, context: grpc.ServicerContext, start: float, failed: bool) -> None:
            seconds = time.perf_counter() - start

            def report() -> None:
                code = context_code(context)
                if code is not None:
                    call.code = code
                elif failed:
                    call.code = grpc.StatusCode.UNKNOWN
                for observer in observers:
                    observer.finished(call, seconds)

            # Report once the call is over, off the path of its response.
            if not context.add_callback(report):
                report()

        def count_requests(call: CallInfo, requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                call.messages_received += 1
                yield request

        def counted(call: CallInfo, request: Any) -> Any:
            """The request, or the request stream counted as the handler consumes it."""
            if handler.request_streaming:
                return count_requests(call, request)
            call.messages_received = 1
            return request

        def unary_response(request: Any, context: grpc.ServicerContext) -> Any:
            call = begin(context)
            start = time.perf_counter()
            failed = True
            try:
                response = inner(counted(call, request), context)
                failed = False
                if context_code(context) in (None, grpc.StatusCode.OK):
                    call.messages_sent = 1
                return response
            finally:
                end(call, context, start, failed)

        def streaming_response(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = begin(context)
            start = time.perf_counter()
            failed = True
            try:
                for response in inner(counted(call, request), context):
                    call.messages_sent += 1
                    yield response
                failed = False
            finally:
                end(call, context, start, failed)

        return _rebuild(
            handler, streaming_response if handler.response_streaming else unary_response
        )


class AccessLog:
    """One access line per call: method, peer, code, duration, request id; never payloads."""

    def started(self, call: CallInfo) -> None:
        pass

    def finished(self, call: CallInfo, seconds: float) -> None:
        log_access(
            f"/{call.service}/{call.method}",
            grpc_type=call.grpc_type,
            peer=call.peer,
            code=call.code.name,
            duration_ms=round(seconds * 1000, 3),
            request_id=call.request_id,
        )
