"""23. Backpressure and a short soak with a deliberately slow executor (RELIABILITY.md §4.2).

The spec asks for 10 minutes nightly; this runs ``SOAK_S`` (two minutes) so the whole
suite stays within its budget. The four services run as processes; two executors serve
the same task ``soak_work``: a normal one (``FAST_S`` a task) and a slow one
(``SLOW_S`` a task, longer than the services' ack wait: only its heartbeats, every
``HEARTBEAT_S``, keep JetStream from redelivering). Lifetimes (``soak_work`` → plan
``soak_done`` → final) are started at a steady rate with a burst now and then, so the
work consumer's backlog rises and falls; the pool's ``max_ack_pending`` is lowered to
``MAX_ACK_PENDING`` so the bound is one the load reaches. Every ``SAMPLE_S`` the test
samples the work consumer (num_pending, num_ack_pending, num_redelivered), each
service's RSS and open file descriptors, and this process's asyncio task count (where
the executors and the client run). Then the slow executor leaves and the backlog must
drain with the normal one alone.

Asserts: num_ack_pending never above max_ack_pending; num_redelivered stays 0 (tasks
heartbeat); the backlog drains after the slow executor leaves and every lifetime
completes, with exactly one task and one plan record each in the store; RSS, open
descriptors and asyncio tasks at the end of the soak within bounds of their values
after the warm-up (first third). Figures: peaks and ends of the samples, drain time.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Final

import psutil
import pytest

from tests.chaos import report
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import SERVICES, Cluster, ServiceName, figure
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    plan,
    task,
)
from tickmesh.v1 import lifetime_pb2

pytestmark = [pytest.mark.slow_chaos, pytest.mark.timeout(360)]

SOAK_S: Final = 120.0
RATE_PER_S: Final = 12.0
"""Lifetimes started per second, steadily."""
BURST: Final = 150
BURST_EVERY_S: Final = 20.0
FAST_S: Final = 0.1
SLOW_S: Final = 2.5
ACK_WAIT_S: Final = 2.0
HEARTBEAT_S: Final = 0.5
MAX_ACK_PENDING: Final = 48
FAST_CONCURRENCY: Final = 8
SLOW_CONCURRENCY: Final = 8
SAMPLE_S: Final = 0.5
RSS_GROWTH: Final = 0.25
"""RSS at the end of the soak may exceed its value after the warm-up by this much: a
short soak still fills caches (SQLite's page cache grows with the store) — a leak of
per-lifetime state would be far above it (thousands of lifetimes pass through)."""
TASKS_SLACK: Final = 50
FDS_SLACK: Final = 16
MIB: Final = 2**20
COMPLETED: Final = lifetime_pb2.LifetimeState.Value("LIFETIME_STATE_COMPLETED")


@dataclass
class Sample:
    at: float
    pending: int
    ack_pending: int
    redelivered: int
    rss_mib: dict[ServiceName, float]
    fds: dict[ServiceName, int]
    tasks: int


@dataclass
class Ran:
    fast: int = 0
    slow: int = 0
    slow_running: int = 0
    slow_peak: int = 0
    started: list[str] = field(default_factory=list)


@task(name="soak_work")
async def fast_work(ctx: TaskContext, job: Any) -> Any:
    await asyncio.sleep(FAST_S)
    RAN.fast += 1
    return job


@task(name="soak_work")
async def slow_work(ctx: TaskContext, job: Any) -> Any:
    RAN.slow_running += 1
    RAN.slow_peak = max(RAN.slow_peak, RAN.slow_running)
    try:
        await asyncio.sleep(SLOW_S)
    finally:
        RAN.slow_running -= 1
    RAN.slow += 1
    return job


@plan(name="soak_done")
async def done(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    return complete(inputs[0].status)


RAN = Ran()


def store_counts(cluster: Cluster) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """Per kind (rows, distinct keys) of execution records; lifetimes per state."""
    db = sqlite3.connect(f"file:{cluster.work_dir / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        kinds = {
            kind: (int(rows), int(distinct))
            for kind, rows, distinct in db.execute(
                "SELECT kind, COUNT(*), COUNT(DISTINCT execution_id || ':' || attempt) "
                "FROM executions WHERE tenant = ? GROUP BY kind",
                (cluster.tenant,),
            ).fetchall()
        }
        states = dict(
            db.execute(
                "SELECT state, COUNT(*) FROM lifetimes WHERE tenant = ? GROUP BY state",
                (cluster.tenant,),
            ).fetchall()
        )
    finally:
        db.close()
    return kinds, {int(k): int(v) for k, v in states.items()}


async def sample_forever(cluster: Cluster, durable: str, into: list[Sample]) -> None:
    procs: dict[int, psutil.Process] = {}
    loop = asyncio.get_running_loop()
    while True:
        info = await cluster.consumer_info(cluster.names.work_stream, durable)
        rss: dict[ServiceName, float] = {}
        fds: dict[ServiceName, int] = {}
        for name in SERVICES:
            pid = cluster.services[name].pid
            assert pid is not None
            proc = procs.get(pid) or procs.setdefault(pid, psutil.Process(pid))
            rss[name] = proc.memory_info().rss / MIB
            fds[name] = proc.num_fds()
        into.append(
            Sample(
                at=loop.time(),
                pending=info.num_pending or 0,
                ack_pending=info.num_ack_pending or 0,
                redelivered=info.num_redelivered or 0,
                rss_mib=rss,
                fds=fds,
                tasks=len(asyncio.all_tasks()),
            )
        )
        await asyncio.sleep(SAMPLE_S)


async def drive(client: Client, graph_id: str, version: int, until: float) -> None:
    """Start lifetimes at RATE_PER_S, plus a burst of BURST every BURST_EVERY_S."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(32)

    async def start(i: int) -> None:
        async with gate:
            handle = await client.start_lifetime(graph_id, {"i": i}, version=version)
        RAN.started.append(handle.id)

    began = loop.time()
    next_burst = began + BURST_EVERY_S / 2
    i = 0
    async with asyncio.TaskGroup() as group:
        while (now := loop.time()) < until:
            due = int((now - began) * RATE_PER_S)
            if now >= next_burst:
                due += BURST
                next_burst += BURST_EVERY_S
            while i < due:
                group.create_task(start(i))
                i += 1
            await asyncio.sleep(0.05)


async def test_slow_executor_backpressure_soak_stays_bounded_and_drains(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster(
        ack_wait_s=ACK_WAIT_S,
        env={
            "TICKMESH_EXECUTOR_POOL_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "TICKMESH_EXECUTOR_POOL_MAX_ACK_PENDING": str(MAX_ACK_PENDING),
        },
    )
    await cluster.worker([fast_work, done], concurrency=FAST_CONCURRENCY)
    slow = await cluster.worker([slow_work], concurrency=SLOW_CONCURRENCY)
    client = await cluster.client()
    graph = await client.register_graph(
        GraphBuilder("soak")
        .task("work", "soak_work")
        .plan("done", "soak_done")
        .edge("work", "done")
        .final("done")
        .build()
    )
    durable = cluster.names.work_consumer("task", "soak_work")
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    sampler = asyncio.create_task(sample_forever(cluster, durable, samples))
    try:
        began = loop.time()
        await drive(client, graph.id, graph.version, until=began + SOAK_S)
        soak = list(samples)
        backlog_at_leave = soak[-1].pending + soak[-1].ack_pending
        left_at = loop.time()
        await slow.shutdown()
        await cluster.wait_drained(cluster.names.work_stream, durable, within=90)
        drain_s = loop.time() - left_at
        await cluster.wait_quiet(within=60)
        info = await cluster.consumer_info(cluster.names.work_stream, durable)
    finally:
        sampler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sampler

    started = len(RAN.started)
    deadline = loop.time() + 30
    while True:
        kinds, states = await asyncio.to_thread(store_counts, cluster)
        if states.get(COMPLETED, 0) >= started or loop.time() > deadline:
            break
        await asyncio.sleep(0.5)

    warm = [s for s in soak if s.at - began <= SOAK_S / 3][-1]
    end = soak[-1]
    peak_ack_pending = max(s.ack_pending for s in soak)
    peak_pending = max(s.pending for s in soak)
    peak_redelivered = max(s.redelivered for s in samples)
    rss_line = ", ".join(f"{n} {warm.rss_mib[n]:.0f}->{end.rss_mib[n]:.0f}" for n in SERVICES)
    fds_line = ", ".join(f"{n} {warm.fds[n]}->{end.fds[n]}" for n in SERVICES)
    tasks, records = kinds.get("task", (0, 0)), kinds.get("plan", (0, 0))
    figure(
        f"23 soak {SOAK_S:.0f} s (spec: 10 min): {started} lifetimes; executors ran fast "
        f"{RAN.fast}, slow {RAN.slow} (slow in flight at most {RAN.slow_peak}, {SLOW_S} s each "
        f"vs ack wait {ACK_WAIT_S} s, heartbeat {HEARTBEAT_S} s); work consumer peaks: "
        f"num_pending {peak_pending}, num_ack_pending {peak_ack_pending} (max_ack_pending "
        f"{MAX_ACK_PENDING}), num_redelivered {peak_redelivered} (end {info.num_redelivered}); "
        f"backlog {backlog_at_leave} when the slow executor left, drained in {drain_s:.2f} s; "
        f"RSS MiB warm->end: {rss_line}; fds: {fds_line}; asyncio tasks "
        f"{warm.tasks}->{end.tasks} (peak {max(s.tasks for s in soak)}); store: task rows "
        f"{tasks}, plan rows {records}, lifetimes by state {states}"
    )
    completed = states.get(COMPLETED, 0)
    report.record(
        report.Row(
            test="23 backpressure soak",
            fault=f"slow executor ({SLOW_S} s tasks) for {SOAK_S:.0f} s, then removed",
            attempted=started,
            acked=started,
            persisted=completed,
            lost=started - completed,
            duplicated=(tasks[0] - tasks[1]) + (records[0] - records[1]),
            recovery_s=drain_s,
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    assert RAN.slow > 0, "the slow executor got no work"
    assert peak_ack_pending <= MAX_ACK_PENDING
    assert peak_redelivered == 0
    assert (info.num_redelivered or 0) == 0
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert states == {COMPLETED: started}, states
    assert tasks == (started, started), tasks
    assert records == (started, started), records
    for name in SERVICES:
        assert end.rss_mib[name] <= warm.rss_mib[name] * (1 + RSS_GROWTH), rss_line
        assert end.fds[name] <= warm.fds[name] + FDS_SLACK, fds_line
    assert end.tasks <= warm.tasks + TASKS_SLACK, (warm.tasks, end.tasks)
