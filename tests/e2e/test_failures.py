"""Failing work end to end: retries then a dead letter, and a killed executor."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tests.support.audit import record_of, task_status
from tests.support.mesh import MeshFactory
from tickmesh.runtime.subjects import HDR_REASON
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    TaskError,
    complete,
    decode_envelope,
    plan,
    task,
)

ROOT = Path(__file__).resolve().parents[2]


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
