"""The hello graph's executor as a process of its own: serves greet, decide and shout.

    TICKMESH_POOL=HOST:PORT TICKMESH_TENANT=acme python -m examples.hello.worker

It follows the contract of every executor process (``tickmesh run --executor``, the compose
stack in deploy/compose): the executor pool's gRPC address comes in ``TICKMESH_POOL`` and the
tenant in ``TICKMESH_TENANT``. It serves until SIGTERM or SIGINT, then lets running work finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from tickmesh.sdk import Worker

from .handlers import decide, greet, shout

logger = logging.getLogger(__name__)


async def serve(pool: str, tenant: str) -> None:
    """Serve the hello handlers for ``tenant`` through the pool at ``pool`` until signalled."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Leaving the block shuts the worker down: no new work, running work finishes.
    async with Worker(
        pool, tenant=tenant, tasks=[greet, decide, shout], labels={"example": "hello"}
    ):
        logger.info("serving greet, decide and shout for %s through %s", tenant, pool)
        await stop.wait()


def main() -> int:
    pool = os.environ.get("TICKMESH_POOL", "")
    tenant = os.environ.get("TICKMESH_TENANT", "")
    if not pool or not tenant:
        sys.stderr.write("TICKMESH_POOL and TICKMESH_TENANT must be set\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(pool, tenant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
