"""Encoding and decoding of the bus's one message type, ExecutionEnvelope.

Every envelope that leaves or enters a tickmesh process goes through
:func:`encode_envelope` / :func:`decode_envelope`. They turn the ways protobuf
input goes wrong (corrupt wire data, invalid UTF-8, nesting too deep to parse,
the wrong message type, a missing header) into a :class:`ValidationError` that
says which, instead of a crash or a silently misread message.

It also owns the executor protocol's conversions: assignments unpacked for the
Worker, and task and plan outcomes packed into TaskResult / PlanResult.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Literal, get_args

from google.protobuf import (
    descriptor,
    duration_pb2,
    json_format,
    message,
    struct_pb2,
    timestamp_pb2,
)

from tickmesh.v1 import (
    envelope_pb2,
    executor_pool_service_pb2,
    header_pb2,
    lifetime_pb2,
    payload_pb2,
    result_pb2,
    telemetry_pb2,
)

from . import codecs
from ._plan import Decision
from ._task import ErrorData, HandlerKind, ToolActionRecord, Usage
from .errors import ValidationError
from .ids import TENANT_ID_PATTERN
from .timestamps import datetime_of, set_timestamp

BodyKind = Literal[
    "task_request",
    "plan_request",
    "task_execution",
    "plan_execution",
    "lifetime_event",
    "signal",
    "execution_ref",
    "lifetime_events",
    "lifetime_event_batch",
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
    check_envelope_size(len(data), max_bytes=max_bytes)
    return data


def check_envelope_size(size: int, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> None:
    """Refuse an encoded envelope of ``size`` bytes over ``max_bytes`` (what
    :func:`encode_envelope` checks; an envelope's ``ByteSize()`` is that size without
    encoding it).

    Raises:
        ValidationError: It is larger than ``max_bytes``.
    """
    if size > max_bytes:
        raise ValidationError(
            f"ExecutionEnvelope is {size} bytes, over the {max_bytes}-byte limit: "
            "store large payloads in the blob store and send a BlobRef"
        )


def events_of(envelope: envelope_pb2.ExecutionEnvelope) -> Sequence[lifetime_pb2.LifetimeEvent]:
    """The lifetime events an envelope carries, in sequence order: its ``lifetime_event``,
    or each of its ``lifetime_events`` (what one decision recorded); none for any other
    body."""
    kind = envelope.WhichOneof("body")
    if kind == "lifetime_event":
        return (envelope.lifetime_event,)
    if kind == "lifetime_events":
        return envelope.lifetime_events.events
    return ()


EVENT_KINDS: frozenset[str] = frozenset({"lifetime_event", "lifetime_events"})
"""The bodies of one decision's events (what a ``lifetime_event_batch`` holds)."""


def decisions_of(
    envelope: envelope_pb2.ExecutionEnvelope,
) -> Sequence[envelope_pb2.ExecutionEnvelope]:
    """The events envelopes an envelope carries: each decision of a
    ``lifetime_event_batch``, the envelope itself for a ``lifetime_event`` or
    ``lifetime_events`` body, none for any other."""
    kind = envelope.WhichOneof("body")
    if kind == "lifetime_event_batch":
        return envelope.lifetime_event_batch.decisions
    if kind in EVENT_KINDS:
        return (envelope,)
    return ()


def encode_event_batch(header: header_pb2.EnvelopeHeader, decisions: Sequence[bytes]) -> bytes:
    """A ``lifetime_event_batch`` envelope holding ``decisions``, each an events envelope
    already encoded (by :func:`encode_envelope`): written on the wire as they are,
    never decoded and encoded again (protobuf's encoding of a repeated message field
    is each message's bytes behind its tag and length)."""
    outer = envelope_pb2.ExecutionEnvelope(header=header)
    validate_header(outer)
    parts = [outer.SerializeToString(deterministic=True)]
    body = b"".join(_BATCH_DECISION_TAG + _varint(len(d)) + d for d in decisions)
    parts.append(_BATCH_BODY_TAG + _varint(len(body)) + body)
    return b"".join(parts)


# Wire tags (field number << 3 | 2, a length-delimited field) of
# ExecutionEnvelope.lifetime_event_batch (10) and LifetimeEventBatch.decisions (1).
_BATCH_BODY_TAG = bytes([10 << 3 | 2])
_BATCH_DECISION_TAG = bytes([1 << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def validate_header(envelope: envelope_pb2.ExecutionEnvelope) -> None:
    """Check the envelope's header: present, with a valid tenant id.

    Raises:
        ValidationError: Naming what is wrong.
    """
    if not envelope.HasField("header"):
        raise ValidationError("ExecutionEnvelope has no header")
    if not TENANT_ID_PATTERN.fullmatch(envelope.header.tenant_id):
        raise ValidationError(
            f"ExecutionEnvelope header.tenant_id {envelope.header.tenant_id!r} is not a valid "
            "tenant id (expected [a-z0-9][a-z0-9_]{0,62})"
        )


def validate_envelope(
    envelope: envelope_pb2.ExecutionEnvelope, *, expected_kind: BodyKind | None = None
) -> None:
    """Check what every consumer relies on: a header, a tenant, the right body.

    Raises:
        ValidationError: Naming the first rule broken.
    """
    validate_header(envelope)
    kind = envelope.WhichOneof("body")
    if kind is None:
        raise ValidationError("ExecutionEnvelope has no body")
    if expected_kind is not None and kind != expected_kind:
        raise ValidationError(
            f"ExecutionEnvelope body is {kind!r} but the message type header says {expected_kind!r}"
        )
    if kind == "lifetime_event_batch":
        _validate_batch(envelope)
    try:
        within = _struct_depth_of(envelope) <= MAX_STRUCT_DEPTH
    except _NotFiniteError:
        within = False
    if not within:
        # Walked again to say where (raising on a non-finite number, with its field):
        # keeping paths on every walk costs more than this rare second walk.
        depth, path = _locate_deepest(envelope)
        raise ValidationError(
            f"ExecutionEnvelope field {path} nests a Struct {depth} levels deep; "
            f"the limit is {MAX_STRUCT_DEPTH}"
        )


def _validate_batch(envelope: envelope_pb2.ExecutionEnvelope) -> None:
    """Each decision of a batch is an events envelope of the batch's tenant."""
    tenant = envelope.header.tenant_id
    for i, decision in enumerate(envelope.lifetime_event_batch.decisions):
        where = f"lifetime_event_batch.decisions[{i}]"
        if not decision.HasField("header"):
            raise ValidationError(f"ExecutionEnvelope {where} has no header")
        if decision.header.tenant_id != tenant:
            raise ValidationError(
                f"ExecutionEnvelope {where} is of tenant {decision.header.tenant_id!r}, "
                f"the batch of tenant {tenant!r}"
            )
        inner = decision.WhichOneof("body")
        if inner not in EVENT_KINDS:
            raise ValidationError(
                f"ExecutionEnvelope {where} body is {inner!r}; "
                "expected lifetime_event or lifetime_events"
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


_SINGULAR, _REPEATED, _MAP, _ONEOF = 0, 1, 2, 3
_StructField = tuple[str, int, bool, Mapping[str, bool]]
"""(field name, or oneof name; kind; whether the field is a Struct/ListValue itself; for a
oneof, the same for each member that can hold a Struct)."""


@cache
def _struct_fields(desc: descriptor.Descriptor) -> tuple[_StructField, ...]:
    """The fields of ``desc`` that can hold a Struct, in field-number order (as
    ``ListFields`` lists them); the members of a oneof as one entry, asked with one
    ``WhichOneof``."""
    found: list[_StructField] = []
    oneofs: dict[str, dict[str, bool]] = {}
    for f in sorted(desc.fields, key=lambda f: f.number):
        sub = f.message_type
        if sub is None or not _may_hold_struct(sub):
            continue
        if _is_map(f):
            kind, sub = _MAP, sub.fields_by_name["value"].message_type
        else:
            kind = _REPEATED if f.is_repeated else _SINGULAR
        is_struct = sub is not None and sub.full_name in _STRUCT_NAMES
        oneof = f.containing_oneof
        if oneof is not None and kind == _SINGULAR:
            if oneof.name not in oneofs:
                oneofs[oneof.name] = {}
                found.append((oneof.name, _ONEOF, False, oneofs[oneof.name]))
            oneofs[oneof.name][f.name] = is_struct
            continue
        found.append((f.name, kind, is_struct, {}))
    return tuple(found)


class _NotFiniteError(Exception):
    """A Struct holds a NaN or an infinite number (a Struct is a JSON value, and JSON has
    neither)."""

    def __init__(self, number: float) -> None:
        super().__init__(number)
        self.number = number


def _struct_depth_of(msg: message.Message) -> int:
    """The deepest Struct/ListValue nesting below ``msg`` (the check every envelope
    passes: where it is is found only when it is too deep, by :func:`_locate_deepest`).

    Raises:
        _NotFiniteError: A Struct below ``msg`` holds a NaN or infinite number.
    """
    best = 0
    # Only the fields that can hold a Struct are visited (listing every set field, as
    # ListFields does, wraps each in a Python object: most of the cost, per envelope).
    for name, kind, is_struct, members in _struct_fields(msg.DESCRIPTOR):
        if kind == _ONEOF:
            chosen = msg.WhichOneof(name)
            if chosen is None or chosen not in members:
                continue
            name, kind, is_struct = chosen, _SINGULAR, members[chosen]
        elif kind == _SINGULAR and not msg.HasField(name):
            continue
        value = getattr(msg, name)
        for item in (value,) if kind == _SINGULAR else value.values() if kind == _MAP else value:
            found = _value_depth(item) if is_struct else _struct_depth_of(item)
            if found > best:
                best = found
    return best


def _value_depth(value: struct_pb2.Struct | struct_pb2.ListValue) -> int:
    """The nesting of ``value``.

    Raises:
        _NotFiniteError: It holds a NaN or infinite number.
    """
    children = value.fields.values() if isinstance(value, struct_pb2.Struct) else value.values
    deepest = 0
    for child in children:
        kind = child.WhichOneof("kind")
        if kind == "struct_value":
            deepest = max(deepest, _value_depth(child.struct_value))
        elif kind == "list_value":
            deepest = max(deepest, _value_depth(child.list_value))
        elif kind == "number_value" and not math.isfinite(child.number_value):
            raise _NotFiniteError(child.number_value)
    return deepest + 1


def _locate_deepest(msg: message.Message, path: str = "") -> tuple[int, str]:
    """The deepest Struct/ListValue nesting below ``msg`` and the field it is in, for the
    error of an envelope that failed :func:`_struct_depth_of` (slower: it lists every set
    field).

    Raises:
        ValidationError: A Struct holds a NaN or infinite number (naming its field).
    """
    best = (0, "")
    for field, value in msg.ListFields():
        sub = field.message_type
        if sub is None:
            continue
        where = f"{path}.{field.name}" if path else field.name
        if _is_map(field):
            sub = sub.fields_by_name["value"].message_type
            if sub is None:
                continue
            items = list(value.values())
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if sub.full_name not in _STRUCT_NAMES:
                best = max(best, _locate_deepest(item, where))
                continue
            try:
                best = max(best, (_value_depth(item), where))
            except _NotFiniteError as exc:
                raise ValidationError(
                    f"ExecutionEnvelope field {where} holds {exc.number} in a Struct; "
                    "Struct numbers must be finite"
                ) from None
    return best


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    sub = field.message_type
    return sub is not None and sub.GetOptions().map_entry


# --- executor protocol: assignments in, results out (used by the Worker) -------------------


@dataclass(frozen=True, slots=True)
class WirePayload:
    """A payload as it arrived: inline bytes, or a blob reference to resolve."""

    content_type: str
    inline: bytes | None
    """The bytes, when they travel inline."""
    blob_uri: str = ""
    """Where the bytes are, when they travel as a BlobRef."""
    sha256: str = ""
    size: int = 0


@dataclass(frozen=True, slots=True)
class PlanInputData:
    """One PlanInput, with its output still encoded."""

    execution_id: str
    node_id: str
    status: str
    output: WirePayload | None
    error_type: str
    error_message: str
    input_tokens: int
    output_tokens: int
    cost_micros: int


@dataclass(frozen=True, slots=True)
class SignalData:
    """A SignalDelivery, with its payload still encoded."""

    name: str
    payload: WirePayload | None
    approver: str
    timed_out: bool


@dataclass(frozen=True, slots=True)
class AssignmentData:
    """One assignment, unpacked for the Worker."""

    assignment_id: str
    kind: HandlerKind
    handler: str
    tenant_id: str
    lifetime_id: str
    execution_id: str
    node_id: str
    attempt: int
    iteration: int
    labels: dict[str, str]
    deadline: datetime
    created_at: datetime | None
    config: dict[str, Any]
    input: WirePayload | None
    """The task's input, or the plan's goal."""
    plan_inputs: tuple[PlanInputData, ...]
    signal: SignalData | None
    raw: executor_pool_service_pb2.Assignment
    traceparent: str = ""
    """The step's span (W3C), when the lifetime is traced: the parent of the handler's span."""
    tracestate: str = ""


def payload_to_proto(content_type: str, data: bytes) -> payload_pb2.Payload:
    """An inline payload with its size and SHA-256 filled in."""
    return payload_pb2.Payload(
        content_type=content_type,
        inline=data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def wire_payload(payload: payload_pb2.Payload) -> WirePayload:
    kind = payload.WhichOneof("data")
    if kind == "blob":
        return WirePayload(
            content_type=payload.content_type or payload.blob.content_type,
            inline=None,
            blob_uri=payload.blob.uri,
            sha256=payload.sha256 or payload.blob.sha256,
            size=payload.size or payload.blob.size,
        )
    return WirePayload(
        content_type=payload.content_type,
        inline=payload.inline if kind == "inline" else b"",
        sha256=payload.sha256,
        size=payload.size,
    )


def _struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    if not value.fields:
        return {}
    return json_format.MessageToDict(value)


def _dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    try:
        result.update(value)
    except (TypeError, ValueError):
        result = struct_pb2.Struct()
        result.update({"repr": repr(dict(value))[:4096]})
    return result


def _datetime(stamp: timestamp_pb2.Timestamp) -> datetime:
    return datetime_of(stamp)


def _status_name(status: result_pb2.TaskStatus.ValueType) -> str:
    for name, value in _TASK_STATUS_BY_NAME.items():
        if value == status:
            return name
    return "unspecified"


_TASK_STATUS_BY_NAME: dict[str, result_pb2.TaskStatus.ValueType] = {
    "succeeded": result_pb2.TASK_STATUS_SUCCEEDED,
    "failed": result_pb2.TASK_STATUS_FAILED,
    "timed_out": result_pb2.TASK_STATUS_TIMED_OUT,
    "cancelled": result_pb2.TASK_STATUS_CANCELLED,
    "rejected": result_pb2.TASK_STATUS_REJECTED,
}
_ON_TIMEOUT: dict[str, result_pb2.WaitTimeoutAction.ValueType] = {
    "fail": result_pb2.WAIT_TIMEOUT_ACTION_FAIL,
    "signal": result_pb2.WAIT_TIMEOUT_ACTION_SIGNAL,
    "abort": result_pb2.WAIT_TIMEOUT_ACTION_ABORT,
}


def assignment_from_proto(item: executor_pool_service_pb2.Assignment) -> AssignmentData:
    """Unpack an assignment for the Worker.

    Raises:
        ValidationError: The envelope carries neither a task nor a plan request.
    """
    envelope = item.envelope
    header = envelope.header
    body = envelope.WhichOneof("body")
    plan_inputs: tuple[PlanInputData, ...] = ()
    signal: SignalData | None = None
    if body == "task_request":
        request = envelope.task_request
        kind: HandlerKind = "task"
        config = _struct_to_dict(request.config)
        payload = wire_payload(request.input) if request.HasField("input") else None
    elif body == "plan_request":
        plan_request = envelope.plan_request
        kind = "plan"
        config = _struct_to_dict(plan_request.config)
        payload = wire_payload(plan_request.goal) if plan_request.HasField("goal") else None
        plan_inputs = tuple(
            PlanInputData(
                execution_id=p.execution_id,
                node_id=p.node.id,
                status=_status_name(p.status),
                output=wire_payload(p.output) if p.HasField("output") else None,
                error_type=p.error.type,
                error_message=p.error.message,
                input_tokens=p.telemetry.input_tokens,
                output_tokens=p.telemetry.output_tokens,
                cost_micros=p.telemetry.cost_micros,
            )
            for p in plan_request.inputs
        )
        if plan_request.HasField("signal"):
            sig = plan_request.signal
            signal = SignalData(
                name=sig.name,
                payload=wire_payload(sig.payload) if sig.HasField("payload") else None,
                approver=sig.approver,
                timed_out=sig.timed_out,
            )
    else:
        raise ValidationError(f"assignment {item.assignment_id} carries a {body!r}, not a request")
    return AssignmentData(
        assignment_id=item.assignment_id,
        kind=kind,
        handler=header.node.handler,
        tenant_id=header.tenant_id,
        lifetime_id=header.lifetime_id,
        execution_id=header.execution_id,
        node_id=header.node.id,
        attempt=header.attempt,
        iteration=header.iteration,
        labels=dict(header.labels),
        deadline=_datetime(item.deadline),
        created_at=_datetime(header.created_at) if header.HasField("created_at") else None,
        config=config,
        input=payload,
        plan_inputs=plan_inputs,
        signal=signal,
        raw=item,
        traceparent=header.trace_context.traceparent,
        tracestate=header.trace_context.tracestate,
    )


def error_to_proto(error: ErrorData) -> result_pb2.ErrorInfo:
    info = result_pb2.ErrorInfo(type=error.type, message=error.message, retryable=error.retryable)
    if error.details:
        info.details.CopyFrom(_dict_to_struct(error.details))
    return info


def _set_duration(target: duration_pb2.Duration, seconds: float) -> None:
    """Set ``target`` to ``seconds`` (negative: zero), rounded to the microsecond as
    ``FromTimedelta(timedelta(seconds=...))`` rounds it, without building the timedelta
    (half the cost, and every completion sets two)."""
    seconds = max(0.0, seconds)
    whole = int(seconds)
    micros = round((seconds - whole) * 1_000_000)  # the fraction alone, as timedelta does
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    target.seconds = whole
    target.nanos = micros * 1000


def _fill_telemetry(
    telemetry: telemetry_pb2.Telemetry,
    usage: Usage,
    *,
    run_time_s: float,
    queue_wait_s: float | None,
) -> None:
    """Set a result's ``telemetry`` (empty) from what the handler reported, in place: a
    message given to a constructor is copied."""
    telemetry.input_tokens = usage.input_tokens
    telemetry.output_tokens = usage.output_tokens
    telemetry.cost_micros = usage.cost_micros
    telemetry.model_calls = usage.model_calls
    telemetry.tool_calls = usage.tool_calls
    if usage.custom:  # a map is updated through the Mapping ABC, even from an empty one
        telemetry.custom_metrics.update(usage.custom)
    _set_duration(telemetry.run_time, run_time_s)
    if queue_wait_s is not None:
        _set_duration(telemetry.queue_wait, queue_wait_s)
    for model in sorted(usage.models):
        m = usage.models[model]
        telemetry.model_usage.add(
            model=model,
            input_tokens=m.input_tokens,
            output_tokens=m.output_tokens,
            cost_micros=m.cost_micros,
            calls=m.calls,
        )


def _tool_action_to_proto(action: ToolActionRecord) -> result_pb2.ToolAction:
    proto = result_pb2.ToolAction(
        action_id=action.action_id,
        tool=action.tool,
        input=payload_to_proto(*action.input),
        side_effect=action.side_effect,
    )
    if action.output is not None:
        proto.output.CopyFrom(payload_to_proto(*action.output))
    if action.error is not None:
        proto.error.CopyFrom(error_to_proto(action.error))
    if action.started_at is not None:
        proto.started_at.FromDatetime(action.started_at)
    if action.duration is not None:
        proto.duration.FromTimedelta(action.duration)
    return proto


def task_result_to_proto(
    status: str,
    *,
    output: tuple[str, bytes] | None = None,
    error: ErrorData | None = None,
    usage: Usage | None = None,
    tool_actions: Sequence[ToolActionRecord] = (),
    run_time_s: float = 0.0,
    queue_wait_s: float | None = None,
) -> result_pb2.TaskResult:
    """Build a TaskResult.

    ``status`` is ``succeeded``, ``failed``, ``timed_out`` or ``cancelled``.
    """
    result = result_pb2.TaskResult(status=_TASK_STATUS_BY_NAME[status])
    _fill_telemetry(
        result.telemetry, usage or Usage(), run_time_s=run_time_s, queue_wait_s=queue_wait_s
    )
    if tool_actions:
        result.tool_actions.extend(_tool_action_to_proto(a) for a in tool_actions)
    if output is not None:
        result.output.CopyFrom(payload_to_proto(*output))
    if error is not None:
        result.error.CopyFrom(error_to_proto(error))
    return result


def plan_result_to_proto(
    decision: Decision | None,
    *,
    error: ErrorData | None = None,
    usage: Usage | None = None,
    run_time_s: float = 0.0,
    queue_wait_s: float | None = None,
) -> result_pb2.PlanResult:
    """Build a PlanResult from a decision, or from the error that prevented one.

    Raises:
        ValidationError: A payload of the decision cannot be encoded.
    """
    result = result_pb2.PlanResult()
    _fill_telemetry(
        result.telemetry, usage or Usage(), run_time_s=run_time_s, queue_wait_s=queue_wait_s
    )
    if error is not None:
        result.error.CopyFrom(error_to_proto(error))
    if decision is None:
        return result
    result.rationale = decision.rationale
    if decision.kind == "dispatch":
        result.dispatch.SetInParent()
        for item in decision.steps:
            result.dispatch.steps.add(
                node_id=item.node_id, input=payload_to_proto(*codecs.encode(item.input))
            )
    elif decision.kind == "complete":
        result.complete.output.CopyFrom(payload_to_proto(*codecs.encode(decision.output)))
    elif decision.kind == "wait":
        wait = result.wait
        wait.signal_name = decision.signal_name
        wait.on_timeout = _ON_TIMEOUT[decision.on_timeout]
        wait.prompt = decision.prompt
        if decision.timeout is not None:
            wait.timeout.FromTimedelta(decision.timeout)
        if decision.default is not None:
            wait.default_payload.CopyFrom(payload_to_proto(*codecs.encode(decision.default)))
    else:
        result.fail.error.CopyFrom(
            error_to_proto(
                ErrorData(
                    decision.error_type or "PlanFailed",
                    decision.message,
                    retryable=False,
                    details=decision.details,
                )
            )
        )
    return result


def completion_to_proto(
    assignment_id: str,
    result: result_pb2.TaskResult | result_pb2.PlanResult,
    *,
    started_at: datetime,
    finished_at: datetime,
    code_digest: str,
) -> executor_pool_service_pb2.Completion:
    completion = executor_pool_service_pb2.Completion(
        assignment_id=assignment_id, code_digest=code_digest
    )
    if isinstance(result, result_pb2.TaskResult):
        completion.task_result.CopyFrom(result)
    else:
        completion.plan_result.CopyFrom(result)
    # Per step: protobuf's FromDatetime does calendar work the arithmetic does not need.
    set_timestamp(completion.started_at, started_at)
    set_timestamp(completion.finished_at, finished_at)
    return completion
