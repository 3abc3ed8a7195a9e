"""Execution records, lifetime rows and events that vary per test, built on the factories.

``factories`` holds fixed golden messages; these helpers change the fields a
store test cares about (tenant, lifetime, execution id, attempt, telemetry).
"""

from __future__ import annotations

from typing import Literal

from tests.support.factories import LIFETIME_ID, TENANT, make_envelope, ts
from tickmesh.v1 import envelope_pb2, lifetime_pb2, telemetry_pb2

Record = tuple[bytes, envelope_pb2.ExecutionEnvelope]

UNKNOWN_FIELD_NUMBER = 9_999
"""A field number no version of ExecutionEnvelope uses, for unknown-field tests."""


def exec_id(n: int) -> str:
    """A well-formed (32 hex digit) execution id, distinct for each ``n``."""
    return f"{n:032x}"


def usage(
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost_micros: int = 0,
    model_calls: int = 0,
    tool_calls: int = 0,
) -> telemetry_pb2.Telemetry:
    return telemetry_pb2.Telemetry(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_micros=cost_micros,
        model_calls=model_calls,
        tool_calls=tool_calls,
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def unknown_field(payload: bytes, number: int = UNKNOWN_FIELD_NUMBER) -> bytes:
    """The wire bytes of a length-delimited field ``number`` holding ``payload``."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def execution_record(
    n: int = 1,
    *,
    tenant: str = TENANT,
    lifetime_id: str = LIFETIME_ID,
    attempt: int = 1,
    kind: Literal["task", "plan"] = "task",
    node_id: str | None = None,
    telemetry: telemetry_pb2.Telemetry | None = None,
    extra: bytes = b"",
) -> Record:
    """Return ``(bytes, parsed envelope)`` of one execution record.

    Args:
        n: Picks the execution id (``exec_id(n)``).
        tenant: Goes into both the envelope's and the record's header.
        lifetime_id: Likewise.
        attempt: Likewise.
        kind: A ``task_execution`` or ``plan_execution`` body.
        node_id: Overrides the golden envelope's node id.
        telemetry: Replaces the result's telemetry (default: all zero).
        extra: Raw bytes appended to the serialized envelope (e.g. ``unknown_field(...)``).
    """
    env = make_envelope("task_execution" if kind == "task" else "plan_execution")
    body = env.task_execution if kind == "task" else env.plan_execution
    for header in (env.header, body.header):
        header.tenant_id = tenant
        header.lifetime_id = lifetime_id
        header.execution_id = exec_id(n)
        header.attempt = attempt
        if node_id is not None:
            header.node.id = node_id
    body.result.telemetry.CopyFrom(telemetry or usage())
    raw = env.SerializeToString(deterministic=True) + extra
    return raw, envelope_pb2.ExecutionEnvelope.FromString(raw)


def lifetime(
    lifetime_id: str = LIFETIME_ID,
    *,
    tenant: str = TENANT,
    last_sequence: int = 1,
    state: lifetime_pb2.LifetimeState.ValueType = lifetime_pb2.LIFETIME_STATE_RUNNING,
) -> lifetime_pb2.AgentLifetime:
    return lifetime_pb2.AgentLifetime(
        lifetime_id=lifetime_id,
        tenant_id=tenant,
        state=state,
        last_sequence=last_sequence,
        created_at=ts(0),
        updated_at=ts(last_sequence),
        labels={"team": "platform"},
    )


def event(
    sequence: int,
    *,
    kind: lifetime_pb2.LifetimeEventKind.ValueType = lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED,
    message: str = "",
) -> lifetime_pb2.LifetimeEvent:
    return lifetime_pb2.LifetimeEvent(
        sequence=sequence,
        kind=kind,
        at=ts(sequence),
        state=lifetime_pb2.LIFETIME_STATE_RUNNING,
        message=message or f"event {sequence}",
    )
