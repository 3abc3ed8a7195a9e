"""The benchmark graph's handlers: a no-op task and a plan that loops it.

A lifetime runs ``noop → loop → noop → loop …``; ``loop`` dispatches ``noop`` again
until it has run ``rounds`` times (its own iteration number), then completes. So a
lifetime of ``rounds`` rounds is ``2 * rounds`` steps.
"""

from __future__ import annotations

from typing import Any

from tickmesh.sdk import (
    Decision,
    Plan,
    PlanContext,
    PlanInputView,
    Task,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
    wait_for,
)

GRAPH_ID = "bench_chain"
TASK_NODE = "noop"
PLAN_NODE = "loop"


@task(name="bench_noop")
async def noop(ctx: TaskContext, value: Any) -> None:
    return None


@plan(name="bench_loop")
async def loop(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    rounds = int(goal.get("rounds", 10)) if isinstance(goal, dict) else 10
    if ctx.iteration >= rounds:
        return complete(None)
    return dispatch(step(TASK_NODE))


PARK_GRAPH_ID = "bench_parked"


@plan(name="bench_park")
async def park(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    """Waits for the ``go`` signal (holding no executor slot while it waits), then completes."""
    if ctx.iteration == 1:
        return wait_for("go")
    return complete(None)


PARK_GRAPH_YAML = f"""\
graph: {PARK_GRAPH_ID}
description: a lifetime that parks until it is signalled (bench/parked.py)
entry: park
nodes:
  - id: park
    kind: plan
    handler: bench_park
edges:
  - {{from: park, kind: final}}
"""


HANDLERS: list[Task[Any, Any] | Plan[Any]] = [noop, loop, park]


def graph_yaml(rounds: int) -> str:
    """The chain graph; max_iterations leaves room above ``rounds``."""
    return f"""\
graph: {GRAPH_ID}
description: tickmesh benchmark chain (no-op task, looping plan)
entry: {TASK_NODE}
max_iterations: {max(rounds + 10, 100)}
nodes:
  - id: {TASK_NODE}
    kind: task
    handler: bench_noop
  - id: {PLAN_NODE}
    kind: plan
    handler: bench_loop
edges:
  - {{from: {TASK_NODE}, to: {PLAN_NODE}}}
  - {{from: {PLAN_NODE}, to: {TASK_NODE}}}
  - {{from: {PLAN_NODE}, kind: final}}
"""
