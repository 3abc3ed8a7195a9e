"""Envelope encoding and decoding refuse bad input with a clear ValidationError."""

from __future__ import annotations

import contextlib
import math

import pytest
from google.protobuf import descriptor, message, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from tests.support.factories import make_envelope
from tickmesh.sdk import (
    EVENT_KINDS,
    MAX_STRUCT_DEPTH,
    ValidationError,
    decisions_of,
    decode_envelope,
    encode_envelope,
    encode_event_batch,
    events_of,
)
from tickmesh.v1 import envelope_pb2


def nested_struct(levels: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    cur = root
    for _ in range(levels - 1):
        cur = cur.fields["n"].struct_value
    cur.fields["leaf"].number_value = 1
    return root


def nested_list(levels: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    cur = root.fields["l"].list_value
    for _ in range(levels - 2):
        cur = cur.values.add().list_value
    cur.values.add().string_value = "leaf"
    return root


def test_roundtrip_keeps_every_field() -> None:
    env = make_envelope("plan_request")
    assert decode_envelope(encode_envelope(env), expected_kind="plan_request") == env


def test_struct_at_the_depth_limit_encodes_and_decodes() -> None:
    env = make_envelope("execution_ref")
    env.execution_ref.task_execution.result.error.details.CopyFrom(nested_struct(MAX_STRUCT_DEPTH))
    assert decode_envelope(encode_envelope(env)) == env


def test_struct_33_levels_deep_is_refused_before_publishing() -> None:
    env = make_envelope("execution_ref")
    env.execution_ref.task_execution.result.error.details.CopyFrom(nested_struct(33))
    with pytest.raises(ValidationError) as info:
        encode_envelope(env)
    message = str(info.value)
    assert "execution_ref.task_execution.result.error.details" in message
    assert "33 levels" in message
    assert "limit is 32" in message


def test_deep_list_values_count_as_nesting() -> None:
    env = make_envelope("task_request")
    env.task_request.config.CopyFrom(nested_list(MAX_STRUCT_DEPTH + 1))
    with pytest.raises(ValidationError, match=r"task_request\.config"):
        encode_envelope(env)


def test_struct_33_levels_deep_is_refused_on_decode() -> None:
    env = make_envelope("execution_ref")
    env.execution_ref.task_execution.result.error.details.CopyFrom(nested_struct(33))
    data = env.SerializeToString()  # bypasses the encoder's check, like a foreign producer
    with pytest.raises(ValidationError, match="depth limit"):
        decode_envelope(data)


def test_invalid_utf8_in_a_string_field_is_refused() -> None:
    data = bytearray(encode_envelope(make_envelope("signal")))
    data[data.index(b"approval")] = 0xC3  # starts a 2-byte sequence that never completes
    with pytest.raises(ValidationError, match="invalid UTF-8"):
        decode_envelope(bytes(data))


def test_wrong_body_kind_is_refused() -> None:
    data = encode_envelope(make_envelope("task_request"))
    with pytest.raises(ValidationError, match="'task_request' but the message type header says"):
        decode_envelope(data, expected_kind="task_execution")


def test_missing_body_is_refused() -> None:
    env = make_envelope("signal")
    env.ClearField("signal")
    with pytest.raises(ValidationError, match="no body"):
        encode_envelope(env)


@pytest.mark.parametrize("tenant", ["", "Acme", "a.b", "a>", "_x", "x" * 64])
def test_bad_tenant_id_is_refused(tenant: str) -> None:
    env = make_envelope("signal")
    env.header.tenant_id = tenant
    with pytest.raises(ValidationError, match="tenant_id"):
        encode_envelope(env)


def test_oversized_envelope_is_refused_with_advice() -> None:
    env = make_envelope("task_request")
    env.task_request.input.inline = b"x" * 2048
    with pytest.raises(ValidationError, match="blob store"):
        encode_envelope(env, max_bytes=1024)


def test_unknown_fields_survive_a_roundtrip() -> None:
    data = encode_envelope(make_envelope("signal"))
    extra = data + b"\xf8\x3e\x05"  # field 999, varint 5: from a newer producer
    env = decode_envelope(extra)
    assert env.SerializeToString(deterministic=True) == extra


@given(st.binary(max_size=512))
def test_decoder_never_raises_anything_but_validation_error(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except ValidationError:
        return
    assert isinstance(env, envelope_pb2.ExecutionEnvelope)
    assert env.WhichOneof("body") is not None


@given(st.data())
def test_mutated_vectors_decode_or_fail_cleanly(data: st.DataObject) -> None:
    golden = bytearray(encode_envelope(make_envelope("plan_request")))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(golden) - 1))
        golden[pos] ^= 1 << data.draw(st.integers(0, 7))
    cut = data.draw(st.integers(0, len(golden)))
    with contextlib.suppress(ValidationError):
        decode_envelope(bytes(golden[:cut]))


def _struct_paths(
    desc: descriptor.Descriptor, prefix: tuple[descriptor.FieldDescriptor, ...] = ()
) -> list[tuple[descriptor.FieldDescriptor, ...]]:
    """Every field path from ``desc`` to a Struct field (each message type once per path)."""
    found = []
    for field in desc.fields:
        sub = field.message_type
        if sub is None or any(f.message_type is sub for f in prefix):
            continue
        path = (*prefix, field)
        if sub.full_name == "google.protobuf.Struct":
            found.append(path)
        elif not sub.GetOptions().map_entry:
            found.extend(_struct_paths(sub, path))
    return found


def _put(env: message.Message, path: tuple[descriptor.FieldDescriptor, ...]) -> message.Message:
    target = env
    for field in path:
        if field.is_repeated:
            target = getattr(target, field.name).add()
        else:
            target = getattr(target, field.name)
    return target


STRUCT_PATHS = [
    path
    for path in _struct_paths(envelope_pb2.ExecutionEnvelope.DESCRIPTOR)
    # A batch holds events envelopes only (any other body is refused before the walk).
    if path[0].name != "lifetime_event_batch" or path[2].name in EVENT_KINDS
]


def test_struct_paths_reach_every_kind_of_body() -> None:
    bodies = {path[0].name for path in STRUCT_PATHS}
    assert {"task_request", "plan_request", "execution_ref", "lifetime_event"} <= bodies
    assert any(any(f.is_repeated for f in path) for path in STRUCT_PATHS)


@pytest.mark.parametrize(
    "path", STRUCT_PATHS, ids=[".".join(f.name for f in p) for p in STRUCT_PATHS]
)
def test_every_place_a_struct_sits_is_checked(
    path: tuple[descriptor.FieldDescriptor, ...],
) -> None:
    name = ".".join(f.name for f in path)
    env = make_envelope(path[0].name)  # type: ignore[arg-type]
    struct = _put(env, path)
    if path[0].name == "lifetime_event_batch":  # the decision just added needs a header
        env.lifetime_event_batch.decisions[-1].header.CopyFrom(env.header)
    assert isinstance(struct, struct_pb2.Struct)
    struct.CopyFrom(nested_struct(MAX_STRUCT_DEPTH))
    encode_envelope(env)  # at the limit: fine
    struct.CopyFrom(nested_struct(MAX_STRUCT_DEPTH + 1))
    with pytest.raises(ValidationError, match=f"field {name} nests a Struct 33 levels"):
        encode_envelope(env)
    struct.CopyFrom(nested_struct(2))
    struct.fields["n"].struct_value.fields["bad"].number_value = math.nan
    with pytest.raises(ValidationError, match=f"field {name} holds nan"):
        encode_envelope(env)


def test_events_of_reads_one_event_a_decisions_events_or_none() -> None:
    single = make_envelope("lifetime_event")
    assert [e.sequence for e in events_of(single)] == [12]
    batch = make_envelope("lifetime_events")
    assert [e.sequence for e in events_of(batch)] == [7, 8]
    assert events_of(make_envelope("task_request")) == ()


def test_a_batch_written_from_encoded_decisions_is_what_protobuf_decodes() -> None:
    batch = make_envelope("lifetime_event_batch")
    data = encode_event_batch(
        batch.header, [encode_envelope(d) for d in batch.lifetime_event_batch.decisions]
    )
    decoded = decode_envelope(data, expected_kind="lifetime_event_batch")
    assert decoded == batch
    assert list(decisions_of(decoded)) == list(batch.lifetime_event_batch.decisions)
    # Large enough that the lengths take several bytes.
    many = [encode_envelope(make_envelope("lifetime_events"))] * 300
    assert len(decisions_of(decode_envelope(encode_event_batch(batch.header, many)))) == 300


def test_decisions_of_one_decision_is_the_envelope_itself_and_of_other_bodies_none() -> None:
    single = make_envelope("lifetime_events")
    assert list(decisions_of(single)) == [single]
    assert decisions_of(make_envelope("task_request")) == ()


@pytest.mark.parametrize("wrong", ["another tenant", "a task request", "a batch", "no header"])
def test_a_batch_holds_only_events_envelopes_of_its_own_tenant(wrong: str) -> None:
    batch = make_envelope("lifetime_event_batch")
    decision = batch.lifetime_event_batch.decisions[1]
    if wrong == "another tenant":
        decision.header.tenant_id = "intruder"
        expected = "decisions\\[1\\] is of tenant 'intruder'"
    elif wrong == "a task request":
        decision.task_request.CopyFrom(make_envelope("task_request").task_request)
        expected = "decisions\\[1\\] body is 'task_request'"
    elif wrong == "a batch":
        inner = make_envelope("lifetime_events")
        decision.lifetime_event_batch.decisions.add().CopyFrom(inner)
        expected = "decisions\\[1\\] body is 'lifetime_event_batch'"
    else:
        decision.ClearField("header")
        expected = "decisions\\[1\\] has no header"
    with pytest.raises(ValidationError, match=expected):
        encode_envelope(batch)
    with pytest.raises(ValidationError, match=expected):
        decode_envelope(batch.SerializeToString(), expected_kind="lifetime_event_batch")
    written = encode_event_batch(
        batch.header, [d.SerializeToString() for d in batch.lifetime_event_batch.decisions]
    )
    with pytest.raises(ValidationError, match=expected):
        decode_envelope(written)
