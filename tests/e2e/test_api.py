"""The orchestrator API end to end: tenancy, listing, pause/resume and abort."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

import examples.hello.handlers as hello
from tests.support.audit import closing, list_executions, record_of, task_status
from tests.support.mesh import MeshFactory, MeshHarness
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    LifetimeFailedError,
    NotFoundError,
    PlanContext,
    PlanInputView,
    RPCError,
    StatusCode,
    TaskContext,
    ValidationError,
    Worker,
    complete,
    load_graph_file,
    plan,
    task,
    wait_for,
)
from tickmesh.v1 import graph_pb2, router_service_pb2, router_service_pb2_grpc

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello" / "graph.yaml"


async def _hello(h: MeshHarness, tenant: str) -> graph_pb2.AgentGraph:
    await h.worker([hello.greet, hello.decide, hello.shout], tenant=tenant)
    return await h.register(load_graph_file(HELLO), tenant=tenant)


async def test_tenants_cannot_see_each_other(start_mesh: MeshFactory) -> None:
    h = await start_mesh(tenants=2)
    a, b = h.tenants
    graph = await _hello(h, a)
    handle = await h.start(graph, {"name": "ada"}, tenant=a)
    assert await handle.result(within=10) == {"greeting": "HELLO, ADA!"}
    await h.audit(handle.id, tenant=a)

    other = h.clients[b]
    with pytest.raises(NotFoundError):
        await other.get_lifetime(handle.id)
    with pytest.raises(NotFoundError):
        await other.abort(handle.id)
    with pytest.raises(NotFoundError):
        async for _ in other.watch(handle.id):
            pass
    with pytest.raises(NotFoundError):
        await other.get_graph(graph.id)
    assert await list_executions(h.mesh.state_target, b, handle.id) == []
    assert (await h.client.get_lifetime(handle.id)).state == "completed"

    async with await Client.connect(h.mesh.router_target, tenant="nobody_here") as stranger:
        with pytest.raises(RPCError) as denied:
            await stranger.get_lifetime(handle.id)
        assert denied.value.status == StatusCode.PERMISSION_DENIED
        with pytest.raises(RPCError) as denied:
            await stranger.register_graph(graph)
        assert denied.value.status == StatusCode.PERMISSION_DENIED
    with pytest.raises(RPCError) as denied:
        async with asyncio.timeout(5):
            await Worker(h.mesh.pool_target, tenant="nobody_here", tasks=[hello.greet]).run()
    assert denied.value.status == StatusCode.PERMISSION_DENIED


async def test_lifetimes_and_graphs_are_listed(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    graph = await _hello(h, h.tenant)
    first = await h.start(graph, {"name": "ada"})
    second = await h.start(graph, {"name": "bob"})
    for handle in (first, second):
        await handle.result(within=10)
        await h.audit(handle.id)

    everything = await h.client.list_lifetimes()
    assert {i.lifetime_id for i in everything} == {first.id, second.id}
    of_graph = await h.client.list_lifetimes(graph_id=graph.id, states=["completed"])
    assert {i.lifetime_id for i in of_graph} == {first.id, second.id}

    async with grpc.aio.insecure_channel(h.mesh.router_target) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        response = await stub.ListGraphs(
            router_service_pb2.ListGraphsRequest(),
            metadata=(("x-tickmesh-tenant", h.tenant),),
            timeout=10,
        )
    assert [g.id for g in response.graphs] == [graph.id]


async def test_a_malformed_id_is_an_invalid_argument_naming_it(
    start_mesh: MeshFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Ids a key or subject cannot hold (dots, wildcards, spaces) are refused by name,
    in every call that takes one — not an internal error from the bucket underneath."""
    h = await start_mesh()
    graph = await _hello(h, h.tenant)
    client = h.client
    for bad in ("a.b.*", "x.>", "a b", "../../etc"):
        calls = {
            "get": client.get_lifetime(bad),
            "pause": client.pause(bad),
            "resume": client.resume(bad),
            "abort": client.abort(bad),
            "signal": client.signal(bad, "go", 1),
            "fork": client.fork(bad, "e"),
            "replay": client.replay(bad),
        }
        for name, call in calls.items():
            with pytest.raises(ValidationError, match="invalid lifetime id") as refused:
                await call
            assert repr(bad) in str(refused.value), (name, refused.value)
        with pytest.raises(ValidationError, match="invalid lifetime id"):
            async for _ in client.watch(bad):
                pass
    for bad in ("a.b.>", "G*", "a b"):
        with pytest.raises(ValidationError, match=re.escape(f"invalid graph id {bad!r}")):
            await client.get_graph(bad)
        with pytest.raises(ValidationError, match=re.escape(f"invalid graph id {bad!r}")):
            await client.start_lifetime(bad, {"name": "ada"})
    with pytest.raises(ValidationError, match="unknown lifetime state 'bogus': expected one of"):
        await client.list_lifetimes(states=["bogus"])
    # the well-formed still work; a finished lifetime's controls change nothing
    handle = await h.start(graph, {"name": "ada"})
    assert await handle.result(within=10) == {"greeting": "HELLO, ADA!"}
    for control in (client.pause, client.resume, client.abort):
        assert (await control(handle.id)).state == "completed"
    with pytest.raises(RPCError) as not_waiting:
        await client.signal(handle.id, "go", 1)
    assert not_waiting.value.status == StatusCode.FAILED_PRECONDITION
    assert "not waiting for a signal" in not_waiting.value.detail
    assert [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()] == []


async def test_a_graph_too_large_for_one_message_is_refused_by_size(
    start_mesh: MeshFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A graph version is one KV message: a 2 MB graph (20,000 nodes) cannot be stored,
    and the caller is told so, not given an internal error; a large one that fits is."""
    h = await start_mesh()

    def fan(name: str, width: int) -> graph_pb2.AgentGraph:
        builder = GraphBuilder(name, max_iterations=5).plan("p", handler="p")
        for n in range(width):
            builder.task(f"t{n}", handler="t", description="x" * 40)
            builder.edge("p", f"t{n}").edge(f"t{n}", "p")
        return builder.final("p").build()

    with pytest.raises(ValidationError) as refused:
        await h.client.register_graph(fan("huge", 20_000))
    assert "graph 'huge' is 2,124," in str(refused.value)
    assert "one NATS message may carry here (20,001 nodes, 40,001 edges)" in str(refused.value)
    with pytest.raises(NotFoundError):
        await h.client.get_graph("huge")
    stored = await h.client.register_graph(fan("large", 4_000))
    assert (stored.version, len(stored.nodes)) == (1, 4_001)
    assert [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()] == []


def _waiting_graph(name: str, first: str) -> graph_pb2.AgentGraph:
    return (
        GraphBuilder(name)
        .task(first, timeout=30)
        .plan("after")
        .edge(first, "after")
        .final("after")
        .build()
    )


async def test_pause_holds_the_next_step_until_resume(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    started = asyncio.Event()
    release = asyncio.Event()
    plan_runs: list[int] = []

    @task
    async def hold(ctx: TaskContext, value: Any) -> str:
        started.set()
        await release.wait()
        return "held"

    @plan
    async def after(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        plan_runs.append(ctx.iteration)
        return complete({"got": inputs[0].output})

    await h.worker([hold, after])
    graph = await h.register(_waiting_graph("pausing", "hold"))
    handle = await h.start(graph, {})
    async with asyncio.timeout(5):
        await started.wait()

    paused = await handle.pause("a person looks at it")
    assert paused.state == "paused"
    requests = await h.stream_last_seq(h.names.work_stream)
    release.set()
    # The task's result arrives and is routed while the lifetime is paused...
    async with asyncio.timeout(5), closing(handle.watch()) as events:
        async for event in events:
            if event.kind == "step_finished" and event.node_id == "hold":
                break
    await asyncio.sleep(0.3)
    # ...but nothing new goes out.
    assert plan_runs == []
    assert await h.stream_last_seq(h.names.work_stream) == requests
    assert (await handle.describe()).state == "paused"

    resumed = await handle.resume("carry on")
    assert resumed.state == "running"
    assert await handle.result(within=10) == {"got": "held"}
    assert plan_runs == [1]
    report = await h.audit(handle.id)
    assert report.by_node == {"hold": 1, "after": 1}
    states = [e.state for e in report.events_of("state_changed")]
    assert states == ["paused", "running", "completed"]


async def test_abort_cancels_the_running_task_within_a_second(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    stopped = asyncio.Event()
    cancelled: list[tuple[float, bool]] = []
    plan_runs: list[int] = []

    @task
    async def sleepy(ctx: TaskContext, value: Any) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append((loop.time(), ctx.cancelled.is_set()))
            stopped.set()
            raise
        return "woke up"

    @plan
    async def after(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        plan_runs.append(ctx.iteration)
        return complete({})

    await h.worker([sleepy, after])
    graph = await h.register(_waiting_graph("aborting", "sleepy"))
    handle = await h.start(graph, {})
    async with asyncio.timeout(5):
        await started.wait()

    asked = loop.time()
    aborted = await handle.abort("changed my mind")
    assert aborted.state == "aborted"
    async with asyncio.timeout(1.0):
        await stopped.wait()
    [(when, flagged)] = cancelled
    assert when - asked < 1.0
    assert flagged
    with pytest.raises(LifetimeFailedError) as ended:
        await handle.result(within=5)
    assert ended.value.state == "ABORTED"

    report = await h.audit(handle.id)
    [stored] = report.of_node("sleepy")
    assert task_status(stored) == "cancelled"
    assert report.by_node == {"sleepy": 1}
    assert plan_runs == []


async def test_abort_while_paused_leaves_no_phantom_dispatch(start_mesh: MeshFactory) -> None:
    """A step decided while paused is held; aborting then must not leave a step that the
    history says was dispatched but that never runs nor gets a record."""
    h = await start_mesh()
    started = asyncio.Event()
    release = asyncio.Event()
    plan_runs: list[int] = []

    @task
    async def hold(ctx: TaskContext, value: Any) -> str:
        started.set()
        await release.wait()
        return "held"

    @plan
    async def after(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        plan_runs.append(ctx.iteration)
        return complete({"got": inputs[0].output})

    await h.worker([hold, after])
    graph = await h.register(_waiting_graph("pause-abort", "hold"))
    handle = await h.start(graph, {})
    async with asyncio.timeout(5):
        await started.wait()
    await handle.pause("hold on")
    release.set()
    async with asyncio.timeout(5), closing(handle.watch()) as events:
        async for event in events:
            if event.kind == "step_finished" and event.node_id == "hold":
                break
    aborted = await handle.abort("never mind")
    assert aborted.state == "aborted"
    with pytest.raises(LifetimeFailedError):
        await handle.result(within=5)
    await asyncio.sleep(0.3)

    assert plan_runs == []
    report = await h.audit(handle.id, settle_s=2.0)
    assert report.by_node == {"hold": 1}


async def test_a_waiting_lifetime_resumes_on_its_signal_once(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    asked: list[str | None] = []

    @task
    async def draft(ctx: TaskContext, value: Any) -> str:
        return "a plan"

    @plan
    async def approve(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        asked.append(None if ctx.signal is None else ctx.signal.name)
        if ctx.signal is None:
            return wait_for("approval", prompt=f"approve {inputs[0].output}?")
        return complete({"ok": ctx.signal.payload, "by": ctx.signal.approver})

    await h.worker([draft, approve])
    graph = await h.register(
        GraphBuilder("approval")
        .task("draft")
        .plan("approve")
        .edge("draft", "approve")
        .final("approve")
        .build()
    )
    handle = await h.start(graph, {})
    async with asyncio.timeout(5), closing(handle.watch()) as events:
        async for event in events:
            if event.kind == "state_changed" and event.state == "waiting":
                break

    woken = await handle.signal("approval", {"yes": True}, approver="ada", signal_id="s-1")
    assert woken.state == "running"
    again = await handle.signal("approval", {"yes": True}, approver="ada", signal_id="s-1")
    assert again.state in ("running", "completed")
    assert await handle.result(within=10) == {"ok": {"yes": True}, "by": "ada"}

    assert asked == [None, "approval"]
    report = await h.audit(handle.id)
    assert report.by_node == {"draft": 1, "approve": 2}
    first, second = report.of_node("approve")
    assert list(record_of(second).header.parent_execution_ids) == [
        record_of(first).header.execution_id
    ]
    assert len(report.events_of("signal_received")) == 1


async def test_starting_twice_with_one_request_id_starts_one_lifetime(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    graph = await _hello(h, h.tenant)
    handles = await asyncio.gather(
        *(
            h.client.start_lifetime(graph.id, {"name": "ada"}, request_id="order-42")
            for _ in range(3)
        )
    )
    assert len({handle.id for handle in handles}) == 1
    assert await handles[0].result(within=10) == {"greeting": "HELLO, ADA!"}
    assert await h.lifetime_ids() == [handles[0].id]
    report = await h.audit(handles[0].id)
    assert report.by_node == {"greet": 1, "decide": 2, "shout": 1}
