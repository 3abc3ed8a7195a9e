"""The contract follows the conventions DESIGN.md §6 sets, beyond what buf lint checks."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "tickmesh" / "v1"


def files() -> Iterator[descriptor.FileDescriptor]:
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        module = importlib.import_module(f"tickmesh.v1.{proto.stem}_pb2")
        yield module.DESCRIPTOR


def messages(desc: descriptor.FileDescriptor) -> Iterator[descriptor.Descriptor]:
    stack = list(desc.message_types_by_name.values())
    while stack:
        msg = stack.pop()
        yield msg
        stack.extend(msg.nested_types)


def all_fields() -> Iterator[tuple[str, descriptor.FieldDescriptor]]:
    for file in files():
        for msg in messages(file):
            for field in msg.fields:
                yield f"{msg.full_name}.{field.name}", field


def test_package_is_tickmesh_v1() -> None:
    for file in files():
        assert file.package == "tickmesh.v1", file.name
        assert file.name.startswith("tickmesh/v1/"), file.name


def test_each_service_has_its_own_file_named_after_it() -> None:
    seen = set()
    for file in files():
        services = list(file.services_by_name.values())
        if file.name.endswith("_service.proto"):
            assert len(services) == 1, file.name
            service = services[0]
            stem = file.name.rsplit("/", 1)[1].removesuffix("_service.proto")
            assert service.name == "".join(p.title() for p in stem.split("_")) + "Service"
            seen.add(service.name)
        else:
            assert not services, f"{file.name} defines a service outside a *_service.proto file"
    assert seen == {"RouterService", "GuardrailService", "StateService", "ExecutorPoolService"}


def test_every_rpc_has_its_own_request_and_response() -> None:
    used: set[str] = set()
    for file in files():
        for service in file.services_by_name.values():
            for method in service.methods:
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name
                for type_name in (method.input_type.full_name, method.output_type.full_name):
                    assert type_name not in used, f"{type_name} is shared between rpcs"
                    used.add(type_name)


def test_no_any_and_no_floating_money() -> None:
    for name, field in all_fields():
        if field.message_type is not None:
            assert field.message_type.full_name != "google.protobuf.Any", name
        if field.name.endswith(("_micros", "cost")) or "cost" in field.name:
            assert field.type == descriptor.FieldDescriptor.TYPE_INT64, f"{name} must be int64"


def test_times_and_durations_are_well_known_types() -> None:
    for name, field in all_fields():
        if field.name.endswith("_at") or field.name in {"at", "deadline"}:
            assert field.message_type is not None, name
            assert field.message_type.full_name == "google.protobuf.Timestamp", name
        if field.name in {"timeout", "lease", "grace", "duration"} or field.name.endswith(
            ("_backoff", "_interval", "_wait", "_time")
        ):
            assert field.message_type is not None, name
            assert field.message_type.full_name == "google.protobuf.Duration", name


def test_enum_zero_values_are_unspecified() -> None:
    for file in files():
        enums = list(file.enum_types_by_name.values())
        for msg in messages(file):
            enums.extend(msg.enum_types)
        for enum in enums:
            zero = enum.values_by_number[0]
            assert zero.name.endswith("_UNSPECIFIED"), enum.full_name


def test_hot_path_frames_carry_batches() -> None:
    """DESIGN.md §8: assignments and completions travel as repeated items per frame."""
    from tickmesh.v1 import executor_pool_service_pb2 as pool

    for message_type in (
        pool.Assignments,
        pool.Completions,
        pool.Heartbeat,
        pool.Rejections,
        pool.Cancellations,
    ):
        repeated = [f for f in message_type.DESCRIPTOR.fields if f.is_repeated]
        assert repeated, f"{message_type.DESCRIPTOR.name} must carry repeated items"


def test_payloads_are_bytes_plus_content_type() -> None:
    from tickmesh.v1 import payload_pb2

    fields = payload_pb2.Payload.DESCRIPTOR.fields_by_name
    assert fields["inline"].type == descriptor.FieldDescriptor.TYPE_BYTES
    assert fields["content_type"].type == descriptor.FieldDescriptor.TYPE_STRING
    blob = fields["blob"].message_type
    assert blob is not None
    assert blob.name == "BlobRef"
