"""Every call of every service, each of its fields set to something bad: never INTERNAL.

For each unary and server-streaming method of the router, state, guardrail and executor
pool services (the client-streaming ones, PutBlob and Connect, have tests of their own),
one request per bad value of one field, down to the fields of the fields of its message
fields (a Timestamp's seconds, a payload's encoding): strings that no id can hold (subject
wildcards, dots, spaces, a path, a NUL, 600 characters), integers at -1, 2^31-1, 0 and
±2^62, enums out of range, bytes that decode as nothing. Whatever the answer — OK, NOT_FOUND,
INVALID_ARGUMENT, FAILED_PRECONDITION — it must be a status the caller can act on, not
INTERNAL or UNKNOWN, and nothing may be logged as an unexpected error.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from tests.support.mesh import MeshFactory
from tickmesh.sdk import GraphBuilder
from tickmesh.v1 import (
    executor_pool_service_pb2,
    guardrail_service_pb2,
    router_service_pb2,
    state_service_pb2,
)

BAD_STRINGS = ("a.b.*", "x.>", "", "a b", "../x", "\x00", "é" * 300)
BAD_INTS: dict[int, tuple[int, ...]] = {
    FieldDescriptor.CPPTYPE_INT32: (-1, 0, 2**31 - 1, -(2**31)),
    FieldDescriptor.CPPTYPE_INT64: (-1, 0, 2**31 - 1, 2**62, -(2**62), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**63, 2**64 - 1),
}
UNARY_DEADLINE_S = 10.0
STREAM_DEADLINE_S = 1.0
"""A watch asked for what has not happened yet waits for it: past this, still waiting."""
ACTIONABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,  # a blob URI outside the tenant's prefix
}


def bad_values(field: FieldDescriptor) -> tuple[Any, ...]:
    if field.is_repeated:
        if field.type == FieldDescriptor.TYPE_STRING:
            return (["a.>", ""],)
        if field.type == FieldDescriptor.TYPE_ENUM:
            return ([9999],)
        return ()
    if field.type == FieldDescriptor.TYPE_STRING:
        return BAD_STRINGS
    if field.cpp_type in BAD_INTS:
        return BAD_INTS[field.cpp_type]
    if field.type == FieldDescriptor.TYPE_ENUM:
        return (9999, -5)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return (b"\xff\x00not a message",)
    return ()


def field_paths(descriptor: Descriptor, depth: int = 2) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every field, and the fields of each (single) message field, ``depth`` levels down:
    a Timestamp's seconds, a Payload's encoding, a header's ids."""
    for field in descriptor.fields:
        yield (field,)
        inner_type = field.message_type
        if depth > 1 and inner_type is not None and not field.is_repeated:
            for inner in field_paths(inner_type, depth - 1):
                yield (field, *inner)


def bad_requests(method: MethodDescriptor, module: ModuleType) -> Iterator[tuple[str, Message]]:
    request_type: type[Message] = getattr(module, method.input_type.name)
    for path in field_paths(method.input_type, depth=3):
        *outer, field = path
        for value in bad_values(field):
            request = request_type()
            holder = request
            for step in outer:
                holder = getattr(holder, step.name)
            if field.is_repeated:
                getattr(holder, field.name).extend(value)
            else:
                setattr(holder, field.name, value)
            name = ".".join(f.name for f in path)
            yield f"{name}={value!r:.40}", request


async def answer(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    module: ModuleType,
    request: Message,
    tenant: str,
) -> grpc.StatusCode:
    response_type: type[Message] = getattr(module, method.output_type.name)
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("x-tickmesh-tenant", tenant),)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            async for _ in stream(request, metadata=metadata, timeout=STREAM_DEADLINE_S):
                break
        else:
            unary = channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            await unary(request, metadata=metadata, timeout=UNARY_DEADLINE_S)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            return grpc.StatusCode.OK  # a watch waiting for what is yet to come
        return exc.code()
    return grpc.StatusCode.OK


async def test_no_bad_field_of_any_call_is_an_internal_error(
    start_mesh: MeshFactory, caplog: pytest.LogCaptureFixture
) -> None:
    h = await start_mesh()
    await h.register(GraphBuilder("g", max_iterations=3).plan("p", handler="p").final("p").build())
    services = [
        (h.mesh.router_target, router_service_pb2, "RouterService"),
        (h.mesh.state_target, state_service_pb2, "StateService"),
        (h.mesh.guardrail_target, guardrail_service_pb2, "GuardrailService"),
        (h.mesh.pool_target, executor_pool_service_pb2, "ExecutorPoolService"),
    ]
    asked = 0
    not_actionable: list[str] = []
    for target, module, name in services:
        async with grpc.aio.insecure_channel(target) as channel:
            for method in module.DESCRIPTOR.services_by_name[name].methods:
                if method.client_streaming:
                    continue
                for what, request in bad_requests(method, module):
                    code = await answer(channel, method, module, request, h.tenant)
                    asked += 1
                    if code not in ACTIONABLE:
                        not_actionable.append(f"{name}.{method.name} {what}: {code.name}")
    assert asked > 500  # every service, most fields: the scan itself did not come up empty
    assert not_actionable == [], "\n".join(not_actionable)
    unexpected = [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()]
    assert unexpected == []
