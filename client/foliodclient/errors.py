"""Maps a failed call's status back to the core's error tree (foliod.mm.errors).

Every class here is also the core class of the same name, so ``except foliod.mm.NotFound`` and
``except foliodclient.NotFound`` both catch a remote UnknownFile:

    foliod.mm.FoliodError
    └── CallError                  a failed call: code, message, field, metadata, details
        ├── InvalidArgument        INVALID_ARGUMENT
        ├── NotFound               NOT_FOUND
        │   ├── UnknownMachine
        │   ├── UnknownOwner
        │   ├── UnknownFolio
        │   ├── UnknownFile
        │   ├── UnknownFileHandle
        │   └── UnknownGuest
        ├── AlreadyExists          ALREADY_EXISTS
        ├── FailedPrecondition     FAILED_PRECONDITION
        │   ├── FolioAlreadyFreed
        │   ├── FileHandleClosed
        │   ├── GuestNesting
        │   └── UnsafeStorePath
        ├── OutOfRange             OUT_OF_RANGE
        ├── WritebackFailed        DATA_LOSS
        ├── OutOfMemory            RESOURCE_EXHAUSTED
        │   ├── AddressSpaceExhausted
        │   └── TenantLimit        a tenant's memory.max, files or open handles
        └── RemoteError            no foliod domain error in the status
            ├── Unavailable        UNAVAILABLE: no server, or it is shutting down
            ├── DeadlineExceeded   DEADLINE_EXCEEDED: the call's deadline passed
            ├── Unauthenticated    UNAUTHENTICATED
            └── PermissionDenied   PERMISSION_DENIED

The domain class comes from the ErrorInfo reason the server attached; a status without foliod
details takes the RemoteError class of its code. The code's name is also kept in
``metadata["grpc_code"]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from foliod.mm import errors
from foliod.rpc.status import ERROR_DOMAIN, STATUS_CODES

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


class CallError(errors.FoliodError):
    """A call failed: its status code, message and google.rpc details."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        details: Sequence[Message] = (),
        field: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, field=field, metadata=metadata)
        self.code = code
        self.details = tuple(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(CallError, errors.InvalidArgument):
    """A request value is malformed or outside the values the field accepts."""


class NotFound(CallError, errors.NotFound):
    """A named object (machine, owner, folio, file, handle, guest) does not exist."""


class UnknownMachine(NotFound, errors.UnknownMachine):
    """No machine has the requested name."""


class UnknownOwner(NotFound, errors.UnknownOwner):
    """No owner (address space) has the requested name on the machine."""


class UnknownFolio(NotFound, errors.UnknownFolio):
    """No folio was ever allocated with the requested handle on the machine."""


class UnknownFile(NotFound, errors.UnknownFile):
    """No file has the requested name on the machine."""


class UnknownFileHandle(NotFound, errors.UnknownFileHandle):
    """No file handle with that number was ever opened on the machine."""


class UnknownGuest(NotFound, errors.UnknownGuest):
    """No guest has the requested name."""


class AlreadyExists(CallError, errors.AlreadyExists):
    """The object to create exists already."""


class FailedPrecondition(CallError, errors.FailedPrecondition):
    """The request is well formed but the machine's state does not allow it."""


class FolioAlreadyFreed(FailedPrecondition, errors.FolioAlreadyFreed):
    """The handle named a folio that has been freed (a double free)."""


class FileHandleClosed(FailedPrecondition, errors.FileHandleClosed):
    """The file handle was closed, or its file deleted."""


class GuestNesting(FailedPrecondition, errors.GuestNesting):
    """A guest was asked to host a guest; guests nest one level only."""


class UnsafeStorePath(FailedPrecondition, errors.UnsafeStorePath):
    """A directory on a file's path in the server's store is a symbolic link or not a
    directory; the server follows no link out of its store."""


class OutOfRange(CallError, errors.OutOfRange):
    """An offset or length reaches past the end of the object it addresses."""


class WritebackFailed(CallError, errors.WritebackFailed):
    """fsync found a writeback error recorded since the handle last checked (errseq)."""


class OutOfMemory(CallError, errors.OutOfMemory):
    """The allocator cannot serve the request, even after reclaim."""


class AddressSpaceExhausted(OutOfMemory, errors.AddressSpaceExhausted):
    """An owner's virtual address space has no room for the mapping."""


class TenantLimit(OutOfMemory, errors.TenantLimit):
    """The caller's tenant is at its memory.max (after reclaiming its own page cache), or holds
    as many files or open handles as it may."""


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


# A foliod error whose reason this client does not know (a newer server) maps by its code.
_BY_DOMAIN_CODE: dict[grpc.StatusCode, type[CallError]] = {
    code: _BY_REASON[core.reason] for core, code in STATUS_CODES.items()
}


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
