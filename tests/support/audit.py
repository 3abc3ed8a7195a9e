"""A Jepsen-style auditor of one lifetime (RELIABILITY.md §0.10 and §4.1).

It compares what the router *says* it did (the lifetime's events, read with
``WatchLifetime`` from sequence 0 through the SDK ``Client``) with what the
state service *stored* (``StateService.ListExecutions`` over gRPC, with the
tenant's metadata), and checks exact sets, never averages:

* every execution is stored once: no (execution id, attempt) twice;
* every STEP_DISPATCHED event has exactly one stored execution (the attempt
  that ended the step: the pool records only final attempts) for its node —
  otherwise the step is **lost**;
* every stored execution was dispatched — otherwise it is **unexpected**;
* no execution id is dispatched twice, nor finished twice;
* the event sequences are exactly 1..N, N being the lifetime's last sequence;
* the lifetime is terminal;
* the parent ids of every execution name stored executions of the lifetime.

Work may still be settling when a lifetime ends (late fan-out branches, a
cancelled task being recorded), so the audit re-reads until the history is
consistent or ``settle_s`` has passed, then reports what is still wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc

from tickmesh.sdk import Client, LifetimeEvent, LifetimeInfo
from tickmesh.v1 import execution_pb2, result_pb2
from tickmesh.v1 import (
    state_service_pb2 as state_pb,
)
from tickmesh.v1 import (
    state_service_pb2_grpc as state_grpc,
)

TENANT_METADATA_KEY = "x-tickmesh-tenant"
TERMINAL_STATES = ("completed", "failed", "aborted")
_CALL_TIMEOUT_S = 10.0


class _HasTargets(Protocol):
    """What the auditor needs of an embedded ``Mesh``."""

    @property
    def router_target(self) -> str: ...

    @property
    def state_target(self) -> str: ...


Record = execution_pb2.TaskExecution | execution_pb2.PlanExecution
T = TypeVar("T")


@contextlib.asynccontextmanager
async def closing(stream: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async generator (e.g. ``Client.watch``) when the block is left early,
    so its gRPC call is cancelled at once rather than when it is collected."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def record_of(ref: execution_pb2.ExecutionRef) -> Record:
    """The task or plan execution a stored ref carries."""
    if ref.HasField("task_execution"):
        return ref.task_execution
    return ref.plan_execution


def task_status(ref: execution_pb2.ExecutionRef) -> str:
    """``succeeded``, ``failed``, ... of a stored task execution ("" for a plan)."""
    if not ref.HasField("task_execution"):
        return ""
    name = result_pb2.TaskStatus.Name(ref.task_execution.result.status)
    return name.removeprefix("TASK_STATUS_").lower()


@dataclass
class AuditReport:
    """What the audit found (every list is empty when the history is sound)."""

    lifetime_id: str
    state: str
    """The lifetime's final state: completed, failed or aborted."""
    info: LifetimeInfo
    events: list[LifetimeEvent]
    """Every event, in sequence order."""
    records: list[execution_pb2.ExecutionRef]
    """Every stored execution of the lifetime, in store order."""
    dispatched: int = 0
    """Distinct execution ids with a STEP_DISPATCHED event."""
    stored: int = 0
    """Stored execution records (rows)."""
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    """(execution id, attempt) stored more than once."""
    lost: list[str] = field(default_factory=list)
    """Dispatched execution ids without a stored execution."""
    unexpected: list[str] = field(default_factory=list)
    """Stored execution ids that were never dispatched."""
    redispatched: list[str] = field(default_factory=list)
    """Execution ids with more than one STEP_DISPATCHED event."""
    problems: list[str] = field(default_factory=list)
    """Every violation, in words."""

    @property
    def by_node(self) -> Counter[str]:
        """Stored executions per node id."""
        return Counter(record_of(r).header.node.id for r in self.records)

    def of_node(self, node_id: str) -> list[execution_pb2.ExecutionRef]:
        """The stored executions of one node, in store order."""
        return [r for r in self.records if record_of(r).header.node.id == node_id]

    def events_of(self, kind: str) -> list[LifetimeEvent]:
        return [e for e in self.events if e.kind == kind]

    def summary(self) -> str:
        return (
            f"lifetime {self.lifetime_id} ({self.state}): {len(self.events)} events, "
            f"dispatched={self.dispatched} stored={self.stored} "
            f"duplicates={len(self.duplicates)} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} redispatched={len(self.redispatched)}"
        )


async def list_executions(
    state_target: str, tenant: str, lifetime_id: str, *, page_size: int = 100
) -> list[execution_pb2.ExecutionRef]:
    """Every stored execution of a lifetime, paging through ``ListExecutions``."""
    metadata = ((TENANT_METADATA_KEY, tenant),)
    refs: list[execution_pb2.ExecutionRef] = []
    async with grpc.aio.insecure_channel(state_target) as channel:
        stub = state_grpc.StateServiceStub(channel)
        token = ""
        while True:
            response: state_pb.ListExecutionsResponse = await stub.ListExecutions(
                state_pb.ListExecutionsRequest(
                    lifetime_id=lifetime_id, page_size=page_size, page_token=token
                ),
                metadata=metadata,
                timeout=_CALL_TIMEOUT_S,
            )
            refs.extend(response.executions)
            token = response.next_page_token
            if not token:
                return refs


async def read_events(client: Client, lifetime_id: str, *, within: float) -> list[LifetimeEvent]:
    """Every event of a lifetime, from sequence 0 (what arrived within ``within`` s).

    ``WatchLifetime`` ends at the terminal STATE_CHANGED event; events can follow
    it (a late branch finishing), so the rest is read with a second watch up to
    the lifetime's last sequence. Whatever is missing when time runs out shows up
    as a gap in the audit.
    """
    events: list[LifetimeEvent] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            async with closing(client.watch(lifetime_id, 0)) as stream:
                async for event in stream:
                    events.append(event)
            last = (await client.get_lifetime(lifetime_id)).raw.last_sequence
            seen = max((e.sequence for e in events), default=0)
            if seen < last:
                async with closing(client.watch(lifetime_id, seen)) as stream:
                    async for event in stream:
                        events.append(event)
                        if event.sequence >= last:
                            break
    return events


def check(
    lifetime_id: str,
    info: LifetimeInfo,
    events: list[LifetimeEvent],
    records: list[execution_pb2.ExecutionRef],
) -> AuditReport:
    """Compare events with stored records; fill the report's findings."""
    report = AuditReport(lifetime_id, info.state, info, sorted(events, key=_seq), records)
    problems = report.problems

    if info.state not in TERMINAL_STATES:
        problems.append(f"the lifetime is {info.state}, not terminal")

    # Event sequences: exactly 1..N.
    sequences = [e.sequence for e in events]
    repeated = sorted(s for s, n in Counter(sequences).items() if n > 1)
    if repeated:
        problems.append(f"event sequences delivered more than once: {repeated}")
    last = info.raw.last_sequence
    expected = set(range(1, last + 1))
    missing = sorted(expected - set(sequences))
    extra = sorted(set(sequences) - expected)
    if missing:
        problems.append(f"event sequences missing (gaps in 1..{last}): {missing}")
    if extra:
        problems.append(f"event sequences outside 1..{last}: {extra}")

    # Dispatches and finishes.
    dispatch_events = [e for e in events if e.kind == "step_dispatched"]
    dispatch_count = Counter(e.execution_id for e in dispatch_events)
    dispatched_node = {e.execution_id: e.node_id for e in dispatch_events}
    report.dispatched = len(dispatch_count)
    report.redispatched = sorted(i for i, n in dispatch_count.items() if n > 1)
    if report.redispatched:
        problems.append(f"execution ids dispatched more than once: {report.redispatched}")
    finish_count = Counter(e.execution_id for e in events if e.kind == "step_finished")
    twice = sorted(i for i, n in finish_count.items() if n > 1)
    if twice:
        problems.append(f"execution ids finished more than once: {twice}")
    never = sorted(set(finish_count) - set(dispatch_count))
    if never:
        problems.append(f"STEP_FINISHED for execution ids never dispatched: {never}")

    # Stored records.
    report.stored = len(records)
    keys = Counter((record_of(r).header.execution_id, record_of(r).header.attempt) for r in records)
    report.duplicates = sorted(k for k, n in keys.items() if n > 1)
    if report.duplicates:
        problems.append(f"(execution id, attempt) stored more than once: {report.duplicates}")
    per_id: dict[str, list[execution_pb2.ExecutionRef]] = {}
    for ref in records:
        per_id.setdefault(record_of(ref).header.execution_id, []).append(ref)
    for exec_id, refs in sorted(per_id.items()):
        attempts = sorted(record_of(r).header.attempt for r in refs)
        if len(set(attempts)) > 1:
            problems.append(
                f"execution {exec_id} has {len(set(attempts))} stored attempts {attempts}: "
                "only the attempt that ended the step should be recorded"
            )
        for ref in refs:
            header = record_of(ref).header
            if header.lifetime_id != lifetime_id:
                problems.append(f"execution {exec_id} belongs to lifetime {header.lifetime_id}")
            node = dispatched_node.get(exec_id)
            if node is not None and header.node.id != node:
                problems.append(
                    f"execution {exec_id} was dispatched for node {node!r} "
                    f"but stored for {header.node.id!r}"
                )
            if ref.HasField("task_execution") and not ref.task_execution.result.status:
                problems.append(f"task execution {exec_id} stored without a status")
            for parent in header.parent_execution_ids:
                if parent not in per_id:
                    problems.append(
                        f"execution {exec_id} names parent {parent}, which is not stored"
                    )
    report.lost = sorted(set(dispatch_count) - set(per_id))
    report.unexpected = sorted(set(per_id) - set(dispatch_count))
    if report.lost:
        problems.append(f"dispatched but never stored (lost): {report.lost}")
    if report.unexpected:
        problems.append(f"stored but never dispatched (unexpected): {report.unexpected}")
    return report


async def audit(
    mesh_or_state_target: _HasTargets | str,
    tenant: str,
    lifetime_id: str,
    *,
    router_target: str | None = None,
    settle_s: float = 10.0,
) -> AuditReport:
    """Audit one ended lifetime; raise AssertionError listing every violation.

    Args:
        mesh_or_state_target: An embedded ``Mesh`` (both targets are taken from
            it), or the state service's ``host:port`` (then ``router_target`` is
            required).
        tenant: The lifetime's tenant (sent as ``x-tickmesh-tenant``).
        lifetime_id: The lifetime to audit.
        router_target: The router to watch events from, when not given a mesh.
        settle_s: How long to wait for in-flight work to settle into a
            consistent history (and for the lifetime to end).

    Returns:
        The report with its counts; ``records`` and ``events`` for further asserts.
    """
    if isinstance(mesh_or_state_target, str):
        if router_target is None:
            raise TypeError("audit() needs router_target when given a state target")
        state_target = mesh_or_state_target
    else:
        state_target = mesh_or_state_target.state_target
        router_target = router_target or mesh_or_state_target.router_target
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    async with await Client.connect(router_target, tenant=tenant) as client:
        while True:
            remaining = max(0.5, deadline - loop.time())
            info = await client.get_lifetime(lifetime_id)
            if info.state in TERMINAL_STATES:
                events = await read_events(client, lifetime_id, within=remaining)
                # Read the lifetime again: events may have arrived meanwhile.
                info = await client.get_lifetime(lifetime_id)
            else:
                events = []
            records = await list_executions(state_target, tenant, lifetime_id)
            report = check(lifetime_id, info, events, records)
            if not report.problems:
                return report
            if loop.time() >= deadline:
                lines = "\n  - ".join(report.problems)
                raise AssertionError(f"audit failed: {report.summary()}\n  - {lines}")
            await asyncio.sleep(0.1)


def _seq(event: LifetimeEvent) -> int:
    return event.sequence


__all__ = [
    "AuditReport",
    "audit",
    "check",
    "closing",
    "list_executions",
    "read_events",
    "record_of",
    "task_status",
]
