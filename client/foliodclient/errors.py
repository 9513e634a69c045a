"""The errors a failed call raises, keyed by the google.rpc.ErrorInfo reason the server sends.

The client's own tree: one class per foliod.api.Reason, named and nested as the server's core
names its errors, so ``except foliodclient.NotFound`` catches a remote UnknownFile:

    CallError                      a failed call: code, message, reason, field, metadata, details
    ├── InvalidArgument            INVALID_ARGUMENT
    ├── NotFound                   NOT_FOUND
    │   ├── UnknownMachine
    │   ├── UnknownOwner
    │   ├── UnknownFolio
    │   ├── UnknownFile
    │   ├── UnknownFileHandle
    │   └── UnknownGuest
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION
    │   ├── FolioAlreadyFreed
    │   ├── FileHandleClosed
    │   ├── GuestNesting
    │   └── UnsafeStorePath
    ├── OutOfRange                 OUT_OF_RANGE
    ├── WritebackFailed            DATA_LOSS
    ├── OutOfMemory                RESOURCE_EXHAUSTED
    │   ├── AddressSpaceExhausted
    │   └── TenantLimit            a tenant's memory.max, files or open handles
    └── RemoteError                no foliod domain error in the status
        ├── Unavailable            UNAVAILABLE: no server, or it is shutting down
        ├── DeadlineExceeded       DEADLINE_EXCEEDED: the call's deadline passed
        ├── Unauthenticated        UNAUTHENTICATED
        └── PermissionDenied       PERMISSION_DENIED

The class comes from the ErrorInfo reason the server attached (domain foliod.api.ERROR_DOMAIN);
a reason this client does not know (a newer server) takes the most general class of its code,
and a status without foliod details the RemoteError class of its code. The code's name is also
kept in ``metadata["grpc_code"]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from foliod.api import ERROR_DOMAIN, STATUS_CODE_NAMES, Reason

# google.rpc detail types the client unpacks, by type name; any other stays a packed Any.
_DETAIL_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.ResourceInfo,
    )
}


class CallError(Exception):
    """A call failed: its status code, message and google.rpc details, and the request field
    at fault (empty when no single field is)."""

    reason: str = Reason.FOLIOD_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        details: Sequence[Message] = (),
        field: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})
        self.code = code
        self.details = tuple(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(CallError):
    """A request value is malformed or outside the values the field accepts."""

    reason = Reason.INVALID_ARGUMENT


class NotFound(CallError):
    """A named object (machine, owner, folio, file, handle, guest) does not exist."""

    reason = Reason.NOT_FOUND


class UnknownMachine(NotFound):
    """No machine has the requested name."""

    reason = Reason.UNKNOWN_MACHINE


class UnknownOwner(NotFound):
    """No owner (address space) has the requested name on the machine."""

    reason = Reason.UNKNOWN_OWNER


class UnknownFolio(NotFound):
    """No folio was ever allocated with the requested handle on the machine."""

    reason = Reason.UNKNOWN_FOLIO


class UnknownFile(NotFound):
    """No file has the requested name on the machine."""

    reason = Reason.UNKNOWN_FILE


class UnknownFileHandle(NotFound):
    """No file handle with that number was ever opened on the machine."""

    reason = Reason.UNKNOWN_FILE_HANDLE


class UnknownGuest(NotFound):
    """No guest has the requested name."""

    reason = Reason.UNKNOWN_GUEST


class AlreadyExists(CallError):
    """The object to create exists already."""

    reason = Reason.ALREADY_EXISTS


class FailedPrecondition(CallError):
    """The request is well formed but the machine's state does not allow it."""

    reason = Reason.FAILED_PRECONDITION


class FolioAlreadyFreed(FailedPrecondition):
    """The handle named a folio that has been freed (a double free)."""

    reason = Reason.FOLIO_ALREADY_FREED


class FileHandleClosed(FailedPrecondition):
    """The file handle was closed, or its file deleted."""

    reason = Reason.FILE_HANDLE_CLOSED


class GuestNesting(FailedPrecondition):
    """A guest was asked to host a guest; guests nest one level only."""

    reason = Reason.GUEST_NESTING


class UnsafeStorePath(FailedPrecondition):
    """A directory on a file's path in the server's store is a symbolic link or not a
    directory; the server follows no link out of its store."""

    reason = Reason.UNSAFE_STORE_PATH


class OutOfRange(CallError):
    """An offset or length reaches past the end of the object it addresses."""

    reason = Reason.OUT_OF_RANGE


class WritebackFailed(CallError):
    """fsync found a writeback error recorded since the handle last checked (errseq)."""

    reason = Reason.WRITEBACK_FAILED


class OutOfMemory(CallError):
    """The allocator cannot serve the request, even after reclaim."""

    reason = Reason.OUT_OF_MEMORY


class AddressSpaceExhausted(OutOfMemory):
    """An owner's virtual address space has no room for the mapping."""

    reason = Reason.ADDRESS_SPACE_EXHAUSTED


class TenantLimit(OutOfMemory):
    """The caller's tenant is at its memory.max (after reclaiming its own page cache), or holds
    as many files or open handles as it may."""

    reason = Reason.TENANT_LIMIT


class RemoteError(CallError):
    """A call failed without a foliod domain error (transport, deadline, server down)."""

    reason = "REMOTE_ERROR"


class Unavailable(RemoteError):
    """The server cannot be reached or is shutting down; reads are retried before this."""


class DeadlineExceeded(RemoteError):
    """The call's deadline passed before the server answered."""


class Unauthenticated(RemoteError):
    """The server did not accept the call's credentials."""


class PermissionDenied(RemoteError):
    """The credentials are valid but do not allow the call."""


_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def _subclasses(cls: type[CallError]) -> Iterator[type[CallError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


_BY_REASON: dict[str, type[CallError]] = {
    cls.reason: cls for cls in _subclasses(CallError) if not issubclass(cls, RemoteError)
}

# A foliod error whose reason this client does not know (a newer server) maps by its code, to
# the most general class sent with it (parents come before their subclasses here).
_BY_DOMAIN_CODE: dict[grpc.StatusCode, type[CallError]] = {}
for _cls in _BY_REASON.values():
    _BY_DOMAIN_CODE.setdefault(grpc.StatusCode[STATUS_CODE_NAMES[Reason(_cls.reason)]], _cls)


def _unpack(status_details: Sequence[any_pb2.Any]) -> list[Message]:
    unpacked: list[Message] = []
    for packed in status_details:
        detail_type = _DETAIL_TYPES.get(packed.TypeName())
        if detail_type is None:
            unpacked.append(packed)
            continue
        detail = detail_type()
        packed.Unpack(detail)
        unpacked.append(detail)
    return unpacked


def error_from_rpc(exc: grpc.RpcError) -> CallError:
    """The domain error a failed call carries; use as ``raise error_from_rpc(exc) from exc``."""
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name
    status = rpc_status.from_call(exc)
    details = _unpack(status.details if status is not None else ())
    cls: type[CallError] = _BY_CODE.get(code, RemoteError)
    field = ""
    metadata: dict[str, str] = {}
    for detail in details:
        if isinstance(detail, error_details_pb2.ErrorInfo) and detail.domain == ERROR_DOMAIN:
            cls = _BY_REASON.get(detail.reason) or _BY_DOMAIN_CODE.get(code, CallError)
            metadata = dict(detail.metadata)
        elif isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
            field = detail.field_violations[0].field
    metadata["grpc_code"] = code.name
    return cls(message, code=code, details=details, field=field, metadata=metadata)
