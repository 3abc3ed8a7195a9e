"""Failing work end to end: retries then a dead letter, and a killed executor."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.audit import record_of, task_status
from tests.support.graphs import plan_task_loop
from tests.support.mesh import MeshFactory
from tickmesh.runtime.subjects import HDR_REASON
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    LifetimeFailedError,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    TaskError,
    complete,
    decode_envelope,
    dispatch,
    plan,
    step,
    task,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]


async def test_usage_that_cannot_be_summed_fails_its_attempt_and_the_store_goes_on(
    start_mesh: MeshFactory,
) -> None:
    """A task reporting 2**63 - 1 tokens (the next sum would overflow every int64 counter:
    the router's totals, the store's, Redis') or a negative cost (a spend below a cap)
    fails its attempt, not retried, saying which figure; the plan sees the failure, the
    work request is dead-lettered, and the state service goes on storing records: a
    well-behaved lifetime's usage is counted after it."""
    h = await start_mesh()

    @task(name="spend")
    async def spend(ctx: TaskContext, usage: dict[str, Any]) -> str:
        reported: dict[str, Any] = {k: float(v) if v == "nan" else v for k, v in usage.items()}
        ctx.report(**reported)  # (a NaN cannot travel in the JSON input: it is named there)
        return "spent"

    @plan(name="judge_spend")
    async def judge(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if not inputs:
            return dispatch(step("spend", goal))
        result = inputs[0]
        return complete([result.status, result.error_type, result.error_message])

    await h.worker([spend, judge])
    retry = Retry(max_attempts=3, initial_backoff=0.01)
    graph = await h.register(
        plan_task_loop("spending", "judge_spend", "spend", max_iterations=4, retry=retry)
    )
    refused = {
        "input_tokens": {"input_tokens": 2**63 - 1},
        "cost_micros": {"cost_micros": -5},
        "output_tokens": {"output_tokens": 2**41, "model": "big"},
        "custom_metrics['score']": {"score": "nan"},
    }
    for field, usage in refused.items():
        handle = await h.start(graph, usage)
        status, error_type, message = await handle.result(within=15)
        assert (status, error_type) == ("failed", "InvalidResult"), (field, message)
        assert message.startswith(f"telemetry.{field} is "), message

    fine = await h.start(graph, {"input_tokens": 7, "cost_micros": 3})
    assert await fine.result(within=15) == ["succeeded", "", ""]
    await h.records_stored()  # the store took every record, the refused ones' included
    info = await h.client.get_lifetime(fine.id)
    assert (info.input_tokens, info.cost_micros) == (7, 3)
    letters = await h.stream_messages(h.names.dlq_stream, h.names.dlq("work"))
    reasons = sorted((m.headers or {})[HDR_REASON] for m in letters)
    assert len(reasons) == len(refused)
    assert all(r.startswith("InvalidResult: telemetry.") for r in reasons), reasons


async def test_a_decision_whose_state_cannot_be_written_fails_its_lifetime_once(
    start_mesh: MeshFactory,
) -> None:
    """A plan dispatching 3,000 steps at once makes a lifetime state of about 2 MB, over
    what one NATS message carries: the write can never succeed. The lifetime fails, saying
    so, instead of its plan record being redelivered and decided again for ever; the same
    graph with 300 steps still runs."""
    h = await start_mesh()

    @plan(name="fan_out")
    async def fan_out(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if inputs:
            return complete(sum(1 for i in inputs if i.succeeded))
        return dispatch(*(step("branch", n) for n in range(goal)))

    @task(name="branch")
    async def branch(ctx: TaskContext, n: int) -> int:
        return n

    await h.worker([fan_out, branch])
    graph = await h.register(plan_task_loop("wide", "fan_out", "branch", max_iterations=10_000))
    too_wide = await h.start(graph, 3_000)
    with pytest.raises(LifetimeFailedError) as failed:
        await too_wide.result(within=15)
    assert "a decision was refused: the lifetime's state would be" in failed.value.detail
    assert "one NATS message may carry" in failed.value.detail
    assert "3,000 executions in flight" in failed.value.detail
    await h.wait_stream_empty(h.names.exec_stream)  # the plan's record is done with
    report = await h.audit(too_wide.id)
    assert report.of_node("branch") == []  # nothing of the refused decision ran

    wide = await h.start(graph, 300)
    assert await wide.result(within=30) == 300


async def test_a_wait_no_deadline_can_hold_fails_the_lifetime_at_once(
    start_mesh: MeshFactory,
) -> None:
    """wait_for(timeout=1e12 s): its deadline is past the year 9999, which no timestamp
    holds. The lifetime fails saying so (it used to raise on every redelivery of the
    plan's record, the lifetime running for ever)."""
    h = await start_mesh()

    @plan(name="patient")
    async def patient(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return wait_for("go", timeout=goal)

    await h.worker([patient])
    graph = await h.register(
        GraphBuilder("patience").plan("wait", handler="patient").final("wait").build()
    )
    handle = await h.start(graph, 1e12)
    with pytest.raises(LifetimeFailedError) as failed:
        await handle.result(within=10)
    assert "asked to wait for 'go' with a timeout of 1e+12 s" in failed.value.detail
    await h.wait_stream_empty(h.names.exec_stream)


async def test_a_failing_task_is_retried_then_dead_lettered(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    attempts: list[int] = []
    seen: list[PlanInputView] = []

    @task
    async def flaky(ctx: TaskContext, value: Any) -> None:
        attempts.append(ctx.attempt)
        raise TaskError("boom", retryable=True)

    @plan
    async def judge(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        seen.extend(inputs)
        result = inputs[0]
        return complete({"status": result.status, "error": result.error_message})

    await h.worker([flaky, judge])
    graph = await h.register(
        GraphBuilder("retry")
        .task(
            "flaky",
            retry=Retry(max_attempts=3, initial_backoff=0.01, max_backoff=0.05),
        )
        .plan("judge")
        .edge("flaky", "judge")
        .final("judge")
        .build()
    )

    handle = await h.start(graph, {"x": 1})
    output = await handle.result(within=10)

    assert output == {"status": "failed", "error": "boom"}
    assert attempts == [1, 2, 3]
    assert [(i.node_id, i.status, i.error_type) for i in seen] == [("flaky", "failed", "TaskError")]
    report = await h.audit(handle.id)
    # Only the attempt that ended the step is recorded.
    [stored] = report.of_node("flaky")
    assert record_of(stored).header.attempt == 3
    assert task_status(stored) == "failed"
    assert stored.task_execution.result.error.message == "boom"

    letters = await h.stream_messages(h.names.dlq_stream, h.names.dlq("work"))
    assert len(letters) == 1
    headers = letters[0].headers or {}
    assert "boom" in headers[HDR_REASON]
    assert headers["Tickmesh-Attempt"] == "3"
    request = decode_envelope(letters[0].data, expected_kind="task_request")
    assert request.header.execution_id == record_of(stored).header.execution_id


async def _wait_for(path: Path, proc: asyncio.subprocess.Process, within: float) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while not await asyncio.to_thread(path.exists):
        if proc.returncode is not None:
            raise AssertionError(f"the worker process exited early with {proc.returncode}")
        if loop.time() > until:
            raise AssertionError(f"{path} did not appear within {within}s")
        await asyncio.sleep(0.05)


async def test_an_executor_killed_mid_task_is_replaced_and_the_step_runs_once(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    h = await start_mesh()
    markers = tmp_path / "markers"
    markers.mkdir()
    completions: list[int] = []

    @task(name="blocker")
    async def blocker(ctx: TaskContext, value: Any) -> dict[str, Any]:
        (markers / f"in-process-{ctx.attempt}").touch()
        completions.append(ctx.attempt)
        return {"attempt": ctx.attempt, "pid": os.getpid()}

    @plan
    async def finish(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return complete(inputs[0].output)

    graph = await h.register(
        GraphBuilder("killed")
        .task("blocker", timeout=30)
        .plan("finish")
        .edge("blocker", "finish")
        .final("finish")
        .build()
    )
    await h.worker([finish])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.worker_proc",
        h.mesh.pool_target,
        h.tenant,
        str(markers),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        handle = await h.start(graph, {"job": 1})
        await _wait_for(markers / "subprocess-1", proc, within=10)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        _, stderr = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode(errors="replace")

    await h.worker([blocker])
    output = await handle.result(within=10)

    assert output == {"attempt": 2, "pid": os.getpid()}
    assert completions == [2]
    assert sorted(p.name for p in markers.iterdir()) == ["in-process-2", "subprocess-1"]
    assert not (markers / "subprocess-done").exists()
    report = await h.audit(handle.id)
    [stored] = report.of_node("blocker")
    assert record_of(stored).header.attempt == 2
    assert task_status(stored) == "succeeded"
    assert report.by_node == {"blocker": 1, "finish": 1}
