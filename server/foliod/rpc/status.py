"""Maps the core's error tree to gRPC status codes with google.rpc details.

Every domain error carries google.rpc.ErrorInfo (domain "foliod", reason = the error class's
``reason``, metadata) and the code foliod.api gives its reason; errors that name a field also
carry google.rpc.BadRequest.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from foliod.api import ERROR_DOMAIN, STATUS_CODE_NAMES, Reason
from foliod.mm import errors

STATUS_CODES: dict[Reason, grpc.StatusCode] = {
    reason: grpc.StatusCode[name] for reason, name in STATUS_CODE_NAMES.items()
}

# Codes whose errors name the request field at fault in a google.rpc.BadRequest.
BAD_REQUEST_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


def status_code_of(exc: errors.FoliodError) -> grpc.StatusCode:
    return STATUS_CODES.get(exc.reason, grpc.StatusCode.INTERNAL)


def to_status(exc: errors.FoliodError) -> grpc.Status:
    """Builds the rich status (code, message, details) for a domain error."""
    code = status_code_of(exc)
    details = []
    info = error_details_pb2.ErrorInfo(
        reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata
    )
    details.append(_pack(info))
    if exc.field and code in BAD_REQUEST_CODES:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def internal_status(message: str) -> grpc.Status:
    result: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INTERNAL, message=message)
    )
    return result


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
