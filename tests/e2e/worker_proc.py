"""A Worker in its own process, for tests that kill executors.

    python -m tests.e2e.worker_proc <pool target> <tenant> <marker dir>

It serves the task ``blocker``: each attempt touches ``<marker dir>/subprocess-<attempt>``
and then blocks for a minute (the test SIGKILLs the process meanwhile); should it
ever finish, it touches ``subprocess-done``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from tickmesh.sdk import TaskContext, Worker, task


async def main(target: str, tenant: str, markers: Path) -> None:
    @task(name="blocker")
    async def blocker(ctx: TaskContext, value: Any) -> dict[str, Any]:
        (markers / f"subprocess-{ctx.attempt}").touch()
        await asyncio.sleep(60)
        (markers / "subprocess-done").touch()
        return {"attempt": ctx.attempt, "pid": "subprocess"}

    async with Worker(target, tenant=tenant, tasks=[blocker]):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
