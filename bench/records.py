"""Reads the stored execution records back from the state service's store (its SQLite
file, or its PostgreSQL database in the cloud profile) and turns them into per-step
orchestration gaps."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tickmesh.v1 import envelope_pb2

from .stats import summarize


@dataclass(frozen=True, slots=True)
class Record:
    execution_id: str
    lifetime_id: str
    attempt: int
    kind: str
    parents: tuple[str, ...]
    created_at: float
    """When the router built the request (header.created_at), epoch seconds."""
    started_at: float
    finished_at: float
    persisted_at: float
    """When the state service inserted it (the row's persisted_at)."""


def _seconds(ts: Any) -> float:
    return float(ts.seconds) + float(ts.nanos) / 1e9


StoreRef = Path | str
"""The state store: a SQLite file, or a ``postgresql://`` DSN."""

_SELECT_AFTER = (
    "SELECT lifetime_id, persisted_at, envelope FROM executions"
    " WHERE tenant = {tenant} AND seq > {after} ORDER BY seq"
)


def _is_postgres(store: StoreRef) -> bool:
    return isinstance(store, str) and store.startswith(("postgresql://", "postgres://"))


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


async def _pg_fetch(dsn: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def max_seq(store: StoreRef) -> int:
    """The newest stored record's sequence (blocking: call it from a thread)."""
    if _is_postgres(store):
        rows = asyncio.run(_pg_fetch(str(store), "SELECT COALESCE(MAX(seq), 0) FROM executions"))
        return int(rows[0][0])
    db = Path(store)
    if not db.exists():
        return 0
    with _connect(db) as conn:
        row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM executions").fetchone()
    return int(row[0])


def read_records(
    store: StoreRef, tenant: str, lifetime_ids: Collection[str], after_seq: int = 0
) -> list[Record]:
    """The stored executions of ``lifetime_ids`` with seq > ``after_seq`` (blocking)."""
    rows: Iterable[tuple[Any, ...]]
    if _is_postgres(store):
        sql = _SELECT_AFTER.format(tenant="$1", after="$2")
        rows = asyncio.run(_pg_fetch(str(store), sql, tenant, after_seq))
    else:
        with _connect(Path(store)) as conn:
            sql = _SELECT_AFTER.format(tenant="?", after="?")
            rows = conn.execute(sql, (tenant, after_seq)).fetchall()
    return _records(rows, set(lifetime_ids))


def _records(rows: Iterable[tuple[Any, ...]], wanted: set[str]) -> list[Record]:
    out: list[Record] = []
    for lifetime_id, persisted_ns, blob in rows:
        if lifetime_id not in wanted:
            continue
        env = envelope_pb2.ExecutionEnvelope.FromString(bytes(blob))
        kind = env.WhichOneof("body")
        body = env.task_execution if kind == "task_execution" else env.plan_execution
        h = body.header
        out.append(
            Record(
                execution_id=h.execution_id,
                lifetime_id=h.lifetime_id,
                attempt=h.attempt,
                kind="task" if kind == "task_execution" else "plan",
                parents=tuple(h.parent_execution_ids),
                created_at=_seconds(h.created_at),
                started_at=_seconds(body.started_at),
                finished_at=_seconds(body.finished_at),
                persisted_at=persisted_ns / 1e9,
            )
        )
    return out


def gaps(records: list[Record]) -> dict[str, Any]:
    """Per-step orchestration gap (parent finished → child started), in ms, and its parts.

    Parts of each gap (all clocks are this machine's wall clock):
      to_store:  parent finished → parent inserted by the state service
      to_router: parent inserted → child request built by the router
      to_start:  child request built → child started by the executor
    """
    by_id: dict[str, Record] = {}
    for r in records:
        prior = by_id.get(r.execution_id)
        if prior is None or r.attempt > prior.attempt:
            by_id[r.execution_id] = r
    total: list[float] = []
    to_store: list[float] = []
    to_router: list[float] = []
    to_start: list[float] = []
    for child in by_id.values():
        for pid in child.parents:
            parent = by_id.get(pid)
            if parent is None:
                continue
            total.append((child.started_at - parent.finished_at) * 1000.0)
            to_store.append((parent.persisted_at - parent.finished_at) * 1000.0)
            to_router.append((child.created_at - parent.persisted_at) * 1000.0)
            to_start.append((child.started_at - child.created_at) * 1000.0)
    return {
        "gap_ms": summarize(total),
        "parts_ms": {
            "finished_to_stored": summarize(to_store),
            "stored_to_dispatched": summarize(to_router),
            "dispatched_to_started": summarize(to_start),
        },
    }


def steps_per_s_within(records: list[Record], window: tuple[float, float] | None) -> float | None:
    """Steps finished per second within ``window`` (epoch seconds, start and end): the
    throughput while every lane was busy with a lifetime, without the phase's ramp up
    (lifetimes still being started) and ramp down (lanes out of work). None without a
    window."""
    if window is None:
        return None
    start, end = window
    if end <= start:
        return None
    # One per execution (a retried step is stored once per attempt).
    finished = {r.execution_id for r in records if start <= r.finished_at < end}
    return len(finished) / (end - start)
