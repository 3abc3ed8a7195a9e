"""`python -m bench.meshproc`: the four services in one process (``tickmesh.embedded.Mesh``)
on a NATS server the benchmark started. Prints the targets as one JSON line, then serves
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from tickmesh.embedded import Mesh, MeshConfig


async def serve(args: argparse.Namespace) -> None:
    config = MeshConfig(
        data_dir=Path(args.data_dir),
        tenants=(args.tenant,),
        nats_url=args.nats_url,
        router_port=args.router_port,
        pool_port=args.pool_port,
        store_url=args.store_url,
        blob_url=args.blob_url,
        usage_counter_url=args.usage_counter_url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Mesh(config) as mesh:
        sys.stdout.write(
            json.dumps(
                {
                    "router": mesh.router_target,
                    "pool": mesh.pool_target,
                    "state": mesh.state_target,
                    "guardrail": mesh.guardrail_target,
                    "state_db": str(mesh.data_dir / "state.db"),
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.meshproc")
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--router-port", type=int, default=0)
    parser.add_argument("--pool-port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--store-url", help="postgresql:// DSN (cloud profile)")
    parser.add_argument("--blob-url", help="s3:// blob URL (cloud profile)")
    parser.add_argument("--usage-counter-url", help="redis:// usage counters (cloud profile)")
    args = parser.parse_args()
    if args.no_uvloop:
        asyncio.run(serve(args))
    else:
        import uvloop

        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
