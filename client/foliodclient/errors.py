"""Maps a failed call's status back to the core's error tree (foliod.mm.errors).

The class comes from the ErrorInfo reason the server attached; a status without foliod details
(a transport error, DEADLINE_EXCEEDED, UNAVAILABLE) becomes RemoteError. The status code's name
is kept in ``metadata["grpc_code"]``.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from foliod.mm import errors


class RemoteError(errors.FoliodError):
    """A call failed without a foliod domain error (transport, deadline, server down)."""

    reason = "REMOTE_ERROR"


def _error_classes() -> dict[str, type[errors.FoliodError]]:
    found: dict[str, type[errors.FoliodError]] = {}
    pending: list[type[errors.FoliodError]] = [errors.FoliodError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.reason, cls)
        pending.extend(cls.__subclasses__())
    return found


_BY_REASON = _error_classes()


def error_from_rpc(exc: grpc.RpcError) -> errors.FoliodError:
    """The domain error a failed call carries; use as ``raise error_from_rpc(exc) from exc``."""
    code: grpc.StatusCode = exc.code()
    message: str = exc.details() or code.name
    status = rpc_status.from_call(exc)
    cls: type[errors.FoliodError] = RemoteError
    field = ""
    metadata: dict[str, str] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            cls = _BY_REASON.get(info.reason, RemoteError)
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            if request.field_violations:
                field = request.field_violations[0].field
    metadata["grpc_code"] = code.name
    return cls(message, field=field, metadata=metadata)
