"""What the state service decides: which records are valid, and the refs it
publishes for records appended through its API (new or already stored: a retried
append must still reach the router). Records from the bus need no ref: the router
reads them from the record stream itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

# check_record is shared with the router, which runs it on the records it reads: a
# record this service dead-letters is never routed.
from tickmesh.runtime.records import RECORD_KINDS as RECORD_KINDS
from tickmesh.runtime.records import check_record as check_record
from tickmesh.runtime.subjects import TenantNames, check_token
from tickmesh.sdk import events_of
from tickmesh.sdk.ids import uuid7
from tickmesh.sdk.timestamps import set_now, set_timestamp
from tickmesh.v1 import envelope_pb2, header_pb2, lifetime_pb2

from .store import StoredExecution, check_event_sequence


def ref_envelope(
    stored: StoredExecution, record: envelope_pb2.ExecutionEnvelope, producer: header_pb2.Producer
) -> envelope_pb2.ExecutionEnvelope:
    header = header_pb2.EnvelopeHeader()
    header.CopyFrom(record.header)
    header.envelope_id = uuid7()
    header.sequence = stored.store_sequence
    header.producer.CopyFrom(producer)
    set_now(header.created_at)
    env = envelope_pb2.ExecutionEnvelope(header=header)
    env.execution_ref.store_sequence = stored.store_sequence
    set_timestamp(env.execution_ref.persisted_at, stored.persisted_at)
    if record.HasField("task_execution"):
        env.execution_ref.task_execution.CopyFrom(record.task_execution)
    else:
        env.execution_ref.plan_execution.CopyFrom(record.plan_execution)
    return env


def ref_message_id(execution_id: str, attempt: int) -> str:
    return f"ref:{execution_id}:{attempt}"


def error_event(
    names: TenantNames, lifetime_id: str, message: str, producer: header_pb2.Producer
) -> envelope_pb2.ExecutionEnvelope:
    """An out-of-band ERROR event (sequence 0: it is not part of the router's sequence)."""
    now = timestamp_pb2.Timestamp()
    now.FromDatetime(datetime.now(UTC))
    header = header_pb2.EnvelopeHeader(
        envelope_id=uuid7(),
        tenant_id=names.tenant,
        lifetime_id=lifetime_id,
        created_at=now,
        producer=producer,
    )
    event = lifetime_pb2.LifetimeEvent(
        sequence=0,
        kind=lifetime_pb2.LIFETIME_EVENT_KIND_DEAD_LETTERED,
        at=now,
        message=message,
    )
    return envelope_pb2.ExecutionEnvelope(header=header, lifetime_event=event)


def check_events(decision: envelope_pb2.ExecutionEnvelope) -> None:
    """What the store needs of one decision's events, checked before they reach it: a
    batch the store refused would be handed back and refused again, forever, holding
    every read that waits for the events on the bus. Out-of-band events (sequence 0)
    are not stored and need nothing.

    Raises:
        ValidationError: The lifetime id is no subject token (the router publishes only
            those; a row under another id would end a ListLifetimeRecords page with a
            token that listing refuses), or a sequence is past ``MAX_SEQUENCE``.
    """
    stored = [event.sequence for event in events_of(decision) if event.sequence > 0]
    if not stored:
        return
    check_token(decision.header.lifetime_id, "lifetime id")
    for sequence in stored:
        check_event_sequence(sequence)


def fold_event(
    header: header_pb2.EnvelopeHeader,
    event: lifetime_pb2.LifetimeEvent,
    row: lifetime_pb2.AgentLifetime | None,
) -> lifetime_pb2.AgentLifetime:
    """Fold one lifetime event, with the header of the envelope that carried it, into
    ``row`` in place (None: a new row) and return the row."""
    return fold_events(header, (event,), row)


def fold_events(
    header: header_pb2.EnvelopeHeader,
    events: Sequence[lifetime_pb2.LifetimeEvent],
    row: lifetime_pb2.AgentLifetime | None,
) -> lifetime_pb2.AgentLifetime:
    """Fold the events of one envelope (in order, under its ``header``) into ``row`` in
    place (None: a new row) and return the row: as folding them one at a time would.

    The stores fold a batch's events into rows they read for it and write back, so no
    event needs a copy of the whole row. What an event sets from the header, and the
    time of the last change, are set once per envelope: a decision's envelope carries
    several events under one header, and setting protobuf fields is most of what a
    fold costs."""
    if row is None:
        row = lifetime_pb2.AgentLifetime()
        last = -1  # a new row takes its first event whatever its sequence
    else:
        last = row.last_sequence
    newest: lifetime_pb2.LifetimeEvent | None = None
    for event in events:
        if event.sequence <= last:
            # Redelivered or late: never take the row back. A start can come late (its
            # batch failed and was redelivered after the next one), and only it says
            # when the lifetime began and with what input.
            if event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STARTED:
                if not row.HasField("created_at"):
                    row.created_at.CopyFrom(event.at)
                if event.HasField("input") and not row.HasField("input"):
                    row.input.CopyFrom(event.input)
            continue
        last = event.sequence
        newest = event
        if event.kind == lifetime_pb2.LIFETIME_EVENT_KIND_STARTED:
            row.created_at.CopyFrom(event.at)
            if event.HasField("input"):
                row.input.CopyFrom(event.input)
        state = event.state
        if state:
            row.state = state
        if event.HasField("output"):
            row.output.CopyFrom(event.output)
        if event.HasField("error"):
            row.error.CopyFrom(event.error)
        if state in _TERMINAL:
            row.finished_at.CopyFrom(event.at)
    if newest is None:
        return row
    row.lifetime_id = header.lifetime_id
    row.tenant_id = header.tenant_id
    if header.HasField("graph"):
        row.graph.CopyFrom(header.graph)
    if header.labels:
        row.labels.update(header.labels)
    row.mode = header.mode
    if header.HasField("fork_origin"):
        row.fork_origin.CopyFrom(header.fork_origin)
    row.last_sequence = newest.sequence
    row.updated_at.CopyFrom(newest.at)
    return row


_TERMINAL = frozenset(
    {
        lifetime_pb2.LIFETIME_STATE_COMPLETED,
        lifetime_pb2.LIFETIME_STATE_FAILED,
        lifetime_pb2.LIFETIME_STATE_ABORTED,
    }
)

_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def message_token(lifetime_id: str) -> str:
    """A lifetime id fit for a subject token, or a stand-in for unusable ones."""
    return lifetime_id if _SUBJECT_TOKEN.fullmatch(lifetime_id) else "_invalid"
