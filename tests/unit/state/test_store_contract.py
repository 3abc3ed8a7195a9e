"""The StateStore contract, run against every implementation in STORE_FACTORIES.

SQLite on a file and PostgreSQL (a database on the session's test server) pass
the same tests unchanged. ``factory(tmp_path)`` called twice with the same folder
must reopen the same database. Tests that look inside SQLite run on SQLite only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest

from tests.support.factories import LIFETIME_ID, make_envelope
from tests.support.postgres import PostgresServer
from tests.support.postgres import postgres_server as postgres_server  # the fixture
from tests.support.records import (
    UNKNOWN_FIELD_NUMBER,
    Record,
    event,
    exec_id,
    execution_record,
    lifetime,
    unknown_field,
    usage,
)
from tickmesh.sdk.errors import ValidationError
from tickmesh.state import store as store_module
from tickmesh.state.core import fold_events
from tickmesh.state.postgres import PostgresStateStore
from tickmesh.state.store import (
    MIGRATIONS,
    SQLITE_CACHE_KIB,
    SQLITE_CHECKPOINT_PAGES,
    SQLiteStateStore,
    StateStore,
    StoreClosedError,
    UsageRow,
)
from tickmesh.v1 import envelope_pb2, header_pb2, lifetime_pb2, telemetry_pb2

StoreFactory = Callable[[Path], Awaitable[StateStore]]

SQLITE_FILE = "state.db"


async def _open_sqlite(folder: Path) -> StateStore:
    return await SQLiteStateStore.open(folder / "state" / SQLITE_FILE)


class _FolderDatabases:
    """Maps a test's folder to a database on the PostgreSQL server the test runs against.

    The factories take only a folder, so the server comes from here: ``store_factory``
    binds it for the duration of a PostgreSQL-parametrized test, and drops the
    databases the test opened afterwards.
    """

    def __init__(self) -> None:
        self.server: PostgresServer | None = None
        self.created: set[str] = set()

    async def dsn_for(self, folder: Path) -> str:
        if self.server is None:
            raise RuntimeError("open PostgreSQL stores through the store_factory fixture")
        # Same folder, same database: a short hash of the folder's path names it.
        digest = hashlib.blake2b(str(folder).encode(), digest_size=8).hexdigest()
        name = f"contract_{digest}"
        if name not in self.created:
            # Fresh for this test, even if an earlier run on an external server left it.
            await self.server.drop_database(name)
            await self.server.create_database(name)
            self.created.add(name)
        return self.server.dsn_for(name)

    async def release(self) -> None:
        assert self.server is not None
        for name in self.created:
            await self.server.drop_database(name)
        self.server, self.created = None, set()


_POSTGRES = _FolderDatabases()


async def _open_postgres(folder: Path) -> StateStore:
    return await PostgresStateStore.open(await _POSTGRES.dsn_for(folder), max_size=4)


STORE_FACTORIES: dict[str, StoreFactory] = {
    "sqlite": _open_sqlite,
    "postgres": _open_postgres,
}

A = "acme"
B = "globex"
OTHER_LIFETIME = "019a0000-0000-7000-8000-000000000002"


@pytest.fixture(
    params=[
        # PostgreSQL runs on a real server: marked integration, like the tests that need one.
        pytest.param(name, marks=pytest.mark.integration if name == "postgres" else ())
        for name in sorted(STORE_FACTORIES)
    ]
)
async def store_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    name: str = request.param
    if name != "postgres":
        yield STORE_FACTORIES[name]
        return
    # Asked for here rather than declared, so SQLite-only runs start no PostgreSQL.
    _POSTGRES.server = request.getfixturevalue("postgres_server")
    try:
        yield STORE_FACTORIES[name]
    finally:
        await _POSTGRES.release()


@pytest.fixture
async def store(store_factory: StoreFactory, tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await store_factory(tmp_path)
    yield opened
    await opened.close()


def _sum(*records: Record) -> tuple[telemetry_pb2.Telemetry, int]:
    totals = telemetry_pb2.Telemetry()
    for _, env in records:
        t = env.task_execution.result.telemetry
        if env.WhichOneof("body") == "plan_execution":
            t = env.plan_execution.result.telemetry
        totals.input_tokens += t.input_tokens
        totals.output_tokens += t.output_tokens
        totals.cost_micros += t.cost_micros
        totals.model_calls += t.model_calls
        totals.tool_calls += t.tool_calls
    return totals, len(records)


# -- appending ---------------------------------------------------------------------------


async def test_store_appends_new_records_with_increasing_sequences(store: StateStore) -> None:
    records = [execution_record(i, kind="task" if i % 2 else "plan") for i in range(1, 6)]

    stored = await store.append_executions(A, records)

    assert [s.execution_id for s in stored] == [exec_id(i) for i in range(1, 6)]
    assert not any(s.duplicate for s in stored)
    sequences = [s.store_sequence for s in stored]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == 5
    assert all(s > 0 for s in sequences)
    assert [s.kind for s in stored] == ["task", "plan", "task", "plan", "task"]
    assert all(s.tenant == A and s.lifetime_id == LIFETIME_ID and s.attempt == 1 for s in stored)
    assert all(s.persisted_at.tzinfo is not None for s in stored)
    assert [s.envelope for s in stored] == [raw for raw, _ in records]

    later = await store.append_executions(A, [execution_record(6)])
    assert later[0].store_sequence > sequences[-1]
    assert later[0].persisted_at >= stored[-1].persisted_at


async def test_store_reports_a_redelivered_record_as_duplicate_of_the_original(
    store: StateStore,
) -> None:
    record = execution_record(1, node_id="generate_code")
    [first] = await store.append_executions(A, [record])

    [again] = await store.append_executions(A, [record])

    assert again.duplicate
    assert not first.duplicate
    assert again.store_sequence == first.store_sequence
    assert again.persisted_at == first.persisted_at
    assert again.envelope == first.envelope
    assert (again.execution_id, again.attempt, again.kind, again.node_id) == (
        exec_id(1),
        1,
        "task",
        "generate_code",
    )
    assert len(await store.list_executions(A, LIFETIME_ID)) == 1


async def test_store_keeps_the_first_record_when_a_different_one_reuses_its_key(
    store: StateStore,
) -> None:
    original = execution_record(1, telemetry=usage(input_tokens=5))
    impostor = execution_record(1, telemetry=usage(input_tokens=500))
    await store.append_executions(A, [original])

    [result] = await store.append_executions(A, [impostor])

    assert result.duplicate
    assert result.envelope == original[0]
    assert (await store.counters(A))[0].input_tokens == 5


async def test_store_stores_another_attempt_as_a_new_row(store: StateStore) -> None:
    [one] = await store.append_executions(A, [execution_record(1, attempt=1)])
    [two] = await store.append_executions(A, [execution_record(1, attempt=2)])

    assert not two.duplicate
    assert two.store_sequence > one.store_sequence
    listed = await store.list_executions(A, LIFETIME_ID)
    assert [(s.execution_id, s.attempt) for s in listed] == [(exec_id(1), 1), (exec_id(1), 2)]


async def test_store_counts_each_record_once_across_redelivery(store: StateStore) -> None:
    batch = [
        execution_record(1, telemetry=usage(100, 10, 1_000, 1, 0)),
        execution_record(2, telemetry=usage(200, 20, 2_000, 2, 3), kind="plan"),
        execution_record(3, telemetry=usage(7, 0, 1, 0, 9), lifetime_id=OTHER_LIFETIME),
    ]
    for _ in range(3):
        await store.append_executions(A, batch)
    await store.append_executions(A, list(reversed(batch)))

    assert await store.counters(A) == _sum(*batch)
    assert await store.counters(A, lifetime_id=LIFETIME_ID) == _sum(*batch[:2])
    assert await store.counters(A, lifetime_id=OTHER_LIFETIME) == _sum(batch[2])

    await store.upsert_lifetime(A, lifetime())
    row = await store.get_lifetime(A, LIFETIME_ID)
    assert row is not None
    assert (row.totals, row.execution_count) == _sum(*batch[:2])


async def test_store_handles_a_batch_mixing_new_records_and_duplicates(
    store: StateStore,
) -> None:
    a, b, c, d = (execution_record(i, telemetry=usage(i, i, i, i, i)) for i in range(1, 5))
    first = await store.append_executions(A, [a, b])

    mixed = await store.append_executions(A, [c, a, d, b, c])

    assert [s.execution_id for s in mixed] == [exec_id(i) for i in (3, 1, 4, 2, 3)]
    assert [s.duplicate for s in mixed] == [False, True, False, True, True]
    assert mixed[1].store_sequence == first[0].store_sequence
    assert mixed[3].store_sequence == first[1].store_sequence
    assert mixed[4].store_sequence == mixed[0].store_sequence
    assert mixed[2].store_sequence > mixed[0].store_sequence > first[1].store_sequence
    assert await store.counters(A) == _sum(a, b, c, d)
    assert len(await store.list_executions(A, LIFETIME_ID)) == 4


async def test_store_accepts_an_empty_batch(store: StateStore) -> None:
    assert await store.append_executions(A, []) == []


async def test_store_keeps_envelope_bytes_exactly_including_unknown_fields(
    store: StateStore,
) -> None:
    raw, env = execution_record(1, extra=unknown_field(b"from a newer producer"))
    assert (
        envelope_pb2.ExecutionEnvelope.FromString(raw).SerializeToString(deterministic=True) == raw
    )

    await store.append_executions(A, [(raw, env)])

    stored = await store.get_execution(A, exec_id(1))
    assert stored is not None
    assert stored.envelope == raw
    listed = await store.list_executions(A, LIFETIME_ID)
    assert listed[0].envelope == raw
    assert unknown_field(b"from a newer producer", UNKNOWN_FIELD_NUMBER) in stored.envelope


async def test_store_gets_the_newest_attempt_by_default(store: StateStore) -> None:
    await store.append_executions(
        A, [execution_record(1, attempt=1), execution_record(1, attempt=3)]
    )
    await store.append_executions(A, [execution_record(1, attempt=2)])

    newest = await store.get_execution(A, exec_id(1))
    assert newest is not None
    assert newest.attempt == 3
    assert not newest.duplicate
    second = await store.get_execution(A, exec_id(1), attempt=2)
    assert second is not None
    assert second.attempt == 2
    assert await store.get_execution(A, exec_id(1), attempt=4) is None
    assert await store.get_execution(A, exec_id(99)) is None


async def test_store_lists_a_lifetimes_executions_in_pages(store: StateStore) -> None:
    records = [
        execution_record(i, lifetime_id=LIFETIME_ID if i % 3 else OTHER_LIFETIME)
        for i in range(1, 11)
    ]
    stored = await store.append_executions(A, records)
    expected = [s.store_sequence for s in stored if s.lifetime_id == LIFETIME_ID]

    pages: list[list[int]] = []
    after = 0
    while page := await store.list_executions(A, LIFETIME_ID, after_sequence=after, limit=3):
        pages.append([s.store_sequence for s in page])
        after = page[-1].store_sequence

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [seq for p in pages for seq in p] == expected
    other = await store.list_executions(A, OTHER_LIFETIME)
    assert [s.execution_id for s in other] == [exec_id(3), exec_id(6), exec_id(9)]


async def test_store_runs_concurrent_appends_without_losing_or_doubling(
    store: StateStore,
) -> None:
    batches = [[execution_record(b * 10 + i) for i in range(10)] for b in range(8)]

    results = await asyncio.gather(
        *(store.append_executions(A, batch) for batch in batches + batches)
    )

    new = [s for result in results for s in result if not s.duplicate]
    assert len(new) == 80
    assert len({s.store_sequence for s in new}) == 80
    assert (await store.counters(A))[1] == 80


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["task_request", "plan_request", "lifetime_event", "lifetime_events", "signal"]
)
async def test_store_refuses_a_body_that_is_not_an_execution(store: StateStore, kind: str) -> None:
    env = make_envelope(kind)  # type: ignore[arg-type]
    env.header.tenant_id = A
    good = execution_record(1)

    with pytest.raises(ValidationError, match=kind):
        await store.append_executions(A, [good, (env.SerializeToString(), env)])

    assert await store.get_execution(A, exec_id(1)) is None, "nothing of the batch is stored"


async def test_store_refuses_a_record_of_another_tenant(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="tenant"):
        await store.append_executions(A, [execution_record(1, tenant=B)])


async def test_store_refuses_a_record_without_an_attempt(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="attempt"):
        await store.append_executions(A, [execution_record(1, attempt=0)])


async def test_store_refuses_a_malformed_tenant_id(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="tenant"):
        await store.counters("Acme/../x")


# -- tenancy -----------------------------------------------------------------------------


async def test_store_never_shows_one_tenant_another_tenants_rows(store: StateStore) -> None:
    await store.append_executions(A, [execution_record(1, telemetry=usage(1, 1, 1, 1, 1))])
    await store.upsert_lifetime(A, lifetime())
    assert await store.record_event(A, LIFETIME_ID, event(1))

    assert await store.get_execution(B, exec_id(1)) is None
    assert await store.get_execution(B, exec_id(1), attempt=1) is None
    assert await store.list_executions(B, LIFETIME_ID) == []
    assert await store.get_lifetime(B, LIFETIME_ID) is None
    assert await store.list_events(B, LIFETIME_ID) == []
    assert await store.counters(B) == (telemetry_pb2.Telemetry(), 0)
    assert await store.counters(B, lifetime_id=LIFETIME_ID) == (telemetry_pb2.Telemetry(), 0)
    since = datetime(2000, 1, 1, tzinfo=UTC)
    assert await store.counters(B, since=since) == (telemetry_pb2.Telemetry(), 0)

    # The same ids under tenant B are B's own rows, not duplicates of A's.
    [theirs] = await store.append_executions(B, [execution_record(1, tenant=B)])
    assert not theirs.duplicate
    assert await store.record_event(B, LIFETIME_ID, event(1))
    assert (await store.counters(A))[0].input_tokens == 1
    assert (await store.counters(B))[1] == 1


# -- lifetimes and events ----------------------------------------------------------------


async def test_store_never_moves_a_lifetime_row_backwards(store: StateStore) -> None:
    await store.upsert_lifetime(A, lifetime(last_sequence=5))
    await store.upsert_lifetime(
        A, lifetime(last_sequence=9, state=lifetime_pb2.LIFETIME_STATE_WAITING)
    )
    await store.upsert_lifetime(
        A, lifetime(last_sequence=7, state=lifetime_pb2.LIFETIME_STATE_PAUSED)
    )

    row = await store.get_lifetime(A, LIFETIME_ID)
    assert row is not None
    assert row.last_sequence == 9
    assert row.state == lifetime_pb2.LIFETIME_STATE_WAITING
    assert row.tenant_id == A
    assert row.labels == {"team": "platform"}
    assert row.execution_count == 0
    assert await store.get_lifetime(A, OTHER_LIFETIME) is None

    await store.upsert_lifetime(
        A, lifetime(last_sequence=10, state=lifetime_pb2.LIFETIME_STATE_COMPLETED)
    )
    row = await store.get_lifetime(A, LIFETIME_ID)
    assert row is not None
    assert row.state == lifetime_pb2.LIFETIME_STATE_COMPLETED


async def test_store_lists_lifetimes_newest_first_by_state_and_graph_in_pages(
    store: StateStore,
) -> None:
    ids = [f"019a0000-0000-7000-8000-{n:012d}" for n in range(1, 8)]
    for n, lifetime_id in enumerate(ids):
        row = lifetime(
            lifetime_id,
            tenant=A,
            state=lifetime_pb2.LIFETIME_STATE_COMPLETED
            if n % 2
            else lifetime_pb2.LIFETIME_STATE_RUNNING,
        )
        row.graph.id = "even" if n % 2 == 0 else "odd"
        await store.upsert_lifetime(A, row)
    await store.upsert_lifetime(B, lifetime(ids[-1], tenant=B))  # another tenant's newest
    await store.append_executions(
        A, [execution_record(1, lifetime_id=ids[0], telemetry=usage(5, 1, 1, 1, 1))]
    )

    def listed(rows: list[lifetime_pb2.AgentLifetime]) -> list[str]:
        return [r.lifetime_id for r in rows]

    newest_first = list(reversed(ids))
    assert listed(await store.list_lifetimes(A)) == newest_first
    assert listed(await store.list_lifetimes(A, limit=3)) == newest_first[:3]
    assert listed(await store.list_lifetimes(A, before=ids[4], limit=3)) == newest_first[3:6]
    assert listed(await store.list_lifetimes(A, before=ids[0])) == []
    completed = await store.list_lifetimes(A, states=[lifetime_pb2.LIFETIME_STATE_COMPLETED])
    assert listed(completed) == [ids[5], ids[3], ids[1]]
    # The graph is read from each row: a page fills across the rows it skips.
    assert listed(await store.list_lifetimes(A, graph_id="even", limit=2)) == [ids[6], ids[4]]
    assert listed(await store.list_lifetimes(A, graph_id="even", before=ids[4], limit=2)) == [
        ids[2],
        ids[0],
    ]
    assert (
        listed(
            await store.list_lifetimes(
                A, graph_id="odd", states=[lifetime_pb2.LIFETIME_STATE_RUNNING], limit=2
            )
        )
        == []
    )
    [oldest] = await store.list_lifetimes(A, before=ids[1])
    assert oldest.execution_count == 1  # totals as get_lifetime gives them
    assert oldest.totals.input_tokens == 5
    assert listed(await store.list_lifetimes(B)) == [ids[-1]]
    with pytest.raises(ValidationError, match="limit"):
        await store.list_lifetimes(A, limit=0)


async def test_store_refuses_a_lifetime_of_another_tenant(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="tenant"):
        await store.upsert_lifetime(A, lifetime(tenant=B))


async def test_store_records_events_once_and_lists_them_in_order(store: StateStore) -> None:
    for sequence in (3, 1, 2):
        assert await store.record_event(A, LIFETIME_ID, event(sequence))
    assert not await store.record_event(A, LIFETIME_ID, event(2, message="redelivered"))
    assert await store.record_event(A, OTHER_LIFETIME, event(1))

    events = await store.list_events(A, LIFETIME_ID)
    assert [e.sequence for e in events] == [1, 2, 3]
    assert events[1].message == "event 2"
    assert events[0] == event(1)
    later = await store.list_events(A, LIFETIME_ID, after_sequence=1, limit=1)
    assert [e.sequence for e in later] == [2]


async def test_store_refuses_an_event_without_a_sequence(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="sequence"):
        await store.record_event(A, LIFETIME_ID, event(0))


# -- counters ----------------------------------------------------------------------------


async def test_store_counts_only_executions_since_a_time(store: StateStore) -> None:
    old = [execution_record(1, telemetry=usage(1, 1, 1, 1, 1))]
    new = [
        execution_record(2, telemetry=usage(10, 20, 30, 4, 5)),
        execution_record(3, telemetry=usage(100, 0, 7, 0, 0), lifetime_id=OTHER_LIFETIME),
    ]
    [first] = await store.append_executions(A, old)
    await asyncio.sleep(0.002)
    stored = await store.append_executions(A, new)
    boundary = stored[0].persisted_at
    assert boundary > first.persisted_at

    assert await store.counters(A, since=boundary) == _sum(*new)
    assert await store.counters(A, since=first.persisted_at) == _sum(*old, *new)
    assert await store.counters(A, since=boundary + timedelta(seconds=1)) == (
        telemetry_pb2.Telemetry(),
        0,
    )
    assert await store.counters(A, lifetime_id=LIFETIME_ID, since=boundary) == _sum(new[0])
    assert await store.counters(A) == _sum(*old, *new)


async def test_store_refuses_a_naive_since(store: StateStore) -> None:
    with pytest.raises(ValidationError, match="timezone"):
        await store.counters(A, since=datetime(2026, 1, 1))


# -- usage -------------------------------------------------------------------------------


def _step(
    n: int,
    graph: str,
    node: str,
    telemetry: telemetry_pb2.Telemetry,
    *,
    version: int = 1,
    handler: str = "",
    tenant: str = A,
    attempt: int = 1,
    kind: Literal["task", "plan"] = "task",
) -> Record:
    """An execution record of ``node`` (handler ``h_<node>`` unless given) of a graph version."""
    _, env = execution_record(
        n, tenant=tenant, attempt=attempt, kind=kind, node_id=node, telemetry=telemetry
    )
    body = env.task_execution if kind == "task" else env.plan_execution
    for header in (env.header, body.header):
        header.graph.id = graph
        header.graph.version = version
        header.node.handler = handler or f"h_{node}"
    return env.SerializeToString(deterministic=True), env


def _usage_row(
    graph: str,
    version: int,
    node: str,
    handler: str,
    *records: Record,
) -> UsageRow:
    totals, count = _sum(*records)
    return UsageRow(
        graph_id=graph,
        graph_version=version,
        node_id=node,
        handler=handler,
        executions=count,
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        cost_micros=totals.cost_micros,
        model_calls=totals.model_calls,
        tool_calls=totals.tool_calls,
    )


async def test_store_sums_usage_by_graph_version_and_node(store: StateStore) -> None:
    plan1 = _step(1, "coder", "plan", usage(100, 10, 1_000, 1, 0), kind="plan")
    gen1 = _step(2, "coder", "generate", usage(200, 20, 2_000, 2, 3))
    gen1_retry = _step(2, "coder", "generate", usage(50, 5, 500, 1, 0), attempt=2)
    test1 = _step(3, "coder", "test", usage(0, 0, 0, 0, 4))
    gen2 = _step(4, "coder", "generate", usage(7, 1, 3, 1, 0), version=2)
    other = _step(5, "Billing", "charge", usage(1, 2, 3, 4, 5), handler="stripe")
    await store.append_executions(A, [plan1, gen1, test1])
    await store.append_executions(A, [gen1_retry, gen2, other])

    assert await store.usage(A) == [
        # Code point order: upper case first, whatever the database's collation.
        _usage_row("Billing", 1, "charge", "stripe", other),
        _usage_row("coder", 1, "generate", "h_generate", gen1, gen1_retry),
        _usage_row("coder", 1, "plan", "h_plan", plan1),
        _usage_row("coder", 1, "test", "h_test", test1),
        _usage_row("coder", 2, "generate", "h_generate", gen2),
    ]
    assert await store.usage(A, by_node=False) == [
        _usage_row("Billing", 1, "", "", other),
        _usage_row("coder", 1, "", "", plan1, gen1, gen1_retry, test1),
        _usage_row("coder", 2, "", "", gen2),
    ]
    totals, executions = await store.counters(A)
    rows = await store.usage(A, by_node=False)
    assert sum(r.executions for r in rows) == executions == 6
    assert sum(r.cost_micros for r in rows) == totals.cost_micros


async def test_store_filters_usage_by_graph(store: StateStore) -> None:
    mine = [
        _step(1, "coder", "plan", usage(1, 1, 1, 1, 1)),
        _step(2, "coder", "plan", usage(2, 2, 2, 2, 2), version=3),
    ]
    await store.append_executions(A, [*mine, _step(3, "coder2", "plan", usage(9, 9, 9, 9, 9))])

    assert await store.usage(A, graph_id="coder") == [
        _usage_row("coder", 1, "plan", "h_plan", mine[0]),
        _usage_row("coder", 3, "plan", "h_plan", mine[1]),
    ]
    assert await store.usage(A, graph_id="coder", by_node=False) == [
        _usage_row("coder", 1, "", "", mine[0]),
        _usage_row("coder", 3, "", "", mine[1]),
    ]
    assert await store.usage(A, graph_id="cod") == []
    assert await store.usage(A, graph_id="") == []


async def test_store_sums_usage_between_since_and_until(store: StateStore) -> None:
    old = _step(1, "g", "a", usage(1, 1, 1, 1, 1))
    middle = [_step(2, "g", "a", usage(10, 0, 5, 1, 0)), _step(3, "g", "b", usage(0, 0, 7, 0, 2))]
    new = _step(4, "g", "a", usage(100, 100, 100, 1, 1))
    [first] = await store.append_executions(A, [old])
    await asyncio.sleep(0.002)
    stored = await store.append_executions(A, middle)
    await asyncio.sleep(0.002)
    [last] = await store.append_executions(A, [new])
    start, end = stored[0].persisted_at, last.persisted_at
    assert first.persisted_at < start < end

    # since is inclusive, until exclusive: [start, end) holds exactly the middle batch.
    assert await store.usage(A, since=start, until=end) == [
        _usage_row("g", 1, "a", "h_a", middle[0]),
        _usage_row("g", 1, "b", "h_b", middle[1]),
    ]
    assert await store.usage(A, since=start, by_node=False) == [
        _usage_row("g", 1, "", "", *middle, new)
    ]
    assert await store.usage(A, until=start, by_node=False) == [_usage_row("g", 1, "", "", old)]
    assert await store.usage(A, since=end + timedelta(seconds=1)) == []
    assert await store.usage(A, since=start, until=start) == []
    with pytest.raises(ValidationError, match="before"):
        await store.usage(A, since=end, until=start)
    with pytest.raises(ValidationError, match="until must be timezone-aware"):
        await store.usage(A, until=datetime(2026, 1, 1))


async def test_store_never_counts_another_tenants_or_a_redelivered_record_in_usage(
    store: StateStore,
) -> None:
    ours = [_step(1, "g", "a", usage(5, 5, 5, 1, 1)), _step(2, "g", "b", usage(1, 0, 0, 0, 0))]
    theirs = _step(1, "g", "a", usage(1_000, 0, 0, 0, 0), tenant=B)
    await store.append_executions(A, ours)
    await store.append_executions(B, [theirs])
    # Redelivered, alone, reordered and mixed with a record whose key another one reuses.
    await store.append_executions(A, [ours[1], ours[0], ours[1]])
    await store.append_executions(A, [_step(1, "g", "a", usage(777, 0, 0, 0, 0))])

    expected = [_usage_row("g", 1, "a", "h_a", ours[0]), _usage_row("g", 1, "b", "h_b", ours[1])]
    assert await store.usage(A) == expected
    assert await store.usage(B) == [_usage_row("g", 1, "a", "h_a", theirs)]
    assert await store.usage("initech") == []
    with pytest.raises(ValidationError, match="tenant"):
        await store.usage("Acme/../x")


async def test_store_reports_records_without_a_graph_under_an_empty_graph_id(
    store: StateStore,
) -> None:
    _, env = execution_record(1, telemetry=usage(3, 2, 1, 1, 0))
    for header in (env.header, env.task_execution.header):
        header.ClearField("graph")
        header.node.handler = ""
    record = (env.SerializeToString(deterministic=True), env)
    await store.append_executions(A, [record])

    assert await store.usage(A) == [_usage_row("", 0, env.header.node.id, "", record)]


# -- durability --------------------------------------------------------------------------


async def test_store_keeps_everything_across_a_reopen(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    records = [execution_record(1, telemetry=usage(3, 4, 5, 6, 7)), execution_record(2)]
    first = await store_factory(tmp_path)
    stored = await first.append_executions(A, records)
    await first.upsert_lifetime(A, lifetime(last_sequence=4))
    await first.record_event(A, LIFETIME_ID, event(1))
    await first.close()

    reopened = await store_factory(tmp_path)
    try:
        assert await reopened.list_executions(A, LIFETIME_ID) == stored
        assert await reopened.counters(A) == _sum(*records)
        row = await reopened.get_lifetime(A, LIFETIME_ID)
        assert row is not None
        assert row.last_sequence == 4
        assert [e.sequence for e in await reopened.list_events(A, LIFETIME_ID)] == [1]
        [again] = await reopened.append_executions(A, records[:1])
        assert again.duplicate
        [third] = await reopened.append_executions(A, [execution_record(3)])
        assert third.store_sequence > stored[-1].store_sequence
        assert third.persisted_at >= stored[-1].persisted_at
    finally:
        await reopened.close()


async def test_store_refuses_use_after_close(store_factory: StoreFactory, tmp_path: Path) -> None:
    opened = await store_factory(tmp_path)
    await opened.close()
    await opened.close()  # idempotent

    with pytest.raises(StoreClosedError):
        await opened.counters(A)


# -- SQLite specifics --------------------------------------------------------------------


def _migration_rows(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT version, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()


async def test_sqlite_store_applies_migrations_once(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dirs" / SQLITE_FILE
    async with await SQLiteStateStore.open(path) as first:
        assert await first.schema_version() == len(MIGRATIONS)
    applied = _migration_rows(path)
    assert [version for version, _ in applied] == list(range(1, len(MIGRATIONS) + 1))

    async with await SQLiteStateStore.open(path) as second:
        assert await second.schema_version() == len(MIGRATIONS)
    assert _migration_rows(path) == applied


async def test_sqlite_store_upgrade_keeps_old_records_and_reports_them_without_a_graph(
    tmp_path: Path,
) -> None:
    path = tmp_path / SQLITE_FILE
    # A file written by a tickmesh that knew only schema version 1.
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
        conn.execute(
            "INSERT INTO executions (tenant, execution_id, attempt, lifetime_id, kind, node_id,"
            " persisted_at, input_tokens, output_tokens, cost_micros, model_calls, tool_calls,"
            " envelope) VALUES (?, ?, 1, ?, 'task', 'old_node', 1, 4, 3, 2, 1, 0, ?)",
            (A, exec_id(1), LIFETIME_ID, execution_record(1)[0]),
        )

    async with await SQLiteStateStore.open(path) as upgraded:
        assert await upgraded.schema_version() == len(MIGRATIONS)
        await upgraded.append_executions(
            A, [_step(2, "g", "new_node", usage(1, 1, 1, 1, 1), version=2)]
        )
        rows = await upgraded.usage(A)
    assert [(r.graph_id, r.graph_version, r.node_id, r.handler, r.executions) for r in rows] == [
        ("", 0, "old_node", "", 1),
        ("g", 2, "new_node", "h_new_node", 1),
    ]
    assert rows[0].input_tokens == 4


async def test_sqlite_lifetime_rows_stored_before_the_graph_column_are_listed_by_graph(
    tmp_path: Path,
) -> None:
    path = tmp_path / SQLITE_FILE
    old = lifetime("019a0000-0000-7000-8000-000000000001", tenant=A)
    old.graph.id = "g"
    # A file written by a tickmesh that knew schema versions 1 and 2.
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(MIGRATIONS[0])
        conn.executescript(MIGRATIONS[1])
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (1, 0), (2, 0)")
        conn.execute(
            "INSERT INTO lifetimes (tenant, lifetime_id, last_sequence, state, body)"
            " VALUES (?, ?, 1, ?, ?)",
            (A, old.lifetime_id, old.state, old.SerializeToString()),
        )

    async with await SQLiteStateStore.open(path) as upgraded:
        new = lifetime("019a0000-0000-7000-8000-000000000002", tenant=A)
        new.graph.id = "g"
        await upgraded.upsert_lifetime(A, new)
        other = lifetime("019a0000-0000-7000-8000-000000000003", tenant=A)
        other.graph.id = "h"
        await upgraded.upsert_lifetime(A, other)
        listed = await upgraded.list_lifetimes(A, graph_id="g")
    assert [r.lifetime_id for r in listed] == [new.lifetime_id, old.lifetime_id]


async def test_sqlite_store_uses_wal_full_sync_its_cache_and_rare_checkpoints(
    tmp_path: Path,
) -> None:
    store = await SQLiteStateStore.open(tmp_path / SQLITE_FILE)
    try:
        pragmas = await store._run(  # a peek at the connection, on its own thread
            lambda: tuple(
                store._conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "cache_size", "wal_autocheckpoint")
            )
        )
    finally:
        await store.close()
    assert pragmas == ("wal", 2, -SQLITE_CACHE_KIB, SQLITE_CHECKPOINT_PAGES)


async def test_sqlite_store_loses_nothing_committed_to_a_long_wal_when_it_crashes(
    tmp_path: Path,
) -> None:
    """Between checkpoints the WAL holds thousands of committed pages: a process that dies
    then (the files copied while the store is open, as a crash leaves them) loses none."""
    live = tmp_path / "live" / SQLITE_FILE
    store = await SQLiteStateStore.open(live)
    big = unknown_field(b"x" * 3000)  # about a page per record
    try:
        for batch in range(40):
            records = [execution_record(batch * 50 + i, extra=big) for i in range(50)]
            await store.append_executions(A, records)
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for suffix in ("", "-wal"):
            (crashed / (SQLITE_FILE + suffix)).write_bytes(
                (live.parent / (SQLITE_FILE + suffix)).read_bytes()
            )
    finally:
        await store.close()
    wal_pages = (crashed / (SQLITE_FILE + "-wal")).stat().st_size // 4096
    # Over twice the 1,000 pages after which SQLite's default would have copied them back.
    assert 2_000 < wal_pages < SQLITE_CHECKPOINT_PAGES

    async with await SQLiteStateStore.open(crashed / SQLITE_FILE) as reopened:
        listed = await reopened.list_executions(A, LIFETIME_ID, limit=5_000)
    assert [r.execution_id for r in listed] == [exec_id(n) for n in range(2_000)]


async def test_sqlite_store_persisted_at_never_goes_back_with_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await SQLiteStateStore.open(tmp_path / SQLITE_FILE) as store:
        [first] = await store.append_executions(A, [execution_record(1)])
        # The wall clock steps back an hour (NTP, a VM restore): store order still rules.
        stepped_back = first.persisted_at - timedelta(hours=1)
        fake_ns = (stepped_back - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        monkeypatch.setattr(store_module, "time", SimpleNamespace(time_ns=lambda: fake_ns * 1000))

        [second] = await store.append_executions(A, [execution_record(2)])

    assert second.persisted_at >= first.persisted_at


async def test_a_page_of_one_graph_reads_that_graphs_rows_not_every_row(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows keep their graph in a column of their own, so a page of a rare graph among
    many others reads only its rows (it used to read every newer row to find them)."""
    common = [f"019a0000-0000-7000-8001-{n:012d}" for n in range(120)]
    for lifetime_id in common:
        row = lifetime(lifetime_id, tenant=A)
        row.graph.id = "common"
        await store.upsert_lifetime(A, row)
    # The two oldest, of the rare graph, folded from events as the state service does.
    rare = [f"019a0000-0000-7000-8000-{n:012d}" for n in (1, 2)]
    for lifetime_id in rare:
        started = envelope_pb2.ExecutionEnvelope(
            header=header_pb2.EnvelopeHeader(tenant_id=A, lifetime_id=lifetime_id, sequence=1)
        )
        started.header.graph.id = "rare"
        started.lifetime_event.sequence = 1
        started.lifetime_event.state = lifetime_pb2.LIFETIME_STATE_RUNNING
        await store.apply_events(A, [started], fold_events)
    read: list[str] = []
    original = store_module.lifetime_of_row

    def counted(row: Sequence[Any]) -> lifetime_pb2.AgentLifetime:
        read.append(str(row[0]))
        return original(row)

    monkeypatch.setattr(store_module, "lifetime_of_row", counted)

    rows = await store.list_lifetimes(A, graph_id="rare", limit=10)

    assert [r.lifetime_id for r in rows] == list(reversed(rare))
    assert [r.graph.id for r in rows] == ["rare", "rare"]
    assert read == list(reversed(rare)), f"read {len(read)} rows for 2"
    assert len(await store.list_lifetimes(A, graph_id="common", limit=1000)) == 120


async def test_apply_events_stores_a_batch_and_folds_rows_once(store: StateStore) -> None:
    """One transaction per batch: events idempotent on sequence, rows never go back."""

    def env(
        lifetime_id: str, sequence: int, state: lifetime_pb2.LifetimeState.ValueType
    ) -> envelope_pb2.ExecutionEnvelope:
        return envelope_pb2.ExecutionEnvelope(
            header=header_pb2.EnvelopeHeader(tenant_id="acme", lifetime_id=lifetime_id),
            lifetime_event=lifetime_pb2.LifetimeEvent(sequence=sequence, state=state),
        )

    running, done = lifetime_pb2.LIFETIME_STATE_RUNNING, lifetime_pb2.LIFETIME_STATE_COMPLETED
    batch = [env("l1", 1, running), env("l2", 1, running), env("l1", 2, done)]
    assert await store.apply_events("acme", batch, fold_events) == 3
    # A redelivery of the whole batch plus an older event: nothing new, nothing taken back.
    assert await store.apply_events("acme", [*batch, env("l1", 1, running)], fold_events) == 0
    l1 = await store.get_lifetime("acme", "l1")
    l2 = await store.get_lifetime("acme", "l2")
    assert l1 is not None
    assert l2 is not None
    assert l1.state == done
    assert l1.last_sequence == 2
    assert l2.state == running
    assert [e.sequence for e in await store.list_events("acme", "l1")] == [1, 2]
    assert await store.get_lifetime("beta", "l1") is None


async def test_apply_events_takes_a_decisions_events_in_one_envelope(store: StateStore) -> None:
    """A decision's events arrive as one lifetime_events body under one header: each is
    stored under its own sequence and folded in order."""
    header = header_pb2.EnvelopeHeader(
        tenant_id="acme", lifetime_id="l1", labels={"team": "qa"}, sequence=1
    )
    decision = envelope_pb2.ExecutionEnvelope(header=header)
    decision.lifetime_events.events.add(
        sequence=1,
        kind=lifetime_pb2.LIFETIME_EVENT_KIND_STARTED,
        state=lifetime_pb2.LIFETIME_STATE_RUNNING,
    )
    decision.lifetime_events.events.add(
        sequence=2,
        kind=lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
        state=lifetime_pb2.LIFETIME_STATE_RUNNING,
    )
    ended = envelope_pb2.ExecutionEnvelope(header=header)
    ended.header.sequence = 3
    ended.lifetime_event.sequence = 3
    ended.lifetime_event.state = lifetime_pb2.LIFETIME_STATE_COMPLETED
    assert await store.apply_events("acme", [decision, ended], fold_events) == 3
    assert await store.apply_events("acme", [decision], fold_events) == 0  # a redelivery
    events = await store.list_events("acme", "l1")
    assert [(e.sequence, e.kind) for e in events] == [
        (1, lifetime_pb2.LIFETIME_EVENT_KIND_STARTED),
        (2, lifetime_pb2.LIFETIME_EVENT_KIND_STEP_DISPATCHED),
        (3, lifetime_pb2.LIFETIME_EVENT_KIND_UNSPECIFIED),
    ]
    row = await store.get_lifetime("acme", "l1")
    assert row is not None
    assert (row.last_sequence, row.state, dict(row.labels)) == (
        3,
        lifetime_pb2.LIFETIME_STATE_COMPLETED,
        {"team": "qa"},
    )

    bad = envelope_pb2.ExecutionEnvelope(header=header)
    bad.lifetime_events.events.add(sequence=4)
    bad.lifetime_events.events.add(sequence=0)
    with pytest.raises(ValidationError, match="sequences start at 1"):
        await store.apply_events("acme", [bad], fold_events)
    not_an_event = envelope_pb2.ExecutionEnvelope(header=header)
    not_an_event.task_request.SetInParent()
    with pytest.raises(ValidationError, match="lifetime_event or lifetime_events"):
        await store.apply_events("acme", [not_an_event], fold_events)
    assert [e.sequence for e in await store.list_events("acme", "l1")] == [1, 2, 3]
