"""The state service's system of record: execution records, lifetime rows, events, counters.

``StateStore`` is the interface the state service's core uses; ``SQLiteStateStore``
implements it for the embedded profile (the cloud profile's PostgreSQL store
implements the same protocol and passes the same contract tests).

What every implementation guarantees:

* An execution record is stored once per (tenant, execution id, attempt), whatever
  is redelivered: appending it again reports ``duplicate=True`` with the original
  row's sequence and time, and counts nothing twice.
* One append call is one transaction and one insert statement, whatever the
  batch size (DESIGN.md §8), and the counters move in the same transaction.
* The tenant is part of every key and every query, so one tenant can never read
  another's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeVar, get_args

from tickmesh.runtime.records import MAX_SEQUENCE as MAX_SEQUENCE
from tickmesh.sdk import events_of
from tickmesh.sdk.errors import ConfigError, TickmeshError, ValidationError
from tickmesh.sdk.ids import TENANT_ID_PATTERN
from tickmesh.v1 import envelope_pb2, execution_pb2, header_pb2, lifetime_pb2, telemetry_pb2

logger = logging.getLogger(__name__)

ExecutionKind = Literal["task", "plan"]
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

SQLITE_CACHE_KIB: Final = 16 * 1024
"""The SQLite connection's page cache (SQLite's default is 2 MiB). With a thousand
lifetimes running, each batch touches their event, lifetime, counter and index pages all
over the file; in 2 MiB most were read back from the file on every batch."""
SQLITE_CHECKPOINT_PAGES: Final = 10_000
"""WAL pages (of 4 KiB) written before they are copied back into the database file
(SQLite's default is 1,000). A page changed by many batches in between is copied once,
and the checkpoints' own fsyncs come ten times less often. The WAL file grows to about
40 MiB and is reused at that size; opening a database after a crash with that much in its
WAL took 15 ms (measured on a 42 MB WAL)."""

LifetimeFold = Callable[
    [
        header_pb2.EnvelopeHeader,
        Sequence[lifetime_pb2.LifetimeEvent],
        lifetime_pb2.AgentLifetime | None,
    ],
    lifetime_pb2.AgentLifetime,
]
"""Folds the lifetime events of one envelope (in order, with the envelope's header) into
the lifetime's row, which it may change in place (None: no row yet), and returns the row."""


class StoredEvent(NamedTuple):
    """A lifetime event as the stores keep it."""

    lifetime_id: str
    sequence: int
    body: bytes


def stored_events(
    tenant: str, envelopes: Sequence[envelope_pb2.ExecutionEnvelope]
) -> list[StoredEvent]:
    """The events ``envelopes`` carry (``lifetime_event`` or a decision's
    ``lifetime_events``), checked as every store takes them."""
    stored = []
    for envelope in envelopes:
        header = envelope.header
        if not header.lifetime_id:
            raise ValidationError("an event needs a lifetime_id")
        if header.tenant_id != tenant:
            raise ValidationError(f"event of tenant {header.tenant_id!r} given for {tenant!r}")
        events = events_of(envelope)
        if not events:
            raise ValidationError("expected a lifetime_event or lifetime_events body")
        for event in events:
            check_event_sequence(event.sequence)
            stored.append(
                StoredEvent(header.lifetime_id, event.sequence, event.SerializeToString())
            )
    return stored


def check_event_sequence(sequence: int) -> None:
    """A stored event's sequence: from 1 to what a signed 64-bit column holds.

    Raises:
        ValidationError: It is 0 or past ``MAX_SEQUENCE``.
    """
    if sequence < 1:
        raise ValidationError("lifetime event sequences start at 1")
    if sequence > MAX_SEQUENCE:
        raise ValidationError(
            f"lifetime event sequence {sequence} is past the largest a store keeps ({MAX_SEQUENCE})"
        )


def fold_rows(
    envelopes: Sequence[envelope_pb2.ExecutionEnvelope],
    rows: dict[str, lifetime_pb2.AgentLifetime | None],
    fold: LifetimeFold,
) -> None:
    """Fold every event of ``envelopes`` into ``rows`` (lifetime id -> its row, None: no
    row yet), in order."""
    for envelope in envelopes:
        events = events_of(envelope)
        if events:
            header = envelope.header
            lifetime_id = header.lifetime_id
            rows[lifetime_id] = fold(header, events, rows[lifetime_id])


_T = TypeVar("_T")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_UINT32_MAX: Final = 0xFFFF_FFFF
_MIN_NS: Final = -(2**63)
_MAX_NS: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class StoredExecution:
    """One stored execution record and its place in the tenant's log."""

    tenant: str
    """The owning tenant."""
    execution_id: str
    """The deterministic execution id."""
    attempt: int
    """The attempt (1-based)."""
    lifetime_id: str
    """The lifetime the execution belongs to."""
    kind: ExecutionKind
    """Whether the record is a task or a plan execution."""
    node_id: str
    """The node that was executed."""
    store_sequence: int
    """The record's position in the tenant's append-only log (increasing, with gaps)."""
    persisted_at: datetime
    """When the store committed the record (UTC)."""
    envelope: bytes
    """The record's ``ExecutionEnvelope`` bytes exactly as first received (unknown fields kept)."""
    duplicate: bool
    """True when an append found the record already stored (the fields are the original's)."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """The summed usage of one graph version, or of one node of it (see ``StateStore.usage``)."""

    graph_id: str
    """The graph's id; empty for records stored before the store kept it (schema version 1)."""
    graph_version: int
    """The graph's version; 0 when unknown."""
    node_id: str
    """The node's id; empty when grouped by graph."""
    handler: str
    """The node's handler; empty when grouped by graph or unknown."""
    executions: int
    """How many execution records (attempts included) were summed."""
    input_tokens: int
    output_tokens: int
    cost_micros: int
    """Summed cost in millionths of the currency unit, as ``Telemetry.cost_micros``."""
    model_calls: int
    tool_calls: int


class StateStore(Protocol):
    """Durable storage of execution records, lifetime rows, lifetime events and counters."""

    async def append_executions(
        self,
        tenant: str,
        envelopes: Sequence[tuple[bytes, envelope_pb2.ExecutionEnvelope]],
    ) -> list[StoredExecution]:
        """Store a batch of execution records, idempotently, in one transaction.

        Args:
            tenant: The tenant the records arrived under; every header must carry it.
            envelopes: ``(bytes as received, parsed envelope)`` pairs, each with a
                ``task_execution`` or ``plan_execution`` body.

        Returns:
            One result per input, in input order. A record already stored (same
            tenant, execution id and attempt, including earlier in the same batch)
            comes back with ``duplicate=True`` and the stored row's fields.

        Raises:
            ValidationError: a record has another body, another tenant, or no ids;
                nothing of the batch is stored.
        """
        ...

    async def get_execution(
        self, tenant: str, execution_id: str, attempt: int = 0
    ) -> StoredExecution | None:
        """Return one stored attempt of an execution (``attempt=0``: the newest), or None."""
        ...

    async def list_executions(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 100
    ) -> list[StoredExecution]:
        """Return up to ``limit`` of a lifetime's executions after ``after_sequence``.

        They come in store order; pass the last one's ``store_sequence`` to page on.
        """
        ...

    async def upsert_lifetime(self, tenant: str, lifetime: lifetime_pb2.AgentLifetime) -> None:
        """Keep ``lifetime`` as the lifetime's row, never replacing a newer one.

        A stored row with a higher ``last_sequence`` wins; an equal one is replaced.
        ``totals`` and ``execution_count`` are not stored: reads fill them from the counters.
        """
        ...

    async def get_lifetime(
        self, tenant: str, lifetime_id: str
    ) -> lifetime_pb2.AgentLifetime | None:
        """Return a lifetime's row with ``totals`` and ``execution_count`` from the counters."""
        ...

    async def list_lifetimes(
        self,
        tenant: str,
        *,
        before: str = "",
        states: Collection[int] = (),
        graph_id: str = "",
        limit: int = 100,
    ) -> list[lifetime_pb2.AgentLifetime]:
        """Return up to ``limit`` of the tenant's lifetime rows, newest (highest id) first,
        as :meth:`get_lifetime` does: those with an id below ``before`` (all when empty),
        in one of ``states`` (any when empty), of graph ``graph_id`` (any when empty).

        The state is a column; the graph is read from each row, so a graph filter reads
        rows newest first until the page is full.
        """
        ...

    async def record_event(
        self, tenant: str, lifetime_id: str, event: lifetime_pb2.LifetimeEvent
    ) -> bool:
        """Store a lifetime event; False if one with its sequence was already stored."""
        ...

    async def apply_events(
        self,
        tenant: str,
        envelopes: Sequence[envelope_pb2.ExecutionEnvelope],
        fold: LifetimeFold,
    ) -> int:
        """Store a batch of lifetime events and fold them into their lifetimes' rows, in
        one transaction; events already stored are skipped. Returns how many were new.

        Each envelope carries one ``lifetime_event`` or a decision's ``lifetime_events``
        (sequences from 1, in order), under one header."""
        ...

    async def list_events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 1000
    ) -> list[lifetime_pb2.LifetimeEvent]:
        """Return up to ``limit`` of a lifetime's events after ``after_sequence``, in order."""
        ...

    async def counters(
        self, tenant: str, *, lifetime_id: str | None = None, since: datetime | None = None
    ) -> tuple[telemetry_pb2.Telemetry, int]:
        """Return (summed telemetry, number of executions) of a lifetime or the whole tenant.

        ``since`` (timezone-aware) counts only executions persisted at or after it.
        """
        ...

    async def usage(
        self,
        tenant: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        graph_id: str | None = None,
        by_node: bool = True,
    ) -> list[UsageRow]:
        """Sum a tenant's executions per graph version (and per node, with ``by_node``).

        Args:
            tenant: The tenant whose executions to sum.
            since: Counts only executions persisted at or after it (timezone-aware).
            until: Counts only executions persisted before it (timezone-aware).
            graph_id: Counts only this graph's executions (every version).
            by_node: One row per node of each graph version; else one per graph version.

        Returns:
            The non-empty groups, ordered by graph id, version, node id and handler
            (code point order). Records stored before schema version 2 have no graph
            or handler and are summed under ``graph_id=""``.

        Raises:
            ValidationError: a time is naive, or ``until`` is before ``since``.
        """
        ...

    async def close(self) -> None:
        """Finish pending work and release the store."""
        ...


class StoreClosedError(TickmeshError):
    """The store was used after ``close()``."""


# Each string is one migration; version N is MIGRATIONS[N - 1]. Never edit one that has
# shipped: append a new one. Tables are created without IF NOT EXISTS on purpose, so a
# migration applied twice fails loudly instead of silently.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE executions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        lifetime_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('task', 'plan')),
        node_id TEXT NOT NULL,
        persisted_at INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        model_calls INTEGER NOT NULL,
        tool_calls INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        UNIQUE (tenant, execution_id, attempt)
    );
    CREATE INDEX executions_by_lifetime ON executions (tenant, lifetime_id, seq);
    -- Covers the windowed tenant sums (guardrails' "over the last 24 h"): index-only scans.
    CREATE INDEX executions_by_time ON executions (
        tenant, persisted_at, input_tokens, output_tokens, cost_micros, model_calls, tool_calls
    );
    CREATE TABLE lifetime_counters (
        tenant TEXT NOT NULL,
        lifetime_id TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        model_calls INTEGER NOT NULL,
        tool_calls INTEGER NOT NULL,
        executions INTEGER NOT NULL,
        PRIMARY KEY (tenant, lifetime_id)
    ) WITHOUT ROWID;
    CREATE TABLE tenant_counters (
        tenant TEXT NOT NULL PRIMARY KEY,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        model_calls INTEGER NOT NULL,
        tool_calls INTEGER NOT NULL,
        executions INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE lifetimes (
        tenant TEXT NOT NULL,
        lifetime_id TEXT NOT NULL,
        last_sequence INTEGER NOT NULL,
        state INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (tenant, lifetime_id)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        tenant TEXT NOT NULL,
        lifetime_id TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (tenant, lifetime_id, sequence)
    ) WITHOUT ROWID;
    """,
    # 2: the graph version and handler of each record, for usage reports by graph and
    # node. Rows stored before keep the defaults and are reported under graph "".
    """
    ALTER TABLE executions ADD COLUMN graph_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE executions ADD COLUMN graph_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE executions ADD COLUMN handler TEXT NOT NULL DEFAULT '';
    """,
    # 3: each lifetime row's graph, so that a listing of one graph reads its own rows by
    # index. Rows stored before have none (NULL) and are read from their bodies, as before.
    """
    ALTER TABLE lifetimes ADD COLUMN graph_id TEXT;
    CREATE INDEX lifetimes_by_graph ON lifetimes (tenant, graph_id, lifetime_id);
    """,
)

_UPSERT_LIFETIME: Final = (
    "INSERT INTO lifetimes (tenant, lifetime_id, last_sequence, state, body, graph_id)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, lifetime_id) DO UPDATE SET"
    " last_sequence = excluded.last_sequence, state = excluded.state, body = excluded.body"
    " WHERE excluded.last_sequence >= lifetimes.last_sequence"
)
"""One lifetime row in; an equal last_sequence replaces it, a lower one never does. A
lifetime's graph never changes, so an update leaves the column (and its index) alone."""

_INSERT_EXECUTION: Final = """
    INSERT INTO executions (
        tenant, execution_id, attempt, lifetime_id, kind, node_id, persisted_at,
        input_tokens, output_tokens, cost_micros, model_calls, tool_calls, envelope,
        graph_id, graph_version, handler
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (tenant, execution_id, attempt) DO NOTHING
"""
_SUMS: Final = (
    "SUM(input_tokens), SUM(output_tokens), SUM(cost_micros), "
    "SUM(model_calls), SUM(tool_calls), COUNT(*)"
)
_ADD_UP: Final = """
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        cost_micros = cost_micros + excluded.cost_micros,
        model_calls = model_calls + excluded.model_calls,
        tool_calls = tool_calls + excluded.tool_calls,
        executions = executions + excluded.executions
"""
# The rows this transaction inserted are exactly those with seq > the max seq before it
# (BEGIN IMMEDIATE holds the write lock), so redelivered records are never counted twice.
_COUNT_NEW_PER_LIFETIME: Final = f"""
    INSERT INTO lifetime_counters (
        tenant, lifetime_id, input_tokens, output_tokens, cost_micros, model_calls,
        tool_calls, executions
    )
    SELECT tenant, lifetime_id, {_SUMS} FROM executions WHERE seq > ?
    GROUP BY tenant, lifetime_id
    ON CONFLICT (tenant, lifetime_id) DO UPDATE SET {_ADD_UP}
"""
_COUNT_NEW_PER_TENANT: Final = f"""
    INSERT INTO tenant_counters (
        tenant, input_tokens, output_tokens, cost_micros, model_calls, tool_calls, executions
    )
    SELECT tenant, {_SUMS} FROM executions WHERE seq > ?
    GROUP BY tenant
    ON CONFLICT (tenant) DO UPDATE SET {_ADD_UP}
"""
_EXECUTION_COLUMNS: Final = (
    "tenant, execution_id, attempt, lifetime_id, kind, node_id, seq, persisted_at, envelope"
)


class _Record(NamedTuple):
    """The columns of one execution record, taken from its envelope."""

    execution_id: str
    attempt: int
    lifetime_id: str
    kind: ExecutionKind
    node_id: str
    input_tokens: int
    output_tokens: int
    cost_micros: int
    model_calls: int
    tool_calls: int
    envelope: bytes
    # Last, so the columns before keep their positions in both stores' inserts.
    graph_id: str
    graph_version: int
    handler: str


def _check_tenant(tenant: str) -> None:
    if TENANT_ID_PATTERN.fullmatch(tenant) is None:
        raise ValidationError(f"invalid tenant id {tenant!r}")


LIFETIME_ROW_COLUMNS: Final = (
    "l.lifetime_id, l.body, c.input_tokens, c.output_tokens, c.cost_micros,"
    " c.model_calls, c.tool_calls, c.executions"
    " FROM lifetimes AS l LEFT JOIN lifetime_counters AS c"
    " ON c.tenant = l.tenant AND c.lifetime_id = l.lifetime_id"
)
"""What a listed lifetime row is read from: its id, body and counters."""

LifetimeRowFetch = Callable[[str, int], Awaitable[Sequence[Sequence[Any]]]]
"""Reads up to n rows (``LIFETIME_ROW_COLUMNS``) with ids below a bound ("" for none),
newest first, the state filter applied."""


def lifetime_of_row(row: Sequence[Any]) -> lifetime_pb2.AgentLifetime:
    """A listed row (``LIFETIME_ROW_COLUMNS``) as the lifetime with its totals."""
    lifetime = lifetime_pb2.AgentLifetime.FromString(bytes(row[1]))
    totals, executions = _telemetry(tuple(row[2:]))
    lifetime.totals.CopyFrom(totals)
    lifetime.execution_count = executions
    return lifetime


async def list_lifetime_rows(
    fetch: LifetimeRowFetch, *, before: str, graph_id: str, limit: int
) -> list[lifetime_pb2.AgentLifetime]:
    """Page through ``fetch`` until ``limit`` lifetimes of ``graph_id`` (any when empty)
    are found or the rows run out (see ``StateStore.list_lifetimes``)."""
    if limit < 1:
        raise ValidationError(f"limit must be >= 1, not {limit}")
    found: list[lifetime_pb2.AgentLifetime] = []
    while True:
        rows = await fetch(before, limit)
        for row in rows:
            lifetime = lifetime_of_row(row)
            if graph_id and lifetime.graph.id != graph_id:
                continue
            found.append(lifetime)
            if len(found) == limit:
                return found
        if len(rows) < limit:
            return found
        before = str(rows[-1][0])


def _check_page(after_sequence: int, limit: int) -> None:
    if not 0 <= after_sequence <= MAX_SEQUENCE:
        raise ValidationError(f"after_sequence must be 0 to {MAX_SEQUENCE}, not {after_sequence}")
    if limit < 1:
        raise ValidationError(f"limit must be >= 1, not {limit}")


def _record(tenant: str, raw: bytes, env: envelope_pb2.ExecutionEnvelope) -> _Record:
    """Validate one execution envelope and take its columns."""
    body_kind = env.WhichOneof("body")
    body: execution_pb2.TaskExecution | execution_pb2.PlanExecution
    kind: ExecutionKind
    if body_kind == "task_execution":
        kind, body = "task", env.task_execution
    elif body_kind == "plan_execution":
        kind, body = "plan", env.plan_execution
    else:
        raise ValidationError(
            f"only task_execution and plan_execution records are stored, not {body_kind}"
        )
    h = env.header
    if h.tenant_id != tenant:
        raise ValidationError(
            f"record {h.execution_id} carries tenant {h.tenant_id!r}, not {tenant!r}"
        )
    if not h.execution_id or not h.lifetime_id or h.attempt < 1:
        raise ValidationError(
            "an execution record needs an execution_id, a lifetime_id and an attempt >= 1"
        )
    if body.HasField("header"):
        inner = body.header
        if (inner.tenant_id, inner.lifetime_id, inner.execution_id, inner.attempt) != (
            h.tenant_id,
            h.lifetime_id,
            h.execution_id,
            h.attempt,
        ):
            raise ValidationError(
                f"record {h.execution_id}: the {body_kind} header disagrees with the envelope's"
            )
    t = body.result.telemetry
    return _Record(
        h.execution_id,
        h.attempt,
        h.lifetime_id,
        kind,
        h.node.id,
        t.input_tokens,
        t.output_tokens,
        t.cost_micros,
        t.model_calls,
        t.tool_calls,
        raw,
        h.graph.id,
        h.graph.version,
        h.node.handler,
    )


def _from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _to_ns(when: datetime, name: str = "since") -> int:
    """``when`` in the stores' nanoseconds, clamped to 64 bits: persisted_at never leaves
    that range (1677 to 2262), so a bound past it keeps or drops every record alike."""
    if when.tzinfo is None:
        raise ValidationError(f"{name} must be timezone-aware")
    ns = (when - _EPOCH) // timedelta(microseconds=1) * 1000
    return min(max(ns, _MIN_NS), _MAX_NS)


def _aware(when: datetime, name: str = "since") -> datetime:
    if when.tzinfo is None:
        raise ValidationError(f"{name} must be timezone-aware")
    return when


def _stored(row: Sequence[Any], *, duplicate: bool) -> StoredExecution:
    """Build a result from a row selected with ``_EXECUTION_COLUMNS``."""
    tenant, execution_id, attempt, lifetime_id, kind, node_id, seq, persisted_ns, env = row
    return StoredExecution(
        tenant=tenant,
        execution_id=execution_id,
        attempt=attempt,
        lifetime_id=lifetime_id,
        kind=kind,
        node_id=node_id,
        store_sequence=seq,
        persisted_at=_from_ns(persisted_ns),
        envelope=env,
        duplicate=duplicate,
    )


def _counters_query(
    tenant: str,
    lifetime_id: str | None,
    since: datetime | None,
    placeholder: Callable[[int], str],
    sums: str = _SUMS,
) -> tuple[str, tuple[object, ...]]:
    """The query (and its parameters) behind ``counters()``, in either store's dialect
    (``placeholder(n)`` is the n-th parameter, from 1; ``sums`` the aggregate columns):
    running totals when no ``since`` is given, else a sum over the executions persisted
    since then."""
    columns = "input_tokens, output_tokens, cost_micros, model_calls, tool_calls, executions"
    params: tuple[object, ...] = (tenant,)
    if lifetime_id is not None:
        params += (lifetime_id,)
    if since is not None:
        params += (_to_ns(since),)
    p = [placeholder(n) for n in range(1, len(params) + 1)]
    if since is None and lifetime_id is None:
        return f"SELECT {columns} FROM tenant_counters WHERE tenant = {p[0]}", params
    if since is None:
        return (
            f"SELECT {columns} FROM lifetime_counters"
            f" WHERE tenant = {p[0]} AND lifetime_id = {p[1]}",
            params,
        )
    if lifetime_id is None:
        return (
            f"SELECT {sums} FROM executions WHERE tenant = {p[0]} AND persisted_at >= {p[1]}",
            params,
        )
    return (
        f"SELECT {sums} FROM executions"
        f" WHERE tenant = {p[0]} AND lifetime_id = {p[1]} AND persisted_at >= {p[2]}",
        params,
    )


def _usage_query(
    tenant: str,
    since: datetime | None,
    until: datetime | None,
    graph_id: str | None,
    by_node: bool,
    placeholder: Callable[[int], str],
    sums: str = _SUMS,
) -> tuple[str, tuple[object, ...]]:
    """The query (and its parameters) behind ``usage()``, in either store's dialect
    (as for ``_counters_query``): one GROUP BY over the tenant's executions, selecting
    graph id, graph version, node id, handler and then ``sums``."""
    # Compared before clamping: past 2262, two distinct times share one bound.
    if since is not None and until is not None and _aware(until, "until") < _aware(since):
        raise ValidationError(f"until ({until.isoformat()}) is before since ({since.isoformat()})")
    conditions = ["tenant = {}"]
    params: list[object] = [tenant]
    if since is not None:
        conditions.append("persisted_at >= {}")
        params.append(_to_ns(since))
    if until is not None:
        conditions.append("persisted_at < {}")
        params.append(_to_ns(until, "until"))
    if graph_id is not None:
        conditions.append("graph_id = {}")
        params.append(graph_id)
    where = " AND ".join(c.format(placeholder(n)) for n, c in enumerate(conditions, start=1))
    keys = "graph_id, graph_version, node_id, handler" if by_node else "graph_id, graph_version"
    columns = keys if by_node else f"{keys}, '', ''"
    return (
        f"SELECT {columns}, {sums} FROM executions WHERE {where} GROUP BY {keys}",
        tuple(params),
    )


def _usage_rows(rows: Sequence[Sequence[Any]]) -> list[UsageRow]:
    """``UsageRow``s from the query's rows, in code point order (collations differ)."""
    usage = [
        UsageRow(
            graph_id=graph_id,
            graph_version=graph_version,
            node_id=node_id,
            handler=handler,
            executions=executions,
            input_tokens=input_tokens or 0,
            output_tokens=output_tokens or 0,
            cost_micros=cost_micros or 0,
            model_calls=model_calls or 0,
            tool_calls=tool_calls or 0,
        )
        for (
            graph_id,
            graph_version,
            node_id,
            handler,
            input_tokens,
            output_tokens,
            cost_micros,
            model_calls,
            tool_calls,
            executions,
        ) in rows
    ]
    usage.sort(key=lambda r: (r.graph_id, r.graph_version, r.node_id, r.handler))
    return usage


def _telemetry(row: tuple[int | None, ...]) -> tuple[telemetry_pb2.Telemetry, int]:
    input_tokens, output_tokens, cost_micros, model_calls, tool_calls, executions = (
        value or 0 for value in row
    )
    totals = telemetry_pb2.Telemetry(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_micros=cost_micros,
        # The proto's call counts are uint32; a tenant's all-time sum could outgrow them.
        model_calls=min(model_calls, _UINT32_MAX),
        tool_calls=min(tool_calls, _UINT32_MAX),
    )
    return totals, executions


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block as one write transaction (the write lock is taken up front)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into its statements (comments go with the next one)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    leftover = [ln for ln in pending.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise ConfigError(f"migration ends with an incomplete statement: {pending.strip()!r}")


def _schema_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
    ).fetchone()[0]
    return version


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    current = _schema_version(conn)
    if current > len(MIGRATIONS):
        raise ConfigError(
            f"the state database is at schema version {current}; this tickmesh knows "
            f"versions up to {len(MIGRATIONS)} (upgrade tickmesh)"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        with _transaction(conn):
            # Re-read under the write lock: another process may have migrated meanwhile.
            if _schema_version(conn) >= version:
                continue
            for statement in _statements(MIGRATIONS[version - 1]):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time_ns()),
            )
        logger.info("state store: applied schema migration %d", version)


async def migrate_sqlite(path: str | Path) -> tuple[int, int]:
    """Bring the SQLite store at ``path`` to the newest schema; return (before, after)."""

    def job() -> tuple[int, int]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None)
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
            )
            before = _schema_version(conn)
            _migrate(conn)
            return before, _schema_version(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(job)


class SQLiteStateStore:
    """A ``StateStore`` in one SQLite file (the embedded profile).

    WAL mode, ``synchronous=FULL`` unless told otherwise. All database work runs
    on one dedicated worker thread that owns the connection, so the event loop
    never blocks on the disk and the connection is never shared between threads;
    calls are serialized in arrival order. Each job is a whole transaction, so a
    cancelled caller can never leave one open.

    Example:
        store = await SQLiteStateStore.open(data_dir / "state.db")
        try:
            stored = await store.append_executions("acme", [(raw, envelope)])
        finally:
            await store.close()
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        conn: sqlite3.Connection,
        path: str,
        last_persisted_ns: int,
    ) -> None:
        """Use :meth:`open`; this only adopts an opened connection and its thread."""
        self._executor = executor
        self._conn = conn  # touched only on the worker thread
        self._path = path
        self._closed = False
        # The newest stored record's persisted_at: new ones never go below it (worker only).
        self._last_persisted_ns = last_persisted_ns

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_ms: int = 5_000,
    ) -> SQLiteStateStore:
        """Open (creating folders and file as needed) and migrate the store at ``path``.

        Args:
            path: The database file, or ``":memory:"`` for a throwaway store.
            synchronous: SQLite's ``PRAGMA synchronous``; ``FULL`` fsyncs every commit.
            busy_timeout_ms: How long to wait for a lock held by another process.

        Raises:
            ConfigError: ``synchronous`` is unknown, WAL mode is unavailable, or the
                file's schema is newer than this version of tickmesh.
        """
        if synchronous not in get_args(Synchronous):
            raise ConfigError(f"synchronous must be one of {get_args(Synchronous)}")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tickmesh-state-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn, last_persisted_ns = await loop.run_in_executor(
                executor, cls._connect, str(path), synchronous, busy_timeout_ms
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn, str(path), last_persisted_ns)

    @staticmethod
    def _connect(
        path: str, synchronous: Synchronous, busy_timeout_ms: int
    ) -> tuple[sqlite3.Connection, int]:
        """Open, configure and migrate the database (on the worker thread)."""
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; _transaction() issues BEGIN/COMMIT.
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if path != ":memory:" and str(mode).lower() != "wal":
                raise ConfigError(f"{path}: SQLite refused WAL mode (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_CHECKPOINT_PAGES}")
            _migrate(conn)
            newest = conn.execute(
                "SELECT persisted_at FROM executions ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        return conn, newest[0] if newest else 0

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    async def __aenter__(self) -> SQLiteStateStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, job: Callable[[], _T]) -> _T:
        if self._closed:
            raise StoreClosedError(f"state store {self._path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        # Queued after every job already submitted, so those finish first.
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=False)

    async def schema_version(self) -> int:
        """The newest schema migration applied to the file."""
        return await self._run(lambda: _schema_version(self._conn))

    # -- executions ---------------------------------------------------------------

    async def append_executions(
        self,
        tenant: str,
        envelopes: Sequence[tuple[bytes, envelope_pb2.ExecutionEnvelope]],
    ) -> list[StoredExecution]:
        _check_tenant(tenant)
        records = [_record(tenant, raw, env) for raw, env in envelopes]
        if not records:
            return []
        return await self._run(lambda: self._append(tenant, records))

    def _append(self, tenant: str, records: list[_Record]) -> list[StoredExecution]:
        conn = self._conn
        # Never earlier than the newest stored record, even if the wall clock steps back,
        # so persisted_at follows store order and `since` windows stay consistent.
        now = max(time.time_ns(), self._last_persisted_ns)
        persisted_at = _from_ns(now)
        with _transaction(conn):
            before: int = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM executions").fetchone()[0]
            conn.executemany(
                _INSERT_EXECUTION,
                [(tenant, *r[:5], now, *r[5:]) for r in records],
            )
            inserted = {
                (execution_id, attempt): seq
                for seq, execution_id, attempt in conn.execute(
                    "SELECT seq, execution_id, attempt FROM executions WHERE seq > ? ORDER BY seq",
                    (before,),
                )
            }
            if inserted:
                conn.execute(_COUNT_NEW_PER_LIFETIME, (before,))
                conn.execute(_COUNT_NEW_PER_TENANT, (before,))
            results: list[StoredExecution] = []
            for r in records:
                seq = inserted.pop((r.execution_id, r.attempt), None)
                if seq is not None:
                    results.append(
                        StoredExecution(
                            tenant=tenant,
                            execution_id=r.execution_id,
                            attempt=r.attempt,
                            lifetime_id=r.lifetime_id,
                            kind=r.kind,
                            node_id=r.node_id,
                            store_sequence=seq,
                            persisted_at=persisted_at,
                            envelope=r.envelope,
                            duplicate=False,
                        )
                    )
                    continue
                # Stored before, or earlier in this batch: report the original row.
                row = conn.execute(
                    f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                    " WHERE tenant = ? AND execution_id = ? AND attempt = ?",
                    (tenant, r.execution_id, r.attempt),
                ).fetchone()
                results.append(_stored(row, duplicate=True))
        if any(not stored.duplicate for stored in results):
            self._last_persisted_ns = now
        return results

    async def get_execution(
        self, tenant: str, execution_id: str, attempt: int = 0
    ) -> StoredExecution | None:
        _check_tenant(tenant)
        if attempt < 0:
            raise ValidationError(f"attempt must be >= 0, not {attempt}")

        def job() -> StoredExecution | None:
            if attempt:
                row = self._conn.execute(
                    f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                    " WHERE tenant = ? AND execution_id = ? AND attempt = ?",
                    (tenant, execution_id, attempt),
                ).fetchone()
            else:
                row = self._conn.execute(
                    f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                    " WHERE tenant = ? AND execution_id = ? ORDER BY attempt DESC LIMIT 1",
                    (tenant, execution_id),
                ).fetchone()
            return None if row is None else _stored(row, duplicate=False)

        return await self._run(job)

    async def list_executions(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 100
    ) -> list[StoredExecution]:
        _check_tenant(tenant)
        _check_page(after_sequence, limit)

        def job() -> list[StoredExecution]:
            rows = self._conn.execute(
                f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                " WHERE tenant = ? AND lifetime_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (tenant, lifetime_id, after_sequence, limit),
            ).fetchall()
            return [_stored(row, duplicate=False) for row in rows]

        return await self._run(job)

    # -- lifetimes and events -----------------------------------------------------

    async def upsert_lifetime(self, tenant: str, lifetime: lifetime_pb2.AgentLifetime) -> None:
        _check_tenant(tenant)
        if not lifetime.lifetime_id:
            raise ValidationError("a lifetime row needs a lifetime_id")
        if lifetime.tenant_id not in ("", tenant):
            raise ValidationError(
                f"lifetime {lifetime.lifetime_id} carries tenant {lifetime.tenant_id!r}, "
                f"not {tenant!r}"
            )
        row = lifetime_pb2.AgentLifetime()
        row.CopyFrom(lifetime)
        row.tenant_id = tenant
        # Derived from the counters on every read; a stored copy would only go stale.
        row.ClearField("totals")
        row.execution_count = 0
        params = (
            tenant,
            row.lifetime_id,
            row.last_sequence,
            row.state,
            row.SerializeToString(),
            row.graph.id,
        )

        def job() -> None:
            # An equal last_sequence replaces the row (a redelivery carries the same
            # content); a lower one never does, so the row never goes backwards.
            self._conn.execute(_UPSERT_LIFETIME, params)

        await self._run(job)

    async def get_lifetime(
        self, tenant: str, lifetime_id: str
    ) -> lifetime_pb2.AgentLifetime | None:
        _check_tenant(tenant)

        def job() -> lifetime_pb2.AgentLifetime | None:
            row = self._conn.execute(
                "SELECT l.body, c.input_tokens, c.output_tokens, c.cost_micros,"
                " c.model_calls, c.tool_calls, c.executions"
                " FROM lifetimes AS l LEFT JOIN lifetime_counters AS c"
                " ON c.tenant = l.tenant AND c.lifetime_id = l.lifetime_id"
                " WHERE l.tenant = ? AND l.lifetime_id = ?",
                (tenant, lifetime_id),
            ).fetchone()
            if row is None:
                return None
            lifetime = lifetime_pb2.AgentLifetime.FromString(row[0])
            totals, executions = _telemetry(row[1:])
            lifetime.totals.CopyFrom(totals)
            lifetime.execution_count = executions
            return lifetime

        return await self._run(job)

    async def list_lifetimes(
        self,
        tenant: str,
        *,
        before: str = "",
        states: Collection[int] = (),
        graph_id: str = "",
        limit: int = 100,
    ) -> list[lifetime_pb2.AgentLifetime]:
        _check_tenant(tenant)
        wanted = sorted({int(s) for s in states})
        where = " WHERE l.tenant = ?"
        if wanted:
            where += f" AND l.state IN ({','.join('?' * len(wanted))})"
        graph: list[str] = []
        if graph_id:
            # By the graph column; rows stored before it (NULL) by their bodies.
            where += " AND (l.graph_id = ? OR l.graph_id IS NULL)"
            graph = [graph_id]

        async def fetch(below: str, n: int) -> list[Any]:
            sql, params = where, [tenant, *wanted, *graph]
            if below:
                sql, params = sql + " AND l.lifetime_id < ?", [*params, below]
            query = f"SELECT {LIFETIME_ROW_COLUMNS}{sql} ORDER BY l.lifetime_id DESC LIMIT ?"
            return await self._run(lambda: self._conn.execute(query, (*params, n)).fetchall())

        return await list_lifetime_rows(fetch, before=before, graph_id=graph_id, limit=limit)

    async def record_event(
        self, tenant: str, lifetime_id: str, event: lifetime_pb2.LifetimeEvent
    ) -> bool:
        _check_tenant(tenant)
        if not lifetime_id:
            raise ValidationError("an event needs a lifetime_id")
        check_event_sequence(event.sequence)
        params = (tenant, lifetime_id, event.sequence, event.SerializeToString())

        def job() -> bool:
            cursor = self._conn.execute(
                "INSERT INTO events (tenant, lifetime_id, sequence, body) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (tenant, lifetime_id, sequence) DO NOTHING",
                params,
            )
            return cursor.rowcount == 1

        return await self._run(job)

    async def apply_events(
        self,
        tenant: str,
        envelopes: Sequence[envelope_pb2.ExecutionEnvelope],
        fold: LifetimeFold,
    ) -> int:
        _check_tenant(tenant)
        events = [(tenant, *event) for event in stored_events(tenant, envelopes)]
        if not events:
            return 0
        lifetime_ids = sorted({e[1] for e in events})

        def job() -> int:
            conn = self._conn
            with _transaction(conn):
                before = conn.total_changes
                conn.executemany(
                    "INSERT INTO events (tenant, lifetime_id, sequence, body)"
                    " VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (tenant, lifetime_id, sequence) DO NOTHING",
                    events,
                )
                inserted = conn.total_changes - before
                marks = ",".join("?" * len(lifetime_ids))
                rows: dict[str, lifetime_pb2.AgentLifetime | None] = dict.fromkeys(lifetime_ids)
                for lifetime_id, body in conn.execute(
                    "SELECT lifetime_id, body FROM lifetimes"
                    f" WHERE tenant = ? AND lifetime_id IN ({marks})",
                    (tenant, *lifetime_ids),
                ):
                    rows[lifetime_id] = lifetime_pb2.AgentLifetime.FromString(body)
                fold_rows(envelopes, rows, fold)
                params = []
                for row in rows.values():
                    if row is None:
                        continue
                    row.tenant_id = tenant
                    row.ClearField("totals")  # derived from the counters on every read
                    row.execution_count = 0
                    params.append(
                        (
                            tenant,
                            row.lifetime_id,
                            row.last_sequence,
                            row.state,
                            row.SerializeToString(),
                            row.graph.id,
                        )
                    )
                conn.executemany(_UPSERT_LIFETIME, params)
            return inserted

        return await self._run(job)

    async def list_events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 1000
    ) -> list[lifetime_pb2.LifetimeEvent]:
        _check_tenant(tenant)
        _check_page(after_sequence, limit)

        def job() -> list[lifetime_pb2.LifetimeEvent]:
            rows = self._conn.execute(
                "SELECT body FROM events WHERE tenant = ? AND lifetime_id = ? AND sequence > ?"
                " ORDER BY sequence LIMIT ?",
                (tenant, lifetime_id, after_sequence, limit),
            ).fetchall()
            return [lifetime_pb2.LifetimeEvent.FromString(body) for (body,) in rows]

        return await self._run(job)

    # -- counters -----------------------------------------------------------------

    async def counters(
        self, tenant: str, *, lifetime_id: str | None = None, since: datetime | None = None
    ) -> tuple[telemetry_pb2.Telemetry, int]:
        _check_tenant(tenant)
        sql, params = _counters_query(tenant, lifetime_id, since, lambda _: "?")

        def job() -> tuple[telemetry_pb2.Telemetry, int]:
            row = self._conn.execute(sql, params).fetchone()
            return _telemetry(tuple(row) if row else (0, 0, 0, 0, 0, 0))

        return await self._run(job)

    async def usage(
        self,
        tenant: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        graph_id: str | None = None,
        by_node: bool = True,
    ) -> list[UsageRow]:
        _check_tenant(tenant)
        sql, params = _usage_query(tenant, since, until, graph_id, by_node, lambda _: "?")
        return await self._run(lambda: _usage_rows(self._conn.execute(sql, params).fetchall()))
