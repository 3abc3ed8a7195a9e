"""Lifetime control figures (issue 7): signal → next dispatch, and fork latency.

Runs its own in-process ``tickmesh.embedded.Mesh`` (own temporary data dir, own embedded
nats-server) and one Python ``Worker`` in the bench process:

* **signal → next dispatch**: a ``draft`` task → ``gate`` plan graph; the plan decides
  ``wait_for("go")`` and, once signalled, dispatches a no-op task. For each lifetime the
  bench waits for WAITING, notes t0 (wall clock) and calls ``SignalLifetime``; the
  STEP_DISPATCHED events that follow (their ``at``, the router's clock, the same machine)
  give t0 → the plan's re-dispatch with the signal (the next step) and t0 → the no-op
  task's dispatch (which includes running the plan in the worker).
* **fork latency**: one lifetime of the bench chain (no-op task ⇄ looping plan) runs 1,000
  steps to completion; then ``ForkLifetime`` at task executions near the end, each time
  t0 (wall clock before the call) → the fork's first STEP_DISPATCHED event, plus the RPC
  round trip, and t0 → the first new step starting in the worker. The event's ``at`` is
  the time the fork was stamped with: after the history was read, before it was re-driven
  and before the fork's write and publish. The worker's start is the stricter figure, and
  the one the fork target is judged by.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from tickmesh.embedded import Mesh, MeshConfig
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    LifetimeEvent,
    PlanContext,
    PlanInputView,
    TaskContext,
    Worker,
    complete,
    dispatch,
    plan,
    step,
    task,
    wait_for,
)
from tickmesh.v1 import graph_pb2

from . import handlers as chain
from .stats import summarize

TENANT = "default"
SIGNAL_LIFETIMES = 30
FORK_STEPS = 1000
FORK_POINTS = 5
SIGNAL_TARGET_MS = 10.0
FORK_TARGET_MS = 50.0


# When a handler first ran, per (lifetime, node, iteration): the worker's side of a latency.
_started: dict[tuple[str, str, int], float] = {}


def _note(ctx: TaskContext | PlanContext) -> None:
    _started.setdefault((ctx.lifetime_id, ctx.node_id, ctx.iteration), time.time())


def _first_run(lifetime_id: str) -> float:
    return min(t for (lid, _, _), t in _started.items() if lid == lifetime_id)


@task(name="control_noop")
async def noop(ctx: TaskContext, value: Any) -> None:
    _note(ctx)


# The bench chain's handlers (bench/handlers.py), noting when they ran.
@task(name="bench_noop")
async def chain_noop(ctx: TaskContext, value: Any) -> None:
    _note(ctx)


@plan(name="bench_loop")
async def chain_loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    _note(ctx)
    return await chain.loop(ctx, goal, inputs)


@plan(name="control_gate")
async def gate(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    _note(ctx)
    if inputs and inputs[0].node_id == "after":
        return complete(None)
    if ctx.iteration == 1:
        return wait_for("go")
    return dispatch(step("after"))


def gate_graph() -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("bench_control_gate")
        .task("draft", "control_noop")
        .plan("gate", "control_gate")
        .task("after", "control_noop")
        .edge("draft", "gate")
        .edge("gate", "after")
        .edge("after", "gate")
        .final("gate")
        .build()
    )


async def _events(
    client: Client, lifetime_id: str, until: Any, *, after: int = 0, within: float = 10.0
) -> list[LifetimeEvent]:
    """Watch ``lifetime_id`` from ``after`` until ``until(event)`` is true (inclusive)."""
    seen: list[LifetimeEvent] = []
    stream = client.watch(lifetime_id, after_sequence=after)
    try:
        async with asyncio.timeout(within):
            async for event in stream:
                seen.append(event)
                if until(event):
                    return seen
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    raise RuntimeError(f"lifetime {lifetime_id} ended before the awaited event: {seen[-3:]}")


def _completed(event: LifetimeEvent) -> bool:
    return event.kind == "state_changed" and event.state == "completed"


async def measure_signal(client: Client, lifetimes: int) -> dict[str, Any]:
    graph = await client.register_graph(gate_graph())
    to_plan: list[float] = []
    to_task: list[float] = []
    to_plan_run: list[float] = []
    to_task_run: list[float] = []
    rpc: list[float] = []
    for n in range(lifetimes):
        handle = await client.start_lifetime(graph.id, n, version=graph.version)
        waiting = await _events(
            client, handle.id, lambda e: e.kind == "state_changed" and e.state == "waiting"
        )
        t0 = time.time()
        await client.signal(handle.id, "go", {"n": n}, approver="bench")
        rpc.append((time.time() - t0) * 1000)
        dispatched = [
            e
            for e in await _events(
                client,
                handle.id,
                lambda e: e.kind == "step_dispatched" and e.node_id == "after",
                after=waiting[-1].sequence,
            )
            if e.kind == "step_dispatched"
        ]
        to_plan.append((dispatched[0].at.timestamp() - t0) * 1000)
        to_task.append((dispatched[-1].at.timestamp() - t0) * 1000)
        await handle.result(within=10)
        to_plan_run.append((_started[(handle.id, "gate", 2)] - t0) * 1000)
        to_task_run.append((_started[(handle.id, "after", 1)] - t0) * 1000)
    return {
        "lifetimes": lifetimes,
        "signal_to_next_dispatch_ms": summarize(to_plan),
        "signal_to_task_dispatch_ms": summarize(to_task),
        "signal_to_plan_started_ms": summarize(to_plan_run),
        "signal_to_task_started_ms": summarize(to_task_run),
        "signal_rpc_ms": summarize(rpc),
        "target_p50_ms": SIGNAL_TARGET_MS,
    }


async def measure_fork(client: Client, mesh: Mesh, steps: int, points: int) -> dict[str, Any]:
    rounds = steps // 2
    graph = await client.register_graph(chain.graph_yaml(rounds))
    handle = await client.start_lifetime(graph.id, {"rounds": rounds}, version=graph.version)
    started = time.perf_counter()
    await handle.result(within=120)
    run_s = time.perf_counter() - started
    # A chain: dispatch order is store order (noop, loop, noop, ...).
    history = [
        (e.execution_id, e.node_id)
        for e in await _events(client, handle.id, _completed)
        if e.kind == "step_dispatched"
    ]
    if len(history) != steps:
        raise RuntimeError(f"the origin dispatched {len(history)} steps, expected {steps}")
    # Task executions near the end: the 990th, 988th, ... dispatched (and stored) step.
    tasks = [i for i in range(steps - 10) if history[i][1] == chain.TASK_NODE]
    chosen = tasks[-points:][::-1]
    to_first: list[float] = []
    to_first_run: list[float] = []
    rpc: list[float] = []
    for index in chosen:
        execution_id = history[index][0]
        t0 = time.time()
        forked = await client.fork(handle.id, execution_id)
        rpc.append((time.time() - t0) * 1000)
        events = await _events(client, forked.id, lambda e: e.kind == "step_dispatched")
        to_first.append((events[-1].at.timestamp() - t0) * 1000)
        await forked.result(within=30)
        to_first_run.append((_first_run(forked.id) - t0) * 1000)
    return {
        "history_steps": steps,
        "origin_run_s": run_s,
        "forked_at_record": [i + 1 for i in chosen],
        "fork_to_first_dispatch_ms": summarize(to_first),
        "fork_to_first_started_ms": summarize(to_first_run),
        "fork_rpc_ms": summarize(rpc),
        "target_ms": FORK_TARGET_MS,
    }


async def run(
    *, signal_lifetimes: int = SIGNAL_LIFETIMES, fork_steps: int = FORK_STEPS
) -> dict[str, Any]:
    """Start a mesh and a worker, take both measurements, stop everything."""
    with tempfile.TemporaryDirectory(prefix="tickmesh-bench-control-") as tmp:
        async with Mesh(MeshConfig(data_dir=Path(tmp), tenants=(TENANT,))) as mesh:
            worker = Worker(
                mesh.pool_target, tenant=TENANT, tasks=[noop, gate, chain_noop, chain_loop]
            )
            await worker.__aenter__()
            try:
                async with asyncio.timeout(10):
                    await worker.wait_connected()
                async with await Client.connect(mesh.router_target, tenant=TENANT) as client:
                    signal = await measure_signal(client, signal_lifetimes)
                    fork = await measure_fork(client, mesh, fork_steps, FORK_POINTS)
            finally:
                await worker.shutdown(grace=1.0)
    return {"signal": signal, "fork": fork}


def render(result: dict[str, Any]) -> str:
    s, f = result["signal"], result["fork"]
    rows = [
        ("SignalLifetime → next step dispatched (plan re-asked)", s["signal_to_next_dispatch_ms"]),
        ("SignalLifetime → plan started in the worker", s["signal_to_plan_started_ms"]),
        ("SignalLifetime → no-op task dispatched", s["signal_to_task_dispatch_ms"]),
        ("SignalLifetime → no-op task started in the worker", s["signal_to_task_started_ms"]),
        ("SignalLifetime RPC round trip", s["signal_rpc_ms"]),
        (
            f"ForkLifetime ({f['history_steps']}-step history) → first step dispatched",
            f["fork_to_first_dispatch_ms"],
        ),
        ("ForkLifetime → first new step started in the worker", f["fork_to_first_started_ms"]),
        ("ForkLifetime RPC round trip", f["fork_rpc_ms"]),
    ]
    lines = [
        "lifetime control (in-process mesh, one worker)",
        f"  {'what':<66} {'n':>3} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}",
    ]
    for name, v in rows:
        lines.append(f"  {name:<66} {v['n']:>3} {v['p50']:>8.2f} {v['p95']:>8.2f} {v['max']:>8.2f}")
    sig_p50 = s["signal_to_next_dispatch_ms"]["p50"]
    fork_p50 = f["fork_to_first_started_ms"]["p50"]
    lines.append(
        f"  targets: signal → next dispatch p50 ≤ {s['target_p50_ms']:.0f} ms "
        f"({'met' if sig_p50 <= s['target_p50_ms'] else 'MISSED'}); "
        f"fork → first new step started ≤ {f['target_ms']:.0f} ms "
        f"({'met' if fork_p50 <= f['target_ms'] else 'MISSED'} at p50); "
        f"forked at stored executions {f['forked_at_record']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(asyncio.run(run())))
