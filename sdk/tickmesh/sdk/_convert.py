"""Encoding and decoding of the bus's one message type, ExecutionEnvelope.

Every envelope that leaves or enters a tickmesh process goes through
:func:`encode_envelope` / :func:`decode_envelope`. They turn the ways protobuf
input goes wrong (corrupt wire data, invalid UTF-8, nesting too deep to parse,
the wrong message type, a missing header) into a :class:`ValidationError` that
says which, instead of a crash or a silently misread message.
"""

from __future__ import annotations

from functools import cache
from typing import Literal, get_args

from google.protobuf import descriptor, message, struct_pb2

from tickmesh.v1 import envelope_pb2

from .errors import ValidationError
from .ids import TENANT_ID_PATTERN

BodyKind = Literal[
    "task_request",
    "plan_request",
    "task_execution",
    "plan_execution",
    "lifetime_event",
    "signal",
    "execution_ref",
]
BODY_KINDS: tuple[BodyKind, ...] = get_args(BodyKind)

MAX_STRUCT_DEPTH = 32
"""Deepest google.protobuf.Struct/ListValue nesting tickmesh accepts.

Deeper values serialize fine but exceed the parsers' recursion limits (upb stops
at 100 message levels, and a Struct level costs three), so the consumer could
never read them. 32 levels decode even at the deepest place a Struct sits in an
envelope.
"""

MAX_ENVELOPE_BYTES = 1024 * 1024
"""NATS's default max_payload; larger envelopes must offload payloads to blobs."""

_STRUCT_NAMES = frozenset({"google.protobuf.Struct", "google.protobuf.ListValue"})


def decode_envelope(
    data: bytes, *, expected_kind: BodyKind | None = None
) -> envelope_pb2.ExecutionEnvelope:
    """Decode and check an envelope.

    Args:
        data: The serialized ExecutionEnvelope.
        expected_kind: The body kind the transport said it carries (the
            ``Tickmesh-Type`` header). Protobuf parses the wrong message type
            without complaint, so the kind is checked, never guessed.

    Returns:
        The decoded envelope. Unknown fields are kept (forward compatibility).

    Raises:
        ValidationError: The bytes are not a well-formed envelope of that kind.
    """
    if not data:
        raise ValidationError("malformed ExecutionEnvelope: empty message")
    try:
        envelope = envelope_pb2.ExecutionEnvelope.FromString(data)
    except message.DecodeError as exc:
        raise ValidationError(
            f"malformed ExecutionEnvelope ({len(data)} bytes): {_explain(exc)}"
        ) from exc
    validate_envelope(envelope, expected_kind=expected_kind)
    return envelope


def encode_envelope(
    envelope: envelope_pb2.ExecutionEnvelope, *, max_bytes: int = MAX_ENVELOPE_BYTES
) -> bytes:
    """Check and serialize an envelope (deterministically: maps sorted by key).

    Raises:
        ValidationError: The envelope would be refused by a consumer, or is
            larger than ``max_bytes``.
    """
    validate_envelope(envelope)
    data = envelope.SerializeToString(deterministic=True)
    if len(data) > max_bytes:
        raise ValidationError(
            f"ExecutionEnvelope is {len(data)} bytes, over the {max_bytes}-byte limit: "
            "store large payloads in the blob store and send a BlobRef"
        )
    return data


def validate_envelope(
    envelope: envelope_pb2.ExecutionEnvelope, *, expected_kind: BodyKind | None = None
) -> None:
    """Check what every consumer relies on: a header, a tenant, the right body.

    Raises:
        ValidationError: Naming the first rule broken.
    """
    if not envelope.HasField("header"):
        raise ValidationError("ExecutionEnvelope has no header")
    header = envelope.header
    if not TENANT_ID_PATTERN.fullmatch(header.tenant_id):
        raise ValidationError(
            f"ExecutionEnvelope header.tenant_id {header.tenant_id!r} is not a valid tenant id "
            "(expected [a-z0-9][a-z0-9_]{0,62})"
        )
    kind = envelope.WhichOneof("body")
    if kind is None:
        raise ValidationError("ExecutionEnvelope has no body")
    if expected_kind is not None and kind != expected_kind:
        raise ValidationError(
            f"ExecutionEnvelope body is {kind!r} but the message type header says {expected_kind!r}"
        )
    depth, path = _deepest_struct(envelope)
    if depth > MAX_STRUCT_DEPTH:
        raise ValidationError(
            f"ExecutionEnvelope field {path} nests a Struct {depth} levels deep; "
            f"the limit is {MAX_STRUCT_DEPTH}"
        )


def body_kind(envelope: envelope_pb2.ExecutionEnvelope) -> BodyKind:
    """Return the envelope's body kind.

    Raises:
        ValidationError: The envelope has no body.
    """
    kind = envelope.WhichOneof("body")
    if kind is None:
        raise ValidationError("ExecutionEnvelope has no body")
    return kind


def _explain(exc: message.DecodeError) -> str:
    text = str(exc)
    if "UTF-8" in text:
        return "a string field holds invalid UTF-8"
    if "MaxDepth" in text or "depth" in text.lower():
        return (
            "nesting exceeds the parser's depth limit "
            f"(Struct values may nest at most {MAX_STRUCT_DEPTH} levels)"
        )
    if "corrupt" in text or "truncated" in text.lower():
        return "not valid protobuf wire data (corrupt or truncated)"
    return text


@cache
def _may_hold_struct(desc: descriptor.Descriptor) -> bool:
    """Whether messages of this type can contain a Struct anywhere below them."""
    return _may_hold_struct_walk(desc, frozenset())


def _may_hold_struct_walk(desc: descriptor.Descriptor, seen: frozenset[str]) -> bool:
    if desc.full_name in _STRUCT_NAMES:
        return True
    if desc.full_name in seen:
        return False
    seen = seen | {desc.full_name}
    return any(
        f.message_type is not None and _may_hold_struct_walk(f.message_type, seen)
        for f in desc.fields
    )


def _deepest_struct(msg: message.Message, path: str = "") -> tuple[int, str]:
    """Return the deepest Struct/ListValue nesting below ``msg`` and where it is."""
    best = (0, "")
    for field, value in msg.ListFields():
        sub = field.message_type
        if sub is None or not _may_hold_struct(sub):
            continue
        name = f"{path}.{field.name}" if path else field.name
        if field.is_repeated:
            items = value.values() if _is_map(field) else value
            for item in items:
                if isinstance(item, message.Message):
                    found = _measure(item, name)
                    best = max(best, found)
        else:
            best = max(best, _measure(value, name))
    return best


def _measure(value: message.Message, path: str) -> tuple[int, str]:
    if isinstance(value, struct_pb2.Struct | struct_pb2.ListValue):
        return _value_depth(value), path
    return _deepest_struct(value, path)


def _value_depth(value: struct_pb2.Struct | struct_pb2.ListValue) -> int:
    children = value.fields.values() if isinstance(value, struct_pb2.Struct) else value.values
    deepest = 0
    for child in children:
        kind = child.WhichOneof("kind")
        if kind == "struct_value":
            deepest = max(deepest, _value_depth(child.struct_value))
        elif kind == "list_value":
            deepest = max(deepest, _value_depth(child.list_value))
    return deepest + 1


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    sub = field.message_type
    return sub is not None and sub.GetOptions().map_entry
