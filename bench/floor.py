"""`python -m bench.floor`: the unbatched floor, measured on the same machine.

Per step: a JetStream publish that waits for its PubAck (the request), a push consumer
delivering it (consume), one SQLite append (one row, one transaction, synchronous=FULL,
WAL, like the state store), and the ack; then the chain's next step is published. M chains
run concurrently (closed loop over L chains of N steps). Nothing is batched: this is the
naive design that tickmesh must beat.

Protocol with the parent: prints ``ready`` once set up, waits for a line on stdin, runs,
prints one JSON line with the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from .stats import summarize

STREAM = "BENCH_FLOOR"
SUBJECT = "benchfloor"


def open_db(path: Path) -> sqlite3.Connection:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE steps (seq INTEGER PRIMARY KEY AUTOINCREMENT, chain TEXT NOT NULL,"
        " step INTEGER NOT NULL, at INTEGER NOT NULL, body BLOB NOT NULL,"
        " UNIQUE (chain, step))"
    )
    return conn


async def run(args: argparse.Namespace) -> dict[str, Any]:
    conn = open_db(Path(args.db))
    db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor-sqlite")

    def append(chain: str, step: int, body: bytes) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO steps (chain, step, at, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (chain, step) DO NOTHING",
            (chain, step, time.time_ns(), body),
        )
        conn.execute("COMMIT")

    nc = await nats.connect(args.nats_url, name="bench-floor")
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[f"{SUBJECT}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    loop = asyncio.get_running_loop()
    steps, lifetimes, concurrency = args.steps, args.lifetimes, args.concurrency
    padding = b"x" * args.payload_bytes
    received: dict[str, list[float]] = {}
    chain_done: dict[str, asyncio.Future[None]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Msg) -> None:
        now = time.perf_counter()
        chain, _, rest = msg.data.partition(b":")
        step = int(rest.split(b":", 1)[0])
        name = chain.decode()
        received[name].append(now)
        await loop.run_in_executor(db_thread, append, name, step, msg.data)
        if step + 1 < steps:
            await js.publish(f"{SUBJECT}.{name}", chain + b":%d:" % (step + 1) + padding)
            await msg.ack()
        else:
            await msg.ack()
            chain_done[name].set_result(None)

    async def on_msg(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await js.subscribe(
        f"{SUBJECT}.>",
        durable="floor",
        cb=on_msg,
        manual_ack=True,
        config=ConsumerConfig(ack_wait=60, max_ack_pending=100_000),
        pending_msgs_limit=1_000_000,
    )
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.readline)

    todo = iter(range(lifetimes))

    async def lane() -> None:
        for n in todo:
            name = f"c{n}"
            received[name] = []
            chain_done[name] = loop.create_future()
            await js.publish(f"{SUBJECT}.{name}", name.encode() + b":0:" + padding)
            await chain_done[name]

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, lifetimes)))))
    wall = time.perf_counter() - start
    gaps = [(b - a) * 1000.0 for times in received.values() for a, b in itertools.pairwise(times)]
    total = sum(len(t) for t in received.values())
    stored = conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    await nc.close()
    db_thread.shutdown()
    conn.close()
    return {
        "concurrency": concurrency,
        "lifetimes": lifetimes,
        "steps": total,
        "stored": stored,
        "wall_s": wall,
        "steps_per_s": stored / wall if wall > 0 else 0.0,
        "gap_ms": summarize(gaps),
        "cpu_s_self": time.process_time(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lifetimes", type=int, default=20)
    parser.add_argument("--payload-bytes", type=int, default=400)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if args.no_uvloop:
        result = asyncio.run(run(args))
    else:
        import uvloop

        result = uvloop.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
