"""Graphs and plan decisions at the edges of what they may hold, on a real mesh."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.graphs import plan_task_loop
from tests.support.mesh import MeshFactory
from tickmesh.sdk import (
    Decision,
    LifetimeFailedError,
    NotFoundError,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    ValidationError,
    complete,
    dispatch,
    plan,
    step,
    task,
)


async def test_a_step_that_may_be_retried_2000_times_runs(start_mesh: MeshFactory) -> None:
    """A valid retry policy of 2,000 attempts: computing the step's deadline overflowed
    a float at the 1,025th backoff, and StartLifetime answered INTERNAL."""
    h = await start_mesh()

    @plan(name="persist")
    async def persist(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if not inputs:
            return dispatch(step("attempt", goal))
        return complete(inputs[0].output)

    @task(name="attempt")
    async def attempt(ctx: TaskContext, n: int) -> int:
        return n + 1

    await h.worker([persist, attempt])
    graph = await h.register(
        plan_task_loop(
            "persistent", "persist", "attempt", max_iterations=4, retry=Retry(max_attempts=2000)
        )
    )
    handle = await h.start(graph, 41)
    assert await handle.result(within=15) == 42


async def test_a_dispatch_over_max_iterations_runs_none_of_its_steps(
    start_mesh: MeshFactory,
) -> None:
    """A plan dispatching five steps of a node that may run three times: the lifetime
    fails, and none of the five runs (the first three were published with the decision
    that failed the lifetime, and ran for it)."""
    h = await start_mesh()
    ran: list[int] = []

    @plan(name="greedy")
    async def greedy(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if not inputs:
            return dispatch(*(step("side_effect", n) for n in range(goal)))
        return complete(len(inputs))

    @task(name="side_effect")
    async def side_effect(ctx: TaskContext, n: int) -> int:
        ran.append(n)
        return n

    await h.worker([greedy, side_effect])
    graph = await h.register(plan_task_loop("capped", "greedy", "side_effect", max_iterations=3))
    handle = await h.start(graph, 5)
    with pytest.raises(LifetimeFailedError) as failed:
        await handle.result(within=15)
    assert "node 'side_effect' would run 5 times, over the graph's max_iterations 3" in (
        failed.value.detail
    )
    # Whatever was published has run (or been cancelled) once the work queue is empty.
    await h.wait_stream_empty(h.names.work_stream, within=15)
    await h.records_stored()
    assert ran == []
    report = await h.audit(handle.id)
    assert report.of_node("side_effect") == []

    fits = await h.start(graph, 3)
    assert await fits.result(within=15) == 3


async def test_register_graph_refuses_a_step_longer_than_a_century(
    start_mesh: MeshFactory,
) -> None:
    """A timeout of 8,000 years was registered; its lifetimes could not start
    (StartLifetime answered INTERNAL: the step's deadline is past the year 9999)."""
    h = await start_mesh()
    source = (
        "graph: eternal\n"
        "nodes:\n"
        "  - {id: decide, kind: plan}\n"
        "  - {id: work, kind: task, timeout: 70080000h}\n"
        "edges:\n"
        "  - {from: decide, to: work}\n"
        "  - {from: work, to: decide}\n"
        "  - {from: decide, kind: final}\n"
    )
    with pytest.raises(ValidationError) as refused:
        await h.register(source)
    assert "request:4:37 nodes[1].timeout: 70080000h is too long" in str(refused.value)
    with pytest.raises(NotFoundError):
        await h.client.get_graph("eternal")
