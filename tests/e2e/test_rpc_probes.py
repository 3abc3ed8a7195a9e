"""Orchestrator calls at the edges of their inputs and of a lifetime's course."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.support.audit import record_of, task_status
from tests.support.mesh import MeshFactory, MeshHarness
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    plan,
    task,
    wait_for,
)
from tickmesh.v1 import graph_pb2, lifetime_pb2
from tickmesh.v1 import router_service_pb2 as pb
from tickmesh.v1 import router_service_pb2_grpc as pb_grpc


def two_step_graph(name: str) -> graph_pb2.AgentGraph:
    return (
        GraphBuilder(name)
        .task("work")
        .plan("decide")
        .edge("work", "decide")
        .final("decide")
        .build()
    )


async def watched(
    h: MeshHarness, lifetime_id: str, after_sequence: int
) -> list[lifetime_pb2.LifetimeEvent]:
    """Every event a raw WatchLifetime call streams, until the server ends it."""
    async with grpc.aio.insecure_channel(h.mesh.router_target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        call = stub.WatchLifetime(
            pb.WatchLifetimeRequest(lifetime_id=lifetime_id, after_sequence=after_sequence),
            metadata=(("x-tickmesh-tenant", h.tenant),),
        )
        return [response.event async for response in call]


async def test_a_watch_after_the_largest_sequence_ends_like_one_after_the_end(
    start_mesh: MeshFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """after_sequence is a uint64; the state service stores sequences as signed 64-bit
    integers, so asking it past 2**63 - 1 overflowed its read (INTERNAL)."""
    h = await start_mesh()

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> str:
        return "done"

    @plan(name="decide")
    async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return complete(inputs[0].output)

    await h.worker([work, decide])
    graph = await h.register(two_step_graph("watch-edges"))
    handle = await h.start(graph, None)
    assert await handle.result(within=10) == "done"
    last = (await handle.describe()).raw.last_sequence
    assert len(await watched(h, handle.id, 0)) == last
    for after in (last, 2**63 - 1, 2**63, 2**64 - 1):
        assert await watched(h, handle.id, after) == [], after
    unexpected = [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()]
    assert unexpected == []


async def test_replay_of_a_lifetime_aborted_while_a_step_ran_reproduces_it(
    start_mesh: MeshFactory,
) -> None:
    """The step the abort cancels reports after the abort: replay used to feed its record
    to a lifetime not aborted yet, which went on to the next step ("replay dispatched a
    step the recorded lifetime never ran")."""
    h = await start_mesh()
    started = asyncio.Event()
    decided: list[int] = []

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> str:
        started.set()
        await asyncio.Event().wait()  # until the abort cancels it
        return "never"

    @plan(name="decide")
    async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        decided.append(ctx.iteration)
        return complete(inputs[0].output)

    await h.worker([work, decide])
    graph = await h.register(two_step_graph("abort-replay"))
    handle = await h.start(graph, None)
    async with asyncio.timeout(10):
        await started.wait()
    assert (await handle.abort("operator")).state == "aborted"
    report = await h.audit(handle.id)
    [cancelled] = report.of_node("work")
    assert task_status(cancelled) == "cancelled"
    assert decided == []

    replayed = await handle.replay(handlers=[work, decide])
    assert replayed.reproduced, replayed.divergences
    assert replayed.decisions_checked >= 2  # the dispatch and the end, at least


async def test_replay_of_a_lifetime_aborted_without_a_reason_reproduces_it(
    start_mesh: MeshFactory,
) -> None:
    """An abort with no reason is recorded as "aborted"; replay aborted its re-drive with
    that message as the reason ("aborted: aborted") and reported a different end."""
    h = await start_mesh()

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> str:
        return "drafted"

    @plan(name="decide")
    async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return wait_for("go")

    await h.worker([work, decide])
    graph = await h.register(two_step_graph("abort-no-reason"))
    handle = await h.start(graph, None)
    async with asyncio.timeout(10):
        while (await handle.describe()).state != "waiting":  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    aborted = await handle.abort()
    assert aborted.raw.error.message == "aborted"
    records = await h.stored(handle.id)
    assert [record_of(r).header.node.id for r in records] == ["work", "decide"]

    replayed = await handle.replay(handlers=[work, decide])
    assert replayed.reproduced, replayed.divergences
