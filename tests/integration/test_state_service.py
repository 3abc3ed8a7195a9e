"""StateService over gRPC on a real grpc.aio server and a real nats-server.

Most tests build the state service alone (``state.server.build``) for two fresh
tenants, with SQLite and a blob folder under ``tmp_path``, and watch the refs
it publishes with a plain nats-py subscription. The lifetime-row test runs a
whole embedded mesh, since rows are folded from the router's events.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo
from nats.js.client import JetStreamContext

from tests.support.event_batches import decision_events, publish_event_batch
from tests.support.factories import make_envelope
from tests.support.nats_server import new_tenant
from tests.support.records import Record, exec_id, execution_record, usage
from tests.support.service_harness import (
    Metadata,
    eventually,
    expect_status,
    open_mesh,
    tenant_metadata,
)
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.blobs import LocalBlobStore
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import HDR_LIFETIME, HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.sdk import (
    Decision,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    decode_envelope,
    dispatch,
    encode_envelope,
    plan,
    step,
    task,
)
from tickmesh.state.config import StateSettings
from tickmesh.state.server import StateService, build
from tickmesh.state.store import SQLiteStateStore
from tickmesh.v1 import (
    envelope_pb2,
    lifetime_pb2,
    state_service_pb2,
    state_service_pb2_grpc,
    telemetry_pb2,
)

SS = state_service_pb2
LIFETIME_A = "019a0000-0000-7000-8000-00000000000a"
LIFETIME_B = "019a0000-0000-7000-8000-00000000000b"
MIB = 1024 * 1024


@dataclass
class StateHarness:
    """A state service serving two tenants, a client stub and a NATS connection."""

    service: StateService
    tenant: str
    other: str
    nc: NatsClient
    stub: state_service_pb2_grpc.StateServiceAsyncStub
    refs: list[Msg] = field(default_factory=list)

    @property
    def md(self) -> Metadata:
        return tenant_metadata(self.tenant)

    def record(self, n: int, **overrides: Any) -> Record:
        overrides.setdefault("tenant", self.tenant)
        overrides.setdefault("lifetime_id", LIFETIME_A)
        return execution_record(n, **overrides)

    async def append(self, records: Sequence[Record]) -> list[SS.AppendOutcome]:
        response = await self.stub.AppendExecution(
            SS.AppendExecutionRequest(envelopes=[env for _, env in records]), metadata=self.md
        )
        return list(response.outcomes)

    async def wait_refs(self, count: int, within: float = 2.0) -> list[Msg]:
        async def enough() -> bool:
            return len(self.refs) >= count

        await eventually(enough, within=within, what=f"{count} refs")
        return list(self.refs)


async def state_service(
    nats_url: str, nc: NatsClient, tmp_path: Path, tenants: list[str]
) -> StateService:
    """A state service for ``tenants`` over SQLite and a blob folder in ``tmp_path``."""
    settings = StateSettings(
        nats_url=nats_url,
        tenants=tenants,
        grpc_listen="127.0.0.1:0",
        log_json=False,
        store_url=f"sqlite:///{tmp_path / 'state.db'}",
        blob_url=str(tmp_path / "blobs"),
    )
    store = await SQLiteStateStore.open(tmp_path / "state.db", synchronous="OFF")
    return await build(
        settings, nc=nc, store=store, blobs=LocalBlobStore(tmp_path / "blobs", fsync=False)
    )


@pytest.fixture
async def state(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[StateHarness]:
    tenant, other = new_tenant("s"), new_tenant("o")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    service = await state_service(nats_server.url, nc, tmp_path, [tenant, other])
    await service.start()
    refs: list[Msg] = []

    async def collect(msg: Msg) -> None:
        refs.append(msg)

    sub = await nc.subscribe(TenantNames(tenant).ref_all, cb=collect)
    channel = grpc.aio.insecure_channel(service.target)
    harness = StateHarness(
        service, tenant, other, nc, state_service_pb2_grpc.StateServiceStub(channel), refs
    )
    try:
        yield harness
    finally:
        await channel.close()
        await sub.unsubscribe()
        await service.stop()
        await nc.close()


def _tokens(telemetry: telemetry_pb2.Telemetry) -> tuple[int, int, int, int, int]:
    return (
        telemetry.input_tokens,
        telemetry.output_tokens,
        telemetry.cost_micros,
        telemetry.model_calls,
        telemetry.tool_calls,
    )


# --- appends and refs -------------------------------------------------------------------


async def test_append_execution_stores_records_and_publishes_a_ref_for_each(
    state: StateHarness,
) -> None:
    first = state.record(1)
    second = state.record(2, lifetime_id=LIFETIME_B, kind="plan")
    outcomes = await state.append([first, second, first])

    assert [(o.execution_id, o.attempt, o.duplicate) for o in outcomes] == [
        (exec_id(1), 1, False),
        (exec_id(2), 1, False),
        (exec_id(1), 1, True),
    ]
    assert outcomes[0].store_sequence < outcomes[1].store_sequence
    assert outcomes[2].store_sequence == outcomes[0].store_sequence

    refs = await state.wait_refs(3)
    assert [m.subject for m in refs] == [
        f"tm.{state.tenant}.ref.{LIFETIME_A}",
        f"tm.{state.tenant}.ref.{LIFETIME_B}",
        f"tm.{state.tenant}.ref.{LIFETIME_A}",
    ]
    for msg, (_, record), outcome in zip(refs, [first, second, first], outcomes, strict=True):
        assert msg.headers is not None
        assert msg.headers[HDR_MSG_ID] == f"ref:{outcome.execution_id}:1"
        assert msg.headers[HDR_TYPE] == "execution_ref"
        assert msg.headers[HDR_TENANT] == state.tenant
        assert msg.headers[HDR_LIFETIME] == record.header.lifetime_id
        ref = decode_envelope(msg.data, expected_kind="execution_ref")
        assert ref.header.producer.service == "state"
        assert ref.header.sequence == outcome.store_sequence
        assert ref.execution_ref.store_sequence == outcome.store_sequence
        body = record.WhichOneof("body")
        assert ref.execution_ref.WhichOneof("record") == body
        assert getattr(ref.execution_ref, str(body)) == getattr(record, str(body))

    # Appending a stored record again stores nothing but still publishes its ref.
    [again] = await state.append([second])
    assert (again.duplicate, again.store_sequence) == (True, outcomes[1].store_sequence)
    refs = await state.wait_refs(4)
    assert refs[3].headers is not None
    assert refs[3].headers[HDR_MSG_ID] == f"ref:{exec_id(2)}:1"
    listed = await state.stub.ListExecutions(
        SS.ListExecutionsRequest(lifetime_id=LIFETIME_A), metadata=state.md
    )
    assert [e.task_execution.header.execution_id for e in listed.executions] == [exec_id(1)]


async def test_append_execution_refuses_a_record_of_another_tenant_and_stores_nothing(
    state: StateHarness,
) -> None:
    good = state.record(1)
    foreign = state.record(2, tenant=state.other)
    details = await expect_status(
        state.stub.AppendExecution(
            SS.AppendExecutionRequest(envelopes=[good[1], foreign[1]]), metadata=state.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("envelopes[1]: ")
    assert repr(state.other) in details
    assert repr(state.tenant) in details

    # Only the record's body claims the other tenant.
    half = state.record(3)
    half[1].task_execution.header.tenant_id = state.other
    details = await expect_status(
        state.stub.AppendExecution(
            SS.AppendExecutionRequest(envelopes=[half[1]]), metadata=state.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("envelopes[0]: record claims tenant(s)")

    not_a_record = envelope_pb2.ExecutionEnvelope(header=good[1].header)
    not_a_record.task_request.SetInParent()
    await expect_status(
        state.stub.AppendExecution(
            SS.AppendExecutionRequest(envelopes=[not_a_record]), metadata=state.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )

    for n in (1, 2, 3):
        await expect_status(
            state.stub.GetExecution(
                SS.GetExecutionRequest(execution_id=exec_id(n)), metadata=state.md
            ),
            grpc.StatusCode.NOT_FOUND,
        )
    counters = await state.stub.GetCounters(
        SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_TENANT), metadata=state.md
    )
    assert counters.executions == 0
    await asyncio.sleep(0.2)
    assert state.refs == []


async def test_state_calls_need_tenant_credentials(state: StateHarness) -> None:
    await expect_status(
        state.stub.GetExecution(SS.GetExecutionRequest(execution_id=exec_id(1))),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await expect_status(
        state.stub.GetExecution(
            SS.GetExecutionRequest(execution_id=exec_id(1)), metadata=tenant_metadata("nobody")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


# --- reads ------------------------------------------------------------------------------


async def test_get_execution_and_list_executions_page_in_store_order(state: StateHarness) -> None:
    records = [state.record(n) for n in range(1, 6)]
    outcomes = await state.append(records)
    await state.append([state.record(9, lifetime_id=LIFETIME_B)])
    [retry] = await state.append([state.record(1, attempt=2)])

    newest = await state.stub.GetExecution(
        SS.GetExecutionRequest(execution_id=exec_id(1)), metadata=state.md
    )
    assert newest.execution.task_execution.header.attempt == 2
    assert newest.execution.store_sequence == retry.store_sequence
    first = await state.stub.GetExecution(
        SS.GetExecutionRequest(execution_id=exec_id(1), attempt=1), metadata=state.md
    )
    assert first.execution.task_execution == records[0][1].task_execution
    assert first.execution.store_sequence == outcomes[0].store_sequence
    assert first.execution.HasField("persisted_at")
    await expect_status(
        state.stub.GetExecution(
            SS.GetExecutionRequest(execution_id=exec_id(1), attempt=3), metadata=state.md
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # Another tenant sees none of it.
    await expect_status(
        state.stub.GetExecution(
            SS.GetExecutionRequest(execution_id=exec_id(1)), metadata=tenant_metadata(state.other)
        ),
        grpc.StatusCode.NOT_FOUND,
    )

    seen: list[tuple[str, int]] = []
    sequences: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await state.stub.ListExecutions(
            SS.ListExecutionsRequest(lifetime_id=LIFETIME_A, page_size=2, page_token=token),
            metadata=state.md,
        )
        pages += 1
        assert len(page.executions) <= 2
        for ref in page.executions:
            header = ref.task_execution.header
            seen.append((header.execution_id, header.attempt))
            sequences.append(ref.store_sequence)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [(exec_id(n), 1) for n in range(1, 6)] + [(exec_id(1), 2)]
    assert sequences == sorted(sequences)

    await expect_status(
        state.stub.ListExecutions(
            SS.ListExecutionsRequest(lifetime_id=LIFETIME_A, page_token="not-a-token"),
            metadata=state.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    empty = await state.stub.ListExecutions(
        SS.ListExecutionsRequest(lifetime_id=LIFETIME_A), metadata=tenant_metadata(state.other)
    )
    assert not empty.executions


async def test_get_counters_by_lifetime_and_tenant_and_window(state: StateHarness) -> None:
    await state.append(
        [
            state.record(1, telemetry=usage(10, 5, 100, 1, 0)),
            state.record(2, telemetry=usage(20, 0, 50, 1, 2)),
            state.record(3, lifetime_id=LIFETIME_B, telemetry=usage(7, 3, 1, 0, 1)),
        ]
    )
    await state.append([state.record(1, telemetry=usage(10, 5, 100, 1, 0))])  # a duplicate

    lifetime = await state.stub.GetCounters(
        SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_LIFETIME, lifetime_id=LIFETIME_A),
        metadata=state.md,
    )
    assert (_tokens(lifetime.totals), lifetime.executions) == ((30, 5, 150, 2, 2), 2)
    tenant = await state.stub.GetCounters(
        SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_TENANT), metadata=state.md
    )
    assert (_tokens(tenant.totals), tenant.executions) == ((37, 8, 151, 2, 3), 3)
    stranger = await state.stub.GetCounters(
        SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_TENANT), metadata=tenant_metadata(state.other)
    )
    assert stranger.executions == 0

    await asyncio.sleep(1.2)
    await state.append([state.record(4, lifetime_id=LIFETIME_B, telemetry=usage(1000))])
    recent = await state.stub.GetCounters(
        SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_TENANT, window_seconds=1), metadata=state.md
    )
    assert (_tokens(recent.totals), recent.executions) == ((1000, 0, 0, 0, 0), 1)
    recent_a = await state.stub.GetCounters(
        SS.GetCountersRequest(
            scope=SS.COUNTER_SCOPE_LIFETIME, lifetime_id=LIFETIME_A, window_seconds=1
        ),
        metadata=state.md,
    )
    assert recent_a.executions == 0
    wide = await state.stub.GetCounters(
        SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_TENANT, window_seconds=3600),
        metadata=state.md,
    )
    assert (wide.totals.input_tokens, wide.executions) == (1037, 4)
    for endless in (2**40, 2**63, 2**64 - 1):  # past 1970 (and past timedelta): every record
        everything = await state.stub.GetCounters(
            SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_TENANT, window_seconds=endless),
            metadata=state.md,
        )
        assert (everything.totals.input_tokens, everything.executions) == (1037, 4)

    for bound, seconds, nanos in (("since", 2**62, 0), ("until", 0, -1), ("since", -(2**40), 0)):
        request = SS.GetUsageRequest()
        getattr(request, bound).seconds = seconds
        getattr(request, bound).nanos = nanos
        details = await expect_status(
            state.stub.GetUsage(request, metadata=state.md), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert details.startswith(f"{bound} is not a valid timestamp"), details

    await expect_status(
        state.stub.GetCounters(SS.GetCountersRequest(), metadata=state.md),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await expect_status(
        state.stub.GetCounters(
            SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_LIFETIME), metadata=state.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


# --- blobs ------------------------------------------------------------------------------


async def _upload(
    state: StateHarness,
    data: bytes,
    *,
    sha256: str | None = None,
    size: int | None = None,
    content_type: str = "application/octet-stream",
    metadata: Metadata | None = None,
) -> SS.PutBlobResponse:
    async def parts() -> AsyncIterator[SS.PutBlobRequest]:
        yield SS.PutBlobRequest(
            upload=SS.BlobUpload(
                content_type=content_type,
                size=len(data) if size is None else size,
                sha256=hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
            )
        )
        for start in range(0, len(data), MIB):
            yield SS.PutBlobRequest(chunk=data[start : start + MIB])

    return await state.stub.PutBlob(parts(), metadata=metadata or state.md)


async def _download(state: StateHarness, uri: str) -> tuple[SS.GetBlobResponse, list[bytes]]:
    call = state.stub.GetBlob(SS.GetBlobRequest(uri=uri), metadata=state.md)
    responses = [response async for response in call]
    return responses[0], [r.chunk for r in responses[1:]]


async def test_put_blob_and_get_blob_round_trip_three_mib(state: StateHarness) -> None:
    data = os.urandom(3 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    stored = await _upload(state, data, content_type="application/x-test")
    blob = stored.blob
    assert (blob.sha256, blob.size, blob.content_type) == (digest, 3 * MIB, "application/x-test")
    assert blob.uri.startswith("file://")
    assert f"/{state.tenant}/{digest[:2]}/{digest}" in blob.uri

    first, chunks = await _download(state, blob.uri)
    assert first.WhichOneof("part") == "blob"
    assert (first.blob.uri, first.blob.sha256, first.blob.size) == (blob.uri, digest, 3 * MIB)
    assert [len(c) for c in chunks] == [MIB, MIB, MIB]
    assert b"".join(chunks) == data

    # Content-addressed: the same bytes again give the same reference.
    again = await _upload(state, data, content_type="application/x-test")
    assert again.blob == blob


async def test_put_blob_verifies_the_declared_sha256_and_size(state: StateHarness) -> None:
    data = os.urandom(MIB + 17)
    details = await expect_status(
        _upload(state, data, sha256="0" * 64), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "sha256 mismatch" in details
    assert hashlib.sha256(data).hexdigest() in details
    await expect_status(_upload(state, data, size=len(data) + 1), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_status(_upload(state, data, size=len(data) - 1), grpc.StatusCode.INVALID_ARGUMENT)

    async def chunk_first() -> AsyncIterator[SS.PutBlobRequest]:
        yield SS.PutBlobRequest(chunk=b"abc")

    details = await expect_status(
        state.stub.PutBlob(chunk_first(), metadata=state.md), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "upload description" in details
    # Nothing was stored under the tenant.
    assert not (Path(state.service.settings.blob_url) / state.tenant).exists()


async def test_get_blob_of_another_tenants_uri_is_invalid(state: StateHarness) -> None:
    stored = await _upload(state, b"private bytes", metadata=tenant_metadata(state.other))
    details = await expect_status(
        _download(state, stored.blob.uri), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert f"outside tenant {state.tenant!r}" in details
    await expect_status(_download(state, "file:///etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT)


# --- lifetime rows ----------------------------------------------------------------------

PAIR = """\
graph: pair
entry: first
nodes:
  - {id: first, kind: task, handler: pair_first}
  - {id: decide, kind: plan, handler: pair_decide}
  - {id: second, kind: task, handler: pair_second}
edges:
  - {from: first, to: decide}
  - {from: decide, to: second}
  - {from: second, to: decide}
  - {from: decide, kind: final}
"""


@task
async def pair_first(ctx: TaskContext, value: Any) -> int:
    ctx.report(input_tokens=11, output_tokens=4, cost_micros=30, model="m")
    return 1


@task
async def pair_second(ctx: TaskContext, value: Any) -> int:
    ctx.report(input_tokens=9, output_tokens=6, cost_micros=20, model="m")
    return 2


@plan
async def pair_decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    if inputs[-1].node_id == "first":
        return dispatch(step("second"))
    return complete({"done": inputs[-1].output})


async def test_get_lifetime_record_after_a_lifetime_ran(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    async with open_mesh(nats_server.url, tmp_path) as mesh:
        await mesh.start_worker([pair_first, pair_second, pair_decide])
        graph = await mesh.register(PAIR)
        started = await mesh.start("pair", {"go": True}, labels={"team": "qa"})
        lifetime_id = started.lifetime_id
        events = await mesh.events(lifetime_id)
        assert events[-1].state == lifetime_pb2.LIFETIME_STATE_COMPLETED
        # Each decision publishes its events as one message; the watch shows each event.
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))

        # What the watch showed is in the row at once: the read waits for the events and
        # the records on the bus to be stored.
        response = await mesh.state.GetLifetimeRecord(
            SS.GetLifetimeRecordRequest(lifetime_id=lifetime_id), metadata=mesh.md
        )
        row = response.lifetime
        assert row.last_sequence == events[-1].sequence
        assert row.lifetime_id == lifetime_id
        assert row.tenant_id == mesh.tenant
        assert row.state == lifetime_pb2.LIFETIME_STATE_COMPLETED
        assert (row.graph.id, row.graph.version, row.graph.digest) == (
            "pair",
            graph.version,
            graph.digest,
        )
        assert dict(row.labels) == {"team": "qa"}
        assert row.execution_count == 4
        assert _tokens(row.totals) == (20, 10, 50, 2, 0)
        assert row.created_at == events[0].at
        assert row.finished_at == events[-1].at
        assert row.output.inline == b'{"done":2}'

        counters = await mesh.state.GetCounters(
            SS.GetCountersRequest(scope=SS.COUNTER_SCOPE_LIFETIME, lifetime_id=lifetime_id),
            metadata=mesh.md,
        )
        assert (counters.totals, counters.executions) == (row.totals, 4)
        await expect_status(
            mesh.state.GetLifetimeRecord(
                SS.GetLifetimeRecordRequest(lifetime_id="019a0000-0000-7000-8000-0000000000ff"),
                metadata=mesh.md,
            ),
            grpc.StatusCode.NOT_FOUND,
        )


async def test_list_lifetime_records_pages_newest_first_as_soon_as_started(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    async with open_mesh(nats_server.url, tmp_path) as mesh:
        await mesh.start_worker([pair_first, pair_second, pair_decide])
        await mesh.register(PAIR)
        # Started and listed at once: the read waits for the events on the bus.
        ids = [(await mesh.start("pair", {"go": True})).lifetime_id for _ in range(3)]
        seen: list[str] = []
        token = ""
        for _ in range(3):
            page = await mesh.state.ListLifetimeRecords(
                SS.ListLifetimeRecordsRequest(page_size=2, page_token=token), metadata=mesh.md
            )
            seen.extend(lt.lifetime_id for lt in page.lifetimes)
            token = page.next_page_token
            if not token:
                break
        assert seen == list(reversed(ids))
        assert token == ""
        await mesh.events(ids[0])
        done = await mesh.state.ListLifetimeRecords(
            SS.ListLifetimeRecordsRequest(
                states=[lifetime_pb2.LIFETIME_STATE_COMPLETED], graph_id="pair"
            ),
            metadata=mesh.md,
        )
        assert ids[0] in [lt.lifetime_id for lt in done.lifetimes]
        assert all(lt.execution_count == 4 for lt in done.lifetimes)
        details = await expect_status(
            mesh.state.ListLifetimeRecords(
                SS.ListLifetimeRecordsRequest(page_token="not a token!"), metadata=mesh.md
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in details


async def test_a_decisions_events_in_one_message_are_stored_one_by_one(
    state: StateHarness,
) -> None:
    names = TenantNames(state.tenant)
    batch = make_envelope("lifetime_events")
    batch.header.tenant_id = state.tenant
    batch.header.lifetime_id = LIFETIME_A
    single = make_envelope("lifetime_event")
    single.header.tenant_id = state.tenant
    single.header.lifetime_id = LIFETIME_A
    single.lifetime_event.sequence = single.header.sequence = 9
    for envelope, kind, msg_id in (
        (batch, "lifetime_events", "evt:a:7-8"),
        (single, "lifetime_event", "evt:a:9"),
    ):
        await state.nc.jetstream().publish(
            names.evb,
            encode_envelope(envelope),
            headers={HDR_TYPE: kind, HDR_MSG_ID: msg_id, HDR_TENANT: state.tenant},
        )

    store = state.service.store

    async def stored() -> list[lifetime_pb2.LifetimeEvent] | None:
        events = await store.list_events(state.tenant, LIFETIME_A)
        return events if len(events) == 3 else None

    events = await eventually(stored, what="three stored events")
    assert events is not None
    assert [e.sequence for e in events] == [7, 8, 9]
    assert list(events[:2]) == list(batch.lifetime_events.events)
    assert [e.kind for e in events][:2] == [
        lifetime_pb2.LIFETIME_EVENT_KIND_STEP_FINISHED,
        lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
    ]
    row = await store.get_lifetime(state.tenant, LIFETIME_A)
    assert row is not None
    assert row.last_sequence == 9


async def test_a_routers_batch_of_events_is_stored_per_lifetime_and_each_event_once(
    state: StateHarness,
) -> None:
    """The router publishes a routed batch's events in one message: each decision's events
    land in their lifetime's history, and a decision published again in another batch (a
    router that crashed before the first batch's PubAck) is stored once."""
    store = state.service.store
    a1, b1 = (
        decision_events(state.tenant, LIFETIME_A, [1, 2]),
        decision_events(state.tenant, LIFETIME_B, [1]),
    )
    a2 = decision_events(state.tenant, LIFETIME_A, [3, 4])
    await publish_event_batch(state.nc, state.tenant, "evb:one", [a1, b1])
    await publish_event_batch(
        state.nc, state.tenant, "evb:two", [a1, a2]
    )  # a1 again, beside a new decision

    async def stored() -> tuple[list[int], list[int]] | None:
        a = [e.sequence for e in await store.list_events(state.tenant, LIFETIME_A)]
        b = [e.sequence for e in await store.list_events(state.tenant, LIFETIME_B)]
        return (a, b) if len(a) >= 4 and b else None

    assert await eventually(stored, what="both lifetimes' events") == ([1, 2, 3, 4], [1])
    row = await store.get_lifetime(state.tenant, LIFETIME_A)
    assert row is not None
    assert row.last_sequence == 4


async def test_a_batch_with_a_decision_of_another_tenant_is_refused_whole(
    state: StateHarness,
) -> None:
    """A batch is one router's write: one part claiming another tenant makes the whole of it
    unreadable (nothing of it stored), and the batches behind it are stored."""
    store = state.service.store
    mine = decision_events(state.tenant, LIFETIME_A, [1])
    theirs = decision_events("intruder", LIFETIME_B, [1])
    await publish_event_batch(state.nc, state.tenant, "evb:forged", [mine, theirs])
    await publish_event_batch(
        state.nc, state.tenant, "evb:next", [decision_events(state.tenant, LIFETIME_B, [1, 2])]
    )

    async def stored() -> list[int]:
        return [e.sequence for e in await store.list_events(state.tenant, LIFETIME_B)]

    assert await eventually(stored, what="the next batch stored") == [1, 2]
    assert await store.list_events(state.tenant, LIFETIME_A) == []
    assert await store.list_events("intruder", LIFETIME_B) == []


async def test_a_lifetime_record_read_waits_for_the_lifetime_events_already_on_the_bus(
    state: StateHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that watched a lifetime complete reads a row that says so: the read waits
    for the events on the bus to be folded into the row."""
    store = state.service.store
    started = make_envelope("lifetime_event")
    started.header.tenant_id = state.tenant
    started.header.lifetime_id = LIFETIME_A
    started.lifetime_event.sequence = started.header.sequence = 1
    started.lifetime_event.state = lifetime_pb2.LIFETIME_STATE_RUNNING
    ended = make_envelope("lifetime_event")
    ended.CopyFrom(started)
    ended.lifetime_event.sequence = ended.header.sequence = 2
    ended.lifetime_event.state = lifetime_pb2.LIFETIME_STATE_COMPLETED
    await publish_event(state, started)

    async def running() -> lifetime_pb2.AgentLifetime | None:
        row = await store.get_lifetime(state.tenant, LIFETIME_A)
        return row if row is not None and row.last_sequence == 1 else None

    await eventually(running, what="the first event folded")
    released = hold_back(monkeypatch, store, "apply_events")
    await publish_event(state, ended)
    read = asyncio.create_task(lifetime_record(state))
    await asyncio.sleep(0.3)
    assert not read.done()

    released.set()
    response = await asyncio.wait_for(read, 5)
    assert (response.lifetime.last_sequence, response.lifetime.state) == (
        2,
        lifetime_pb2.LIFETIME_STATE_COMPLETED,
    )


async def test_lifetime_events_are_listed_once_on_the_bus_and_only_to_their_tenant(
    state: StateHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListLifetimeEvents (what a watch reads once the event stream has dropped a part of a
    history) waits for the events on the bus to be stored, and lists a tenant's own only."""
    released = hold_back(monkeypatch, state.service.store, "apply_events")
    for sequence in (1, 2, 3):
        envelope = make_envelope("lifetime_event")
        envelope.header.tenant_id = state.tenant
        envelope.header.lifetime_id = LIFETIME_A
        envelope.lifetime_event.sequence = envelope.header.sequence = sequence
        await publish_event(state, envelope)

    async def listed(tenant: str, after: int = 0, size: int = 0) -> list[int]:
        response: SS.ListLifetimeEventsResponse = await state.stub.ListLifetimeEvents(
            SS.ListLifetimeEventsRequest(
                lifetime_id=LIFETIME_A, after_sequence=after, page_size=size
            ),
            metadata=tenant_metadata(tenant),
        )
        return [e.sequence for e in response.events]

    read = asyncio.create_task(listed(state.tenant))
    await asyncio.sleep(0.3)
    assert not read.done()
    released.set()
    assert await asyncio.wait_for(read, 5) == [1, 2, 3]
    assert await listed(state.tenant, after=1, size=1) == [2]
    assert await listed(state.other) == []
    details = await expect_status(
        listed(state.tenant, after=2**64 - 1), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "after_sequence" in details


# --- records from the bus -------------------------------------------------------------


async def publish_record(state: StateHarness, record: Record) -> None:
    raw, env = record
    names = TenantNames(state.tenant)
    js = runtime_nats.jetstream(state.nc)
    await js.publish(
        names.exec(env.header.lifetime_id),
        raw,
        headers={
            HDR_TYPE: env.WhichOneof("body") or "",
            HDR_TENANT: state.tenant,
            HDR_LIFETIME: env.header.lifetime_id,
            HDR_MSG_ID: f"exec:{env.header.execution_id}:{env.header.attempt}",
        },
    )


async def listed_ids(state: StateHarness, lifetime_id: str = LIFETIME_A) -> list[str]:
    listed = await state.stub.ListExecutions(
        SS.ListExecutionsRequest(lifetime_id=lifetime_id), metadata=state.md
    )
    return [e.task_execution.header.execution_id for e in listed.executions]


async def lifetime_record(state: StateHarness) -> SS.GetLifetimeRecordResponse:
    return await state.stub.GetLifetimeRecord(
        SS.GetLifetimeRecordRequest(lifetime_id=LIFETIME_A), metadata=state.md
    )


async def publish_event(state: StateHarness, envelope: envelope_pb2.ExecutionEnvelope) -> None:
    """Publish one lifetime event of LIFETIME_A as the router does."""
    await state.nc.jetstream().publish(
        TenantNames(state.tenant).evb,
        encode_envelope(envelope),
        headers={
            HDR_TYPE: "lifetime_event",
            HDR_MSG_ID: f"evt:{LIFETIME_A}:{envelope.lifetime_event.sequence}",
            HDR_TENANT: state.tenant,
        },
    )


def hold_back(monkeypatch: pytest.MonkeyPatch, store: Any, method: str) -> asyncio.Event:
    """Hold the store's ``method`` back (as a slow commit would) until the event is set."""
    original = getattr(store, method)
    released = asyncio.Event()

    async def held_back(*args: Any, **kwargs: Any) -> Any:
        await released.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(store, method, held_back)
    return released


async def test_a_record_from_the_bus_is_stored_without_a_ref(state: StateHarness) -> None:
    # The router reads it from the record stream itself.
    await publish_record(state, state.record(1))
    assert await listed_ids(state) == [exec_id(1)]
    await asyncio.sleep(0.2)
    assert state.refs == []


async def test_a_history_read_waits_for_the_records_already_on_the_bus(
    state: StateHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = hold_back(monkeypatch, state.service.store, "append_executions")
    records = state.service.consumer(state.tenant)
    await publish_record(state, state.record(1))
    await publish_record(state, state.record(2))
    # Nothing is stored while the commit is held: a bounded wait says so.
    assert not await records.caught_up(within_s=0.2)
    read = asyncio.create_task(listed_ids(state))
    await asyncio.sleep(0.3)
    assert not read.done()

    released.set()
    # The read answers once both are stored, and has both.
    assert await asyncio.wait_for(read, 5) == [exec_id(1), exec_id(2)]
    assert await records.caught_up(within_s=0.2)


async def test_a_lifetime_record_read_waits_for_the_records_already_on_the_bus(
    state: StateHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row's execution_count and totals come from the counters the records feed: a
    caller who saw the lifetime complete must read every execution in them."""
    store = state.service.store
    await store.upsert_lifetime(
        state.tenant,
        lifetime_pb2.AgentLifetime(
            lifetime_id=LIFETIME_A,
            tenant_id=state.tenant,
            state=lifetime_pb2.LIFETIME_STATE_COMPLETED,
            last_sequence=3,
        ),
    )
    released = hold_back(monkeypatch, store, "append_executions")
    await publish_record(state, state.record(1))
    await publish_record(state, state.record(2))
    read = asyncio.create_task(lifetime_record(state))
    await asyncio.sleep(0.3)
    assert not read.done()

    released.set()
    response = await asyncio.wait_for(read, 5)
    assert response.lifetime.execution_count == 2
    assert response.lifetime.state == lifetime_pb2.LIFETIME_STATE_COMPLETED


async def test_records_are_stored_in_the_streams_order_when_the_store_fails_a_batch(
    state: StateHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router applies records in the stream's order and replay follows the store's:
    a batch the store refused is retried in place, never overtaken by the ones behind."""
    store = state.service.store
    append = store.append_executions
    calls: list[int] = []

    async def fails_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ConnectionError("the store dropped the connection")
        return await append(*args, **kwargs)

    monkeypatch.setattr(store, "append_executions", fails_once)
    await publish_record(state, state.record(1))

    async def refused() -> bool:
        return len(calls) >= 1

    await eventually(refused, within=5, what="the first append")
    await publish_record(state, state.record(2))

    assert await listed_ids(state) == [exec_id(1), exec_id(2)]


async def _leave_unbatched_events(js: JetStreamContext, tenant: str) -> None:
    """Events as an earlier version left them: one message per decision on each
    lifetime's own subject (A: sequences 1, 2 then 3; B: 1), the stream keeping those."""
    names = TenantNames(tenant)
    await ensure_tenant(js, tenant)
    old = (await js.stream_info(names.evt_stream)).config
    await js.update_stream(replace(old, subjects=[names.evt_all]))  # as that version made it
    left = [decision_events(tenant, LIFETIME_A, [1, 2]), decision_events(tenant, LIFETIME_A, [3])]
    left.append(decision_events(tenant, LIFETIME_B, [1]))
    for decision in left:
        await js.publish(
            names.evt(decision.header.lifetime_id),
            encode_envelope(decision),
            headers={HDR_TYPE: "lifetime_events", HDR_TENANT: tenant},
        )


async def test_events_an_earlier_version_left_unbatched_are_stored_then_purged(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """An earlier version kept one message per decision on the lifetime's own subject.
    Once the events stream keeps the batch subject only, no consumer reads those: the
    state service stores them when it starts (each event once), then purges them, so
    an upgrade loses no event whichever service started first."""
    tenant = new_tenant("u")
    names = TenantNames(tenant)
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    js = runtime_nats.jetstream(nc)
    await _leave_unbatched_events(js, tenant)
    service = await state_service(nats_server.url, nc, tmp_path, [tenant])
    store = service.store
    await service.start()  # moves the stream to the batch subject, then drains the rest
    try:

        async def stored() -> tuple[list[int], list[int]] | None:
            a = [e.sequence for e in await store.list_events(tenant, LIFETIME_A)]
            b = [e.sequence for e in await store.list_events(tenant, LIFETIME_B)]
            return (a, b) if len(a) == 3 and b else None

        assert await eventually(stored, what="the events left unbatched") == ([1, 2, 3], [1])
        row = await store.get_lifetime(tenant, LIFETIME_A)
        assert row is not None
        assert row.last_sequence == 3

        async def purged() -> bool:
            info = await js.stream_info(names.evt_stream, subjects_filter=names.evt_all)
            return not info.state.subjects

        await eventually(purged, what="the unbatched events purged")
        assert (await js.stream_info(names.evt_stream)).config.subjects == [names.evb]
        # Nothing left: a second drain reads nothing.
        assert await service.consumers[tenant].drain_unbatched_events() == 0
    finally:
        await service.stop()
        await nc.close()


async def test_the_drain_counts_events_pushed_before_the_server_said_how_many(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain's consumer is pushed to from the moment it exists; when the server
    answers how many are pending only after pushing them all, it says none are. The
    drain still reads and stores every one (it read nothing and stored nothing)."""
    tenant = new_tenant("v")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    js = runtime_nats.jetstream(nc)
    await _leave_unbatched_events(js, tenant)
    asked = JetStreamContext.PushSubscription.consumer_info

    async def after_the_push(sub: JetStreamContext.PushSubscription) -> ConsumerInfo:
        async def all_pushed() -> bool:
            return sub.pending_msgs >= 3

        await eventually(all_pushed, what="every message pushed to this client")
        return await asked(sub)

    monkeypatch.setattr(JetStreamContext.PushSubscription, "consumer_info", after_the_push)
    service = await state_service(nats_server.url, nc, tmp_path, [tenant])
    await service.start()  # drains in the background, through the patched question
    try:

        async def stored() -> tuple[list[int], list[int]] | None:
            a = [e.sequence for e in await service.store.list_events(tenant, LIFETIME_A)]
            b = [e.sequence for e in await service.store.list_events(tenant, LIFETIME_B)]
            return (a, b) if len(a) == 3 and b else None

        assert await eventually(stored, what="the events left unbatched") == ([1, 2, 3], [1])
    finally:
        await service.stop()
        await nc.close()
