"""The reasons of foliod's errors, as google.rpc.ErrorInfo carries them, and each one's code.

The server's core raises an error class per reason (foliod.mm.errors), the rpc layer sends the
reason in ErrorInfo (domain ERROR_DOMAIN) with the code below, and the client raises its class
for the reason (foliodclient.errors).
"""

from __future__ import annotations

import enum

ERROR_DOMAIN = "foliod"


class Reason(enum.StrEnum):
    """The stable reason string of each domain error."""

    FOLIOD_ERROR = "FOLIOD_ERROR"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNKNOWN_MACHINE = "UNKNOWN_MACHINE"
    UNKNOWN_OWNER = "UNKNOWN_OWNER"
    UNKNOWN_FOLIO = "UNKNOWN_FOLIO"
    UNKNOWN_FILE = "UNKNOWN_FILE"
    UNKNOWN_FILE_HANDLE = "UNKNOWN_FILE_HANDLE"
    UNKNOWN_GUEST = "UNKNOWN_GUEST"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    FOLIO_ALREADY_FREED = "FOLIO_ALREADY_FREED"
    FILE_HANDLE_CLOSED = "FILE_HANDLE_CLOSED"
    GUEST_NESTING = "GUEST_NESTING"
    UNSAFE_STORE_PATH = "UNSAFE_STORE_PATH"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    WRITEBACK_FAILED = "WRITEBACK_FAILED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    ADDRESS_SPACE_EXHAUSTED = "ADDRESS_SPACE_EXHAUSTED"
    TENANT_LIMIT = "TENANT_LIMIT"


# The name of the grpc.StatusCode each reason is sent with.
STATUS_CODE_NAMES: dict[Reason, str] = {
    Reason.FOLIOD_ERROR: "INTERNAL",
    Reason.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    Reason.NOT_FOUND: "NOT_FOUND",
    Reason.UNKNOWN_MACHINE: "NOT_FOUND",
    Reason.UNKNOWN_OWNER: "NOT_FOUND",
    Reason.UNKNOWN_FOLIO: "NOT_FOUND",
    Reason.UNKNOWN_FILE: "NOT_FOUND",
    Reason.UNKNOWN_FILE_HANDLE: "NOT_FOUND",
    Reason.UNKNOWN_GUEST: "NOT_FOUND",
    Reason.ALREADY_EXISTS: "ALREADY_EXISTS",
    Reason.FAILED_PRECONDITION: "FAILED_PRECONDITION",
    Reason.FOLIO_ALREADY_FREED: "FAILED_PRECONDITION",
    Reason.FILE_HANDLE_CLOSED: "FAILED_PRECONDITION",
    Reason.GUEST_NESTING: "FAILED_PRECONDITION",
    Reason.UNSAFE_STORE_PATH: "FAILED_PRECONDITION",
    Reason.OUT_OF_RANGE: "OUT_OF_RANGE",
    Reason.WRITEBACK_FAILED: "DATA_LOSS",
    Reason.OUT_OF_MEMORY: "RESOURCE_EXHAUSTED",
    Reason.ADDRESS_SPACE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    Reason.TENANT_LIMIT: "RESOURCE_EXHAUSTED",
}
