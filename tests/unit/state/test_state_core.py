"""The state service's pure decisions: record checks, refs, lifetime rows, subject tokens."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from tests.support.factories import GRAPH, LIFETIME_ID, TENANT, make_envelope, ts
from tests.support.records import exec_id, execution_record
from tickmesh.runtime.records import MAX_USAGE, check_telemetry
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import BodyKind, ValidationError
from tickmesh.state import core
from tickmesh.state.store import StoredExecution
from tickmesh.v1 import (
    envelope_pb2,
    header_pb2,
    lifetime_pb2,
    payload_pb2,
    result_pb2,
    telemetry_pb2,
)

LS = lifetime_pb2
NAMES = TenantNames(TENANT)
SUBJECT = NAMES.exec(LIFETIME_ID)
PRODUCER = header_pb2.Producer(service="state", version="1.2.3", instance="host:1")
RecordKind = Literal["task", "plan"]
UUID7 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _stored(env: envelope_pb2.ExecutionEnvelope, raw: bytes, seq: int = 42) -> StoredExecution:
    record = env.task_execution if env.HasField("task_execution") else env.plan_execution
    return StoredExecution(
        tenant=env.header.tenant_id,
        execution_id=record.header.execution_id,
        attempt=record.header.attempt,
        lifetime_id=env.header.lifetime_id,
        kind="task" if env.HasField("task_execution") else "plan",
        node_id=env.header.node.id,
        store_sequence=seq,
        persisted_at=datetime(2026, 11, 23, 12, 0, 1, 500_000, tzinfo=UTC),
        envelope=raw,
        duplicate=False,
    )


# --- check_record ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["task", "plan"])
def test_check_record_accepts_a_record_of_the_subjects_tenant(kind: RecordKind) -> None:
    _, env = execution_record(1, kind=kind)
    core.check_record(SUBJECT, env)


def test_check_record_names_the_claimed_and_the_subject_tenant() -> None:
    _, env = execution_record(1, tenant="globex")
    with pytest.raises(ValidationError) as info:
        core.check_record(SUBJECT, env)
    assert str(info.value) == (
        "record claims tenant(s) ['globex'] but arrived on a subject of tenant 'acme'"
    )


def test_check_record_refuses_a_record_whose_headers_disagree_on_the_tenant() -> None:
    _, env = execution_record(1)
    env.task_execution.header.tenant_id = "globex"
    with pytest.raises(ValidationError) as info:
        core.check_record(SUBJECT, env)
    assert str(info.value) == (
        "record claims tenant(s) ['acme', 'globex'] but arrived on a subject of tenant 'acme'"
    )


def test_check_record_refuses_a_subject_of_another_tenant() -> None:
    _, env = execution_record(1)
    with pytest.raises(ValidationError, match="subject of tenant 'globex'"):
        core.check_record(TenantNames("globex").exec(LIFETIME_ID), env)
    with pytest.raises(ValidationError, match="subject of tenant None"):
        core.check_record("orders.created", env)


@pytest.mark.parametrize("kind", ["task", "plan"])
@pytest.mark.parametrize(
    ("where", "usage", "named"),
    [
        ("total", {"input_tokens": 2**63 - 1}, "telemetry.input_tokens is 9223372036854775807"),
        ("total", {"cost_micros": -1}, "telemetry.cost_micros is -1"),
        ("total", {"output_tokens": MAX_USAGE + 1}, "telemetry.output_tokens is"),
        ("model", {"input_tokens": -3}, "telemetry.model_usage[1].input_tokens is -3"),
        ("model", {"cost_micros": 2**62}, "telemetry.model_usage[1].cost_micros is"),
    ],
)
def test_check_record_refuses_usage_that_cannot_be_summed(
    kind: RecordKind, where: str, usage: dict[str, int], named: str
) -> None:
    """A report no counter can add (or one below zero) is refused where records are read,
    for a record forged on the bus: the executor pool refuses it before it is recorded."""
    _, env = execution_record(1, kind=kind)
    telemetry = (env.task_execution if kind == "task" else env.plan_execution).result.telemetry
    if where == "total":
        for field, value in usage.items():
            setattr(telemetry, field, value)
    else:
        telemetry.model_usage.add(model="small", input_tokens=5)
        telemetry.model_usage.add(model="big", **usage)
    with pytest.raises(ValidationError) as info:
        core.check_record(SUBJECT, env)
    assert str(info.value).startswith(named), info.value


@pytest.mark.parametrize(
    ("what", "where"),
    [("node id", "node.id"), ("graph id", "graph.id"), ("handler", "node.handler")],
)
def test_check_record_refuses_a_nul_in_a_column_the_store_keeps_as_text(
    what: str, where: str
) -> None:
    _, env = execution_record(1)
    holder, field = where.split(".")
    setattr(getattr(env.header, holder), field, "a\x00b")
    with pytest.raises(ValidationError, match=re.escape(f"record {what} 'a\\x00b' holds a NUL")):
        core.check_record(SUBJECT, env)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_telemetry_refuses_a_custom_metric_that_is_not_a_number(value: float) -> None:
    telemetry = telemetry_pb2.Telemetry(input_tokens=1, custom_metrics={"ok": 1.5, "bad": value})
    with pytest.raises(ValidationError, match=r"custom_metrics\['bad'\] is .*finite"):
        check_telemetry(telemetry)


def test_check_telemetry_takes_the_bounds_themselves() -> None:
    at_bounds = telemetry_pb2.Telemetry(
        input_tokens=MAX_USAGE,
        output_tokens=0,
        cost_micros=MAX_USAGE,
        model_usage=[telemetry_pb2.ModelUsage(model="m", input_tokens=MAX_USAGE)],
        custom_metrics={"score": -1e300},
    )
    check_telemetry(at_bounds)


@pytest.mark.parametrize("body", ["task_request", "plan_request", "execution_ref"])
def test_check_record_refuses_bodies_that_are_not_records(body: BodyKind) -> None:
    env = make_envelope(body)
    with pytest.raises(ValidationError, match=f"expected an execution record, got a {body} body"):
        core.check_record(SUBJECT, env)


def test_check_record_refuses_an_envelope_without_a_body() -> None:
    _, record = execution_record(1)
    env = envelope_pb2.ExecutionEnvelope(header=record.header)
    with pytest.raises(ValidationError, match="got a None body"):
        core.check_record(SUBJECT, env)


@pytest.mark.parametrize(
    ("field", "value"), [("execution_id", ""), ("attempt", 0)], ids=["no-id", "attempt-0"]
)
def test_check_record_needs_an_execution_id_and_attempt(field: str, value: object) -> None:
    _, env = execution_record(1)
    setattr(env.task_execution.header, field, value)
    with pytest.raises(ValidationError) as info:
        core.check_record(SUBJECT, env)
    assert str(info.value) == "record header needs an execution_id and an attempt >= 1"


def test_check_record_refuses_a_record_of_another_lifetime() -> None:
    _, env = execution_record(1)
    env.task_execution.header.lifetime_id = "019a0000-0000-7000-8000-0000000000ff"
    with pytest.raises(ValidationError) as info:
        core.check_record(SUBJECT, env)
    assert str(info.value) == "record and envelope disagree on the lifetime id"


# --- refs -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["task", "plan"])
def test_ref_envelope_wraps_the_stored_record(kind: RecordKind) -> None:
    raw, env = execution_record(3, kind=kind, attempt=2)
    stored = _stored(env, raw, seq=77)
    before = datetime.now(UTC)
    ref = core.ref_envelope(stored, env, PRODUCER)
    after = datetime.now(UTC)

    expected_header = header_pb2.EnvelopeHeader()
    expected_header.CopyFrom(env.header)
    expected_header.envelope_id = ref.header.envelope_id
    expected_header.sequence = 77
    expected_header.producer.CopyFrom(PRODUCER)
    expected_header.created_at.CopyFrom(ref.header.created_at)
    assert ref.header == expected_header
    assert ref.header.envelope_id != env.header.envelope_id
    assert UUID7.fullmatch(ref.header.envelope_id)
    created = ref.header.created_at.ToDatetime(tzinfo=UTC)
    assert before - timedelta(microseconds=1) <= created <= after + timedelta(microseconds=1)

    assert ref.WhichOneof("body") == "execution_ref"
    body = ref.execution_ref
    assert body.store_sequence == 77
    assert body.persisted_at.ToDatetime(tzinfo=UTC) == stored.persisted_at
    if kind == "task":
        assert body.WhichOneof("record") == "task_execution"
        assert body.task_execution == env.task_execution
    else:
        assert body.WhichOneof("record") == "plan_execution"
        assert body.plan_execution == env.plan_execution
    # The input is left alone.
    assert env.header.sequence != 77


def test_ref_message_id_names_the_execution_and_attempt() -> None:
    assert core.ref_message_id(exec_id(5), 3) == f"ref:{exec_id(5)}:3"


def test_error_event_is_an_out_of_band_dead_letter_event() -> None:
    env = core.error_event(NAMES, LIFETIME_ID, "dead-lettered: bad bytes", PRODUCER)
    assert env.header.tenant_id == TENANT
    assert env.header.lifetime_id == LIFETIME_ID
    assert env.header.producer == PRODUCER
    assert UUID7.fullmatch(env.header.envelope_id)
    event = env.lifetime_event
    assert event.sequence == 0
    assert event.kind == LS.LIFETIME_EVENT_KIND_DEAD_LETTERED
    assert event.message == "dead-lettered: bad bytes"
    assert event.at == env.header.created_at


# --- lifetime rows ----------------------------------------------------------------------


def _event_envelope(
    sequence: int,
    kind: lifetime_pb2.LifetimeEventKind.ValueType,
    state: lifetime_pb2.LifetimeState.ValueType = LS.LIFETIME_STATE_RUNNING,
    *,
    output: payload_pb2.Payload | None = None,
    error: result_pb2.ErrorInfo | None = None,
) -> envelope_pb2.ExecutionEnvelope:
    header = header_pb2.EnvelopeHeader(
        tenant_id=TENANT,
        lifetime_id=LIFETIME_ID,
        graph=GRAPH,
        labels={"team": "platform"},
        mode=header_pb2.EXECUTION_MODE_LIVE,
        sequence=sequence,
    )
    event = lifetime_pb2.LifetimeEvent(
        sequence=sequence,
        kind=kind,
        state=state,
        at=ts(sequence * 1000),
        output=output,
        error=error,
    )
    return envelope_pb2.ExecutionEnvelope(header=header, lifetime_event=event)


def _fold(*envelopes: envelope_pb2.ExecutionEnvelope) -> lifetime_pb2.AgentLifetime:
    row: lifetime_pb2.AgentLifetime | None = None
    for env in envelopes:
        row = core.fold_event(env.header, env.lifetime_event, row)
    assert row is not None
    return row


def test_lifetime_row_starts_from_the_started_event() -> None:
    row = _fold(_event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED))
    assert row.lifetime_id == LIFETIME_ID
    assert row.tenant_id == TENANT
    assert row.graph == GRAPH
    assert dict(row.labels) == {"team": "platform"}
    assert row.mode == header_pb2.EXECUTION_MODE_LIVE
    assert row.state == LS.LIFETIME_STATE_RUNNING
    assert row.last_sequence == 1
    assert row.created_at == ts(1000)
    assert row.updated_at == ts(1000)
    assert not row.HasField("finished_at")


def test_lifetime_row_folds_events_up_to_a_completed_end() -> None:
    output = payload_pb2.Payload(content_type="application/json", inline=b'{"ok":true}')
    row = _fold(
        _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED),
        _event_envelope(2, LS.LIFETIME_EVENT_KIND_STEP_DISPATCHED),
        _event_envelope(3, LS.LIFETIME_EVENT_KIND_STEP_FINISHED),
        _event_envelope(
            4, LS.LIFETIME_EVENT_KIND_STATE_CHANGED, LS.LIFETIME_STATE_COMPLETED, output=output
        ),
    )
    assert row.state == LS.LIFETIME_STATE_COMPLETED
    assert row.last_sequence == 4
    assert row.created_at == ts(1000)
    assert row.updated_at == ts(4000)
    assert row.finished_at == ts(4000)
    assert row.output == output
    assert not row.HasField("error")


@pytest.mark.parametrize(
    "terminal", [LS.LIFETIME_STATE_FAILED, LS.LIFETIME_STATE_ABORTED], ids=["failed", "aborted"]
)
def test_lifetime_row_records_the_error_and_finish_of_a_failed_end(
    terminal: lifetime_pb2.LifetimeState.ValueType,
) -> None:
    error = result_pb2.ErrorInfo(type="guardrail.aborted", message="over budget")
    row = _fold(
        _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED),
        _event_envelope(2, LS.LIFETIME_EVENT_KIND_STATE_CHANGED, terminal, error=error),
    )
    assert row.state == terminal
    assert row.error == error
    assert row.finished_at == ts(2000)


def test_lifetime_row_has_no_finish_while_paused_or_waiting() -> None:
    row = _fold(
        _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED),
        _event_envelope(2, LS.LIFETIME_EVENT_KIND_STATE_CHANGED, LS.LIFETIME_STATE_PAUSED),
        _event_envelope(3, LS.LIFETIME_EVENT_KIND_STATE_CHANGED, LS.LIFETIME_STATE_WAITING),
    )
    assert row.state == LS.LIFETIME_STATE_WAITING
    assert not row.HasField("finished_at")


def test_lifetime_row_keeps_earlier_fields_and_merges_labels() -> None:
    first = _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED)
    later = _event_envelope(2, LS.LIFETIME_EVENT_KIND_STEP_DISPATCHED)
    later.header.ClearField("graph")
    later.header.labels["run"] = "7"
    fork = header_pb2.ForkOrigin(lifetime_id="019a0000-0000-7000-8000-0000000000f0")
    later.header.fork_origin.CopyFrom(fork)
    row = _fold(first, later)
    assert row.graph == GRAPH
    assert dict(row.labels) == {"team": "platform", "run": "7"}
    assert row.fork_origin == fork
    assert row.created_at == ts(1000)


def test_lifetime_row_is_not_taken_back_by_a_redelivered_older_event() -> None:
    """A redelivered event older than the row must not roll its state back."""
    done = _fold(
        _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED),
        _event_envelope(2, LS.LIFETIME_EVENT_KIND_STATE_CHANGED, LS.LIFETIME_STATE_COMPLETED),
    )
    redelivered = _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED)
    again = core.fold_event(redelivered.header, redelivered.lifetime_event, done)
    assert again.last_sequence == 2
    assert again.state == LS.LIFETIME_STATE_COMPLETED
    assert again.updated_at == done.updated_at
    assert again.created_at == done.created_at


def test_fold_event_changes_the_row_in_place() -> None:
    envelopes = [
        _event_envelope(1, LS.LIFETIME_EVENT_KIND_STARTED),
        _event_envelope(2, LS.LIFETIME_EVENT_KIND_STATE_CHANGED, LS.LIFETIME_STATE_COMPLETED),
    ]
    row = core.fold_event(envelopes[0].header, envelopes[0].lifetime_event, None)
    same = core.fold_event(envelopes[1].header, envelopes[1].lifetime_event, row)
    assert same is row
    assert row == _fold(*envelopes)
    # An older event leaves the row as it is, in place too.
    older = core.fold_event(envelopes[0].header, envelopes[0].lifetime_event, row)
    assert older is row
    assert (row.last_sequence, row.state) == (2, LS.LIFETIME_STATE_COMPLETED)


# --- message_token ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "lifetime_id",
    [LIFETIME_ID, "abc", "A_b-9", "x" * 128],
)
def test_message_token_keeps_usable_lifetime_ids(lifetime_id: str) -> None:
    assert core.message_token(lifetime_id) == lifetime_id


@pytest.mark.parametrize(
    "lifetime_id",
    [
        "",
        "a.b",
        "a b",
        "a*",
        "a>",
        "x" * 129,
        "tm.acme.evt.>",
        "lifetime-\u00e9",
        "\u0661\u0662\u0663",
        "\uff41\uff42\uff43",
    ],
    ids=[
        "empty",
        "dot",
        "space",
        "star",
        "gt",
        "too-long",
        "subject",
        "accented",
        "arabic-digits",
        "fullwidth",
    ],
)
def test_message_token_replaces_ids_unfit_for_a_subject(lifetime_id: str) -> None:
    token = core.message_token(lifetime_id)
    assert token == "_invalid"
    NAMES.evt(token)  # the subject builder accepts the stand-in
