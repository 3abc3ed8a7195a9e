"""Lifetime control end to end: approvals, wait timeouts, fork and replay."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import examples.coding_agent.handlers as coding
from tests.support.audit import closing, record_of
from tests.support.mesh import Handler, MeshFactory, MeshHarness
from tickmesh.cli.main import main as cli
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    LifetimeFailedError,
    LifetimeHandle,
    PlanContext,
    PlanInputView,
    TaskContext,
    ValidationError,
    complete,
    dispatch,
    load_graph_file,
    plan,
    step,
    task,
    wait_for,
)
from tickmesh.sdk.approvals import approval, approval_of
from tickmesh.v1 import graph_pb2

logger = logging.getLogger(__name__)
CODING = Path(__file__).resolve().parents[2] / "examples" / "coding_agent" / "graph.yaml"
CODING_HANDLERS: list[Handler] = [
    coding.parse_request,
    coding.coding_planner,
    coding.llm_codegen,
    coding.assembler,
    coding.validate_code,
    coding.reviewer,
]


async def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(cli, list(argv), out)
    return code, out.getvalue()


async def wait_state(handle: LifetimeHandle, state: str, within: float = 5.0) -> None:
    async with asyncio.timeout(within), closing(handle.watch()) as events:
        async for event in events:
            if event.kind == "state_changed" and event.state == state:
                return


def approval_graph(name: str = "approval") -> graph_pb2.AgentGraph:
    return (
        GraphBuilder(name)
        .task("draft")
        .plan("review")
        .edge("draft", "review")
        .final("review")
        .build()
    )


@task
async def draft(ctx: TaskContext, value: Any) -> str:
    return f"draft of {value}"


def reviewer_plan(timeout: float | None, on_timeout: str) -> Any:
    @plan(name="review")
    async def review(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        decided = approval_of(ctx)
        if decided is None:
            return approval(
                prompt=f"ship {inputs[0].output}?",
                timeout=timeout,
                on_timeout=on_timeout,  # type: ignore[arg-type]
            )
        return complete(
            {
                "approved": decided.approved,
                "by": decided.approver,
                "timed_out": decided.timed_out,
            }
        )

    return review


async def test_approval_wait_then_cli_signal_completes(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    await h.worker([draft, reviewer_plan(None, "fail")])
    graph = await h.register(approval_graph())
    handle = await h.start(graph, "v1")
    await wait_state(handle, "waiting")
    info = await handle.describe()
    assert info.raw.waiting_signal == "approval"

    loop = asyncio.get_running_loop()
    sent = loop.time()
    code, text = await run_cli(
        "signal",
        handle.id,
        "approval",
        "--data",
        '{"approved": true, "comment": "ok"}',
        "--approver",
        "ada",
        "--router",
        h.mesh.router_target,
        "--tenant",
        h.tenant,
    )
    assert code == 0, text
    assert "RUNNING" in text
    assert await handle.result(within=10) == {"approved": True, "by": "ada", "timed_out": False}
    logger.info("signal (CLI) -> completed: %.1f ms", (loop.time() - sent) * 1000)
    report = await h.audit(handle.id)
    assert report.by_node == {"draft": 1, "review": 2}
    assert len(report.events_of("signal_received")) == 1


async def test_signal_to_next_dispatch_latency(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    await h.worker([draft, reviewer_plan(None, "fail")])
    graph = await h.register(approval_graph())
    samples: list[float] = []
    for n in range(10):
        handle = await h.start(graph, n)
        await wait_state(handle, "waiting")
        loop = asyncio.get_running_loop()
        started = loop.time()
        info = await handle.signal("approval", {"approved": True}, approver="ada")
        samples.append(loop.time() - started)
        assert info.state == "running"  # the plan's request is published before the reply
        await handle.result(within=10)
    samples.sort()
    logger.info("SignalLifetime -> next dispatch: p50 %.1f ms", samples[len(samples) // 2] * 1000)


async def test_wait_timeout_delivers_the_default_signal(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    await h.worker([draft, reviewer_plan(0.3, "signal")])
    graph = await h.register(approval_graph())
    handle = await h.start(graph, "v1")
    output = await handle.result(within=10)
    assert output == {"approved": False, "by": "", "timed_out": True}
    report = await h.audit(handle.id)
    assert report.by_node == {"draft": 1, "review": 2}
    assert not report.events_of("signal_received")


async def test_wait_timeout_fails_the_lifetime(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    await h.worker([draft, reviewer_plan(0.3, "fail")])
    graph = await h.register(approval_graph())
    handle = await h.start(graph, "v1")
    with pytest.raises(LifetimeFailedError):
        await handle.result(within=10)
    info = await handle.describe()
    assert info.state == "failed"
    assert info.raw.error.type == "WaitTimeout"
    await h.audit(handle.id)


async def test_wait_timeout_survives_a_router_restart(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    await h.worker([draft, reviewer_plan(1.5, "fail")])
    graph = await h.register(approval_graph())
    handle = await h.start(graph, "v1")
    await wait_state(handle, "waiting")
    router = h.mesh.router
    assert router is not None
    assert router.timers is not None
    # A restarted router loses its timers; the start-up scan arms them again.
    await router.timers.stop()
    assert await router.timers.scan(h.tenant) == 1
    async with asyncio.timeout(10):
        while (await handle.describe()).state != "failed":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert (await handle.describe()).raw.error.type == "WaitTimeout"


def chat_graph() -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("chat", max_iterations=100)
        .task("open")
        .plan("chat")
        .edge("open", "chat")
        .final("chat")
        .build()
    )


async def test_many_large_signals_keep_the_state_small_and_replay_and_fork(
    start_mesh: MeshFactory,
) -> None:
    """A lifetime woken by more signal data than one NATS message holds: the router's
    state keeps none of it (it failed with StateTooLarge when the state kept each signal),
    and replay and fork read the signals back from the stored events."""
    h = await start_mesh()
    turns, size = 24, 60_000  # 1.4 MB of signals: over the state's ~1 MB limit

    @task(name="open")
    async def open_(ctx: TaskContext, value: Any) -> int:
        return 0

    @plan(name="chat")
    async def chat(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if ctx.signal is not None and ctx.signal.payload["n"] == turns - 1:
            heard = ctx.signal.payload
            return complete(
                {"turns": ctx.iteration - 1, "n": heard["n"], "size": len(heard["text"])}
            )
        return wait_for("message")

    await h.worker([open_, chat])
    graph = await h.register(chat_graph())
    handle = await h.start(graph, None)
    assert h.mesh.router is not None
    tenant = h.mesh.router.processor.tenants[h.tenant]
    with pytest.raises(ValidationError, match="signal_id has 257 characters; at most 256"):
        await handle.signal("message", {"n": 0, "text": ""}, signal_id="x" * 257)
    sizes = []
    for n in range(turns):
        async with asyncio.timeout(10):
            while (await handle.describe()).state != "waiting":  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        text = chr(ord("a") + n % 26) * size
        await handle.signal("message", {"n": n, "text": text}, signal_id=f"turn-{n}")
        loaded = await tenant.store.load(handle.id, fresh=True)
        assert loaded is not None
        sizes.append(loaded.state.ByteSize())
    assert await handle.result(within=10) == {"turns": turns, "n": turns - 1, "size": size}
    # The state holds each turn's signal until the plan's request is out (its outbox),
    # never all of them: it does not grow with the turns.
    assert max(sizes) < 3 * size, sizes
    assert sizes[-1] < sizes[0] + 4096, sizes
    final = await tenant.store.load(handle.id, fresh=True)
    assert final is not None
    assert (final.state.wake_count, len(final.state.wakes)) == (turns, 0)
    assert list(final.state.signal_ids) == [f"turn-{n}" for n in range(turns)]
    report = await h.audit(handle.id)
    received = report.events_of("signal_received")
    # Each signal is stored whole in its event, which names the plan execution that waited.
    sent = [json.loads(e.raw.signal.payload.inline) for e in received]
    assert [(m["n"], len(m["text"])) for m in sent] == [(n, size) for n in range(turns)]
    waited = {
        record_of(r).header.execution_id
        for r in await h.stored(handle.id)
        if record_of(r).header.node.id == "chat"
    }
    assert {e.execution_id for e in received} <= waited
    assert len({e.execution_id for e in received}) == turns

    # Replay reads the signals back from the store and reproduces every decision.
    replayed = await handle.replay(handlers=[open_, chat])
    assert replayed.reproduced, replayed.divergences
    # A fork at the tenth turn's plan re-drives the first ten signals and goes on from there.
    records = await h.stored(handle.id)
    tenth = next(
        record_of(r).header
        for r in records
        if record_of(r).header.node.id == "chat" and record_of(r).header.iteration == 10
    )
    forked = await handle.fork(tenth.execution_id)
    info = await forked.describe()
    assert info.state == "waiting"
    await forked.signal("message", {"n": turns - 1, "text": "fin"})
    assert await forked.result(within=10) == {"turns": 10, "n": turns - 1, "size": 3}
    fork_replayed = await forked.replay(handlers=[open_, chat])
    assert fork_replayed.reproduced, fork_replayed.divergences


# --- fork -----------------------------------------------------------------------------


def loop_graph() -> graph_pb2.AgentGraph:
    return (
        GraphBuilder("counter")
        .task("seed")
        .plan("loop")
        .task("step")
        .edge("seed", "loop")
        .edge("loop", "step")
        .edge("step", "loop")
        .final("loop")
        .build()
    )


async def test_fork_from_the_third_iteration_of_a_loop_runs_only_later_steps(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    runs: Counter[tuple[str, str, int]] = Counter()

    @task(name="seed")
    async def seed(ctx: TaskContext, value: Any) -> int:
        runs[(ctx.lifetime_id, ctx.node_id, ctx.iteration)] += 1
        return 0

    @task(name="step")
    async def step_(ctx: TaskContext, value: int) -> int:
        runs[(ctx.lifetime_id, ctx.node_id, ctx.iteration)] += 1
        return value + 1

    @plan(name="loop")
    async def loop_(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        runs[(ctx.lifetime_id, ctx.node_id, ctx.iteration)] += 1
        value = inputs[0].output
        if value >= 5:
            return complete({"value": value, "loops": ctx.iteration})
        return dispatch(step("step", value))

    await h.worker([seed, step_, loop_])
    graph = await h.register(loop_graph())
    origin = await h.start(graph, None)
    assert await origin.result(within=10) == {"value": 5, "loops": 6}
    records = await h.stored(origin.id)
    third = next(
        record_of(r).header
        for r in records
        if record_of(r).header.node.id == "step" and record_of(r).header.iteration == 3
    )
    before_fork = {
        (record_of(r).header.node.id, record_of(r).header.iteration)
        for r in records[: records.index(next(r for r in records if record_of(r).header == third))]
    } | {("step", 3)}
    executed_before = sum(runs.values())

    loop = asyncio.get_running_loop()
    started = loop.time()
    forked = await origin.fork(third.execution_id, replacement=-2)
    logger.info("fork of %d records: %.1f ms", len(records), (loop.time() - started) * 1000)
    info = await forked.describe()
    assert info.raw.fork_origin.lifetime_id == origin.id
    assert info.raw.fork_origin.execution_id == third.execution_id
    # -2 -> ... -> 5 takes 7 more steps; loop iterations 4..11.
    assert await forked.result(within=10) == {"value": 5, "loops": 11}

    # Zero re-executions: nothing before the fork point ran again, in any lifetime.
    in_fork = Counter((node, it) for (lid, node, it), n in runs.items() if lid == forked.id)
    assert not set(in_fork) & before_fork
    assert all(n == 1 for n in runs.values())
    assert sum(runs.values()) - executed_before == sum(in_fork.values()) == 8 + 7
    fork_records = await h.stored(forked.id)
    assert min(record_of(r).header.iteration for r in fork_records) == 4
    first = min(fork_records, key=lambda r: r.store_sequence)
    assert list(record_of(first).header.parent_execution_ids) == [third.execution_id]

    # Replaying the fork re-drives the origin up to the fork point, with the replacement,
    # then the fork's own records.
    replayed = await forked.replay(handlers=[seed, step_, loop_])
    assert replayed.reproduced, replayed.divergences
    assert replayed.decisions_checked >= len(fork_records)

    # The trace shows the lineage; the CLI can fork too.
    code, text = await run_cli(
        "trace",
        forked.id,
        "--router",
        h.mesh.router_target,
        "--state",
        h.mesh.state_target,
        "--tenant",
        h.tenant,
    )
    assert code == 0, text
    assert f"forked from {origin.id} at execution {third.execution_id}" in text
    code, text = await run_cli(
        "fork",
        origin.id,
        third.execution_id,
        "--router",
        h.mesh.router_target,
        "--tenant",
        h.tenant,
    )
    assert code == 0, text
    assert f"forked from {origin.id}" in text


# --- replay ---------------------------------------------------------------------------


async def _coding_lifetimes(h: MeshHarness, count: int) -> tuple[graph_pb2.AgentGraph, list[str]]:
    await h.worker(CODING_HANDLERS, concurrency=32)
    graph = await h.register(load_graph_file(CODING))
    modules = [["parser", "lexer"], ["io"], ["parser", "lexer", "emit"]]
    handles = [
        await h.start(graph, {"task": f"task {n}", "modules": modules[n % 3]}) for n in range(count)
    ]
    async with asyncio.timeout(60):
        for handle in handles:
            while (await handle.describe()).state != "completed":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    return graph, [handle.id for handle in handles]


async def test_replay_of_20_coding_agent_lifetimes_reproduces_every_decision(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    _, ids = await _coding_lifetimes(h, 20)
    results = await asyncio.gather(*(h.client.replay(i) for i in ids))
    for lifetime_id, result in zip(ids, results, strict=True):
        assert result.reproduced, (lifetime_id, result.divergences)
        stored = await h.stored(lifetime_id)
        assert result.decisions_checked >= len({record_of(r).header.execution_id for r in stored})
    code, text = await run_cli(
        "replay",
        ids[0],
        "--router",
        h.mesh.router_target,
        "--state",
        h.mesh.state_target,
        "--tenant",
        h.tenant,
    )
    assert code == 0, text
    assert "reproduced" in text


async def test_replay_after_a_graph_change_reports_the_first_divergence(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    graph, [lifetime_id] = await _coding_lifetimes(h, 1)
    source = CODING.read_text().replace("max_iterations: 12", "max_iterations: 2")
    v2 = await h.register(source)
    assert v2.version == graph.version + 1

    result = await h.client.replay(lifetime_id, graph_version=v2.version)
    assert not result.reproduced
    assert result.graph_version == v2.version
    first = result.divergences[0]
    assert first.message.startswith(f"graph digest changed: recorded v{graph.version}")
    assert "max_iterations 2" in first.actual

    changed_handler = CODING.read_text().replace("handler: validate_code", "handler: lint_code")
    v3 = await h.register(changed_handler)
    result = await h.client.replay(lifetime_id, graph_version=v3.version)
    assert not result.reproduced
    assert result.divergences[0].node_id == "validate"
    assert "the handler changed" in result.divergences[0].message

    code, text = await run_cli(
        "replay",
        lifetime_id,
        "--graph-version",
        str(v3.version),
        "--router",
        h.mesh.router_target,
        "--tenant",
        h.tenant,
    )
    assert code == 1
    assert "DIVERGED" in text
    assert "expected:" in text


async def test_replay_with_changed_handler_code_names_the_handler(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    h = await start_mesh()
    _, [lifetime_id] = await _coding_lifetimes(h, 1)
    result = await h.client.replay(lifetime_id, handlers=CODING_HANDLERS)
    assert result.reproduced, result.divergences

    # Same name, other code: the records were written by the code above.
    @plan(name="coding_planner")
    async def coding_planner_v2(
        ctx: PlanContext, goal: Any, inputs: list[PlanInputView]
    ) -> Decision:
        return complete("nothing to do")

    others = [h for h in CODING_HANDLERS if h.name != "coding_planner"]
    result = await h.client.replay(lifetime_id, handlers=[*others, coding_planner_v2])
    assert not result.reproduced
    [changed] = result.divergences
    assert changed.message.startswith("handler code changed: coding_planner recorded ")
    assert changed.node_id == "plan"
    assert changed.expected == coding.coding_planner.code_digest
    assert changed.actual == coding_planner_v2.code_digest

    # The CLI loads handler modules as `tickmesh run --handlers` does.
    target = ("--router", h.mesh.router_target, "--tenant", h.tenant)
    code, text = await run_cli(
        "replay", lifetime_id, "--handlers", str(CODING.with_name("handlers.py")), *target
    )
    assert code == 0, text
    assert "reproduced" in text
    edited = tmp_path / "handlers.py"
    edited.write_text(
        "from tickmesh.sdk import complete, plan\n\n\n"
        '@plan(name="coding_planner")\n'
        "async def coding_planner(ctx, goal, inputs):\n"
        '    return complete("nothing to do")\n'
    )
    code, text = await run_cli("replay", lifetime_id, "--handlers", str(edited), *target)
    assert code == 1, text
    assert "handler code changed: coding_planner" in text
