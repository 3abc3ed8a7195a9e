"""StateService at the edges of its input, on a real nats-server and each real store.

Every test runs once over SQLite and once over PostgreSQL (a database on the session's
test server): page tokens no listing handed out, timestamps at the ends of
``google.protobuf.Timestamp``'s range, event messages no store can keep, and events
that reach the store out of order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from nats.aio.client import Client as NatsClient

from tests.support.event_batches import decision_events, publish_event_batch
from tests.support.factories import make_envelope
from tests.support.nats_server import new_tenant
from tests.support.postgres import PostgresServer, unique_database_name
from tests.support.records import exec_id, execution_record
from tests.support.service_harness import Metadata, eventually, expect_status, tenant_metadata
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.blobs import LocalBlobStore
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.subjects import HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.sdk import encode_envelope
from tickmesh.state.config import StateSettings
from tickmesh.state.postgres import PostgresStateStore
from tickmesh.state.server import StateService, build
from tickmesh.state.store import SQLiteStateStore, StateStore
from tickmesh.v1 import (
    envelope_pb2,
    lifetime_pb2,
    payload_pb2,
    state_service_pb2,
    state_service_pb2_grpc,
)

SS = state_service_pb2
LIFETIME_A = "019a0000-0000-7000-8000-00000000000a"
LIFETIME_B = "019a0000-0000-7000-8000-00000000000b"
MAX_SEQUENCE = 2**63 - 1
FIRST_TIMESTAMP = timestamp_pb2.Timestamp(seconds=-62_135_596_800)  # 0001-01-01T00:00:00Z
LAST_TIMESTAMP = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)  # 9999


@dataclass
class Probe:
    """A state service for one tenant over one kind of store, and a client of it."""

    service: StateService
    tenant: str
    nc: NatsClient
    stub: state_service_pb2_grpc.StateServiceAsyncStub

    @property
    def md(self) -> Metadata:
        return tenant_metadata(self.tenant)

    async def events(self, lifetime_id: str) -> list[int]:
        response = await self.stub.ListLifetimeEvents(
            SS.ListLifetimeEventsRequest(lifetime_id=lifetime_id), metadata=self.md
        )
        return [e.sequence for e in response.events]


@pytest.fixture(params=["sqlite", "postgres"])
async def probe(
    request: pytest.FixtureRequest, nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[Probe]:
    database = ""
    server: PostgresServer | None = None
    store: StateStore
    if request.param == "sqlite":
        store = await SQLiteStateStore.open(tmp_path / "state.db", synchronous="OFF")
    else:
        # Asked for here rather than declared, so SQLite runs start no PostgreSQL.
        server = request.getfixturevalue("postgres_server")
        database = unique_database_name()
        dsn = await server.create_database(database)
        store = await PostgresStateStore.open(dsn, retry_for_s=2.0)
    tenant = new_tenant("p")
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    settings = StateSettings(
        nats_url=nats_server.url,
        tenants=[tenant],
        grpc_listen="127.0.0.1:0",
        log_json=False,
        store_url=f"sqlite:///{tmp_path / 'state.db'}",
        blob_url=str(tmp_path / "blobs"),
    )
    service = await build(
        settings, nc=nc, store=store, blobs=LocalBlobStore(tmp_path / "blobs", fsync=False)
    )
    await service.start()
    channel = grpc.aio.insecure_channel(service.target)
    try:
        yield Probe(service, tenant, nc, state_service_pb2_grpc.StateServiceStub(channel))
    finally:
        await channel.close()
        await service.stop()
        await nc.close()
        if server is not None:
            await server.drop_database(database)


# --- page tokens ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        str(MAX_SEQUENCE + 1),  # past the signed 64-bit column
        "9" * 30,
        "\N{SUPERSCRIPT TWO}",  # str.isdigit() says yes, int() says no
        "\N{ARABIC-INDIC DIGIT ONE}\N{ARABIC-INDIC DIGIT TWO}",  # int() reads 12
        "+5",
    ],
)
async def test_a_list_executions_page_token_no_listing_gave_is_invalid(
    probe: Probe, token: str
) -> None:
    details = await expect_status(
        probe.stub.ListExecutions(
            SS.ListExecutionsRequest(lifetime_id=LIFETIME_A, page_token=token), metadata=probe.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in details


async def test_a_list_executions_page_token_at_the_last_sequence_lists_nothing(
    probe: Probe,
) -> None:
    record = execution_record(1, tenant=probe.tenant, lifetime_id=LIFETIME_A)
    await probe.stub.AppendExecution(
        SS.AppendExecutionRequest(envelopes=[record[1]]), metadata=probe.md
    )
    first = await probe.stub.ListExecutions(
        SS.ListExecutionsRequest(lifetime_id=LIFETIME_A), metadata=probe.md
    )
    assert [e.task_execution.header.execution_id for e in first.executions] == [exec_id(1)]
    last = await probe.stub.ListExecutions(
        SS.ListExecutionsRequest(lifetime_id=LIFETIME_A, page_token=str(MAX_SEQUENCE)),
        metadata=probe.md,
    )
    assert (list(last.executions), last.next_page_token) == ([], "")


# --- usage at the ends of the Timestamp range -----------------------------------------


async def test_usage_from_the_first_to_the_last_timestamp_counts_every_record(
    probe: Probe,
) -> None:
    """Timestamp reaches from year 1 to 9999; the stores keep nanoseconds in 64 bits
    (1677 to 2262). A range reaching past those covers every record there is."""
    records = [execution_record(n, tenant=probe.tenant, lifetime_id=LIFETIME_A) for n in (1, 2)]
    await probe.stub.AppendExecution(
        SS.AppendExecutionRequest(envelopes=[env for _, env in records]), metadata=probe.md
    )
    everything = await probe.stub.GetUsage(
        SS.GetUsageRequest(since=FIRST_TIMESTAMP, until=LAST_TIMESTAMP), metadata=probe.md
    )
    assert everything.executions == 2
    since_first = await probe.stub.GetUsage(
        SS.GetUsageRequest(since=FIRST_TIMESTAMP), metadata=probe.md
    )
    assert since_first.executions == 2
    until_last = await probe.stub.GetUsage(
        SS.GetUsageRequest(until=LAST_TIMESTAMP), metadata=probe.md
    )
    assert until_last.executions == 2
    none_yet = await probe.stub.GetUsage(
        SS.GetUsageRequest(since=LAST_TIMESTAMP, until=LAST_TIMESTAMP), metadata=probe.md
    )
    assert none_yet.executions == 0
    none_before = await probe.stub.GetUsage(
        SS.GetUsageRequest(since=FIRST_TIMESTAMP, until=FIRST_TIMESTAMP), metadata=probe.md
    )
    assert none_before.executions == 0


async def test_usage_until_before_since_is_invalid_even_past_the_stored_range(
    probe: Probe,
) -> None:
    # Both past 2262: the order is still the caller's mistake, not an empty report.
    details = await expect_status(
        probe.stub.GetUsage(
            SS.GetUsageRequest(
                since=LAST_TIMESTAMP, until=timestamp_pb2.Timestamp(seconds=253_402_300_000)
            ),
            metadata=probe.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "before since" in details


# --- event messages no store can keep --------------------------------------------------


async def _publish_event(probe: Probe, envelope: envelope_pb2.ExecutionEnvelope) -> None:
    await probe.nc.jetstream().publish(
        TenantNames(probe.tenant).evb,
        encode_envelope(envelope),
        headers={
            HDR_TYPE: envelope.WhichOneof("body") or "",
            HDR_MSG_ID: f"evt:{envelope.header.lifetime_id}:{envelope.header.sequence}",
            HDR_TENANT: probe.tenant,
        },
    )


@pytest.mark.parametrize(
    ("lifetime_id", "sequence"),
    [
        (LIFETIME_B, MAX_SEQUENCE + 1),  # uint64 past the signed 64-bit column
        (LIFETIME_B, 2**64 - 1),
        ("", 3),  # no lifetime to store it under
        ("a\x00b", 3),  # PostgreSQL text cannot hold a NUL; SQLite can
        ("x.>", 3),  # no subject token: its row's id could page no listing on
    ],
)
async def test_an_event_no_store_can_keep_is_refused_and_the_events_around_it_stored(
    probe: Probe, lifetime_id: str, sequence: int
) -> None:
    """An event batch the stores cannot take is refused whole, as an unreadable one is;
    it must not come back forever, holding every read of events or lifetime rows."""
    good = decision_events(probe.tenant, LIFETIME_A, [1])
    bad = decision_events(probe.tenant, lifetime_id, [sequence])
    await publish_event_batch(probe.nc, probe.tenant, "evb:forged", [good, bad])
    lone = decision_events(probe.tenant, lifetime_id, [sequence])
    await _publish_event(probe, lone)
    await publish_event_batch(
        probe.nc, probe.tenant, "evb:next", [decision_events(probe.tenant, LIFETIME_A, [2, 3])]
    )

    # The read waits until every event message on the bus is settled.
    assert await probe.events(LIFETIME_A) == [2, 3]
    row = await probe.stub.GetLifetimeRecord(
        SS.GetLifetimeRecordRequest(lifetime_id=LIFETIME_A), metadata=probe.md
    )
    assert row.lifetime.last_sequence == 3
    assert await probe.events(LIFETIME_B) == []


# --- events out of order ----------------------------------------------------------------


def _event(sequence: int, state: Any, kind: Any, *, at: int) -> envelope_pb2.ExecutionEnvelope:
    envelope = make_envelope("lifetime_event")
    envelope.header.lifetime_id = LIFETIME_A
    envelope.header.sequence = sequence
    event = lifetime_pb2.LifetimeEvent(
        sequence=sequence, kind=kind, state=state, at=timestamp_pb2.Timestamp(seconds=at)
    )
    envelope.lifetime_event.CopyFrom(event)
    return envelope


async def test_a_start_stored_after_a_later_event_still_gives_the_row_its_start(
    probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch the store fails is handed back and redelivered after the ones behind it:
    the lifetime's start then reaches its row after a later event. The row must not go
    back to the start's state, but the start is the only event with its creation time
    and its input."""
    store = probe.service.store
    apply_events = store.apply_events
    calls: list[int] = []

    async def fails_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls))
        if len(calls) == 1:
            raise ConnectionError("the store dropped the connection")
        return await apply_events(*args, **kwargs)

    monkeypatch.setattr(store, "apply_events", fails_once)
    started = _event(
        1, lifetime_pb2.LIFETIME_STATE_RUNNING, lifetime_pb2.LIFETIME_EVENT_KIND_STARTED, at=100
    )
    started.header.tenant_id = probe.tenant
    started.lifetime_event.input.CopyFrom(
        payload_pb2.Payload(content_type="application/json", inline=b'{"goal": 1}')
    )
    await _publish_event(probe, started)

    async def refused() -> bool:
        return len(calls) >= 1

    await eventually(refused, within=5, what="the first batch tried")
    finished = _event(
        2,
        lifetime_pb2.LIFETIME_STATE_COMPLETED,
        lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED,
        at=200,
    )
    finished.header.tenant_id = probe.tenant
    await _publish_event(probe, finished)

    assert await probe.events(LIFETIME_A) == [1, 2]
    assert len(calls) >= 3, "the start was stored after the finish"
    row = (
        await probe.stub.GetLifetimeRecord(
            SS.GetLifetimeRecordRequest(lifetime_id=LIFETIME_A), metadata=probe.md
        )
    ).lifetime
    assert (row.last_sequence, row.state) == (2, lifetime_pb2.LIFETIME_STATE_COMPLETED)
    assert (row.created_at.seconds, row.finished_at.seconds) == (100, 200)
    assert row.input.inline == b'{"goal": 1}'
