"""A Jepsen-style auditor of stored execution records (RELIABILITY.md §0.10 and §4.1).

The test keeps its own :class:`Ledger` of what it tried to get stored (``attempt``)
and what the system acknowledged (``ack``, e.g. a PubAck from the records stream);
:func:`audit_store` reads what the state service holds (``ListExecutions`` over gRPC,
so SQLite and PostgreSQL alike) and :func:`classify` compares, as exact sets:

* ``lost = acked - persisted`` (acknowledged, never stored);
* ``duplicates``: keys stored more than once (``rows - distinct``);
* ``unexpected = persisted - attempted`` (stored, never attempted);
* ``recovered = persisted ∩ (attempted - acked)`` (stored though never acknowledged:
  allowed — a publish whose PubAck was lost can still have landed).

A key is ``(execution_id, attempt)``. :meth:`Verdict.assert_clean` fails listing
each violation; :meth:`Verdict.row` turns the counts into a summary row.

For lifetimes run through the router, :func:`audit_lifetime` is the lifetime
auditor of ``tests/support/audit.py`` (events vs stored records).

:func:`publish_records` is a writer for tests that publish records straight to the
records stream: each record tagged ``(writer, counter)`` through its execution id.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import PubAck

from tests.chaos import report
from tests.support.audit import audit as audit_lifetime
from tests.support.audit import list_executions, record_of
from tests.support.records import execution_record
from tickmesh.runtime.subjects import (
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_TENANT,
    HDR_TYPE,
    TenantNames,
)

Key = tuple[str, int]
"""(execution id, attempt): what the store keeps once."""

WRITER_STRIDE = 1_000_000
"""Execution ids of writer w are ``exec_id(w * WRITER_STRIDE + counter)``."""


def writer_key(writer: int, counter: int, attempt: int = 1) -> Key:
    """The key of record ``counter`` of ``writer`` (see :func:`publish_records`)."""
    return f"{writer * WRITER_STRIDE + counter:032x}", attempt


@dataclass
class Ledger:
    """The test's own log of what it attempted and what was acknowledged."""

    attempted: set[Key] = field(default_factory=set)
    acked: set[Key] = field(default_factory=set)
    failed: dict[Key, str] = field(default_factory=dict)
    """Attempts that surfaced an error (timeout, no responders, ...), with the error."""
    ack_times: list[float] = field(default_factory=list)
    """Loop time of each ack, for the longest gap between acknowledged publishes."""

    def attempt(self, key: Key) -> None:
        self.attempted.add(key)

    def ack(self, key: Key) -> None:
        self.acked.add(key)
        self.failed.pop(key, None)
        self.ack_times.append(asyncio.get_running_loop().time())

    def fail(self, key: Key, error: str) -> None:
        if key not in self.acked:
            self.failed[key] = error

    def longest_gap_s(self) -> float:
        """The longest time between two acks (unavailability as the writers saw it)."""
        times = sorted(self.ack_times)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@dataclass
class Verdict:
    """What the store holds against the ledger; every violation set empty when sound."""

    attempted: int
    acked: int
    rows: int
    """Stored records (rows, duplicates included)."""
    persisted: set[Key]
    """Distinct keys stored."""
    lost: set[Key]
    duplicates: dict[Key, int]
    """Key -> how many rows hold it (only keys with more than one)."""
    unexpected: set[Key]
    recovered: set[Key]
    unacked_missing: set[Key]
    """Attempted, never acknowledged, not stored: allowed when the attempt failed."""

    @property
    def duplicated(self) -> int:
        """``rows - distinct``."""
        return self.rows - len(self.persisted)

    def summary(self) -> str:
        return (
            f"attempted={self.attempted} acked={self.acked} rows={self.rows} "
            f"persisted={len(self.persisted)} lost={len(self.lost)} dup={self.duplicated} "
            f"unexpected={len(self.unexpected)} recovered={len(self.recovered)} "
            f"unacked_missing={len(self.unacked_missing)}"
        )

    def assert_clean(self) -> None:
        """Raise AssertionError unless ``lost``, ``duplicates`` and ``unexpected`` are empty."""
        problems = []
        if self.lost:
            problems.append(f"lost (acked, not stored): {sorted(self.lost)[:20]}")
        if self.duplicates:
            problems.append(f"stored more than once: {sorted(self.duplicates.items())[:20]}")
        if self.unexpected:
            problems.append(f"stored, never attempted: {sorted(self.unexpected)[:20]}")
        if problems:
            lines = "\n  - ".join(problems)
            raise AssertionError(f"audit failed: {self.summary()}\n  - {lines}")

    def row(
        self,
        test: str,
        fault: str,
        *,
        recovery_s: float = math.nan,
        peak_rss_mib: float = math.nan,
    ) -> report.Row:
        """The summary row of this verdict (pass it to ``report.record``)."""
        return report.Row(
            test=test,
            fault=fault,
            attempted=self.attempted,
            acked=self.acked,
            persisted=len(self.persisted),
            lost=len(self.lost),
            duplicated=self.duplicated,
            recovery_s=recovery_s,
            peak_rss_mib=peak_rss_mib,
        )


def classify(ledger: Ledger, stored: Iterable[Key]) -> Verdict:
    """Compare the store's rows (``stored``: one key per row) with the ledger."""
    rows = Counter(stored)
    persisted = set(rows)
    return Verdict(
        attempted=len(ledger.attempted),
        acked=len(ledger.acked),
        rows=sum(rows.values()),
        persisted=persisted,
        lost=ledger.acked - persisted,
        duplicates={k: n for k, n in rows.items() if n > 1},
        unexpected=persisted - ledger.attempted,
        recovered=persisted & (ledger.attempted - ledger.acked),
        unacked_missing=(ledger.attempted - ledger.acked) - persisted,
    )


async def stored_keys(state_target: str, tenant: str, lifetime_ids: Iterable[str]) -> list[Key]:
    """One key per stored row of the given lifetimes, read with ``ListExecutions``."""
    keys: list[Key] = []
    for lifetime_id in lifetime_ids:
        for ref in await list_executions(state_target, tenant, lifetime_id, page_size=1000):
            header = record_of(ref).header
            keys.append((header.execution_id, header.attempt))
    return keys


async def audit_store(
    state_target: str,
    tenant: str,
    lifetime_ids: Iterable[str],
    ledger: Ledger,
    *,
    settle_s: float = 10.0,
) -> Verdict:
    """Classify the store against ``ledger``, re-reading for up to ``settle_s`` seconds
    while acked records are still missing (in flight); then return the verdict
    (call :meth:`Verdict.assert_clean` on it)."""
    ids = list(lifetime_ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    while True:
        verdict = classify(ledger, await stored_keys(state_target, tenant, ids))
        if not verdict.lost or loop.time() >= deadline:
            return verdict
        await asyncio.sleep(0.2)


async def publish_records(
    js: JetStreamContext,
    tenant: str,
    lifetime_id: str,
    writer: int,
    counters: Iterable[int],
    ledger: Ledger,
    *,
    window: int = 64,
    ack_timeout: float = 5.0,
) -> None:
    """Publish one task execution record per counter to ``tenant``'s records stream,
    ``window`` at a time, with the message id the executor pool would give it
    (``exec:<id>:<attempt>``), logging each attempt, ack and failure in ``ledger``.

    A failed publish is logged, not raised: the auditor decides what it means.
    """
    names = TenantNames(tenant)
    subject = names.exec(lifetime_id)
    batch: list[int] = []

    async def flush() -> None:
        pending: list[tuple[Key, asyncio.Future[PubAck]]] = []
        for counter in batch:
            n = writer * WRITER_STRIDE + counter
            data, env = execution_record(n, tenant=tenant, lifetime_id=lifetime_id)
            key: Key = (env.task_execution.header.execution_id, 1)
            ledger.attempt(key)
            headers = {
                HDR_MSG_ID: f"exec:{key[0]}:{key[1]}",
                HDR_TYPE: "task_execution",
                HDR_TENANT: tenant,
                HDR_LIFETIME: lifetime_id,
                HDR_EXECUTION: key[0],
            }
            try:
                future = await js.publish_async(subject, data, headers=headers)
            except Exception as exc:  # e.g. too many pending, connection closed
                ledger.fail(key, repr(exc))
                continue
            pending.append((key, future))
        for key, future in pending:
            try:
                async with asyncio.timeout(ack_timeout):
                    await future
            except Exception as exc:
                ledger.fail(key, repr(exc))
            else:
                ledger.ack(key)
        batch.clear()

    for counter in counters:
        batch.append(counter)
        if len(batch) >= window:
            await flush()
    if batch:
        await flush()


__all__ = [
    "Key",
    "Ledger",
    "Verdict",
    "audit_lifetime",
    "audit_store",
    "classify",
    "publish_records",
    "stored_keys",
    "writer_key",
]
