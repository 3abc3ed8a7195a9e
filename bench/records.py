"""Reads the stored execution records back from the state service's SQLite file and
turns them into per-step orchestration gaps."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
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


def _connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)


def max_seq(db: Path) -> int:
    if not db.exists():
        return 0
    with _connect(db) as conn:
        row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM executions").fetchone()
    return int(row[0])


def read_records(
    db: Path, tenant: str, lifetime_ids: Collection[str], after_seq: int = 0
) -> list[Record]:
    """The stored executions of ``lifetime_ids`` with seq > ``after_seq``."""
    wanted = set(lifetime_ids)
    out: list[Record] = []
    with _connect(db) as conn:
        rows = conn.execute(
            "SELECT lifetime_id, persisted_at, envelope FROM executions"
            " WHERE tenant = ? AND seq > ? ORDER BY seq",
            (tenant, after_seq),
        )
        for lifetime_id, persisted_ns, blob in rows:
            if lifetime_id not in wanted:
                continue
            env = envelope_pb2.ExecutionEnvelope.FromString(blob)
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
