"""What the PostgreSQL store adds to the StateStore contract, on a real server.

The contract itself (tests/unit/state/test_store_contract.py) runs on both stores;
these tests cover migrations, concurrent writers seen by a paging reader, batch
throughput, and a server that stops and restarts under a stream of appends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from tests.support.factories import LIFETIME_ID
from tests.support.postgres import (
    PostgresFactory,
    PostgresServer,
    StopMode,
    unique_database_name,
)
from tests.support.records import Record, exec_id, execution_record, usage
from tickmesh.sdk.errors import ConfigError, TransportError
from tickmesh.state.postgres import MIGRATIONS, PostgresStateStore, migrate
from tickmesh.state.store import StoredExecution
from tickmesh.v1 import lifetime_pb2

A = "acme"
NEWEST = len(MIGRATIONS)
TABLES = {
    "executions",
    "lifetime_counters",
    "tenant_counters",
    "lifetimes",
    "events",
    "schema_migrations",
}


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _tables(dsn: str, schema: str = "public") -> set[str]:
    rows = await _fetch(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {row["tablename"] for row in rows}


async def _migrations(dsn: str) -> list[tuple[int, int]]:
    rows = await _fetch(dsn, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    return [(row["version"], row["applied_at"]) for row in rows]


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStateStore]:
    opened = await PostgresStateStore.open(postgres_dsn)
    try:
        yield opened
    finally:
        await opened.close()


async def _list_all(store: PostgresStateStore, tenant: str = A) -> list[StoredExecution]:
    listed: list[StoredExecution] = []
    while page := await store.list_executions(
        tenant, LIFETIME_ID, after_sequence=listed[-1].store_sequence if listed else 0, limit=1000
    ):
        listed += page
    return listed


# -- migrations --------------------------------------------------------------------------


async def test_migrate_brings_a_fresh_database_to_the_newest_schema(postgres_dsn: str) -> None:
    assert await migrate(postgres_dsn) == (0, NEWEST)

    assert await _tables(postgres_dsn) >= TABLES
    assert [version for version, _ in await _migrations(postgres_dsn)] == list(range(1, NEWEST + 1))


async def test_migrate_again_is_a_no_op(postgres_dsn: str) -> None:
    await migrate(postgres_dsn)
    applied = await _migrations(postgres_dsn)

    assert await migrate(postgres_dsn) == (NEWEST, NEWEST)
    async with await PostgresStateStore.open(postgres_dsn) as store:
        assert await store.schema_version() == NEWEST

    assert await _migrations(postgres_dsn) == applied


async def test_lifetime_rows_stored_before_the_graph_column_are_listed_by_graph(
    postgres_dsn: str,
) -> None:
    old = lifetime_pb2.AgentLifetime(
        lifetime_id="019a0000-0000-7000-8000-000000000001", tenant_id=A, last_sequence=1
    )
    old.graph.id = "g"
    # A database a tickmesh that knew schema versions 1 and 2 wrote.
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT)"
        )
        for version in (1, 2):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", version)
        await conn.execute(
            "INSERT INTO lifetimes (tenant, lifetime_id, last_sequence, state, body)"
            " VALUES ($1, $2, 1, 0, $3)",
            A,
            old.lifetime_id,
            old.SerializeToString(),
        )
    finally:
        await conn.close()

    assert await migrate(postgres_dsn) == (2, NEWEST)
    async with await PostgresStateStore.open(postgres_dsn) as store:
        new = lifetime_pb2.AgentLifetime(
            lifetime_id="019a0000-0000-7000-8000-000000000002", last_sequence=1
        )
        new.graph.id = "g"
        await store.upsert_lifetime(A, new)
        other = lifetime_pb2.AgentLifetime(
            lifetime_id="019a0000-0000-7000-8000-000000000003", last_sequence=1
        )
        other.graph.id = "h"
        await store.upsert_lifetime(A, other)
        listed = await store.list_lifetimes(A, graph_id="g")
    assert [r.lifetime_id for r in listed] == [new.lifetime_id, old.lifetime_id]


async def test_services_starting_together_migrate_once(postgres_dsn: str) -> None:
    """The advisory lock makes the others wait, then find nothing left to do."""
    results = await asyncio.gather(*(migrate(postgres_dsn) for _ in range(4)))

    assert sorted(results) == [(0, NEWEST)] + [(NEWEST, NEWEST)] * 3
    assert len(await _migrations(postgres_dsn)) == NEWEST


async def test_open_without_migrating_refuses_an_old_schema(postgres_dsn: str) -> None:
    with pytest.raises(ConfigError, match=r"schema version 0.*run `tickmesh migrate`"):
        await PostgresStateStore.open(postgres_dsn, migrate=False)
    assert await _tables(postgres_dsn) <= {"schema_migrations"}, "nothing was created"

    await migrate(postgres_dsn)
    async with await PostgresStateStore.open(postgres_dsn, migrate=False) as store:
        assert await store.schema_version() == NEWEST


async def test_open_refuses_a_schema_newer_than_this_code(postgres_dsn: str) -> None:
    await migrate(postgres_dsn)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", NEWEST + 1)
    finally:
        await conn.close()

    for should_migrate in (True, False):
        with pytest.raises(ConfigError, match=rf"version {NEWEST + 1}.*upgrade tickmesh"):
            await PostgresStateStore.open(postgres_dsn, migrate=should_migrate)
    with pytest.raises(ConfigError, match="upgrade tickmesh"):
        await migrate(postgres_dsn)


async def test_store_keeps_its_tables_in_the_schema_it_is_given(postgres_dsn: str) -> None:
    async with await PostgresStateStore.open(postgres_dsn, schema="tickmesh_state") as store:
        await store.append_executions(A, [execution_record(1)])

    assert await _tables(postgres_dsn, "tickmesh_state") >= TABLES
    assert not TABLES & await _tables(postgres_dsn, "public")
    rows = await _fetch(postgres_dsn, "SELECT execution_id FROM tickmesh_state.executions")
    assert [row["execution_id"] for row in rows] == [exec_id(1)]


# -- connection errors -------------------------------------------------------------------


async def test_open_names_an_unreachable_server_without_its_password(
    postgres_server: PostgresServer,
) -> None:
    dsn = "postgresql://tickmesh:s3cret-pw@127.0.0.1:1/tickmesh"

    with pytest.raises(ConfigError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1/tickmesh"):
        await PostgresStateStore.open(dsn)
    with pytest.raises(ConfigError) as caught:
        await migrate(dsn)
    assert "s3cret-pw" not in str(caught.value)


async def test_open_names_a_database_that_does_not_exist(postgres_server: PostgresServer) -> None:
    dsn = postgres_server.dsn_for(unique_database_name("missing"))

    with pytest.raises(ConfigError, match=r"cannot reach PostgreSQL at .*missing_.*does not exist"):
        await PostgresStateStore.open(dsn)


async def test_store_gives_up_after_retry_for_s_and_recovers_when_the_server_returns(
    start_postgres: PostgresFactory,
) -> None:
    server = start_postgres()
    dsn = await server.create_database("retries")
    async with await PostgresStateStore.open(dsn, retry_for_s=1.0) as store:
        await store.append_executions(A, [execution_record(1)])
        await asyncio.to_thread(server.stop)

        started = time.monotonic()
        with pytest.raises(TransportError, match=r"unreachable for 1 s"):
            await store.counters(A)
        assert 1.0 <= time.monotonic() - started < 5.0

        await asyncio.to_thread(server.start)
        assert (await store.counters(A))[1] == 1, "the same store works again"


# -- ordering, time and throughput -------------------------------------------------------


async def test_concurrent_writers_never_show_a_paging_reader_sequences_out_of_order(
    postgres_dsn: str,
) -> None:
    """Two stores (two pools) append to one tenant while a reader pages by sequence.

    Without the per-tenant append lock a transaction holding lower sequences can commit
    after one holding higher sequences, and the reader, already past them, misses it.
    """
    writers, tasks_per_writer, batches, batch_size = 2, 3, 30, 8
    stores = [await PostgresStateStore.open(postgres_dsn) for _ in range(writers)]
    done = asyncio.Event()

    async def write(store: PostgresStateStore, first: int) -> None:
        for b in range(batches):
            start = first + b * batch_size
            await store.append_executions(
                A, [execution_record(n) for n in range(start, start + batch_size)]
            )

    async def read() -> list[StoredExecution]:
        seen: list[StoredExecution] = []
        after = 0
        while True:
            finished = done.is_set()  # read before the page: a last full pass follows
            page = await stores[0].list_executions(A, LIFETIME_ID, after_sequence=after, limit=37)
            seen += page
            after = page[-1].store_sequence if page else after
            if not page:
                if finished:
                    return seen
                await asyncio.sleep(0.001)

    try:
        reader = asyncio.create_task(read())
        async with asyncio.TaskGroup() as group:
            for w, store in enumerate(stores):
                for t in range(tasks_per_writer):
                    first = 1 + (w * tasks_per_writer + t) * batches * batch_size
                    group.create_task(write(store, first))
        done.set()
        seen = await reader
    finally:
        for store in stores:
            await store.close()

    total = writers * tasks_per_writer * batches * batch_size
    sequences = [s.store_sequence for s in seen]
    assert sequences == sorted(set(sequences)), "strictly increasing"
    assert sorted(s.execution_id for s in seen) == sorted(exec_id(n) for n in range(1, total + 1))


async def test_persisted_at_never_goes_below_the_tenants_newest_record(
    store: PostgresStateStore, postgres_dsn: str
) -> None:
    [first] = await store.append_executions(A, [execution_record(1)])
    # As if the clock had stepped back an hour since the newest record was stored.
    await _fetch(
        postgres_dsn,
        "UPDATE tenant_counters SET last_persisted_ns = last_persisted_ns + $1 WHERE tenant = $2",
        3_600 * 10**9,
        A,
    )

    [second] = await store.append_executions(A, [execution_record(2)])

    assert second.persisted_at == first.persisted_at + timedelta(hours=1)
    assert (await store.counters(A, since=second.persisted_at))[1] == 1


async def test_append_throughput_in_batches_of_512(
    store: PostgresStateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """100 batches of 512 records, each one transaction around one insert statement."""
    batches, batch_size = 100, 512
    telemetry = usage(10, 5, 3, 1, 0)
    records = [
        [execution_record(b * batch_size + i, telemetry=telemetry) for i in range(batch_size)]
        for b in range(batches)
    ]

    started = time.perf_counter()
    for batch in records:
        stored = await store.append_executions(A, batch)
        assert not any(s.duplicate for s in stored)
    elapsed = time.perf_counter() - started

    totals, executions = await store.counters(A)
    assert executions == batches * batch_size
    assert totals.input_tokens == 10 * batches * batch_size
    rate = batches * batch_size / elapsed
    with capsys.disabled():
        print(  # noqa: T201 - the figure is the point of this test
            f"\nPostgreSQL append: {batches} x {batch_size} records in {elapsed:.2f} s"
            f" = {rate:,.0f} steps/s ({elapsed / batches * 1000:.1f} ms per batch)"
        )


# -- a server that goes away -------------------------------------------------------------


async def test_a_dedicated_server_starts_quickly_and_keeps_its_data_across_restarts(
    start_postgres: PostgresFactory,
) -> None:
    server = start_postgres()
    assert server.started_in_s < 3.0, "initdb and start together"
    dsn = await server.create_database("kept")
    await _fetch(dsn, "CREATE TABLE kept AS SELECT 42 AS answer")
    port = server.port

    await asyncio.to_thread(server.restart)
    await asyncio.to_thread(server.restart, "immediate")  # a crash: WAL recovery

    assert server.port == port
    assert [row["answer"] for row in await _fetch(dsn, "SELECT answer FROM kept")] == [42]


async def test_appends_survive_server_restarts_without_loss_or_duplicates(
    start_postgres: PostgresFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream of appends (with redeliveries) while the server stops twice: once cleanly,
    once by crashing. Every record ends up stored exactly once, counted once, and each
    append reported the sequence the record really has."""
    server = start_postgres()
    dsn = await server.create_database("restarts")
    batches, batch_size = 120, 16
    reported: dict[str, int] = {}
    progress = 0
    milestones = {20: asyncio.Event(), 70: asyncio.Event()}  # batches done -> bounce
    hit: list[bool] = []  # per outage: did appends in flight run into it?

    async def append_all(store: PostgresStateStore, lane: int) -> None:
        nonlocal progress
        previous: Sequence[Record] = ()
        for b in range(lane, batches, 2):
            batch = [execution_record(b * batch_size + i + 1) for i in range(batch_size)]
            # A redelivery of the lane's previous batch rides along, as after a nak.
            for s in await store.append_executions(A, [*previous[-4:], *batch]):
                assert reported.setdefault(s.execution_id, s.store_sequence) == s.store_sequence
            previous = batch
            progress += 1
            if progress in milestones:
                milestones[progress].set()
            await asyncio.sleep(0.005)  # a steady stream rather than one burst

    def retry_warnings() -> int:
        return sum("retrying" in r.getMessage() for r in caplog.records)

    async def bounce(after_batches: int, mode: StopMode) -> None:
        await milestones[after_batches].wait()
        before = retry_warnings()
        await asyncio.to_thread(server.stop, mode)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.start)
        hit.append(retry_warnings() > before)

    caplog.set_level(logging.WARNING, logger="tickmesh.state.postgres")
    async with await PostgresStateStore.open(dsn, max_size=4, retry_for_s=30) as store:
        async with asyncio.TaskGroup() as group:
            group.create_task(append_all(store, 0))
            group.create_task(append_all(store, 1))

            async def bounce_twice() -> None:
                await bounce(20, "fast")
                await bounce(70, "immediate")

            group.create_task(bounce_twice())
        listed = await _list_all(store)
        _, counted = await store.counters(A)

    total = batches * batch_size
    assert len(listed) == total
    assert sorted(s.execution_id for s in listed) == sorted(exec_id(n) for n in range(1, total + 1))
    assert counted == total
    assert {s.execution_id: s.store_sequence for s in listed} == reported
    assert hit == [True, True], "both outages hit appends in flight"
