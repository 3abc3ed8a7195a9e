"""A Python-registered graph whose tasks run partly in Node.js executors, partly in a Python
Worker: the Node executor holding a task is SIGKILLed mid-task and another Node instance
finishes it; payloads cross the language boundary both ways and decode identically.

Needs the compiled TypeScript SDK (``npm run build -w @tickmesh/sdk``; ``make test-node`` does it).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support.audit import record_of, task_status
from tests.support.mesh import MeshFactory
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    Retry,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
)

ROOT = Path(__file__).resolve().parents[2]
TS_EXECUTOR = ROOT / "sdk/typescript/dist/sdk/typescript/examples/polyglot.js"
TEXT = "héllo wörld — tickmesh ✓ 🚀"
N_BYTES = 5000


def _digest(text: str) -> dict[str, Any]:
    data = text.encode()
    return {
        "text": text,
        "sha256": hashlib.sha256(data).hexdigest(),
        "length": len(data),
        "upper": text.upper(),
    }


def _expected_bytes(n: int) -> bytes:
    return bytes((i * 7) % 256 for i in range(n))


async def _start_node(
    node: str, target: str, tenant: str, markers: Path
) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.update(TICKMESH_POOL=target, TICKMESH_TENANT=tenant, TICKMESH_MARKERS=str(markers))
    return await asyncio.create_subprocess_exec(
        node,
        str(TS_EXECUTOR),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _wait_for_marker(markers: Path, within: float) -> Path:
    loop = asyncio.get_running_loop()
    until = loop.time() + within
    while True:
        found = sorted(await asyncio.to_thread(lambda: list(markers.glob("ts-1-*"))))
        if found:
            return found[0]
        if loop.time() > until:
            raise AssertionError(f"no Node executor started ts_digest within {within}s")
        await asyncio.sleep(0.05)


async def test_a_graph_runs_across_python_and_node_executors_and_survives_a_killed_node(
    start_mesh: MeshFactory, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: this test needs Node.js >= 20", pytrace=False)
    if not TS_EXECUTOR.exists():
        pytest.fail(
            f"{TS_EXECUTOR.relative_to(ROOT)} is missing: build the TypeScript SDK first "
            "(npm ci && npm run build -w @tickmesh/sdk, or make test-node)",
            pytrace=False,
        )
    h = await start_mesh()
    markers = tmp_path / "markers"
    markers.mkdir()
    python_ran: list[int] = []

    @task(name="py_digest")
    async def py_digest(ctx: TaskContext, value: dict[str, Any]) -> dict[str, Any]:
        python_ran.append(ctx.attempt)
        return {**_digest(value["text"]), "pid": os.getpid(), "attempt": ctx.attempt}

    @plan(name="poly_plan")
    async def poly_plan(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if not inputs:
            return dispatch(
                step("ts", {"text": goal["text"]}),
                step("py", {"text": goal["text"]}),
                step("blob", {"n": goal["n"]}),
            )
        by_node = {i.node_id: i for i in inputs}
        raw = by_node["blob"].output
        assert isinstance(raw, bytes), f"ts_bytes decoded as {type(raw).__name__}"
        return complete(
            {
                "ts": by_node["ts"].output,
                "py": by_node["py"].output,
                "statuses": sorted(f"{i.node_id}:{i.status}" for i in inputs),
                "blob_sha256": hashlib.sha256(raw).hexdigest(),
                "blob_len": len(raw),
            }
        )

    graph = await h.register(
        GraphBuilder("polyglot")
        .plan("plan", "poly_plan")
        .task("ts", "ts_digest", timeout=30, retry=Retry(max_attempts=3, initial_backoff=0.05))
        .task("py", "py_digest", timeout=30)
        .task("blob", "ts_bytes", timeout=30)
        .edge("plan", "ts")
        .edge("plan", "py")
        .edge("plan", "blob")
        .edge("ts", "plan")
        .edge("py", "plan")
        .edge("blob", "plan")
        .final("plan")
        .build()
    )
    await h.worker([poly_plan, py_digest])
    procs = [await _start_node(node, h.mesh.pool_target, h.tenant, markers) for _ in range(2)]
    try:
        # Let both Node executors connect before work arrives.
        await asyncio.sleep(1.0)
        for proc in procs:
            assert proc.returncode is None, "a Node executor exited early"
        handle = await h.start(graph, {"text": TEXT, "n": N_BYTES})

        marker = await _wait_for_marker(markers, within=15)
        victim_pid = int(marker.name.split("-")[-1])
        [victim] = [p for p in procs if p.pid == victim_pid]
        [survivor] = [p for p in procs if p.pid != victim_pid]
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        assert victim.returncode == -signal.SIGKILL

        output = await handle.result(within=30)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                async with asyncio.timeout(10):
                    await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()

    expected = _digest(TEXT)
    ts, py = output["ts"], output["py"]
    # The Node instance that survived finished the killed task, at the second attempt.
    assert ts["pid"] == survivor.pid
    assert ts["attempt"] == 2
    assert py["pid"] == os.getpid()
    # Same bytes in, same digests out, whichever language decoded and encoded them.
    assert {k: ts[k] for k in expected} == expected
    assert {k: py[k] for k in expected} == expected
    assert output["statuses"] == ["blob:succeeded", "py:succeeded", "ts:succeeded"]
    assert output["blob_len"] == N_BYTES
    assert output["blob_sha256"] == hashlib.sha256(_expected_bytes(N_BYTES)).hexdigest()
    assert python_ran == [1]
    assert sorted(p.name for p in markers.iterdir()) == [marker.name]

    report = await h.audit(handle.id)
    [stored] = report.of_node("ts")
    assert record_of(stored).header.attempt == 2
    assert task_status(stored) == "succeeded"
    executor = record_of(stored).executor
    assert "node" in executor.runtime, executor
    blob_record = report.of_node("blob")[0].task_execution
    assert blob_record.result.output.sha256 == hashlib.sha256(_expected_bytes(N_BYTES)).hexdigest()
    assert report.by_node == {"plan": 2, "ts": 1, "py": 1, "blob": 1}
