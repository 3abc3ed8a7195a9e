"""The Python client against a real mesh: a client closed, closed under a call, or used
from another event loop, and the approval helpers' reading of an answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.support.audit import closing
from tests.support.mesh import MeshFactory, MeshHarness
from tickmesh.router import server as router_server
from tickmesh.router.config import RouterSettings
from tickmesh.runtime import nats as tm_nats
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    LifetimeHandle,
    PlanContext,
    PlanInputView,
    TaskContext,
    TickmeshError,
    complete,
    plan,
    task,
)
from tickmesh.sdk.approvals import approval, approval_of
from tickmesh.sdk.errors import ClientUsageError, TransportError
from tickmesh.v1 import graph_pb2


async def _approval_graph(h: MeshHarness) -> graph_pb2.AgentGraph:
    @task
    async def draft(ctx: TaskContext, value: Any) -> str:
        return "a plan"

    @plan
    async def review(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        decided = approval_of(ctx)
        if decided is None:
            return approval(prompt="ship it?")
        return complete({"approved": decided.approved, "comment": decided.comment})

    await h.worker([draft, review])
    return await h.register(
        GraphBuilder("review")
        .task("draft")
        .plan("review")
        .edge("draft", "review")
        .final("review")
        .build()
    )


async def _until_waiting(handle: LifetimeHandle) -> None:
    async with asyncio.timeout(10), closing(handle.watch()) as events:
        async for event in events:
            if event.kind == "state_changed" and event.state == "waiting":
                return


def _in_another_loop(call: Callable[[], Awaitable[Any]]) -> BaseException | None:
    """Run ``call()`` in a thread's own event loop; what it raised, if anything."""
    raised: list[BaseException | None] = []

    def run() -> None:
        async def main() -> None:
            await call()

        try:
            asyncio.run(main())
            raised.append(None)
        except BaseException as exc:  # reported to the test, whatever it is
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0]


async def test_a_call_from_another_event_loop_is_refused_before_it_is_made(
    start_mesh: MeshFactory,
) -> None:
    """grpc.aio binds a channel to the loop it was made in. A call from another loop used
    to be scheduled on the channel's loop anyway — the lifetime started — while its caller
    got a RuntimeError about futures, and so would start it again on a retry."""
    h = await start_mesh()
    graph = await _approval_graph(h)
    client = h.client

    raised = await asyncio.to_thread(_in_another_loop, lambda: client.start_lifetime(graph.id, {}))
    assert isinstance(raised, ClientUsageError), repr(raised)
    assert isinstance(raised, TickmeshError)
    assert "another event loop" in str(raised)
    assert await h.lifetime_ids() == []

    async def watch_there() -> None:
        # Refused before the first event: nothing is ever read.
        events = [event async for event in client.watch("missing")]
        raise AssertionError(f"the watch ran in another loop: {events}")

    raised = await asyncio.to_thread(_in_another_loop, watch_there)
    assert isinstance(raised, ClientUsageError), repr(raised)

    # Its own loop still works, and a client connected in the other loop works there.
    handle = await client.start_lifetime(graph.id, {})
    await _until_waiting(handle)
    assert (await handle.describe()).state == "waiting"

    async def own_client_there() -> None:
        async with await Client.connect(h.mesh.router_target, tenant=h.tenant) as there:
            assert (await there.get_lifetime(handle.id)).state == "waiting"

    assert await asyncio.to_thread(_in_another_loop, own_client_there) is None


async def test_a_closed_client_raises_an_sdk_error_naming_it(start_mesh: MeshFactory) -> None:
    """grpc's own UsageError('Channel is closed.') is no TickmeshError: a caller catching
    the SDK's errors missed it."""
    h = await start_mesh()
    graph = await _approval_graph(h)
    handle = await h.start(graph, {})
    client = await Client.connect(h.mesh.router_target, tenant=h.tenant)
    await client.close()
    await client.close()  # twice is harmless

    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "get": lambda: client.get_lifetime(handle.id),
        "list": lambda: client.list_lifetimes(),
        "start": lambda: client.start_lifetime(graph.id, {}),
        "register": lambda: client.register_graph(graph),
        "signal": lambda: client.signal(handle.id, "approval", {"approved": True}),
        "abort": lambda: client.abort(handle.id),
        "fork": lambda: client.fork(handle.id, "e"),
        "replay": lambda: client.replay(handle.id),
        "result": lambda: client.handle(handle.id).result(within=10),
        "watch": lambda: anext(aiter(client.watch(handle.id))),
    }
    for name, call in calls.items():
        with pytest.raises(ClientUsageError, match="client is closed"):
            await call()
        assert name  # each call named in a failure's traceback
    await _until_waiting(handle)
    assert (await h.client.get_lifetime(handle.id)).state == "waiting"
    assert len(await h.lifetime_ids()) == 1


async def test_closing_the_client_under_a_watch_is_an_error_not_a_cancellation(
    start_mesh: MeshFactory,
) -> None:
    """Closing a channel cancels its calls, and grpc.aio raises CancelledError in their
    callers: a task nobody cancelled saw a cancellation (a TaskGroup or a retry loop
    takes it for its own)."""
    h = await start_mesh()
    graph = await _approval_graph(h)
    handle = await h.start(graph, {})
    await _until_waiting(handle)

    client = await Client.connect(h.mesh.router_target, tenant=h.tenant)
    events = client.watch(handle.id)
    first = await anext(events)
    assert first.kind == "started"
    waiter = asyncio.create_task(client.handle(handle.id).result())
    async with asyncio.timeout(10):
        # the waiter's watch is past its history: nothing more comes while it waits
        while True:
            event = await anext(events)
            if event.kind == "state_changed" and event.state == "waiting":
                break
    await client.close()

    with pytest.raises(ClientUsageError, match="closed"):
        await anext(events)
    with pytest.raises(ClientUsageError, match="closed"):
        await waiter
    assert not waiter.cancelled()


async def test_a_watch_broken_by_its_router_stopping_says_where_to_resume(
    start_mesh: MeshFactory,
) -> None:
    """A router stopping under a watch used to surface as gRPC's bare "Cancelling all
    calls": neither the watch nor how far it got. Resuming from the sequence the error
    names, on another replica, gives the rest: no event twice, none missing."""
    h = await start_mesh()
    graph = await _approval_graph(h)
    nc = await tm_nats.connect(h.mesh.nats_url, name="router-b")
    second = await router_server.build(
        RouterSettings(
            nats_url=h.mesh.nats_url,
            tenants=[h.tenant],
            grpc_listen="127.0.0.1:0",
            instance="router-b",
            state_target=h.mesh.state_target,
            log_json=False,
        ),
        nc=nc,
    )
    await second.start()
    stopping: list[asyncio.Task[None]] = []
    seen: list[int] = []

    async def watch_until_broken(handle: LifetimeHandle) -> None:
        async with asyncio.timeout(30):
            async for event in handle.watch():
                seen.append(event.sequence)
                if event.kind == "state_changed" and event.state == "waiting":
                    stopping.append(asyncio.create_task(second.stop()))

    try:
        async with await Client.connect(second.target, tenant=h.tenant) as via_b:
            handle = await via_b.start_lifetime(graph.id, {})
            with pytest.raises(TransportError) as broken:
                await watch_until_broken(handle)
    finally:
        if stopping:
            await stopping[0]
        else:
            await second.stop()
        await nc.close()
    assert seen == list(range(1, seen[-1] + 1))
    message = str(broken.value)
    assert f"watch of lifetime {handle.id} broke after sequence {seen[-1]}" in message
    assert f"after_sequence={seen[-1]}" in message

    # (abort, not a signal: the other replica may not have seen the wait yet)
    assert (await h.client.abort(handle.id, "enough")).state == "aborted"
    async with asyncio.timeout(30):
        rest = [e async for e in h.client.watch(handle.id, after_sequence=seen[-1])]
    assert [e.sequence for e in rest] == list(range(seen[-1] + 1, seen[-1] + 1 + len(rest)))
    assert (rest[-1].kind, rest[-1].state) == ("state_changed", "aborted")


@pytest.mark.parametrize(
    ("answer", "approved"),
    [
        ({"approved": "false"}, False),
        ({"approved": "no"}, False),
        ({"approved": 0}, False),
        ("no", False),
        ({"approved": True}, True),
        (True, True),
    ],
)
async def test_only_an_explicit_true_approves(
    start_mesh: MeshFactory, answer: Any, approved: bool
) -> None:
    """An approval is a yes only when it says ``true``: a form's string "false" (or a
    bare "no") used to approve, being a non-empty string."""
    h = await start_mesh()
    graph = await _approval_graph(h)
    handle = await h.start(graph, {})
    await _until_waiting(handle)
    await handle.signal("approval", answer, approver="ada")
    output = await handle.result(within=10)
    assert output["approved"] is approved
