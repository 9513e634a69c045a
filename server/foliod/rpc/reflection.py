"""Server reflection under both of its names: grpc.reflection.v1 and grpc.reflection.v1alpha.

grpcio-reflection (1.85) implements v1alpha only (grpc/grpc#38576); newer tools ask for v1.
The two are one protocol: grpc/reflection/v1/reflection.proto declares the same messages with
the same field numbers under the package grpc.reflection.v1, so the bytes of a v1 call are the
bytes of a v1alpha call. v1 is served by grpcio-reflection's v1alpha servicer through v1alpha's
message classes, and v1's file descriptor (v1alpha's, renamed) joins the descriptor pool, so a
client can ask reflection to describe either service.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def _v1_file_descriptor() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto in the default pool: v1alpha's descriptor with its
    package renamed, added unless a file of that name is there already."""
    pool = descriptor_pool.Default()
    try:
        found: FileDescriptor = pool.FindFileByName(V1_FILE)
        return found
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    added: FileDescriptor = pool.AddSerializedFile(proto.SerializeToString())
    return added


# Added once, at import, as generated _pb2 modules add theirs.
V1_DESCRIPTOR = _v1_file_descriptor()


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Registers reflection on `server` under v1 and v1alpha; `service_names` are the
    application's services, listed by both beside the two reflection services."""
    servicer = reflection.ReflectionServicer((*service_names, *SERVICE_NAMES))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in SERVICE_NAMES:
        handlers = {"ServerReflectionInfo": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
