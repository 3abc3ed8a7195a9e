"""`python -m bench.worker`: one executor process serving the benchmark handlers.

Prints ``ready`` on stdout once the executor pool has welcomed it; SIGTERM drains it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tickmesh.sdk import Worker

from .handlers import HANDLERS


async def serve(pool: str, tenant: str, concurrency: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Worker(pool, tenant=tenant, tasks=HANDLERS, concurrency=concurrency) as worker:
        async with asyncio.timeout(30):
            await worker.wait_connected()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("--pool", required=True, help="executor pool host:port")
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    coro = serve(args.pool, args.tenant, args.concurrency)
    if args.no_uvloop:
        asyncio.run(coro)
    else:
        import uvloop

        uvloop.run(coro)


if __name__ == "__main__":
    main()
