"""Recovery after a nats-server SIGKILL under steady lifetime load (RELIABILITY.md §4.2, 4).

The four services run as processes (the chaos harness, SQLite store) with one in-process
worker, and starters keep lifetimes coming (a plan that dispatches one task, then
completes). nats-server is SIGKILLed and restarted on its store directory ``ROUNDS``
times, down a different short time each round. Measured per round, from the server
being back (ready): until the next lifetime completed (seen on the events subjects),
and until the first lifetime *started* after that completed (every service's path
working again end to end); the second is asserted.

A broker restart loses the in-flight PubAcks and pull requests of every connection; the
services must notice at once and go on, not wait out a publish timeout or a pull
request's expiry. Then every lifetime started must still complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Final

import pytest
from nats.aio.msg import Msg

from tests.chaos import report
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import figure, wait_terminal
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    complete,
    dispatch,
    events_of,
    plan,
    step,
    task,
)
from tickmesh.v1 import envelope_pb2, lifetime_pb2

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]

DOWN_S: Final = (0.1, 0.6, 1.2)
"""How long nats-server stays down, one round each."""
ROUNDS: Final = len(DOWN_S)
RECOVERY_BOUND_S: Final = 4.0
"""Server back -> a lifetime started since then completed, every round."""
STARTERS: Final = 3
START_EVERY_S: Final = 0.15
STEADY_S: Final = 1.5
"""Steady load before each kill (after the previous round's recovery)."""
SETTLE_S: Final = 60.0
COMPLETED: Final = lifetime_pb2.LIFETIME_STATE_COMPLETED
STATE_CHANGED: Final = lifetime_pb2.LIFETIME_EVENT_KIND_STATE_CHANGED


@task(name="restart_work")
async def work(ctx: TaskContext, job: dict[str, int]) -> int:
    return job["n"] + 1


@plan(name="restart_loop")
async def loop(ctx: PlanContext, goal: dict[str, int], inputs: list[PlanInputView]) -> Decision:
    if ctx.iteration > 1:
        return complete({"n": goal["n"]})
    return dispatch(step("work", {"n": goal["n"]}))


RETRY: Final = Retry(max_attempts=25, initial_backoff=0.2, max_backoff=1.0)
GRAPH: Final = (
    GraphBuilder("broker-restart")
    .plan("loop", "restart_loop", retry=RETRY, timeout=60.0)
    .task("work", "restart_work", retry=RETRY, timeout=60.0)
    .edge("loop", "work")
    .edge("work", "loop")
    .final("loop")
    .build()
)


async def test_lifetimes_complete_soon_after_nats_server_is_back(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster()
    loop_time = asyncio.get_running_loop().time
    await cluster.worker([work, loop], concurrency=32)
    client = await Client.connect(cluster.router_target, tenant=cluster.tenant, call_timeout=5)
    cluster.clients.append(client)
    graph = await client.register_graph(GRAPH)

    completions: dict[str, float] = {}
    """Lifetime id -> when its completion was seen."""
    completed_now = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        with contextlib.suppress(Exception):
            envelope = envelope_pb2.ExecutionEnvelope.FromString(msg.data)
            for event in events_of(envelope):
                if event.kind == STATE_CHANGED and event.state == COMPLETED:
                    completions.setdefault(envelope.header.lifetime_id, loop_time())
                    completed_now.set()

    assert cluster.nc is not None
    await cluster.nc.subscribe(cluster.names.evt_all, cb=on_event)

    stopping = asyncio.Event()
    started: list[str] = []
    asked_at: dict[str, float] = {}
    """Lifetime id -> when its start was first asked for."""

    async def starter(number: int) -> None:
        for count in itertools.count(1):
            if stopping.is_set():
                return
            request_id = f"restart-{number}-{count}"
            asked = loop_time()
            while True:  # until answered: a start while NATS is down is retried, same id
                try:
                    handle = await client.start_lifetime(
                        graph.id, {"n": number * 100_000 + count}, request_id=request_id
                    )
                except Exception:
                    await asyncio.sleep(0.1)
                    continue
                started.append(handle.id)
                asked_at[handle.id] = asked
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), START_EVERY_S)

    async def next_completion(
        after: float, within: float, *, started_after: bool = False
    ) -> float | None:
        """When the first lifetime completed after ``after`` (with ``started_after``:
        the first of those started after ``after``)."""
        deadline = loop_time() + within
        while loop_time() < deadline:
            later = [
                t
                for lifetime_id, t in list(completions.items())
                if t >= after and (not started_after or asked_at.get(lifetime_id, 0.0) >= after)
            ]
            if later:
                return min(later)
            completed_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(completed_now.wait(), deadline - loop_time())
        return None

    starters = [asyncio.create_task(starter(n)) for n in range(1, STARTERS + 1)]
    recoveries: list[float] = []
    firsts: list[float] = []
    try:
        assert await next_completion(loop_time(), 30.0) is not None, "no lifetime completed"
        for down_s in DOWN_S:
            await asyncio.sleep(STEADY_S)
            await cluster.restart_nats(kill=True, down_s=down_s)
            back = loop_time()
            first = await next_completion(back, 30.0)
            done = await next_completion(back, 30.0, started_after=True)
            firsts.append(float("inf") if first is None else first - back)
            recoveries.append(float("inf") if done is None else done - back)
            figure(
                f"broker restart: down {down_s:.1f}s; then a completion after {firsts[-1]:.2f}s, "
                f"a lifetime started since completed after {recoveries[-1]:.2f}s"
            )
    finally:
        stopping.set()
        await asyncio.gather(*starters, return_exceptions=True)

    states = await wait_terminal(client, started, SETTLE_S)
    completed = sum(1 for s in states.values() if s == "completed")
    report.record(
        report.Row(
            test="4 broker restart recovery",
            fault=f"SIGKILL nats-server x{ROUNDS} ({', '.join(f'{d:g}s' for d in DOWN_S)} down)",
            attempted=len(started),
            acked=len(started),
            persisted=completed,
            lost=len(started) - completed,
            duplicated=0,
            recovery_s=max(recoveries),
        )
    )
    figure(
        f"broker restart: {len(started)} lifetimes, {completed} completed; "
        f"next completion {', '.join(f'{r:.2f}s' for r in firsts)}; "
        f"first new lifetime completed {', '.join(f'{r:.2f}s' for r in recoveries)}"
    )
    assert completed == len(started), f"not completed: {sorted(set(states.values()))}"
    assert max(recoveries) < RECOVERY_BOUND_S, (
        f"a lifetime started after nats-server was back completed only "
        f"{max(recoveries):.2f}s after "
        f"(bound {RECOVERY_BOUND_S:g}s): {recoveries}"
    )
