"""Fork from inside one branch of a fan-out: only the steps after the fork point run."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from tests.support.audit import record_of
from tests.support.mesh import MeshFactory
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.v1 import graph_pb2

# Each branch is its own task node, so a handler run is identified by (node, iteration).
# The delays fix the branches' store order: a, then b, then c.
BRANCH_DELAY_S = {"a": 0.0, "b": 0.15, "c": 0.4}


def fan_out_graph() -> graph_pb2.AgentGraph:
    builder = GraphBuilder("fork-fanout").plan("fan").plan("collect", join="all")
    for node in BRANCH_DELAY_S:
        builder = (
            builder.task(node, "branch").edge("fan", node, "parallel").edge(node, "collect", "join")
        )
    return builder.entry("fan").final("collect").build()


async def test_fork_inside_one_branch_of_a_fan_out_reruns_nothing_stored_before_it(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    runs: Counter[tuple[str, str, int]] = Counter()

    @plan(name="fan")
    async def fan(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        runs[(ctx.lifetime_id, ctx.node_id, ctx.iteration)] += 1
        return dispatch(*(step(node, node) for node in BRANCH_DELAY_S))

    @task(name="branch")
    async def branch(ctx: TaskContext, value: str) -> str:
        runs[(ctx.lifetime_id, ctx.node_id, ctx.iteration)] += 1
        await asyncio.sleep(BRANCH_DELAY_S[ctx.node_id])
        return value.upper()

    @plan(name="collect")
    async def collect(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        runs[(ctx.lifetime_id, ctx.node_id, ctx.iteration)] += 1
        return complete({i.node_id: i.output for i in inputs})

    await h.worker([fan, branch, collect])
    graph = await h.register(fan_out_graph())
    origin = await h.start(graph, None)
    assert await origin.result(within=10) == {"a": "A", "b": "B", "c": "C"}
    records = await h.stored(origin.id)
    nodes = [record_of(r).header.node.id for r in records]
    assert nodes == ["fan", "a", "b", "c", "collect"], nodes

    # Fork at branch b: fan and a were stored before it, c and collect after it.
    at = records[nodes.index("b")]
    fork_point = record_of(at).header
    before_fork = {
        (record_of(r).header.node.id, record_of(r).header.iteration)
        for r in records[: records.index(at) + 1]
    }
    assert {node for node, _ in before_fork} == {"fan", "a", "b"}
    executed_before = sum(runs.values())

    forked = await origin.fork(fork_point.execution_id, replacement="b replaced")
    info = await forked.describe()
    assert info.raw.fork_origin.lifetime_id == origin.id
    assert info.raw.fork_origin.execution_id == fork_point.execution_id
    # The join saw a's recorded output, b's replacement and a live run of c.
    assert await forked.result(within=10) == {"a": "A", "b": "b replaced", "c": "C"}

    # Zero re-executions of anything stored up to the fork point, in any lifetime.
    in_fork = Counter((node, it) for (lid, node, it), n in runs.items() if lid == forked.id)
    assert not set(in_fork) & before_fork, in_fork
    assert set(in_fork) == {("c", record_of(records[3]).header.iteration)} | {
        ("collect", record_of(records[4]).header.iteration)
    }
    assert all(n == 1 for n in runs.values()), runs
    assert sum(runs.values()) - executed_before == sum(in_fork.values()) == 2

    # The fork stores only its own new steps: c (open at the fork point) and the join.
    fork_records = sorted(await h.stored(forked.id), key=lambda r: r.store_sequence)
    assert [record_of(r).header.node.id for r in fork_records] == ["c", "collect"]
    for ref in fork_records:
        header = record_of(ref).header
        assert header.lifetime_id == forked.id
        assert header.execution_id not in {record_of(r).header.execution_id for r in records}
    c_fork, collect_fork = (record_of(r).header for r in fork_records)
    # c's parent is the origin's fan (finished, not re-run); the join names the origin's
    # a and b (b with its replaced output) and the fork's own c.
    fan_id = record_of(records[0]).header.execution_id
    assert list(c_fork.parent_execution_ids) == [fan_id]
    assert set(collect_fork.parent_execution_ids) == {
        record_of(records[1]).header.execution_id,
        fork_point.execution_id,
        c_fork.execution_id,
    }
