"""The domain error tree of foliod's core; the rpc layer alone maps it to gRPC status codes.

    FoliodError                    anything the core refuses to do
    ├── InvalidArgument            a request value is malformed or out of its domain
    ├── NotFound                   a named object does not exist
    │   ├── UnknownMachine
    │   ├── UnknownOwner
    │   ├── UnknownFolio
    │   ├── UnknownFile
    │   ├── UnknownFileHandle
    │   └── UnknownGuest
    ├── AlreadyExists              the object to create exists already
    ├── FailedPrecondition         the request is well formed but the state forbids it
    │   ├── FolioAlreadyFreed
    │   ├── FileHandleClosed
    │   ├── GuestNesting           guests nest one level: a guest cannot host one
    │   └── UnsafeStorePath        a backing file's path holds a symbolic link or a non-directory
    ├── OutOfRange                 an offset or length passes the end of an object
    ├── WritebackFailed            fsync found a writeback error since the handle's last look
    └── OutOfMemory                the allocator cannot serve the request
        ├── AddressSpaceExhausted  an owner's 128 TiB of virtual addresses are used up
        └── TenantLimit            a tenant's memory.max (or file or handle limit) is reached

Every error names the request field at fault (``field``, empty when no single field is) and has
a stable ``reason`` (foliod.api.Reason) that travels to clients in google.rpc.ErrorInfo.
"""

from __future__ import annotations

from collections.abc import Mapping

from foliod.api import Reason


class FoliodError(Exception):
    """Base of every error the core raises on purpose."""

    reason = Reason.FOLIOD_ERROR

    def __init__(self, message: str, *, field: str = "", metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(FoliodError):
    """A request value is malformed or outside the values the field accepts."""

    reason = Reason.INVALID_ARGUMENT


class NotFound(FoliodError):
    """A named object (machine, owner, folio) does not exist."""

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


class FailedPrecondition(FoliodError):
    """The request is well formed but the machine's state does not allow it."""

    reason = Reason.FAILED_PRECONDITION


class FolioAlreadyFreed(FailedPrecondition):
    """The handle named a folio that has been freed (a double free)."""

    reason = Reason.FOLIO_ALREADY_FREED


class OutOfRange(FoliodError):
    """An offset or length reaches past the end of the object it addresses."""

    reason = Reason.OUT_OF_RANGE


class OutOfMemory(FoliodError):
    """The buddy allocator has no block of the requested order above the min watermark."""

    reason = Reason.OUT_OF_MEMORY


class HostCannotBack(OutOfMemory):
    """A guest's host has no memory to back more of the guest's frames (the guest itself may
    have free frames); metadata names the host."""

    reason = Reason.OUT_OF_MEMORY


class AddressSpaceExhausted(OutOfMemory):
    """An owner's virtual address space has no room for the mapping (mmap's ENOMEM)."""

    reason = Reason.ADDRESS_SPACE_EXHAUSTED


class TenantLimit(OutOfMemory):
    """A tenant's memory cgroup cannot take the charge even after reclaiming its own page cache
    (memory.max), or the tenant holds as many files or open handles as it may."""

    reason = Reason.TENANT_LIMIT


class UnknownFile(NotFound):
    """No file has the requested name on the machine."""

    reason = Reason.UNKNOWN_FILE


class UnknownGuest(NotFound):
    """No guest has the requested name."""

    reason = Reason.UNKNOWN_GUEST


class GuestNesting(FailedPrecondition):
    """A guest was asked to host a guest; foliod nests one level only."""

    reason = Reason.GUEST_NESTING


class UnknownFileHandle(NotFound):
    """No file handle with that number was ever opened on the machine."""

    reason = Reason.UNKNOWN_FILE_HANDLE


class AlreadyExists(FoliodError):
    """The object to create exists already."""

    reason = Reason.ALREADY_EXISTS


class FileHandleClosed(FailedPrecondition):
    """The file handle was closed, or its file deleted."""

    reason = Reason.FILE_HANDLE_CLOSED


class UnsafeStorePath(FailedPrecondition):
    """A component of a backing file's path inside the store is a symbolic link, or not a
    directory where one should be (replaced after foliod made it): foliod follows no link, so
    nothing outside the store is touched."""

    reason = Reason.UNSAFE_STORE_PATH


class WritebackFailed(FoliodError):
    """fsync found a writeback error recorded since the handle last checked (errseq)."""

    reason = Reason.WRITEBACK_FAILED
