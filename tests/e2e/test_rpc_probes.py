"""Orchestrator calls at the edges of their inputs and of a lifetime's course."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.support.audit import closing, record_of, task_status
from tests.support.mesh import MeshFactory, MeshHarness
from tickmesh.router import processor
from tickmesh.router.store import request_key
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    LifetimeHandle,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    plan,
    task,
    wait_for,
)
from tickmesh.v1 import graph_pb2, lifetime_pb2, payload_pb2
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


# --- payloads the router carries: checked by content type and size, by name -------------

INLINE_LIMIT = 256 * 1024
"""The router's inline limit in the embedded mesh (``runtime.blobs.DEFAULT_INLINE_LIMIT``)."""
BAD_PAYLOADS = (
    ("application/json", b"{not json"),
    ("application/problem+json; charset=utf-8", b'{"a": "\xff"}'),
    ("text/plain; charset=utf-8", b"caf\xe9"),
    ("text/csv; charset=no-such-charset", b"a,b"),
)
"""Bytes a receiver cannot decode as their declared content type (``sdk.codecs.decode``)."""


async def router_call(h: MeshHarness, method: str, request: Any) -> Any:
    async with grpc.aio.insecure_channel(h.mesh.router_target) as channel:
        stub = pb_grpc.RouterServiceStub(channel)
        call = getattr(stub, method)
        return await call(request, metadata=(("x-tickmesh-tenant", h.tenant),))


async def refusal(h: MeshHarness, method: str, request: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await router_call(h, method, request)
    return refused.value


def signal_of(name: str, content_type: str, data: bytes) -> lifetime_pb2.Signal:
    return lifetime_pb2.Signal(
        name=name, payload=payload_pb2.Payload(content_type=content_type, inline=data)
    )


async def waiting_lifetime(h: MeshHarness, name: str, goal: Any = None) -> LifetimeHandle:
    """A started lifetime whose plan waits for signal "go", then completes with its payload
    (its length, for bytes)."""

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> str:
        return "drafted"

    @plan(name="decide")
    async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if ctx.signal is None:
            return wait_for("go")
        payload = ctx.signal.payload
        return complete(len(payload) if isinstance(payload, bytes) else payload)

    await h.worker([work, decide])
    graph = await h.register(two_step_graph(name))
    handle = await h.start(graph, goal)
    async with asyncio.timeout(10):
        while (await handle.describe()).state != "waiting":  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return handle


async def test_a_signal_its_content_type_cannot_decode_is_refused_and_the_wait_goes_on(
    start_mesh: MeshFactory,
) -> None:
    """Bytes that are not what their content type says were accepted; the plan then could
    not decode them and the lifetime failed, the signal lost."""
    h = await start_mesh()
    handle = await waiting_lifetime(h, "bad-signal")
    for content_type, data in BAD_PAYLOADS:
        refused = await refusal(
            h,
            "SignalLifetime",
            pb.SignalLifetimeRequest(
                lifetime_id=handle.id, signal=signal_of("go", content_type, data)
            ),
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (content_type, refused)
        assert "signal.payload" in (refused.details() or ""), refused.details()
        assert (await handle.describe()).state == "waiting"
    # Bytes any content type but these declares are the sender's to interpret.
    woken = await router_call(
        h,
        "SignalLifetime",
        pb.SignalLifetimeRequest(
            lifetime_id=handle.id, signal=signal_of("go", "application/json", b'{"ok": true}')
        ),
    )
    assert woken.lifetime.state == lifetime_pb2.LIFETIME_STATE_RUNNING
    assert await handle.result(within=10) == {"ok": True}


async def test_a_start_input_its_content_type_cannot_decode_is_refused_before_any_lifetime(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    graph = await h.register(two_step_graph("bad-input"))
    for content_type, data in BAD_PAYLOADS:
        refused = await refusal(
            h,
            "StartLifetime",
            pb.StartLifetimeRequest(
                graph_id=graph.id,
                input=payload_pb2.Payload(content_type=content_type, inline=data),
                client_request_id=f"bad {content_type}",
            ),
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (content_type, refused)
        assert "input" in (refused.details() or ""), refused.details()
    assert await h.lifetime_ids() == []


async def completed_origin(h: MeshHarness, name: str) -> tuple[LifetimeHandle, str]:
    """A completed lifetime of ``two_step_graph`` and the execution id of its task."""

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> Any:
        return "done"

    @plan(name="decide")
    async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        output = inputs[0].output
        return complete(len(output) if isinstance(output, bytes) else output)

    await h.worker([work, decide])
    graph = await h.register(two_step_graph(name))
    handle = await h.start(graph, None)
    assert await handle.result(within=10) == "done"
    [work_record] = [r for r in await h.stored(handle.id) if record_of(r).header.node.id == "work"]
    return handle, record_of(work_record).header.execution_id


async def test_a_fork_replacement_its_content_type_cannot_decode_is_refused_before_any_fork(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    origin, execution = await completed_origin(h, "bad-replacement")
    for content_type, data in BAD_PAYLOADS:
        refused = await refusal(
            h,
            "ForkLifetime",
            pb.ForkLifetimeRequest(
                lifetime_id=origin.id,
                execution_id=execution,
                replacement_output=payload_pb2.Payload(content_type=content_type, inline=data),
            ),
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (content_type, refused)
        assert "replacement_output" in (refused.details() or ""), refused.details()
    assert await h.lifetime_ids() == [origin.id]


async def test_a_signal_payload_over_the_inline_limit_is_refused_by_name(
    start_mesh: MeshFactory,
) -> None:
    """The plan's request carries the signal inline beside its goal and inputs, each
    within the inline limit; a signal was refused only past the 1 MiB envelope, by the
    envelope's size ("ExecutionEnvelope is N bytes"), and one between the two accepted."""
    h = await start_mesh()
    handle = await waiting_lifetime(h, "large-signal")
    for size in (INLINE_LIMIT + 1, 2 << 20):
        refused = await refusal(
            h,
            "SignalLifetime",
            pb.SignalLifetimeRequest(
                lifetime_id=handle.id,
                signal=signal_of("go", "application/octet-stream", b"x" * size),
            ),
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (size, refused)
        details = refused.details() or ""
        assert "signal.payload" in details, details
        assert f"{INLINE_LIMIT}-byte" in details, details
        assert (await handle.describe()).state == "waiting"
    await router_call(
        h,
        "SignalLifetime",
        pb.SignalLifetimeRequest(
            lifetime_id=handle.id,
            signal=signal_of("go", "application/octet-stream", b"x" * INLINE_LIMIT),
        ),
    )
    assert await handle.result(within=10) == INLINE_LIMIT


async def test_a_signal_that_would_outgrow_the_lifetime_state_is_refused_by_name(
    start_mesh: MeshFactory,
) -> None:
    """Within the inline limit, a signal to a lifetime whose goal is as large would make
    the state (the goal, the plan's request with goal and signal, the signal's event)
    larger than one message: the refusal names the signal's payload among the sizes."""
    h = await start_mesh()
    handle = await waiting_lifetime(h, "large-goal", b"g" * INLINE_LIMIT)
    refused = await refusal(
        h,
        "SignalLifetime",
        pb.SignalLifetimeRequest(
            lifetime_id=handle.id,
            signal=signal_of("go", "application/octet-stream", b"x" * INLINE_LIMIT),
        ),
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    details = refused.details() or ""
    assert "the lifetime's state would be" in details, details
    assert "signal.payload is 262144 bytes inline" in details, details
    assert (await handle.describe()).state == "waiting"


async def test_a_fork_replacement_over_the_inline_limit_is_refused_by_name(
    start_mesh: MeshFactory,
) -> None:
    """The fork's first state holds the replacement four times (kept for its replay, on its
    STARTED event, in the plan's inputs and in its request), so one of the inline limit
    does not fit in it either: that refusal names the field too."""
    h = await start_mesh()
    origin, execution = await completed_origin(h, "large-replacement")
    for size in (INLINE_LIMIT + 1, 2 << 20):
        refused = await refusal(
            h,
            "ForkLifetime",
            pb.ForkLifetimeRequest(
                lifetime_id=origin.id,
                execution_id=execution,
                replacement_output=payload_pb2.Payload(
                    content_type="application/octet-stream", inline=b"x" * size
                ),
            ),
        )
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (size, refused)
        details = refused.details() or ""
        assert "replacement_output" in details, details
        assert f"{INLINE_LIMIT}-byte" in details, details
    refused = await refusal(
        h,
        "ForkLifetime",
        pb.ForkLifetimeRequest(
            lifetime_id=origin.id,
            execution_id=execution,
            replacement_output=payload_pb2.Payload(
                content_type="application/octet-stream", inline=b"x" * INLINE_LIMIT
            ),
        ),
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert "replacement_output is 262144 bytes inline" in (refused.details() or "")
    assert await h.lifetime_ids() == [origin.id]
    forked = await origin.fork(execution, replacement=b"x" * (INLINE_LIMIT // 2))
    assert await forked.result(within=10) == INLINE_LIMIT // 2


async def test_replay_of_a_lifetime_aborted_while_paused_with_a_step_held_reproduces_it(
    start_mesh: MeshFactory,
) -> None:
    """A task finished while the lifetime was paused: the plan it leads to was decided and
    held, and the abort dropped it unpublished. Replay, which knew nothing of the pause,
    dispatched that plan and reported it as a step the recorded lifetime never ran."""
    h = await start_mesh()
    started = asyncio.Event()
    release = asyncio.Event()
    decided: list[int] = []

    @task(name="work")
    async def work(ctx: TaskContext, value: Any) -> str:
        started.set()
        await release.wait()
        return "held"

    @plan(name="decide")
    async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        decided.append(ctx.iteration)
        return complete(inputs[0].output)

    await h.worker([work, decide])
    graph = await h.register(two_step_graph("pause-hold-abort"))
    handle = await h.start(graph, None)
    async with asyncio.timeout(10):
        await started.wait()
    assert (await handle.pause("look")).state == "paused"
    release.set()
    # The task's record is routed while paused: the plan is decided and held.
    async with asyncio.timeout(10), closing(handle.watch()) as events:
        async for event in events:
            if event.kind == "step_finished" and event.node_id == "work":
                break
    assert (await handle.abort("never mind")).state == "aborted"
    report = await h.audit(handle.id)
    assert report.by_node == {"work": 1}
    assert decided == []

    replayed = await handle.replay(handlers=[work, decide])
    assert replayed.reproduced, replayed.divergences


async def test_a_start_request_id_cannot_take_a_fork_request_id_for_its_own(
    start_mesh: MeshFactory,
) -> None:
    """A fork claims its client_request_id as "fork:<id>", in the keys a start claims its
    own with as they are: StartLifetime(client_request_id="fork:k1") answered with the
    fork made with "k1" (created false), and a fork with "k1" after such a start answered
    with the started lifetime, forking nothing."""
    h = await start_mesh()
    origin, execution = await completed_origin(h, "request-ids")
    forked = await router_call(
        h,
        "ForkLifetime",
        pb.ForkLifetimeRequest(
            lifetime_id=origin.id, execution_id=execution, client_request_id="k1"
        ),
    )
    assert forked.lifetime.fork_origin.lifetime_id == origin.id
    graph = forked.lifetime.graph
    refused = await refusal(
        h,
        "StartLifetime",
        pb.StartLifetimeRequest(
            graph_id=graph.id, graph_version=graph.version, client_request_id="fork:k1"
        ),
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert "client_request_id" in (refused.details() or ""), refused.details()
    assert sorted(await h.lifetime_ids()) == sorted([origin.id, forked.lifetime.lifetime_id])
    # Any other id, a fork's own among them, still starts (once).
    for request_id in ("k1", "fork-k1", "Fork:k1"):
        started = await router_call(
            h,
            "StartLifetime",
            pb.StartLifetimeRequest(
                graph_id=graph.id, graph_version=graph.version, client_request_id=request_id
            ),
        )
        assert started.created, request_id
        again = await router_call(
            h,
            "StartLifetime",
            pb.StartLifetimeRequest(
                graph_id=graph.id, graph_version=graph.version, client_request_id=request_id
            ),
        )
        assert not again.created
        assert again.lifetime.lifetime_id == started.lifetime.lifetime_id

    # A start of an earlier version may hold such a key: a fork with its id is refused
    # rather than answered with that lifetime.
    kv = await h.js.key_value(h.names.router_bucket)
    await kv.create(request_key("fork:k2"), started.lifetime.lifetime_id.encode())
    before = await h.lifetime_ids()
    refused = await refusal(
        h,
        "ForkLifetime",
        pb.ForkLifetimeRequest(
            lifetime_id=origin.id, execution_id=execution, client_request_id="k2"
        ),
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused
    assert started.lifetime.lifetime_id in (refused.details() or ""), refused.details()
    assert await h.lifetime_ids() == before


async def test_a_call_that_loses_every_compare_and_set_race_answers_aborted(
    start_mesh: MeshFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Processor.apply gives up after MAX_CAS_RETRIES conflicting writes; its ConflictError
    answered INTERNAL (logged as unexpected), where the caller should retry: ABORTED."""
    h = await start_mesh()
    handle = await waiting_lifetime(h, "contended")
    # Another writer moves the lifetime on behind the router's cached revision, and the
    # router tries once: its write conflicts, and it gives up.
    monkeypatch.setattr(processor, "MAX_CAS_RETRIES", 1)
    kv = await h.js.key_value(h.names.router_bucket)
    entry = await kv.get(f"lt.{handle.id}")
    assert entry.value is not None
    await kv.put(f"lt.{handle.id}", entry.value)
    refused = await refusal(h, "PauseLifetime", pb.PauseLifetimeRequest(lifetime_id=handle.id))
    assert refused.code() == grpc.StatusCode.ABORTED, refused
    assert "retry" in (refused.details() or ""), refused.details()
    assert (await handle.describe()).state == "waiting"
    unexpected = [r.getMessage() for r in caplog.records if "unexpected error" in r.getMessage()]
    assert unexpected == []
    # The retry the status asks for reads the lifetime afresh and succeeds.
    assert (await handle.pause("again")).state == "paused"
