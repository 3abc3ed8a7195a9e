"""The cloud profile's ``StateStore``: PostgreSQL through an asyncpg connection pool.

It keeps the promises of ``tickmesh.state.store`` (same results as the SQLite store
for every contract test) and adds what a shared server needs:

* Versioned migrations tracked in ``schema_migrations`` and applied under a
  session advisory lock, so services starting together never race; ``migrate()``
  backs the ``tickmesh migrate`` command.
* Transient failures (connection lost, server restarting or shutting down) are
  retried inside the store for up to ``retry_for_s``. Every operation is
  idempotent or read-only, so replaying a whole transaction is safe: an append
  that did commit before its connection dropped is reported as duplicates of
  itself on the replay, exactly what a redelivery would see.

This module is imported only when a ``postgresql://`` URL is configured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from tickmesh.sdk.errors import ConfigError, TransportError, ValidationError
from tickmesh.v1 import envelope_pb2, lifetime_pb2, telemetry_pb2

# The SQLite store's validation and row helpers define the contract's behaviour;
# sharing them keeps both stores' answers identical.
from .store import (
    _EXECUTION_COLUMNS,
    LIFETIME_ROW_COLUMNS,
    LifetimeFold,
    StoreClosedError,
    StoredExecution,
    UsageRow,
    _check_page,
    _check_tenant,
    _counters_query,
    _from_ns,
    _Record,
    _record,
    _stored,
    _telemetry,
    _usage_query,
    _usage_rows,
    check_event_sequence,
    fold_rows,
    list_lifetime_rows,
    stored_events,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
if TYPE_CHECKING:  # asyncpg's classes are generic in its stubs only
    _Connection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    )
    _Job: TypeAlias = Callable[[PoolConnectionProxy[asyncpg.Record]], Awaitable[_T]]

_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_CONNECT_TIMEOUT_S: Final = 10.0
_CLOSE_TIMEOUT_S: Final = 10.0
_FIRST_BACKOFF_S: Final = 0.05
_MAX_BACKOFF_S: Final = 1.0

# Each string is one migration; version N is MIGRATIONS[N - 1]. Never edit one that has
# shipped: append a new one. Like the SQLite schema, tables are created without IF NOT
# EXISTS so a migration applied twice fails loudly. Timestamps are BIGINT nanoseconds
# since the epoch, as in SQLite, so both stores round the same way.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE executions (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        tenant TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        lifetime_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('task', 'plan')),
        node_id TEXT NOT NULL,
        persisted_at BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        model_calls BIGINT NOT NULL,
        tool_calls BIGINT NOT NULL,
        envelope BYTEA NOT NULL,
        UNIQUE (tenant, execution_id, attempt)
    );
    CREATE INDEX executions_by_lifetime ON executions (tenant, lifetime_id, seq);
    -- Covers the windowed tenant sums (guardrails' "over the last 24 h"): index-only scans.
    CREATE INDEX executions_by_time ON executions (tenant, persisted_at)
        INCLUDE (input_tokens, output_tokens, cost_micros, model_calls, tool_calls);
    CREATE TABLE lifetime_counters (
        tenant TEXT NOT NULL,
        lifetime_id TEXT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        model_calls BIGINT NOT NULL,
        tool_calls BIGINT NOT NULL,
        executions BIGINT NOT NULL,
        PRIMARY KEY (tenant, lifetime_id)
    );
    CREATE TABLE tenant_counters (
        tenant TEXT NOT NULL PRIMARY KEY,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_micros BIGINT NOT NULL,
        model_calls BIGINT NOT NULL,
        tool_calls BIGINT NOT NULL,
        executions BIGINT NOT NULL,
        -- The newest stored record's persisted_at: later ones never go below it.
        last_persisted_ns BIGINT NOT NULL
    );
    CREATE TABLE lifetimes (
        tenant TEXT NOT NULL,
        lifetime_id TEXT NOT NULL,
        last_sequence BIGINT NOT NULL,
        state INTEGER NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (tenant, lifetime_id)
    );
    CREATE TABLE events (
        tenant TEXT NOT NULL,
        lifetime_id TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (tenant, lifetime_id, sequence)
    );
    """,
    # 2: the graph version and handler of each record, for usage reports by graph and
    # node. A constant default adds the columns without rewriting the table; rows stored
    # before keep the defaults and are reported under graph "".
    """
    ALTER TABLE executions
        ADD COLUMN graph_id TEXT NOT NULL DEFAULT '',
        ADD COLUMN graph_version BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN handler TEXT NOT NULL DEFAULT '';
    """,
    # 3: each lifetime row's graph, so that a listing of one graph reads its own rows by
    # index. Rows stored before have none (NULL) and are read from their bodies, as before.
    # A row is rewritten with every batch of its lifetime's events: pages left 30% free
    # let PostgreSQL keep the new version on the same page without touching either index
    # (a HOT update): 95% of the updates in a scratch run of 1,000 lifetimes x 20 batches,
    # 27% at the default fillfactor (bench/README.md, ninth pass).
    """
    ALTER TABLE lifetimes ADD COLUMN graph_id TEXT;
    CREATE INDEX lifetimes_by_graph ON lifetimes (tenant, graph_id, lifetime_id);
    ALTER TABLE lifetimes SET (fillfactor = 70);
    """,
    # 4: the same for each lifetime's counters, rewritten with every batch of its records
    # (a scratch run of 1,000 lifetimes x 20 batches: 94% of the updates HOT, 29% before).
    """
    ALTER TABLE lifetime_counters SET (fillfactor = 70);
    """,
)

_SUMS: Final = (
    "SUM(input_tokens)::bigint, SUM(output_tokens)::bigint, SUM(cost_micros)::bigint,"
    " SUM(model_calls)::bigint, SUM(tool_calls)::bigint, COUNT(*)"
)
_ADD_UP: Final = """
        input_tokens = {t}.input_tokens + excluded.input_tokens,
        output_tokens = {t}.output_tokens + excluded.output_tokens,
        cost_micros = {t}.cost_micros + excluded.cost_micros,
        model_calls = {t}.model_calls + excluded.model_calls,
        tool_calls = {t}.tool_calls + excluded.tool_calls,
        executions = {t}.executions + excluded.executions
"""
# One statement stores the whole batch and moves the counters by exactly the rows it
# inserted: the counter inserts read the INSERT's RETURNING set, so a redelivered record
# (a conflict, skipped by DO NOTHING) is never counted twice. persisted_at comes from the
# database's clock, one clock for every service instance, floored at the tenant's newest
# stored record (read under the tenant's append lock, see _append).
_APPEND: Final = f"""
    WITH floor AS (
        SELECT GREATEST(
            (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint * 1000,
            COALESCE((SELECT last_persisted_ns FROM tenant_counters WHERE tenant = $1), 0)
        ) AS ns
    ), inserted AS (
        INSERT INTO executions (
            tenant, execution_id, attempt, lifetime_id, kind, node_id, persisted_at,
            input_tokens, output_tokens, cost_micros, model_calls, tool_calls, envelope,
            graph_id, graph_version, handler
        )
        SELECT $1, r.execution_id, r.attempt, r.lifetime_id, r.kind, r.node_id, floor.ns,
            r.input_tokens, r.output_tokens, r.cost_micros, r.model_calls, r.tool_calls,
            r.envelope, r.graph_id, r.graph_version, r.handler
        FROM unnest(
            $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[],
            $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bytea[],
            $13::text[], $14::bigint[], $15::text[]
        ) WITH ORDINALITY AS r(
            execution_id, attempt, lifetime_id, kind, node_id, input_tokens, output_tokens,
            cost_micros, model_calls, tool_calls, envelope, graph_id, graph_version, handler,
            position
        )
        CROSS JOIN floor
        ORDER BY r.position  -- sequences follow the batch's order
        ON CONFLICT (tenant, execution_id, attempt) DO NOTHING
        RETURNING seq, execution_id, attempt, lifetime_id, persisted_at,
            input_tokens, output_tokens, cost_micros, model_calls, tool_calls
    ), per_lifetime AS (
        INSERT INTO lifetime_counters (
            tenant, lifetime_id, input_tokens, output_tokens, cost_micros, model_calls,
            tool_calls, executions
        )
        SELECT $1, lifetime_id, {_SUMS} FROM inserted GROUP BY lifetime_id
        ON CONFLICT (tenant, lifetime_id) DO UPDATE SET {_ADD_UP.format(t="lifetime_counters")}
    ), per_tenant AS (
        INSERT INTO tenant_counters (
            tenant, input_tokens, output_tokens, cost_micros, model_calls, tool_calls,
            executions, last_persisted_ns
        )
        SELECT $1, {_SUMS}, MAX(persisted_at) FROM inserted HAVING COUNT(*) > 0
        ON CONFLICT (tenant) DO UPDATE SET {_ADD_UP.format(t="tenant_counters")},
            last_persisted_ns = GREATEST(
                tenant_counters.last_persisted_ns, excluded.last_persisted_ns
            )
    )
    SELECT seq, execution_id, attempt, persisted_at FROM inserted
"""
_ORIGINALS: Final = f"""
    SELECT {_EXECUTION_COLUMNS} FROM executions
    JOIN unnest($2::text[], $3::bigint[]) AS k(key_execution_id, key_attempt)
        ON execution_id = key_execution_id AND attempt = key_attempt
    WHERE tenant = $1
"""
_UPSERT_LIFETIMES: Final = """
    INSERT INTO lifetimes (tenant, lifetime_id, last_sequence, state, body, graph_id)
    SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::int[], $5::bytea[], $6::text[])
    ON CONFLICT (tenant, lifetime_id) DO UPDATE SET
        last_sequence = excluded.last_sequence, state = excluded.state, body = excluded.body
    WHERE excluded.last_sequence >= lifetimes.last_sequence
"""
# A lifetime's graph never changes: an update leaves the column (and its index) alone.
_INSERT_EVENTS: Final = """
    WITH inserted AS (
        INSERT INTO events (tenant, lifetime_id, sequence, body)
        SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bytea[])
        ON CONFLICT (tenant, lifetime_id, sequence) DO NOTHING
        RETURNING 1
    )
    SELECT COUNT(*) FROM inserted
"""


class _ConnectionLostError(Exception):
    """A connection that closed, or lost its protocol state, under a call."""


# Failures that pass once the server is back; anything else is a real error.
_TRANSIENT: Final[tuple[type[BaseException], ...]] = (
    OSError,  # refused, reset, unreachable; a connect's TimeoutError too
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08, e.g. connection lost
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # a fast shutdown ended the session
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    _ConnectionLostError,
)


def _is_lost(conn: PoolConnectionProxy[asyncpg.Record]) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True  # already detached: the pool saw the connection close


def _discard(conn: PoolConnectionProxy[asyncpg.Record]) -> None:
    """Close a connection that failed mid-call, so the pool opens a fresh one instead."""
    if not _is_lost(conn):
        conn.terminate()


def _lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key, stable across processes and versions."""
    digest = hashlib.blake2b(":".join(("tickmesh.state", *parts)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _describe(dsn: str) -> tuple[str, str]:
    """``host:port/database`` of a DSN, for messages, and its password (to mask)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    try:
        port = parts.port or int(query.get("port", ["5432"])[0])
    except ValueError:
        port = 0
    host = parts.hostname or query.get("host", ["localhost"])[0]
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0]
    return f"{host}:{port}/{database}", unquote(parts.password or "")


def _masked(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text


def _check_schema(schema: str) -> None:
    if _SCHEMA_NAME.fullmatch(schema) is None:
        raise ConfigError(
            f"invalid PostgreSQL schema name {schema!r}: use lowercase letters, digits and _"
        )


async def _schema_version(conn: _Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    version: int = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    return version


def _newer_schema(where: str, version: int) -> ConfigError:
    return ConfigError(
        f"the state database at {where} is at schema version {version}; this tickmesh "
        f"knows versions up to {len(MIGRATIONS)} (upgrade tickmesh)"
    )


async def _apply_migrations(conn: _Connection, schema: str, where: str) -> tuple[int, int]:
    """Bring the schema up to date under a session advisory lock; return (before, after).

    The lock makes concurrent starters wait for the first one and then find nothing
    left to do. DDL is transactional in PostgreSQL: each migration commits together
    with its ``schema_migrations`` row, or not at all.
    """
    key = _lock_key("migrate", schema)
    await conn.execute("SELECT pg_advisory_lock($1)", key)
    try:
        # CREATE SCHEMA needs the database's CREATE privilege even when the schema
        # exists, which an operator may rightly withhold: only create a missing one.
        # (The name is checked against _SCHEMA_NAME, so quoting it is enough.)
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", schema
        ):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
        before = await _schema_version(conn)
        if before > len(MIGRATIONS):
            raise _newer_schema(where, before)
        for version in range(before + 1, len(MIGRATIONS) + 1):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time_ns(),
                )
            logger.info("state store %s: applied schema migration %d", where, version)
        return before, len(MIGRATIONS)
    finally:
        if not conn.is_closed():  # a lost session has released its locks already
            await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def _check_schema_version(conn: _Connection, where: str) -> None:
    version = await _schema_version(conn)
    if version > len(MIGRATIONS):
        raise _newer_schema(where, version)
    if version < len(MIGRATIONS):
        raise ConfigError(
            f"the state database at {where} is at schema version {version}, this tickmesh "
            f"needs version {len(MIGRATIONS)}: run `tickmesh migrate` (or start with "
            "migrations enabled)"
        )


def _server_settings(schema: str) -> dict[str, str]:
    return {"search_path": schema, "application_name": "tickmesh-state"}


async def migrate(dsn: str, *, schema: str = "public") -> tuple[int, int]:
    """Bring the PostgreSQL store at ``dsn`` to the newest schema; return (before, after).

    Raises:
        ConfigError: the server cannot be reached, the schema is newer than this
            version of tickmesh, or a migration failed (e.g. missing privileges).
    """
    _check_schema(schema)
    where, password = _describe(dsn)
    try:
        conn = await asyncpg.connect(
            dsn, timeout=_CONNECT_TIMEOUT_S, server_settings=_server_settings(schema)
        )
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ConfigError(
            f"cannot reach PostgreSQL at {where}: {_masked(str(exc), password)}"
        ) from exc
    try:
        return await _apply_migrations(conn, schema, where)
    except asyncpg.PostgresError as exc:
        raise ConfigError(f"cannot migrate the state database at {where}: {exc}") from exc
    finally:
        await conn.close()


class PostgresStateStore:
    """A ``StateStore`` on a PostgreSQL server (the cloud profile).

    Appends of one tenant are serialized (see :meth:`append_executions`); everything
    else runs concurrently on up to ``max_size`` pooled connections.

    Example:
        store = await PostgresStateStore.open("postgresql://tickmesh@db:5432/tickmesh")
        try:
            stored = await store.append_executions("acme", [(raw, envelope)])
        finally:
            await store.close()
    """

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], *, where: str, schema: str, retry_for_s: float
    ) -> None:
        """Use :meth:`open`; this only adopts a pool on a migrated database."""
        self._pool = pool
        self._where = where
        self._schema = schema
        self._retry_for_s = retry_for_s
        self._unreachable = False
        self._on_reachability: Callable[[bool], None] | None = None
        self._closed = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        migrate: bool = True,
        min_size: int = 1,
        max_size: int = 8,
        schema: str = "public",
        retry_for_s: float = 30.0,
        command_timeout_s: float | None = 30.0,
    ) -> PostgresStateStore:
        """Connect a pool to ``dsn`` and check (or bring up to date) the schema.

        Args:
            dsn: ``postgresql://user:password@host:port/database``.
            migrate: Apply pending migrations; when False, an old schema is refused.
            min_size: Connections kept open.
            max_size: Most connections open at once.
            schema: The PostgreSQL schema holding the tables (created if missing).
            retry_for_s: How long an operation keeps retrying while the server is
                unreachable or restarting before it raises ``TransportError``.
            command_timeout_s: Longest a statement may take. A link that drops packets
                silently would otherwise hold a call (and its batch) until the kernel gives
                up on the socket, minutes later; a statement that times out is retried
                on a fresh connection like any lost one (every job is idempotent).

        Raises:
            ConfigError: the server cannot be reached, a parameter is invalid, or the
                schema is behind (with ``migrate=False``) or newer than this tickmesh.
        """
        _check_schema(schema)
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(
                f"need 0 <= min_size <= max_size and max_size >= 1, not {min_size}, {max_size}"
            )
        if retry_for_s < 0:
            raise ConfigError(f"retry_for_s must be >= 0, not {retry_for_s}")
        where, password = _describe(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=_CONNECT_TIMEOUT_S,
                command_timeout=command_timeout_s,
                server_settings=_server_settings(schema),
            )
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ConfigError(
                f"cannot reach PostgreSQL at {where}: {_masked(str(exc), password)}"
            ) from exc
        try:
            async with pool.acquire() as conn:
                if migrate:
                    await _apply_migrations(conn, schema, where)
                else:
                    await _check_schema_version(conn, where)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            pool.terminate()
            raise ConfigError(
                f"cannot open the state database at {where}: {_masked(str(exc), password)}"
            ) from exc
        except BaseException:
            pool.terminate()
            raise
        return cls(pool, where=where, schema=schema, retry_for_s=retry_for_s)

    @property
    def where(self) -> str:
        """``host:port/database`` (no credentials), for messages and logs."""
        return self._where

    async def __aenter__(self) -> PostgresStateStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Waits for the calls in flight to hand their connections back.
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._pool.close()
        except TimeoutError:
            logger.warning("state store %s: closing took too long, terminating", self._where)
            self._pool.terminate()

    async def schema_version(self) -> int:
        """The newest schema migration applied to the database."""
        return await self._run(_schema_version)

    async def _run(self, job: _Job[_T]) -> _T:
        """Run ``job`` on a pooled connection, retrying it while the server is away.

        ``job`` must be safe to replay from the start: it is one transaction (or one
        statement) that either committed or did nothing, and every write is idempotent.
        """
        deadline = time.monotonic() + self._retry_for_s
        backoff = _FIRST_BACKOFF_S
        failures = 0
        while True:
            if self._closed:
                raise StoreClosedError(f"state store {self._where} is closed")
            try:
                result = await self._attempt(job)
            except asyncpg.InterfaceError as exc:
                if self._closed:  # the pool closed while this call waited for it
                    raise StoreClosedError(f"state store {self._where} is closed") from exc
                raise
            except asyncpg.CharacterNotInRepertoireError as exc:
                # A NUL in a string asked for (PostgreSQL text cannot hold one, so nothing
                # stored has one): the caller's input, not the store's failure.
                raise ValidationError(f"a text value PostgreSQL cannot hold: {exc}") from exc
            except _TRANSIENT as exc:
                failures += 1
                self._reachable(False)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"PostgreSQL at {self._where} unreachable for {self._retry_for_s:g} s"
                        f" ({failures} attempts): {exc}"
                    ) from exc
                if failures == 1:
                    logger.warning(
                        "state store %s: %s; retrying for up to %.0f s",
                        self._where,
                        exc,
                        left,
                    )
                await asyncio.sleep(min(backoff, left))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            else:
                self._reachable(True)
                return result

    def watch_reachability(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(False)`` when calls start failing for want of the server, and
        ``callback(True)`` at the first success after that (the state service turns its
        health NOT_SERVING and back)."""
        self._on_reachability = callback

    def _reachable(self, reachable: bool) -> None:
        if self._unreachable == (not reachable):
            return
        self._unreachable = not reachable
        if reachable:
            logger.info("state store %s: reachable again", self._where)
        if self._on_reachability is not None:
            self._on_reachability(reachable)

    async def _attempt(self, job: _Job[_T]) -> _T:
        try:
            return await self._attempt_on_a_connection(job)
        except asyncpg.exceptions.InternalClientError as exc:
            # The pool resets a connection as it takes it back; right after a server
            # restart that reset can find the protocol in a bad state although the job
            # itself finished. Replaying the job is safe (every job is idempotent), so
            # this is a lost connection like any other.
            raise _ConnectionLostError(f"releasing a connection: {exc}") from exc

    async def _attempt_on_a_connection(self, job: _Job[_T]) -> _T:
        async with self._pool.acquire() as conn:
            try:
                return await job(conn)
            except _TRANSIENT:
                _discard(conn)
                raise
            except asyncpg.exceptions.InternalClientError as exc:
                # The connection lost track of its protocol state (seen right after a
                # server restart): replace it like a lost one.
                _discard(conn)
                raise _ConnectionLostError(str(exc)) from exc
            except asyncpg.InterfaceError as exc:
                # A bare InterfaceError for a connection that closed under the call;
                # any other interface error is a bug and surfaces as is.
                if not _is_lost(conn):
                    raise
                raise _ConnectionLostError(str(exc)) from exc

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
        columns = [list(column) for column in zip(*records, strict=True)]
        lock = _lock_key("append", self._schema, tenant)

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> list[StoredExecution]:
            async with conn.transaction():
                # Appends of one tenant take turns. Identity values are handed out at
                # insert time, not commit time, so two concurrent transactions could
                # commit seq 20 before seq 15; a reader paging by `seq > after_sequence`
                # that saw 20 would then never see 15. Under this lock the next append
                # draws its sequences only after the previous one committed, and its
                # statement's snapshot sees that append's last_persisted_ns.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                rows = await conn.fetch(_APPEND, tenant, *columns)
                inserted = {(row["execution_id"], row["attempt"]): row for row in rows}
                # Stored before this batch: read the originals back in one query.
                missing = sorted({(r.execution_id, r.attempt) for r in records} - set(inserted))
                originals: dict[tuple[str, int], StoredExecution] = {}
                if missing:
                    ids, attempts = zip(*missing, strict=True)
                    for row in await conn.fetch(_ORIGINALS, tenant, list(ids), list(attempts)):
                        stored = _stored(tuple(row), duplicate=True)
                        originals[stored.execution_id, stored.attempt] = stored
            return _results(tenant, records, inserted, originals)

        return await self._run(job)

    async def get_execution(
        self, tenant: str, execution_id: str, attempt: int = 0
    ) -> StoredExecution | None:
        _check_tenant(tenant)
        if attempt < 0:
            raise ValidationError(f"attempt must be >= 0, not {attempt}")

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> StoredExecution | None:
            if attempt:
                row = await conn.fetchrow(
                    f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                    " WHERE tenant = $1 AND execution_id = $2 AND attempt = $3",
                    tenant,
                    execution_id,
                    attempt,
                )
            else:
                row = await conn.fetchrow(
                    f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                    " WHERE tenant = $1 AND execution_id = $2 ORDER BY attempt DESC LIMIT 1",
                    tenant,
                    execution_id,
                )
            return None if row is None else _stored(tuple(row), duplicate=False)

        return await self._run(job)

    async def list_executions(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 100
    ) -> list[StoredExecution]:
        _check_tenant(tenant)
        _check_page(after_sequence, limit)

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> list[StoredExecution]:
            rows = await conn.fetch(
                f"SELECT {_EXECUTION_COLUMNS} FROM executions"
                " WHERE tenant = $1 AND lifetime_id = $2 AND seq > $3 ORDER BY seq LIMIT $4",
                tenant,
                lifetime_id,
                after_sequence,
                limit,
            )
            return [_stored(tuple(row), duplicate=False) for row in rows]

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
        columns = _lifetime_columns(tenant, [row])

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> None:
            # One statement: an equal last_sequence replaces the row (a redelivery
            # carries the same content), a lower one never does.
            await conn.execute(_UPSERT_LIFETIMES, tenant, *columns)

        await self._run(job)

    async def get_lifetime(
        self, tenant: str, lifetime_id: str
    ) -> lifetime_pb2.AgentLifetime | None:
        _check_tenant(tenant)

        async def job(
            conn: PoolConnectionProxy[asyncpg.Record],
        ) -> lifetime_pb2.AgentLifetime | None:
            row = await conn.fetchrow(
                "SELECT l.body, c.input_tokens, c.output_tokens, c.cost_micros,"
                " c.model_calls, c.tool_calls, c.executions"
                " FROM lifetimes AS l LEFT JOIN lifetime_counters AS c"
                " ON c.tenant = l.tenant AND c.lifetime_id = l.lifetime_id"
                " WHERE l.tenant = $1 AND l.lifetime_id = $2",
                tenant,
                lifetime_id,
            )
            if row is None:
                return None
            lifetime = lifetime_pb2.AgentLifetime.FromString(row[0])
            totals, executions = _telemetry(tuple(row)[1:])
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
        where = " WHERE l.tenant = $1"
        params: list[object] = [tenant]
        if wanted:
            params.append(wanted)
            where += f" AND l.state = ANY(${len(params)}::int[])"
        if graph_id:
            # By the graph column; rows stored before it (NULL) by their bodies.
            params.append(graph_id)
            where += f" AND (l.graph_id = ${len(params)} OR l.graph_id IS NULL)"

        async def fetch(below: str, n: int) -> list[tuple[Any, ...]]:
            sql, args = where, list(params)
            if below:
                args.append(below)
                sql += f" AND l.lifetime_id < ${len(args)}"
            args.append(n)
            query = (
                f"SELECT {LIFETIME_ROW_COLUMNS}{sql} ORDER BY l.lifetime_id DESC LIMIT ${len(args)}"
            )

            async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> list[tuple[Any, ...]]:
                return [tuple(row) for row in await conn.fetch(query, *args)]

            return await self._run(job)

        return await list_lifetime_rows(fetch, before=before, graph_id=graph_id, limit=limit)

    async def record_event(
        self, tenant: str, lifetime_id: str, event: lifetime_pb2.LifetimeEvent
    ) -> bool:
        _check_tenant(tenant)
        if not lifetime_id:
            raise ValidationError("an event needs a lifetime_id")
        check_event_sequence(event.sequence)
        body = event.SerializeToString()

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> bool:
            inserted: int = await conn.fetchval(
                _INSERT_EVENTS, tenant, [lifetime_id], [event.sequence], [body]
            )
            return inserted == 1

        return await self._run(job)

    async def apply_events(
        self,
        tenant: str,
        envelopes: Sequence[envelope_pb2.ExecutionEnvelope],
        fold: LifetimeFold,
    ) -> int:
        _check_tenant(tenant)
        stored = stored_events(tenant, envelopes)
        if not stored:
            return 0
        lifetime_ids = sorted({e.lifetime_id for e in stored})
        events = (
            [e.lifetime_id for e in stored],
            [e.sequence for e in stored],
            [e.body for e in stored],
        )
        lock = _lock_key("lifetimes", self._schema, tenant)

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> int:
            async with conn.transaction():
                # Reading, folding and writing the rows must not interleave with another
                # batch of the tenant's events, or one batch's fold would be lost.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                inserted: int = await conn.fetchval(_INSERT_EVENTS, tenant, *events)
                rows: dict[str, lifetime_pb2.AgentLifetime | None] = dict.fromkeys(lifetime_ids)
                for lifetime_id, body in await conn.fetch(
                    "SELECT lifetime_id, body FROM lifetimes"
                    " WHERE tenant = $1 AND lifetime_id = ANY($2::text[])",
                    tenant,
                    lifetime_ids,
                ):
                    rows[lifetime_id] = lifetime_pb2.AgentLifetime.FromString(body)
                fold_rows(envelopes, rows, fold)
                folded = [row for row in rows.values() if row is not None]
                if folded:
                    await conn.execute(
                        _UPSERT_LIFETIMES, tenant, *_lifetime_columns(tenant, folded)
                    )
            return inserted

        return await self._run(job)

    async def list_events(
        self, tenant: str, lifetime_id: str, *, after_sequence: int = 0, limit: int = 1000
    ) -> list[lifetime_pb2.LifetimeEvent]:
        _check_tenant(tenant)
        _check_page(after_sequence, limit)

        async def job(
            conn: PoolConnectionProxy[asyncpg.Record],
        ) -> list[lifetime_pb2.LifetimeEvent]:
            rows = await conn.fetch(
                "SELECT body FROM events"
                " WHERE tenant = $1 AND lifetime_id = $2 AND sequence > $3"
                " ORDER BY sequence LIMIT $4",
                tenant,
                lifetime_id,
                after_sequence,
                limit,
            )
            return [lifetime_pb2.LifetimeEvent.FromString(row[0]) for row in rows]

        return await self._run(job)

    # -- counters -----------------------------------------------------------------

    async def counters(
        self, tenant: str, *, lifetime_id: str | None = None, since: datetime | None = None
    ) -> tuple[telemetry_pb2.Telemetry, int]:
        _check_tenant(tenant)
        sql, params = _counters_query(tenant, lifetime_id, since, lambda n: f"${n}", _SUMS)

        async def job(
            conn: PoolConnectionProxy[asyncpg.Record],
        ) -> tuple[telemetry_pb2.Telemetry, int]:
            row = await conn.fetchrow(sql, *params)
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
        sql, params = _usage_query(
            tenant, since, until, graph_id, by_node, lambda n: f"${n}", _SUMS
        )

        async def job(conn: PoolConnectionProxy[asyncpg.Record]) -> list[UsageRow]:
            return _usage_rows([tuple(row) for row in await conn.fetch(sql, *params)])

        return await self._run(job)


def _lifetime_columns(
    tenant: str, rows: Sequence[lifetime_pb2.AgentLifetime]
) -> tuple[list[str], list[int], list[int], list[bytes], list[str]]:
    """The unnest() columns of lifetime rows, normalized for storage (rows are changed)."""
    for row in rows:
        row.tenant_id = tenant
        # Derived from the counters on every read; a stored copy would only go stale.
        row.ClearField("totals")
        row.execution_count = 0
    return (
        [row.lifetime_id for row in rows],
        [row.last_sequence for row in rows],
        [row.state for row in rows],
        [row.SerializeToString() for row in rows],
        [row.graph.id for row in rows],
    )


def _results(
    tenant: str,
    records: Sequence[_Record],
    inserted: dict[tuple[str, int], asyncpg.Record],
    originals: dict[tuple[str, int], StoredExecution],
) -> list[StoredExecution]:
    """One result per input record, in input order."""
    results: list[StoredExecution] = []
    first: dict[tuple[str, int], StoredExecution] = {}  # new in this batch
    persisted_at = {ns: _from_ns(ns) for ns in {row["persisted_at"] for row in inserted.values()}}
    for r in records:
        key = (r.execution_id, r.attempt)
        if key in originals:
            results.append(originals[key])
        elif key in first:
            # A repeat later in the batch is a duplicate of its first occurrence.
            results.append(dataclasses.replace(first[key], duplicate=True))
        else:
            row = inserted[key]
            first[key] = StoredExecution(
                tenant=tenant,
                execution_id=r.execution_id,
                attempt=r.attempt,
                lifetime_id=r.lifetime_id,
                kind=r.kind,
                node_id=r.node_id,
                store_sequence=row["seq"],
                persisted_at=persisted_at[row["persisted_at"]],
                envelope=r.envelope,
                duplicate=False,
            )
            results.append(first[key])
    return results
