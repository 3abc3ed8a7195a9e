"""22. 10,000 concurrent lifetimes, two rounds: all complete, stored exactly, memory flat
(RELIABILITY.md §4.2).

The four services run as processes (the chaos harness). Each round starts ``LIFETIMES``
lifetimes of a one-plan graph that parks until a ``go`` signal (``wait_for``), waits until
every one is parked (WAITING: all of them in flight at once, holding no executor slot),
signals them all and waits until all completed. The spec's "plan x 3 steps" is replaced
by park + signal (two plan executions per lifetime): 10,000 of those fit in about two
minutes a round on two cores, three steps each would not fit the suite's budget.

Asserts, after each round, straight from the state store: exactly 2 * N plan execution
records per round, one per (execution id, attempt), N more COMPLETED lifetimes, none in
another state; the router and the state service use no more resident memory after
round 2 than after round 1 plus 10 % (what round 1 allocated for good — caches, pools,
SQLite's page cache — is reused by round 2, not added to). Figures: start, park and
completion times per round, RSS per round, peak RSS.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import psutil
import pytest

from tests.chaos import report
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import Cluster, ServiceName, figure
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    complete,
    plan,
    wait_for,
)
from tickmesh.v1 import lifetime_pb2

pytestmark = [pytest.mark.slow_chaos, pytest.mark.timeout(420)]

LIFETIMES: Final = 10_000
ROUNDS: Final = 2
CONCURRENCY: Final = 64
"""RPCs in flight while starting and signalling."""
ROUND_WITHIN_S: Final = 150.0
"""How long one round's park (or completion) may take."""
GROWTH: Final = 0.10
WATCHED: Final[tuple[ServiceName, ...]] = ("router", "state")
MIB: Final = 2**20
COMPLETED: Final = lifetime_pb2.LifetimeState.Value("LIFETIME_STATE_COMPLETED")
WAITING: Final = lifetime_pb2.LifetimeState.Value("LIFETIME_STATE_WAITING")


@plan(name="chaos_park")
async def park(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    """Waits for the ``go`` signal, then completes."""
    if ctx.iteration == 1:
        return wait_for("go")
    return complete(None)


@dataclass(frozen=True, slots=True)
class Counts:
    """What the state store holds for the tenant."""

    plan_rows: int
    distinct_rows: int
    lifetimes: dict[int, int]
    """Lifetime state -> how many."""


def read_counts(cluster: Cluster) -> Counts:
    """Read the SQLite store directly (read-only), beside the running state service."""
    db = sqlite3.connect(f"file:{cluster.work_dir / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT execution_id || ':' || attempt) FROM executions "
            "WHERE tenant = ? AND kind = 'plan'",
            (cluster.tenant,),
        ).fetchone()
        states = dict(
            db.execute(
                "SELECT state, COUNT(*) FROM lifetimes WHERE tenant = ? GROUP BY state",
                (cluster.tenant,),
            ).fetchall()
        )
    finally:
        db.close()
    return Counts(int(rows), int(distinct), {int(k): int(v) for k, v in states.items()})


async def until_state(cluster: Cluster, state: int, expected: int, within: float) -> float:
    """Seconds until the store holds ``expected`` lifetimes in ``state``."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        counts = await asyncio.to_thread(read_counts, cluster)
        seen = counts.lifetimes.get(state, 0)
        if seen >= expected:
            return loop.time() - began
        if loop.time() - began > within:
            raise AssertionError(
                f"only {seen} of {expected} lifetimes in state {state} after {within:g} s "
                f"(states {counts.lifetimes})"
            )
        await asyncio.sleep(0.5)


async def bounded(items: Iterable[Any], call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Any) -> Any:
        async with gate:
            return await call(item)

    return await asyncio.gather(*(one(item) for item in items))


def rss_mib(cluster: Cluster) -> dict[ServiceName, float]:
    out: dict[ServiceName, float] = {}
    for name in WATCHED:
        pid = cluster.services[name].pid
        assert pid is not None
        out[name] = psutil.Process(pid).memory_info().rss / MIB
    return out


async def test_ten_thousand_parked_lifetimes_twice_complete_exactly_with_flat_memory(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster()
    await cluster.worker([park], concurrency=64)
    client: Client = await Client.connect(
        cluster.router_target, tenant=cluster.tenant, call_timeout=60
    )
    cluster.clients.append(client)
    graph = await client.register_graph(
        GraphBuilder("chaos_parked").plan("park", "chaos_park").final("park").build()
    )
    loop = asyncio.get_running_loop()
    idle = rss_mib(cluster)
    rounds: list[dict[str, Any]] = []
    for number in range(1, ROUNDS + 1):
        began = loop.time()
        handles = await bounded(
            range(LIFETIMES), lambda _: client.start_lifetime(graph.id, None, version=graph.version)
        )
        started_s = loop.time() - began
        parked_s = await until_state(cluster, WAITING, LIFETIMES, ROUND_WITHIN_S)
        parked = rss_mib(cluster)
        signalled_at = loop.time()
        await bounded(handles, lambda h: client.signal(h.id, "go", None))
        signal_s = loop.time() - signalled_at
        done_s = await until_state(cluster, COMPLETED, LIFETIMES * number, ROUND_WITHIN_S)
        await cluster.wait_quiet(within=60)
        await asyncio.sleep(2.0)  # let buffers settle before reading memory
        counts = await asyncio.to_thread(read_counts, cluster)
        rounds.append(
            {
                "started_s": started_s,
                "parked_s": started_s + parked_s,
                "completed_s": signal_s + done_s,
                "parked_mib": parked,
                "after_mib": rss_mib(cluster),
                "counts": counts,
            }
        )
        figure(
            f"22 round {number}: {LIFETIMES:,} started in {started_s:.1f} s, all parked after "
            f"{started_s + parked_s:.1f} s, all completed {signal_s + done_s:.1f} s after the "
            f"signals; RSS parked {fmt(parked)}, after {fmt(rounds[-1]['after_mib'])}; "
            f"store: {counts.plan_rows} plan rows ({counts.distinct_rows} distinct), "
            f"lifetimes by state {counts.lifetimes}"
        )
        assert counts.plan_rows == counts.distinct_rows == 2 * LIFETIMES * number, counts
        assert counts.lifetimes == {COMPLETED: LIFETIMES * number}, counts.lifetimes

    listed = await client.list_lifetimes(states=["completed"], graph_id=graph.id, page_size=1000)
    first, last = rounds[0]["after_mib"], rounds[-1]["after_mib"]
    peak = {name: cluster.peak_rss_mib(name) for name in WATCHED}
    figure(
        f"22 memory: idle {fmt(idle)}; after round 1 {fmt(first)}, after round {ROUNDS} "
        f"{fmt(last)} (bound: round 1 + {GROWTH:.0%}); peak {fmt(peak)}, all services "
        f"{cluster.peak_rss_mib():.0f} MiB"
    )
    final = rounds[-1]["counts"]
    attempted = LIFETIMES * ROUNDS
    completed = final.lifetimes.get(COMPLETED, 0)
    report.record(
        report.Row(
            test="22 10k lifetimes x2",
            fault=f"{LIFETIMES:,} parked at once + signalled, {ROUNDS} rounds",
            attempted=attempted,
            acked=len(listed),
            persisted=completed,
            lost=attempted - completed,
            duplicated=final.plan_rows - final.distinct_rows,
            recovery_s=max(r["completed_s"] for r in rounds),
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    assert len(listed) == attempted
    for name in WATCHED:
        assert last[name] <= first[name] * (1 + GROWTH), (
            f"{name} grew from {first[name]:.0f} MiB after round 1 to {last[name]:.0f} MiB"
        )


def fmt(mib: dict[ServiceName, float]) -> str:
    return ", ".join(f"{name} {value:.0f}" for name, value in mib.items()) + " MiB"
