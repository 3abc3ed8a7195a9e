"""Graph semantics end to end: bounded cycles and join policies after a fan-out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.audit import record_of, task_status
from tests.support.graphs import plan_task_loop
from tests.support.mesh import MeshFactory
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    LifetimeFailedError,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
)


async def test_a_cycle_stops_at_max_iterations(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    plan_runs: list[int] = []

    @plan
    async def forever(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        plan_runs.append(ctx.iteration)
        return dispatch(step("again", {"round": ctx.iteration}))

    @task
    async def again(ctx: TaskContext, value: Any) -> Any:
        return value

    await h.worker([forever, again])
    graph = await h.register(plan_task_loop("cycle", "forever", "again", max_iterations=3))

    handle = await h.start(graph, {})
    with pytest.raises(LifetimeFailedError) as failed:
        await handle.result(within=10)

    assert failed.value.state == "FAILED"
    info = await handle.describe()
    assert info.raw.error.type == "MaxIterationsExceeded"
    assert plan_runs == [1, 2, 3]
    report = await h.audit(handle.id)
    assert report.state == "failed"
    assert report.by_node == {"forever": 3, "again": 3}


@pytest.mark.parametrize(
    ("join", "quorum", "fired_with"),
    [("all", 0, 4), ("any", 0, 1), ("quorum", 2, 2)],
)
async def test_fan_out_joins_fire_the_plan_once(
    start_mesh: MeshFactory, join: str, quorum: int, fired_with: int
) -> None:
    h = await start_mesh()
    branches_done: list[int] = []
    all_done = asyncio.Event()
    collect_inputs: list[list[str]] = []

    @plan
    async def fan(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return dispatch(*(step("branch", i) for i in range(4)))

    @task
    async def branch(ctx: TaskContext, i: int) -> int:
        await asyncio.sleep(0.05 * i)
        branches_done.append(i)
        if len(branches_done) == 4:
            all_done.set()
        return i

    @plan
    async def collect(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        collect_inputs.append([i.node_id for i in inputs])
        if inputs[0].node_id == "branch":
            # Keep the lifetime running until every late branch has finished.
            return dispatch(step("linger", [i.output for i in inputs]))
        return complete({"joined": inputs[0].output})

    @task
    async def linger(ctx: TaskContext, joined: list[int]) -> list[int]:
        # Hold the lifetime open until the late branches are done and their records
        # have had time to be routed: they must not fire the join again.
        await all_done.wait()
        await asyncio.sleep(0.2)
        return joined

    await h.worker([fan, branch, collect, linger])
    graph = await h.register(
        GraphBuilder(f"join-{join}")
        .plan("fan")
        .task("branch")
        .plan("collect", join=join, quorum=quorum)
        .task("linger")
        .edge("fan", "branch", "parallel")
        .edge("branch", "collect", "join")
        .edge("collect", "linger")
        .edge("linger", "collect")
        .final("collect")
        .build()
    )

    handle = await h.start(graph, {})
    output = await handle.result(within=10)

    assert len(output["joined"]) == fired_with
    assert sorted(branches_done) == [0, 1, 2, 3]
    # The join fired the plan once, with as many branches as its policy waits for;
    # the second run of the plan is the linger task's.
    assert collect_inputs == [["branch"] * fired_with, ["linger"]]
    report = await h.audit(handle.id)
    assert report.by_node == {"fan": 1, "branch": 4, "collect": 2, "linger": 1}
    assert [task_status(r) for r in report.of_node("branch")] == ["succeeded"] * 4
    first, second = report.of_node("collect")
    assert len(record_of(first).header.parent_execution_ids) == fired_with
    assert [e.node_id for e in report.events_of("step_finished")].count("branch") == 4
    assert [e.node_id for e in report.events_of("step_dispatched")].count("collect") == 2
    assert record_of(second).header.iteration == 2
