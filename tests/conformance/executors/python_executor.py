"""The conformance executor in Python: serves the fixed handler set of
tests/conformance/PROTOCOL.md with the SDK's Worker.

    TICKMESH_POOL=host:port TICKMESH_TENANT=t python -m tests.conformance.executors.python_executor
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from tickmesh.sdk import (
    Decision,
    PlanContext,
    PlanInputView,
    TaskContext,
    TaskError,
    Worker,
    complete,
    dispatch,
    plan,
    step,
    task,
)
from tickmesh.sdk.codecs import Payload


@task(name="conf_echo")
async def conf_echo(ctx: TaskContext, value: Payload) -> Payload:
    """Echo the input byte for byte, content type included."""
    return value


@task(name="conf_sleep")
async def conf_sleep(ctx: TaskContext, value: Any) -> dict[str, Any]:
    """Sleep value["ms"] milliseconds (cancellation interrupts the sleep)."""
    ms = int((value or {}).get("ms", 0))
    await asyncio.sleep(ms / 1000)
    return {"slept": ms, "attempt": ctx.attempt}


@task(name="conf_fail")
async def conf_fail(ctx: TaskContext, value: Any) -> None:
    raise TaskError(
        "conformance failure", type="ConformanceError", retryable=False, details={"input": value}
    )


@task(name="conf_big")
async def conf_big(ctx: TaskContext, value: Any) -> bytes:
    """value["bytes"] bytes of output: byte i is i % 256."""
    n = int((value or {}).get("bytes", 0))
    return bytes(i % 256 for i in range(n))


@plan(name="conf_plan")
async def conf_plan(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    """Dispatch node "work" once with the goal; then complete with its output."""
    if not inputs:
        return dispatch(step("work", goal))
    first = inputs[0]
    if first.succeeded:
        return complete(first.output)
    return complete(
        {
            "status": first.status,
            "error_type": first.error_type,
            "error_message": first.error_message,
        }
    )


async def main() -> None:
    target = os.environ.get("TICKMESH_POOL", "")
    tenant = os.environ.get("TICKMESH_TENANT", "")
    if not target or not tenant:
        sys.exit("TICKMESH_POOL and TICKMESH_TENANT must be set")
    worker = Worker(
        target,
        tenant=tenant,
        tasks=[conf_echo, conf_sleep, conf_fail, conf_big, conf_plan],
        concurrency=int(os.environ.get("TICKMESH_CONCURRENCY", "4")),
        labels={"conformance": "python"},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
